"""Arms with their own DPO pairs (``dpo:best_worst``), tokens processed per arm, and the per-error-type
assessment: single-error probe captions, their accuracies (length-normalised where lengths differ), and
generation fact F1 per fact group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

from rankloss.reference import losses as R  # noqa: E402

from rankloss.synthetic import (  # noqa: E402
    DEGRADATIONS,
    PROBE_GROUPS,
    caption,
    group_fact_scores,
    probe_captions,
    probe_chain,
    random_scene,
)
from rankloss.train.config import Arm, TrainConfig, parse_arms  # noqa: E402
from rankloss.train.data import (  # noqa: E402
    IGNORE_INDEX,
    VideoChain,
    collate_chains,
    global_batch_indices,
    make_collator,
    synthetic_chains,
    synthetic_frames,
)
from rankloss.train.evaluate import ProbeSet, probe_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_video_rank.py"


# ------------------------------------------------------------------------------------------------------
# The arm grammar


def test_arm_grammar_names_specs_and_titles():
    arms = parse_arms("plackett_luce, dpo:best_worst, dpo, plackett_luce:frozen, sft, dpo:all:frozen")
    assert arms == (
        Arm("plackett_luce"),
        Arm("dpo", pairs="best_worst"),
        Arm("dpo"),
        Arm("plackett_luce", True),
        Arm("sft"),
        Arm("dpo", True, "all"),
    )
    assert [a.name for a in arms] == [
        "plackett_luce",
        "dpo_best_worst",
        "dpo",
        "plackett_luce_frozen",
        "sft_control",
        "dpo_all_frozen",
    ]
    assert [a.spec for a in arms][1::4] == ["dpo:best_worst", "dpo:all:frozen"]
    assert parse_arms([a.spec for a in arms]) == arms
    assert arms[1].title() == "DPO (one pair: best vs worst)"
    assert arms[2].title() == "DPO (adjacent)"  # today's title of the default arm, unchanged
    assert arms[2].title("best_worst") == "DPO (one pair: best vs worst)"
    assert arms[1].title("all") == "DPO (one pair: best vs worst)"  # the arm's own pairs win
    cfg = TrainConfig(arms=tuple(a.spec for a in arms))
    assert cfg.loss_options(arms[1])["pairs"] == "best_worst"
    assert cfg.loss_options(arms[2])["pairs"] == "adjacent"
    assert TrainConfig(pairs="all").loss_options(arms[1])["pairs"] == "best_worst"
    assert TrainConfig(pairs="all").loss_options(arms[2])["pairs"] == "all"


@pytest.mark.parametrize(
    "text,message",
    [
        ("dpo:bad", "pairs must be one of"),
        ("plackett_luce:best_worst", "applies to dpo arms only"),
        ("sft:adjacent", "applies to dpo arms only"),
        ("dpo:best_worst:all", "is not an arm"),
        ("dpo:frozen:best_worst", "is not an arm"),
        ("ppo", "is not an arm"),
        ("dpo:best_worst,dpo:best_worst", "names an arm twice"),
        ("", "is not an arm"),
    ],
)
def test_arm_grammar_errors_name_the_flag(text, message):
    with pytest.raises(ValueError, match=message) as exc:
        parse_arms(text)
    assert "--arms" in str(exc.value)


def test_pairs_flag_must_apply_to_some_dpo_arm():
    TrainConfig(arms=("dpo:best_worst", "dpo"), pairs="all", given=("pairs",)).validate()
    with pytest.raises(ValueError, match="--pairs applies to dpo arms without their own pairs"):
        TrainConfig(arms=("dpo:best_worst", "sft"), pairs="all", given=("pairs",)).validate()


# ------------------------------------------------------------------------------------------------------
# dpo:best_worst trains on one pair per chain


@pytest.fixture(scope="module")
def tiny():
    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config, train_tokenizer

    cfg = TrainConfig(num_videos=6, heldout=2, frames=4, frame_size=56, max_objects=2)
    chains = synthetic_chains(cfg)
    frames = synthetic_frames(cfg)
    tok = train_tokenizer([c for ch in chains for c in ch.captions], 400)
    processor = build_tiny_processor(tok, 56)
    mcfg = tiny_config(tok, hidden_size=32, num_layers=1, vision_depth=1, vision_hidden_size=32)
    model = build_tiny_model(mcfg, seed=0).double()
    return chains, frames, make_collator(processor), model


def test_dpo_best_worst_arm_loss_is_reference_dpo_on_one_pair_per_chain(tiny):
    from rankloss.integrations import ChainRankModel
    from rankloss.integrations.forward import LossSpec

    chains, frames, collator, model = tiny
    assert all(len(c.captions) == 4 for c in chains)  # so best_worst (1 pair) differs from adjacent (3)
    cfg = TrainConfig(arms=("dpo:best_worst", "dpo"), sft_weight=0.0)
    arm = parse_arms(cfg.arms)[0]
    spec = LossSpec(length_normalize=cfg.length_normalize, **cfg.loss_options(arm))
    g = torch.Generator().manual_seed(0)
    ref = {c.id: (torch.randn(4, generator=g) * 3 - 150, torch.ones(4, dtype=torch.long)) for c in chains}
    batch = collate_chains(collator, chains[:3], frames, ref_scores=ref)
    wrapper = ChainRankModel(model)
    with torch.no_grad():
        loss = wrapper(batch, mode="rank", spec=spec)["loss"].double()
        scores = wrapper(batch, mode="score")["scores"].double()
    sizes = batch["chain_sizes"].tolist()
    refs = batch["ref_scores"].double()
    expected = R.dpo_chain_loss(scores, sizes, refs, cfg.beta, pairs="best_worst")
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-9)
    assert R.chain_pairs(4, "best_worst") == [(0, 3)]
    adjacent = R.dpo_chain_loss(scores, sizes, refs, cfg.beta, pairs="adjacent")
    assert not torch.isclose(loss, adjacent, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------------
# Probes


def _word_count(text: str) -> int:
    return len(text.split())


def test_probes_have_one_error_of_their_kind_and_are_deterministic():
    substitutions = ("colour", "size", "shape", "count", "order")
    for i in range(40):
        scene = random_scene(i, max_objects=3)
        for kind in DEGRADATIONS:
            ch = probe_chain(scene, kind, seed=0, key=f"v{i}", length=_word_count)
            if ch is None:
                assert kind == "order" and len(scene.events) < 2
                continue
            assert ch.captions[0] == caption(scene)
            assert len(ch.edits) == 1 and (ch.edits[0].type, ch.edits[0].subtype) == DEGRADATIONS[kind]
            assert ch.captions[1] != ch.captions[0]
            if kind in substitutions:
                assert _word_count(ch.captions[1]) == _word_count(ch.captions[0]), (kind, ch.captions)
            again = probe_chain(scene, kind, seed=0, key=f"v{i}", length=_word_count)
            assert again.captions == ch.captions
        assert set(probe_captions(scene, seed=0, key=f"v{i}")) <= set(DEGRADATIONS)


def test_probes_are_token_length_matched_for_substitution_kinds():
    from rankloss.train.model import train_tokenizer

    # the default run's tokenizer: BPE with the default vocabulary cap, trained on the training captions
    cfg = TrainConfig(num_videos=300, max_objects=3)
    tok = train_tokenizer([c for ch in synthetic_chains(cfg) for c in ch.captions], cfg.vocab_size)

    def length(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    cfg = TrainConfig(num_videos=40, max_objects=3, data_seed=1)
    matched = {k: 0 for k in DEGRADATIONS}
    total = {k: 0 for k in DEGRADATIONS}
    for c in synthetic_chains(cfg):
        for kind in DEGRADATIONS:
            ch = probe_chain(c.scene, kind, seed=1, key=c.id, length=length)
            if ch is not None:
                total[kind] += 1
                matched[kind] += length(ch.captions[1]) == length(ch.captions[0])
    for kind in ("colour", "size", "shape", "count", "order"):
        assert matched[kind] == total[kind] > 0, kind
    assert matched["motion"] >= total["motion"] // 2  # some scenes allow only motions of another length
    assert matched["insertion"] == matched["omission"] == 0


def _hand_made_probes():
    a = VideoChain("probe:a", ["true a", "colour a", "motion a", "insertion a"])
    b = VideoChain("probe:b", ["true b", "colour b", "order b", "omission b"])
    kinds = {"probe:a": ["colour", "motion", "insertion"], "probe:b": ["colour", "order", "omission"]}
    scores = {
        # colour: same length, -10 > -12 (right); motion: -10 < -9 (wrong); insertion: longer, the sums say
        # right (-10 > -14) but per token -2 < -1.75 (wrong)
        "probe:a": (torch.tensor([-10.0, -12.0, -9.0, -14.0]), torch.tensor([5, 5, 5, 8])),
        # colour: a tie (wrong: strictly higher counts); order: right; omission: shorter, the sums say
        # wrong (-10 < -7) but per token -2 > -2.33 (right)
        "probe:b": (torch.tensor([-10.0, -10.0, -11.0, -7.0]), torch.tensor([5, 5, 5, 3])),
    }
    return ProbeSet([a, b], kinds), scores


def test_probe_accuracy_on_a_hand_made_case():
    probes, scores = _hand_made_probes()
    m = probe_metrics(probes, scores)
    assert m["probe_acc_colour"] == 0.5
    assert m["probe_acc_motion"] == 0.0 and m["probe_acc_order"] == 1.0
    assert m["probe_acc_insertion"] == 0.0 and m["probe_acc_omission"] == 1.0
    assert m["probe_acc_static"] == 0.5 and m["probe_acc_dynamic"] == 0.5
    assert (m["probe_n_static"], m["probe_n_dynamic"], m["probe_n_insertion"], m["probe_n_omission"]) == (
        2.0,
        2.0,
        1.0,
        1.0,
    )
    assert not any(k.startswith("probe_reward") for k in m)
    assert "probe_acc_size" not in m  # no probe of that kind

    ref = {
        "probe:a": (torch.tensor([-10.0, -10.0, -10.0, -10.0]), torch.tensor([5, 5, 5, 8])),
        "probe:b": (torch.tensor([-12.0, -9.0, -11.0, -9.0]), torch.tensor([5, 5, 5, 3])),
    }
    m = probe_metrics(probes, scores, ref)
    # rewards a: [0, -2, 1, -4] -> colour right, motion wrong, insertion 0/5 > -4/8 right
    # rewards b: [2, -1, 0, 2] -> colour right, order right, omission 2/5 < 2/3 wrong
    assert m["probe_reward_acc_colour"] == 1.0
    assert m["probe_reward_acc_motion"] == 0.0 and m["probe_reward_acc_order"] == 1.0
    assert m["probe_reward_acc_insertion"] == 1.0 and m["probe_reward_acc_omission"] == 0.0
    assert m["probe_reward_acc_static"] == 1.0 and m["probe_reward_acc_dynamic"] == 0.5
    # reference scores without the probes: no reward accuracies (not a partial mix)
    assert not any(k.startswith("probe_reward") for k in probe_metrics(probes, scores, {"x": ref["probe:a"]}))


def test_groups_cover_every_kind_once():
    kinds = [k for ks in PROBE_GROUPS.values() for k in ks]
    assert sorted(kinds) == sorted(DEGRADATIONS)


def test_generation_f1_by_fact_group():
    scene = next(s for s in (random_scene(i, max_objects=3) for i in range(100)) if len(s.events) >= 2)
    true = caption(scene)
    g = group_fact_scores(true, scene)
    assert g["static"].f1 == 1.0 and g["dynamic"].f1 == 1.0
    wrong_motion = probe_chain(scene, "motion", seed=0, key="x").captions[1]
    g = group_fact_scores(wrong_motion, scene)
    assert g["static"].f1 == 1.0 and g["dynamic"].f1 < 1.0
    wrong_colour = probe_chain(scene, "colour", seed=0, key="x").captions[1]
    assert group_fact_scores(wrong_colour, scene)["static"].f1 < 1.0


# ------------------------------------------------------------------------------------------------------
# A tiny run: tokens per arm, probe metrics in the records and the per-type table

TINY = [
    "--num-videos", "8", "--heldout", "2", "--chain-length", "3", "--frames", "4", "--max-objects", "2",
    "--hidden-size", "32", "--num-layers", "1", "--vision-depth", "1", "--vision-hidden-size", "32",
    "--vocab-size", "300", "--batch-size", "2", "--eval-batch-size", "4", "--max-new-tokens", "4",
    "--log-every", "1", "--no-progress", "--threads", "1", "--jobs", "1", "--seeds", "1",
    "--sft-steps", "2", "--rank-steps", "2", "--arms", "dpo:best_worst,plackett_luce,sft",
    "--vision-pretrain-steps", "3", "--vision-pretrain-batch-size", "4",  # stage 0 on by default (auto)
]  # fmt: skip


def test_tiny_run_counts_tokens_per_arm_and_reports_probes(tmp_path: Path):
    from rankloss.train.model import load_processor

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--output-dir", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    split = json.loads((out / "data" / "split.json").read_text())
    by_id = {c.id: c for c in synthetic_chains(cfg)}
    train = [by_id[i] for i in split["train"]]
    frames = synthetic_frames(cfg)
    collator = make_collator(load_processor(str(out / "processor")))

    def expected_tokens(task: str, steps: int, best_only: bool) -> int:
        n = 0
        for step in range(steps):
            idx = global_batch_indices(len(train), cfg.batch_size, step, cfg.seed, task)
            batch = collate_chains(collator, [train[i] for i in idx], frames, best_only=best_only)
            n += int(batch["prompt_attention_mask"].sum()) + int(
                (batch["completion_labels"] != IGNORE_INDEX).sum()
            )
        return n

    want = {
        "sft": expected_tokens("sft", 2, True),
        "dpo_best_worst": expected_tokens("dpo_best_worst", 2, False),
        "plackett_luce": expected_tokens("plackett_luce", 2, False),
        "sft_control": expected_tokens("sft_control", 2, True),
    }
    for task, n in want.items():
        done = json.loads((out / "seed0" / task / "done.json").read_text())
        assert done["final"]["tokens"] == n, task
        records = [
            json.loads(line) for line in (out / "seed0" / task / "metrics.jsonl").read_text().splitlines()
        ]
        train_tokens = [r["tokens"] for r in records if r["event"] == "train"]
        assert train_tokens[-1] == n and train_tokens == sorted(train_tokens)
    assert want["dpo_best_worst"] > want["sft_control"]  # a chain's captions, not just the best one

    final = json.loads((out / "seed0" / "dpo_best_worst" / "done.json").read_text())["final"]
    for group in PROBE_GROUPS:
        assert 0.0 <= final[f"probe_acc_{group}"] <= 1.0
        assert 0.0 <= final[f"probe_reward_acc_{group}"] <= 1.0
    assert final["probe_n_insertion"] == 2.0  # one insertion probe per held-out video
    assert "gen_f1_static" in final
    comparison = (out / "comparison.md").read_text()
    assert "DPO (one pair: best vs worst)" in comparison and "LLM tokens" in comparison
    assert "Held-out metrics per error type" in comparison and "static (reward)" in comparison
    assert "static (log-prob)" in (out / "summary.md").read_text()
    # the claims: claim 1's arms are in this run (one seed: nothing can be decided), claim 2's are not
    assert "**Claim 1" in comparison and "Claim 1: **undecided at this size** (1 seed)" in comparison
    assert "Claim 2" not in comparison
    # stage 0 ran by default (auto: the tiny model on synthetic videos), and SFT froze the tower
    assert cfg.vision_pretrain == "proxy"
    assert (out / "seed0" / "vision_pretrain" / "done.json").exists()
    assert (out / "claims.png").stat().st_size > 0  # the claims' plot: claim 1's two tests
