"""ChainRankTrainer edge cases (issue #21): the reference cache key covers the processor and every
collator setting; a damaged or mismatched cache warns, naming the file, and is recomputed; empty datasets
and max_steps=0 are refused; the reference pass runs under the training's autocast."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_chain_trainer import WORDS, Logs, config, records, tiny_lm  # noqa: E402

from rankloss.integrations import ChainCollator, ChainRankConfig, ChainRankTrainer  # noqa: E402
from rankloss.integrations.forward import ChainRankModel  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(WORDS + ["describe:"], 200)


@pytest.fixture
def score_calls(monkeypatch):
    """The reference passes run (ChainRankModel forwards in mode="score")."""
    calls = []
    original = ChainRankModel.forward

    def counting(self, batch, mode="rank", **kw):
        if mode == "score":
            calls.append(len(batch["chain_sizes"]))
        return original(self, batch, mode=mode, **kw)

    monkeypatch.setattr(ChainRankModel, "forward", counting)
    return calls


def cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "out" / "rankloss-ref").glob("ref-scores-*.pt"))


# ---------------------------------------------------------------------------------------------------------
# 2. the cache key covers the processor and the collator


def test_reference_cache_key_covers_the_processor(tmp_path, score_calls):
    import numpy as np

    from rankloss.train.model import build_tiny_model, build_tiny_processor, tiny_config

    captions = ["a red circle moves left", "a blue square moves up", "a green circle stops", "describe it"]
    vtok = train_tokenizer(captions, 300)
    cfg = tiny_config(vtok, hidden_size=32, num_layers=1, vision_depth=1, vision_hidden_size=32)
    rng = np.random.default_rng(0)
    data = [
        {
            "id": f"v{i}",
            "prompt": "describe it",
            "videos": [rng.integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)],
            "completions": captions[i % 3 : i % 3 + 2],
        }
        for i in range(3)
    ]
    args = config(tmp_path, max_steps=1)

    def scores(frame_size: int) -> list[list[float]]:
        trainer = ChainRankTrainer(
            build_tiny_model(cfg, seed=0),
            args,
            train_dataset=data,
            processing_class=build_tiny_processor(vtok, frame_size),
        )
        return trainer.train_dataset.scores

    small = scores(28)
    assert len(cache_files(tmp_path)) == 1 and score_calls
    score_calls.clear()
    large = scores(56)  # the same model and data, frames kept at 56 px instead of resized to 28 px
    assert score_calls, "the 56 px processor reused the 28 px processor's reference scores"
    assert len(cache_files(tmp_path)) == 2
    assert large != small
    score_calls.clear()
    assert scores(28) == small  # the same processor, rebuilt: the same cache file, no reference pass
    assert not score_calls
    assert len(cache_files(tmp_path)) == 2


def test_reference_cache_key_covers_every_collator_setting(tmp_path, tok):
    data = records(3)
    model = tiny_lm(tok)
    trainer = ChainRankTrainer(model, config(tmp_path), train_dataset=data, processing_class=tok)
    path = trainer._ref_cache_path(data, model)
    # a setting the old key left out, and one the collator may gain later: all init fields count
    trainer.data_collator = ChainCollator(tok, pad_to_multiple_of=8)
    assert trainer._ref_cache_path(data, model) != path
    trainer.data_collator = ChainCollator(tok)
    assert trainer._ref_cache_path(data, model) == path

    class Plain:  # not a dataclass: its public attributes count, and its class
        def __init__(self, size):
            self.inner = ChainCollator(tok)
            self.size = size

        def __call__(self, recs):
            return self.inner(recs)

    trainer.data_collator = Plain(1)
    first = trainer._ref_cache_path(data, model)
    assert first != path
    trainer.data_collator = Plain(2)
    assert trainer._ref_cache_path(data, model) != first
    trainer.data_collator = Plain(1)
    assert trainer._ref_cache_path(data, model) == first


# ---------------------------------------------------------------------------------------------------------
# 8. a damaged or mismatched cache warns, naming the file, and is recomputed


def _expect_recompute(trainer, data, path: Path, want, score_calls, match: str) -> None:
    score_calls.clear()
    with pytest.warns(UserWarning, match=match) as seen:
        got = trainer.reference_scores(data)
    assert any(str(path) in str(w.message) for w in seen), [str(w.message) for w in seen]
    assert got == want
    assert score_calls  # recomputed
    # and rewritten: the next call loads it
    score_calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert trainer.reference_scores(data) == want
    assert not score_calls


def test_damaged_or_mismatched_cache_is_recomputed(tmp_path, tok, score_calls):
    from rankloss.integrations.trainer import _scores_checksum

    data = records(4, seed=3)
    trainer = ChainRankTrainer(
        tiny_lm(tok, seed=4), config(tmp_path), train_dataset=data, processing_class=tok
    )
    (path,) = cache_files(tmp_path)
    want = trainer.train_dataset.scores
    good = path.read_bytes()

    path.write_bytes(good[: len(good) // 2])  # truncated: PytorchStreamReader failed
    _expect_recompute(trainer, data, path, want, score_calls, "cannot be read")
    path.write_bytes(b"")  # 0 bytes: EOFError with no message
    _expect_recompute(trainer, data, path, want, score_calls, "cannot be read")

    def write(scores, checksum=None):
        checksum = _scores_checksum(scores) if checksum is None else checksum
        torch.save({"scores": scores, "dataset": "train", "checksum": checksum}, path)

    write(want[:-1])  # loadable, one record short
    _expect_recompute(trainer, data, path, want, score_calls, "scores of 3 records but the dataset has 4")
    write([want[0][:-1]] + want[1:])  # one score short for record 0
    _expect_recompute(trainer, data, path, want, score_calls, r"record 0 \(id 'r0'\), which has")
    write([[math.nan] + want[0][1:]] + want[1:])
    _expect_recompute(trainer, data, path, want, score_calls, "non-finite")
    write([[x + 1.0 for x in want[0]]] + want[1:], checksum=_scores_checksum(want))
    _expect_recompute(trainer, data, path, want, score_calls, "checksum")
    torch.save({"scores": want}, path)  # no checksum
    _expect_recompute(trainer, data, path, want, score_calls, "checksum")


@pytest.fixture(scope="module")
def cached_trainer(tmp_path_factory, tok):
    tmp_path = tmp_path_factory.mktemp("damage")
    data = records(3, seed=7)
    trainer = ChainRankTrainer(
        tiny_lm(tok, seed=8), config(tmp_path), train_dataset=data, processing_class=tok
    )
    (path,) = cache_files(tmp_path)
    return trainer, data, path, path.read_bytes(), trainer.train_dataset.scores


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    damage=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 1.0), st.just(b"")),
        st.tuples(st.just("overwrite"), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=16)),
    )
)
def test_any_damage_to_the_cache_loads_or_recomputes_the_same_scores(cached_trainer, damage):
    trainer, data, path, good, want = cached_trainer
    kind, where, patch = damage
    at = min(int(where * len(good)), len(good) - 1)
    if kind == "truncate":
        damaged = good[:at]
    else:
        damaged = good[:at] + patch + good[at + len(patch) :]
        damaged = damaged[: len(good)]
    path.write_bytes(damaged)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = trainer.reference_scores(data)
    assert got == want
    messages = [str(w.message) for w in seen if "reference score cache" in str(w.message)]
    assert all(str(path) in m for m in messages)
    if damaged != good and kind == "truncate":
        assert messages  # a truncated zip never loads
    # the file holds the right scores again
    assert torch.load(path, weights_only=True)["scores"] == want
    path.write_bytes(good)


# ---------------------------------------------------------------------------------------------------------
# 9b. empty datasets; 10c. max_steps=0


def test_empty_datasets_are_refused_in_the_constructor(tmp_path, tok):
    args = config(tmp_path)
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 records\)"):
        ChainRankTrainer(tiny_lm(tok), args, train_dataset=[], processing_class=tok)
    with pytest.raises(ValueError, match=r"^eval_dataset is empty"):
        ChainRankTrainer(tiny_lm(tok), args, train_dataset=records(2), eval_dataset=[], processing_class=tok)
    with pytest.raises(ValueError, match=r"eval_dataset\['held'\] is empty"):
        ChainRankTrainer(
            tiny_lm(tok),
            args,
            train_dataset=records(2),
            eval_dataset={"ok": records(2), "held": []},
            processing_class=tok,
        )
    datasets = pytest.importorskip("datasets")
    empty = datasets.Dataset.from_list(records(2)).select([])
    with pytest.raises(ValueError, match="train_dataset is empty"):
        ChainRankTrainer(tiny_lm(tok), args, train_dataset=empty, processing_class=tok)


def test_max_steps_zero_is_refused(tmp_path):
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"max_steps={bad}: .*max_steps=-1 .*positive"):
            ChainRankConfig(output_dir=str(tmp_path), max_steps=bad)
    assert ChainRankConfig(output_dir=str(tmp_path), max_steps=-1).max_steps == -1
    assert ChainRankConfig(output_dir=str(tmp_path), max_steps=3).max_steps == 3


# ---------------------------------------------------------------------------------------------------------
# 10b. the reference pass runs under the training's autocast


def test_bf16_first_step_rewards_are_zero(tmp_path, tok):
    data = records(4, seed=1)
    logs = Logs()
    args = config(
        tmp_path,
        max_steps=1,
        bf16=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        train_sampling_strategy="sequential",
    )
    model = tiny_lm(tok, seed=2)  # fp32 weights
    trainer = ChainRankTrainer(model, args, train_dataset=data, processing_class=tok, callbacks=[logs])
    assert trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    (step,) = [entry for entry in logs.logs if "reward_pos1" in entry]
    rewards = [v for k, v in step.items() if k.startswith("reward_pos")]
    assert len(rewards) >= 2
    # ~1e-4 when the reference pass ran in fp32; what is left is a few fp32 ulps of the scores (~20 here)
    # between the score and the rank paths, as without bf16
    assert max(abs(r) for r in rewards) < 5e-6, step
    # a different precision is a different cache file
    assert len(cache_files(tmp_path)) == 1
    ChainRankTrainer(tiny_lm(tok, seed=2), config(tmp_path), train_dataset=data, processing_class=tok)
    assert len(cache_files(tmp_path)) == 2


# ---------------------------------------------------------------------------------------------------------
# the reference pass scores every completion, duplicates included (the collator may drop them in training)


def test_reference_pass_scores_duplicate_completions(tmp_path, tok):
    data = records(3, seed=2)
    data[1] = {**data[1], "completions": [data[1]["completions"][0]] * 2 + data[1]["completions"][1:]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ChainRankTrainer(
            tiny_lm(tok), config(tmp_path, max_steps=1), train_dataset=data, processing_class=tok
        )
        assert [len(s) for s in trainer.train_dataset.scores] == [len(r["completions"]) for r in data]
        trainer.train()


# ---------------------------------------------------------------------------------------------------------
# 7. every record is checked before the reference pass; what cannot be ranked is skipped and counted


def test_records_that_cannot_be_ranked_are_skipped_before_the_reference_pass(tmp_path, tok, score_calls):
    """A K=1 record crashed training at step 3, after the whole reference pass, naming no record."""
    data = records(6, seed=3)
    data[2] = {**data[2], "completions": data[2]["completions"][:1]}  # K = 1
    data[4] = {**data[4], "completions": [data[4]["completions"][0]] * 3}  # one distinct completion
    logs = Logs()
    match = (r"train_dataset: skipped 2 of 6 record\(s\) with fewer than 2 distinct "
             r"completions.*2 \(id 'r2'\): 1, 4 \(id 'r4'\): 1")  # fmt: skip
    with pytest.warns(UserWarning, match=match):
        trainer = ChainRankTrainer(
            tiny_lm(tok), config(tmp_path, max_steps=3, per_device_train_batch_size=2), train_dataset=data,
            processing_class=tok, callbacks=[logs],
        )  # fmt: skip
    summary = trainer.record_summary["train_dataset"]
    assert summary["records"] == 6 and summary["skipped_records"] == 2
    assert summary["skipped"] == [(2, "r2"), (4, "r4")]
    assert summary["dropped_completions"] == 0  # the skipped record's duplicates are not counted twice
    assert len(trainer.train_dataset) == 4
    assert sum(score_calls) == 4  # the reference pass scored the 4 records kept
    trainer.train()
    assert trainer.state.global_step == 3


def test_a_bad_record_stops_the_run_before_the_reference_pass(tmp_path, tok, score_calls):
    data = records(5, seed=4)
    data[3] = {**data[3], "completions": [data[3]["completions"][0], 17]}
    with pytest.raises(TypeError, match=r"train_dataset record 3 \(id 'r3'\) is not a usable chain record: "
                       r"records\[3\]\['completions'\]\[1\] must be a non-empty string"):  # fmt: skip
        ChainRankTrainer(tiny_lm(tok), config(tmp_path), train_dataset=data, processing_class=tok)
    assert score_calls == []
    with pytest.raises(ValueError, match=r"eval_dataset: none of its 1 records has 2 distinct completions"):
        ChainRankTrainer(
            tiny_lm(tok), config(tmp_path), train_dataset=records(2), processing_class=tok,
            eval_dataset=[{"id": "e", "prompt": "describe:", "completions": ["a red", "a red"]}],
        )  # fmt: skip


def test_truncation_duplicates_are_dropped_counted_and_logged(tmp_path, tok):
    """Cut to 2 tokens, completions that share their first words become one; the chain keeps its order,
    the reference scores stay aligned, and the logs count the completions dropped."""
    data = [
        {"id": f"t{i}", "prompt": "describe: a red circle",
         "completions": ["a red circle moves left", "a red square moves up", "a blue circle stops",
                         "a blue square turns"]}
        for i in range(4)
    ]  # fmt: skip
    logs = Logs()
    match = (r"8 completion\(s\) of 4 record\(s\) are token-identical after "
             r"max_completion_length=2.*record 0 \(id 't0'\): completion 1 = completion 0")  # fmt: skip
    with pytest.warns(UserWarning, match=match):
        trainer = ChainRankTrainer(
            tiny_lm(tok), config(tmp_path, max_steps=1, max_completion_length=2), train_dataset=data,
            processing_class=tok, callbacks=[logs],
        )  # fmt: skip
    assert [len(s) for s in trainer.train_dataset.scores] == [4] * 4  # every completion scored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    step = next(entry for entry in logs.logs if "dropped_completions" in entry)
    assert step["dropped_completions"] == 8.0
    assert step["chains"] == 4.0
    # the rewards at the first step are 0: each kept completion's reference score is its own
    assert abs(step["reward_pos1"]) < 1e-5 and abs(step["reward_pos2"]) < 1e-5


def test_duplicates_error_is_a_config_option(tmp_path, tok):
    data = [{"id": "d", "prompt": "describe:", "completions": ["a red circle", "a red circle", "a blue"]}]
    with pytest.raises(
        ValueError, match=r"train_dataset record 0 \(id 'd'\).*completions 0 and 1 are the same text"
    ):
        ChainRankTrainer(tiny_lm(tok), config(tmp_path, duplicates="error"), train_dataset=data,
                         processing_class=tok)  # fmt: skip
    with pytest.raises(ValueError, match="duplicates must be 'drop' or 'error', got 'keep'"):
        config(tmp_path, duplicates="keep")
