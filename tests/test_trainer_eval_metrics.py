"""ChainRankTrainer's assessment metrics (issue 23, part 1): the policy's own log-prob ranking (summed and
per token) beside the implicit-reward ranking, both with ties counted as half, so nothing reads 0 before
training; per edit type, per chain position and a length-matched view from the chain records' edits; the
SFT term logged on its own. Each value is checked against a brute-force computation from
``ChainForward.scores``."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from test_chain_trainer import Logs, config, records, tiny_lm  # noqa: E402
from test_chain_trainer import tok as tok  # noqa: E402,F401 - the module's tokenizer fixture

from rankloss.integrations import (  # noqa: E402
    CHAIN_KEYS,
    ChainCollator,
    ChainForward,
    ChainRankTrainer,
    load_chain_dataset,
)
from rankloss.integrations.trainer import LENGTH_MATCHED_TYPES, ranking_metrics  # noqa: E402

TYPES = ("object", "insertion", "count", "omission", "order", "attribute")


def with_edits(recs: list[dict]) -> list[dict]:
    """``recs`` with an ``edit_types`` entry per step, cycling through :data:`TYPES`."""
    out = []
    for i, r in enumerate(recs):
        k = len(r["completions"])
        out.append({**r, "edit_types": [TYPES[(i + j) % len(TYPES)] for j in range(k - 1)]})
    return out


def brute(values: list[float]) -> tuple[float, float, float]:
    """Pairwise accuracy, top-1 and Kendall tau of one chain, ties as half, by enumeration."""
    K = len(values)
    credit = conc = disc = 0.0
    n = 0
    for a in range(K):
        for b in range(a + 1, K):
            n += 1
            if values[a] > values[b]:
                credit, conc = credit + 1, conc + 1
            elif values[a] == values[b]:
                credit += 0.5
            else:
                disc += 1
    top = max(values)
    top1 = 1.0 / values.count(top) if values[0] == top else 0.0
    return credit / n, top1, (conc - disc) / n


def policy_scores(model, tok, data):
    s, n = ChainForward(model).scores(ChainCollator(tok, duplicates="keep")(data))
    sizes = [len(r["completions"]) for r in data]
    return [c.double().tolist() for c in torch.split(s, sizes)], [c.tolist() for c in torch.split(n, sizes)]


def test_ranking_metrics_count_ties_as_half():
    sizes = torch.tensor([3, 2, 4])
    v = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, 5.0, 5.0, 3.0, 7.0])
    m = ranking_metrics(v, sizes)
    assert m["pairwise_accuracy"].tolist() == [0.5, 0.5, pytest.approx(2.5 / 6)]
    assert m["top1_accuracy"].tolist() == [pytest.approx(1 / 3), 0.5, 0.0]
    assert m["kendall_tau"].tolist() == [0.0, 0.0, pytest.approx((2 - 3) / 6)]
    # adjacent pairs: (prev, this) for every row after a chain's first
    assert m["adjacent"].tolist() == [0, 0.5, 0.5, 0, 0.5, 0, 0.5, 1.0, 0.0]
    for c, chain in enumerate(torch.split(v, sizes.tolist())):
        acc, top1, tau = brute(chain.tolist())
        assert m["pairwise_accuracy"][c] == pytest.approx(acc)
        assert m["top1_accuracy"][c] == pytest.approx(top1)
        assert m["kendall_tau"][c] == pytest.approx(tau)


def test_before_training_implicit_rewards_read_half_and_logps_match_brute_force(tmp_path, tok):
    data = with_edits(records(9, seed=11))
    model = tiny_lm(tok, seed=3)
    trainer = ChainRankTrainer(
        model, config(tmp_path), train_dataset=data, eval_dataset=data, processing_class=tok
    )
    metrics = trainer.evaluate()
    # ref = the policy before training: every reward is 0, every pair a tie
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["eval_rewards/accuracies"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["eval_kendall_tau"] == pytest.approx(0.0, abs=1e-12)
    want_top1 = sum(1 / len(r["completions"]) for r in data) / len(data)
    assert metrics["eval_top1_accuracy"] == pytest.approx(want_top1, abs=1e-12)
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key

    scores, tokens = policy_scores(model, tok, data)
    for name, per_token in (("logps", False), ("logps_per_token", True)):
        rows = [brute([x / n if per_token else x for x, n in zip(s, t)]) for s, t in zip(scores, tokens)]
        for j, key in enumerate(("pairwise_accuracy", "top1_accuracy", "kendall_tau")):
            want = sum(r[j] for r in rows) / len(rows)
            assert metrics[f"eval_{name}/{key}"] == pytest.approx(want, abs=1e-6), (name, key)
    assert metrics["eval_logps/chosen"] == pytest.approx(sum(s[0] for s in scores) / len(scores), rel=1e-5)
    assert metrics["eval_logps/rejected"] == pytest.approx(
        sum(sum(s[1:]) / (len(s) - 1) for s in scores) / len(scores), rel=1e-5
    )
    # a random model does not rank its own chains by chance alone here: the metric is not a constant
    assert 0.0 < metrics["eval_logps/pairwise_accuracy"] < 1.0

    # per edit type, per position and length-matched, by brute force over adjacent pairs
    by_type: dict[str, list[float]] = {}
    by_pos: dict[int, list[float]] = {}
    for r, s in zip(data, scores):
        for k in range(1, len(s)):
            credit = 1.0 if s[k - 1] > s[k] else 0.5 if s[k - 1] == s[k] else 0.0
            by_type.setdefault(r["edit_types"][k - 1], []).append(credit)
            by_pos.setdefault(k + 1, []).append(credit)
    for t, credits in by_type.items():
        assert metrics[f"eval_logps/pair_accuracy/{t}"] == pytest.approx(
            sum(credits) / len(credits), abs=1e-6
        )
        assert metrics[f"eval_pairs/{t}"] == len(credits)
        # before training the implicit rewards tie on every pair
        assert metrics[f"eval_rewards/pair_accuracy/{t}"] == pytest.approx(0.5, abs=1e-12)
    for k, credits in by_pos.items():
        assert metrics[f"eval_logps/pair_accuracy/pos{k}"] == pytest.approx(
            sum(credits) / len(credits), abs=1e-6
        )
    matched = [c for t, cs in by_type.items() if t in LENGTH_MATCHED_TYPES for c in cs]
    assert metrics["eval_pairs/length_matched"] == len(matched)
    assert metrics["eval_logps/pair_accuracy/length_matched"] == pytest.approx(
        sum(matched) / len(matched), abs=1e-6
    )
    assert not any(k.startswith("eval_logps/pair_accuracy/") and k.endswith("spatial") for k in metrics)
    # the historic names stay
    assert metrics["eval_rewards/pos1"] == metrics["eval_reward_pos1"]


def test_reference_free_implicit_metrics_equal_the_log_prob_ones(tmp_path, tok):
    data = records(6, seed=2)
    model = tiny_lm(tok, seed=8)
    args = config(tmp_path, reference_free=True, beta=0.5)
    trainer = ChainRankTrainer(model, args, train_dataset=data, eval_dataset=data, processing_class=tok)
    metrics = trainer.evaluate()
    for key in ("pairwise_accuracy", "top1_accuracy", "kendall_tau"):
        assert metrics[f"eval_{key}"] == pytest.approx(metrics[f"eval_logps/{key}"], abs=1e-9)
    # records without edits: no per-type metric, the per-position ones still
    assert not any(k.startswith("eval_pairs/") for k in metrics)
    assert "eval_logps/pair_accuracy/pos2" in metrics


def test_length_normalised_training_recovers_the_summed_log_probs(tmp_path, tok):
    data = records(5, seed=4)
    model = tiny_lm(tok, seed=9)
    args = config(tmp_path, reference_free=True, length_normalize=True, beta=2.0)
    trainer = ChainRankTrainer(model, args, train_dataset=data, eval_dataset=data, processing_class=tok)
    metrics = trainer.evaluate()
    scores, tokens = policy_scores(model, tok, data)
    want = sum(brute(s)[0] for s in scores) / len(scores)
    assert metrics["eval_logps/pairwise_accuracy"] == pytest.approx(want, abs=1e-6)
    per_token = [[x / n for x, n in zip(s, t)] for s, t in zip(scores, tokens)]
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(
        sum(brute(s)[0] for s in per_token) / len(per_token), abs=1e-6
    )


def test_sft_term_is_logged_on_its_own(tmp_path, tok):
    data = records(8, seed=1)
    model = tiny_lm(tok, seed=2)
    logs = Logs()
    args = config(tmp_path, sft_weight=0.25, max_steps=1)
    trainer = ChainRankTrainer(
        model, args, train_dataset=data, eval_dataset=data, processing_class=tok, callbacks=[logs]
    )
    metrics = trainer.evaluate()
    scores, tokens = policy_scores(model, tok, data)
    want = sum(-s[0] / t[0] for s, t in zip(scores, tokens)) / len(scores)
    assert metrics["eval_sft_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_nll_loss"] == metrics["eval_sft_loss"]
    assert metrics["eval_chain_loss"] == pytest.approx(
        metrics["eval_rank_loss"] + 0.25 * metrics["eval_sft_loss"], rel=1e-9
    )
    trainer.train()
    step = [e for e in logs.logs if "chain_loss" in e and "eval_loss" not in e]
    assert step and all("sft_loss" in e and "nll_loss" in e and "rank_loss" in e for e in step)
    assert all("rewards/accuracies" in e and "logps/pairwise_accuracy" in e for e in step)
    # without the SFT term nothing is logged for it
    plain = ChainRankTrainer(
        tiny_lm(tok, seed=2),
        config(tmp_path, reference_free=True),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tok,
    ).evaluate()
    assert "eval_sft_loss" not in plain and "eval_nll_loss" not in plain


def test_chains_file_edits_reach_the_batch_aligned_with_kept_completions(tmp_path, tok):
    caps = ["a red circle moves left", "a red circle moves right", "a red circle moves right",
            "a blue circle moves right", "a blue circle moves right then stops"]  # fmt: skip
    recs = [
        {"id": "c0", "chain": caps, "edits": [
            {"step": 1, "type": "spatial", "before": "left", "after": "right"},
            {"step": 2, "type": "omission", "before": "", "after": ""},
            {"step": 3, "type": "attribute", "before": "red", "after": "blue"},
            {"step": 4, "type": "insertion", "before": "", "after": " then stops"},
        ]},
        {"id": "c1", "chain": caps[:2]},
    ]  # fmt: skip
    path = tmp_path / "chains.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = load_chain_dataset(path, chain_length=4)
    assert ds.column_names == ["id", "prompt", "videos", "completions", "edit_types"]
    assert ds[0]["edit_types"] == ["spatial", "omission", "attribute"]  # cut with the chain
    assert ds[1]["edit_types"] == []
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"id": r["id"], "chain": r["chain"]}) + "\n" for r in recs))
    assert "edit_types" not in load_chain_dataset(plain).column_names  # no edits: no column

    with pytest.warns(UserWarning, match="dropped"):
        batch = ChainCollator(tok)([ds[0], ds[1]])
    # caption 2 repeats caption 1 and is dropped: the kept rows are captions 0, 1, 3 and 0, 1
    assert batch["completion_index"].tolist() == [0, 1, 3, 0, 1]
    assert batch["chain_edit_types"] == [[None, "spatial", "attribute"], [None, None]]
    assert {"completion_index", "chain_edit_types"} <= set(CHAIN_KEYS)

    # the trainer counts (1, 3) as no adjacent pair: only the spatial edit is one edit apart
    model = tiny_lm(tok, seed=1)
    trainer = ChainRankTrainer(
        model, config(tmp_path, reference_free=True), train_dataset=ds, eval_dataset=ds, processing_class=tok
    )
    with pytest.warns(UserWarning, match="dropped"):
        metrics = trainer.evaluate()
    assert metrics["eval_pairs/spatial"] == 1 and "eval_pairs/attribute" not in metrics
    assert metrics["eval_pairs/length_matched"] == 1
    s, _ = ChainForward(model).scores(ChainCollator(tok, duplicates="keep")([ds[0]]))
    assert metrics["eval_logps/pair_accuracy/spatial"] == (1.0 if s[0] > s[1] else 0.0)


def test_record_edit_types_are_checked(tok):
    collate = ChainCollator(tok)
    with pytest.raises(ValueError, match=r"records\[0\]\['edit_types'\] has 1 types for 3 completions"):
        collate([{"completions": ["a red circle", "a blue circle", "a blue square"], "edit_types": ["x"]}])
    with pytest.raises(TypeError, match=r"records\[0\]\['edits'\]\[0\]"):
        collate([{"completions": ["a red circle", "a blue circle"], "edits": [{"type": "object"}]}])
    batch = collate(
        [{"completions": ["a red circle", "a blue circle"], "edits": [{"step": 1, "type": "attribute"}]}]
    )
    assert batch["chain_edit_types"] == [[None, "attribute"]]
