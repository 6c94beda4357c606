"""Damaged files of the example trainer's run folder (issue #21): every file ``examples/train_video_rank.py``
writes and reads back when a run resumes, truncated, emptied or overwritten with random bytes.

What must happen: a derived cache (decoded frames, reference scores, the split, the
run's processor, stage 0's tower) is made again with a warning naming it; a damaged checkpoint is set aside
and the task resumes from the previous intact one (or from its start); a damaged ``done.json`` or saved SFT
model makes the task run again; a damaged line of a ``metrics.jsonl`` is skipped with a warning naming
``file:line``, keeping the lines after it. Never a bare torch / json / numpy / safetensors error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

from rankloss.train.config import TrainConfig  # noqa: E402
from rankloss.train.data import VideoChain, decode_videos, read_split, split_by_video  # noqa: E402
from rankloss.train.files import DamagedFileError, DamagedFileWarning, seal  # noqa: E402
from rankloss.train.loop import (  # noqa: E402
    MetricsLog,
    NullReporter,
    StopRequested,
    _checkpoint_problem,
    build_context,
    make_accelerator,
    read_jsonl,
    read_ref_scores,
    run_arm_task,
    run_sft_task,
    save_ref_scores,
)
from rankloss.train.vision_pretrain import _read_done  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_video_rank.py"

# A run of a few seconds: 10 videos (3 held out), chains of 3, a 32-wide model, 4 SFT steps with a
# checkpoint after each (3 kept), one ranking step.
ARGS = [
    *("--vision-pretrain", "none", "--num-videos", "10", "--heldout", "3", "--chain-length", "3"),
    *("--frames", "4", "--max-objects", "2", "--hidden-size", "32", "--num-layers", "1"),
    *("--vision-depth", "1", "--vision-hidden-size", "32", "--vocab-size", "300", "--batch-size", "2"),
    *("--eval-batch-size", "4", "--max-new-tokens", "4", "--log-every", "1", "--no-progress"),
    *("--threads", "1", "--no-compare", "--rank-steps", "1", "--sft-steps", "4", "--sft-lr", "1e-2"),
    *("--save-every", "1", "--keep-checkpoints", "3", "--cpu"),
]
DAMAGE = st.sampled_from(["truncate", "overwrite", "zero"])


def _script():
    spec = importlib.util.spec_from_file_location("train_video_rank_damaged", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context(run_dir: Path, *, prepare: bool = False, **overrides):
    """The Context of the run in ``run_dir`` (prepared first with ``prepare``), in this process."""
    script = _script()
    config = script.parse_config([*ARGS, "--output-dir", str(run_dir)])
    config.output_dir = str(run_dir)
    for k, v in overrides.items():
        setattr(config, k, v)
    acc = make_accelerator(config)
    if prepare:
        script.prepare_run(config, str(run_dir), acc)
    return build_context(config, str(run_dir), acc, NullReporter())


def _damage(path: str | Path, kind: str, data) -> bool:
    """Truncate, empty or overwrite (random bytes at a random offset) ``path``; whether its bytes changed."""
    raw = Path(path).read_bytes()
    if kind == "zero":
        new = b""
    elif kind == "truncate":
        new = raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="cut")]
    else:
        at = data.draw(st.integers(0, max(0, len(raw) - 1)), label="at")
        junk = data.draw(st.binary(min_size=1, max_size=64), label="junk")
        new = raw[:at] + junk + raw[at + len(junk) :]
    Path(path).write_bytes(new)
    return new != raw


def _damage_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DamagedFileWarning)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _train_losses(path: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(str(path)) if r.get("event") == "train"]


# ------------------------------------------------------------------------------------------------------
# Two tiny runs, made once: one finished (SFT + one arm), one stopped after 3 of 4 SFT steps.


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    ctx = _context(run, prepare=True)
    run_sft_task(ctx, 0)
    run_arm_task(ctx, 0, ctx.config.arm_list[0], save_to=None)
    return run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("stopped") / "run"
    ctx = _context(run, prepare=True, stop_after_steps=3)
    with pytest.raises(StopRequested):
        run_sft_task(ctx, 0)
    ctx.accelerator.free_memory()
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ------------------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_log_damaged_middle_line_is_named_and_later_lines_are_kept(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"event": "train", "step": i, "loss": 1.0 / (i + 1)} for i in range(1, 6)]
    lines = [json.dumps(r) for r in recs]
    lines[1] = "\x00\x00garbage"  # line 2 damaged
    path.write_text("\n".join(lines) + '\n{"event": "tra')  # and an append cut short
    with pytest.warns(
        DamagedFileWarning, match=rf"{re.escape(str(path))}:2: not a JSON record.*kept the 4 other"
    ):
        out = read_jsonl(str(path))
    assert out == [recs[0], *recs[2:]]
    # a new record after the cut-short line goes on a line of its own
    log = MetricsLog(str(path), {"seed": 0}, True)
    log.write({"event": "eval", "step": 6})
    with pytest.warns(DamagedFileWarning):
        assert read_jsonl(str(path))[-1] == {"seed": 0, "event": "eval", "step": 6}
    with pytest.warns(DamagedFileWarning):
        log.truncate_after(3)  # a resumed task: the damaged lines go with the rewrite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_jsonl(str(path)) == [recs[0], recs[2]]


@given(data=st.data(), kind=DAMAGE, n=st.integers(1, 8))
def test_metrics_log_damage_never_drops_an_intact_line_silently(data, kind, n):
    recs = [{"event": "train", "step": i, "loss": round(1.0 / (i + 1), 6)} for i in range(n)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "metrics.jsonl")
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in recs))
        before = Path(path).read_bytes()
        _damage(path, kind, data)
        after = Path(path).read_bytes()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = read_jsonl(path)
    # every line whose bytes (and newline) are still where they were is read back, in order
    kept, offset = [], 0
    for r in recs:
        line = (json.dumps(r) + "\n").encode()
        starts_a_line = offset == 0 or after[offset - 1 : offset] == b"\n"
        if (
            starts_a_line
            and after[offset : offset + len(line)] == before[offset : offset + len(line)] == line
        ):
            kept.append(r)
        offset += len(line)
    assert [r for r in out if r in kept] == kept
    messages = _damage_warnings(caught)
    assert all(path in m for m in messages)
    terminated = [p for p in after.split(b"\n")[:-1] if p.strip()]
    if not messages:  # nothing but a cut-short last line may go without a word
        assert len(out) >= len(terminated)


# ------------------------------------------------------------------------------------------------------
# config.json, split.json


@given(data=st.data(), kind=DAMAGE)
def test_run_config_damage_is_an_error_naming_the_file(data, kind):
    config = TrainConfig(num_videos=12, heldout=2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.json")
        config.save(path)
        _damage(path, kind, data)
        try:
            loaded = TrainConfig.load(path)
        except DamagedFileError as exc:
            assert path in str(exc) and "--overwrite" in str(exc)
            return
    assert loaded.differences(config) == []  # (only white space changed, if anything)


def _chains(n: int = 10) -> list[VideoChain]:
    return [VideoChain(f"video-{i}", ["a b", "a c"], f"v{i}.mp4", None, i) for i in range(n)]


def test_damaged_split_is_made_again_and_a_foreign_one_refused(tmp_path: Path):
    chains, path = _chains(), str(tmp_path / "split.json")
    split = read_split(path, chains, 3, 7)  # written
    train, held = split_by_video(chains, 3, 7)
    assert split == {"train": [c.id for c in train], "heldout": [c.id for c in held]}
    Path(path).write_bytes(Path(path).read_bytes()[:20])
    with pytest.warns(DamagedFileWarning, match=rf"{re.escape(path)} is not valid JSON.*made it again"):
        assert read_split(path, chains, 3, 7) == split
    assert json.loads(Path(path).read_text()) == split  # rewritten
    Path(path).write_text(
        json.dumps({"train": split["train"], "heldout": ["video-99", *split["heldout"][1:]]})
    )
    with pytest.raises(DamagedFileError, match=rf"{re.escape(path)} lists heldout id 'video-99'.*delete"):
        read_split(path, chains, 3, 7)


@given(data=st.data(), kind=DAMAGE)
def test_split_damage_gives_the_split_or_names_the_file(data, kind):
    chains = _chains()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "split.json")
        split = read_split(path, chains, 3, 7)
        _damage(path, kind, data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = read_split(path, chains, 3, 7)
            except DamagedFileError as exc:
                assert path in str(exc) and "delete" in str(exc)
                return
    assert got == split
    assert all(path in m for m in _damage_warnings(caught))


def test_damaged_split_in_a_run_folder_is_made_again(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    split = json.loads((run / "data" / "split.json").read_text())
    (run / "data" / "split.json").write_bytes(b"")
    with pytest.warns(DamagedFileWarning, match="split.json is empty"):
        ctx = _context(run)
    assert [c.id for c in ctx.train] == split["train"] and [c.id for c in ctx.heldout] == split["heldout"]


def test_resume_through_the_example_names_a_damaged_config_and_remakes_the_split(
    finished: Path, tmp_path: Path
):
    """``examples/train_video_rank.py --resume``: prepare_run reads config.json and split.json first."""
    run = _copy(finished, tmp_path)
    script = _script()
    config = script.parse_config([*ARGS, "--output-dir", str(run), "--resume"])
    acc = make_accelerator(config)
    split = json.loads((run / "data" / "split.json").read_text())
    (run / "data" / "split.json").write_bytes(b'{"train": ["vid')
    with pytest.warns(DamagedFileWarning, match="split.json is not valid JSON"):
        script.prepare_run(config, str(run), acc)
    assert json.loads((run / "data" / "split.json").read_text()) == split
    cfg = run / "config.json"
    cfg.write_bytes(cfg.read_bytes()[:30])
    with pytest.raises(SystemExit, match=rf"error: --resume: {re.escape(str(cfg))} .*--overwrite"):
        script.prepare_run(config, str(run), acc)


# ------------------------------------------------------------------------------------------------------
# data/frames.npy + frames.json


def _fake_video(path: str, num_frames: int, size: int) -> np.ndarray:
    seed = int(path[1:].split(".")[0])
    return np.random.default_rng(seed).integers(0, 256, (num_frames, 3, size, size), dtype=np.uint8)


@given(data=st.data(), kind=DAMAGE, which=st.sampled_from(["frames.npy", "frames.json"]))
def test_frame_cache_damage_is_decoded_again(data, kind, which):
    chains, calls = _chains(3), []

    def load_video(path, num_frames, size):
        calls.append(path)
        return _fake_video(path, num_frames, size)

    with (
        tempfile.TemporaryDirectory() as d,
        mock.patch("rankloss.video.load_video", load_video),
        mock.patch("rankloss.train.data.sampled_fps", lambda path, n: 2.0 + int(path[1:].split(".")[0])),
    ):
        first = decode_videos(chains, d, 2, 8)
        want_frames, want_fps = np.array(first.frames), np.array(first.fps)
        del first
        calls.clear()
        changed = _damage(os.path.join(d, which), kind, data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store = decode_videos(chains, d, 2, 8)
        got_frames, got_fps = np.array(store.frames), np.array(store.fps)
        del store
    np.testing.assert_array_equal(got_frames, want_frames)
    np.testing.assert_array_equal(got_fps, want_fps)
    messages = _damage_warnings(caught)
    assert all(os.path.join(d, "frames.") in m and "decoding the 3 videos again" in m for m in messages)
    if changed and which == "frames.npy":
        assert messages and calls  # never the damaged frames, never silently
    if not changed:
        assert not messages and not calls


# ------------------------------------------------------------------------------------------------------
# seed<k>/ref_scores.pt


@given(data=st.data(), kind=DAMAGE)
def test_reference_score_damage_is_found(data, kind):
    chains = _chains(4)
    scores = {c.id: (torch.randn(2), torch.tensor([3, 4])) for c in chains}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ref_scores.pt")
        save_ref_scores(path, scores)
        changed = _damage(path, kind, data)
        got, problem = read_ref_scores(path, chains)
    if got is None:
        assert isinstance(problem, str) and problem
    else:
        assert problem is None
        for c in chains:
            assert torch.equal(got[c.id][0], scores[c.id][0]) and torch.equal(got[c.id][1], scores[c.id][1])
    if kind == "zero" and changed:
        assert got is None


def test_damaged_reference_scores_are_computed_again(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    path = run / "seed0" / "ref_scores.pt"
    want = read_ref_scores(str(path), [])[0]
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    ctx = _context(run)
    with pytest.warns(
        DamagedFileWarning, match=rf"{re.escape(str(path))} cannot be read.*again with its SFT model"
    ):
        run_sft_task(ctx, 0)  # finished: only the reference scores are made again
    got, problem = read_ref_scores(str(path), ctx.train + ctx.heldout)
    assert problem is None and set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k][0], want[k][0])
        assert torch.equal(got[k][1], want[k][1])


# ------------------------------------------------------------------------------------------------------
# checkpoints/step-*/


@given(data=st.data(), kind=DAMAGE)
def test_checkpoint_damage_is_found(stopped: Path, data, kind):
    src = stopped / "seed0" / "sft" / "checkpoints" / "step-000003"
    name = data.draw(st.sampled_from(sorted(p.name for p in src.iterdir())), label="file")
    with tempfile.TemporaryDirectory() as d:
        copy = Path(d) / "step-000003"
        shutil.copytree(src, copy)
        assert _checkpoint_problem(str(copy), 3)[0] is None
        before = (copy / "trainer_state.json").read_text()
        changed = _damage(copy / name, kind, data)
        problem, _ = _checkpoint_problem(str(copy), 3)
        if problem is None and changed:  # only a change that leaves the same JSON value (white space)
            assert name == "trainer_state.json"
            assert json.loads((copy / name).read_text()) == json.loads(before)
    if changed and name != "trainer_state.json":
        assert problem is not None
    if not changed:
        assert problem is None


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("model.safetensors", lambda raw: raw[: len(raw) // 3]),  # truncated
        ("trainer_state.json", lambda raw: b""),  # zero length
        ("optimizer.bin", lambda raw: raw[:100] + bytes(64) + raw[164:]),  # zeros in the middle
    ],
)
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(
    finished: Path, stopped: Path, tmp_path: Path, name, damage
):
    run = _copy(stopped, tmp_path)
    ckpts = run / "seed0" / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002", "step-000003"]
    f = ckpts / "step-000003" / name
    f.write_bytes(damage(f.read_bytes()))
    ctx = _context(run)
    with pytest.warns(
        DamagedFileWarning,
        match=rf"checkpoint {re.escape(str(ckpts / 'step-000003'))} .*set it aside as .*step-000003.damaged; "
        rf"seed 0 sft resumes from {re.escape(str(ckpts / 'step-000002'))} \(step 2\)",
    ):
        run_sft_task(ctx, 0)
    # the same model and the same logged losses as the uninterrupted run
    a, b = _weights(finished / "seed0" / "sft" / "model"), _weights(run / "seed0" / "sft" / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sft_log = Path("seed0", "sft", "metrics.jsonl")
    assert _train_losses(run / sft_log) == _train_losses(finished / sft_log)


def test_every_checkpoint_damaged_starts_the_task_over(finished: Path, stopped: Path, tmp_path: Path):
    run = _copy(stopped, tmp_path)
    ckpts = run / "seed0" / "sft" / "checkpoints"
    for step in ckpts.iterdir():
        (step / "model.safetensors").write_bytes(b"")
    ctx = _context(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_sft_task(ctx, 0)
    messages = _damage_warnings(caught)
    assert len(messages) == 3 and all(
        "no intact checkpoint is left: seed 0 sft starts over" in m for m in messages
    )
    a, b = _weights(finished / "seed0" / "sft" / "model"), _weights(run / "seed0" / "sft" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sft_log = Path("seed0", "sft", "metrics.jsonl")
    assert _train_losses(run / sft_log) == _train_losses(finished / sft_log)


def test_damaged_checkpoint_without_a_file_list_is_named_and_set_aside(
    finished: Path, stopped: Path, tmp_path: Path
):
    """A checkpoint written before checkpoints listed their files is found damaged only when it does not
    load: an error naming it (not a bare safetensors one), the checkpoint set aside, and the next run goes
    on from the previous one."""
    run = _copy(stopped, tmp_path)
    ckpts = run / "seed0" / "sft" / "checkpoints"
    for step in ckpts.iterdir():
        state = json.loads((step / "trainer_state.json").read_text())
        (step / "trainer_state.json").write_text(
            json.dumps({"step": state["step"], "tokens": state["tokens"]})
        )
    f = ckpts / "step-000003" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    ctx = _context(run)
    with pytest.raises(
        DamagedFileError,
        match=rf"{re.escape(str(ckpts / 'step-000003'))} cannot be loaded \(SafetensorError.*set aside as "
        r".*step-000003.damaged: run the same command again",
    ):
        run_sft_task(ctx, 0)
    ctx.accelerator.free_memory()
    run_sft_task(_context(run), 0)
    a, b = _weights(finished / "seed0" / "sft" / "model"), _weights(run / "seed0" / "sft" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sft_log = Path("seed0", "sft", "metrics.jsonl")
    assert _train_losses(run / sft_log) == _train_losses(finished / sft_log)


# ------------------------------------------------------------------------------------------------------
# done.json, the saved SFT model, the run's processor


def test_damaged_done_json_runs_the_task_again(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    done = run / "seed0" / "plackett_luce" / "done.json"
    want = json.loads(done.read_text())
    text = done.read_text()
    done.write_text(text.replace('"seed": 0', '"seed": 5'))  # a value overwritten, still JSON
    ctx = _context(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedFileWarning)
        assert run_sft_task(ctx, 0)["task"] == "sft"  # intact: nothing redone, no warning
    d = re.escape(str(done))
    with pytest.warns(
        DamagedFileWarning, match=rf"{d} holds other values.*deleted {d}: seed 0 plackett_luce"
    ):
        result = run_arm_task(ctx, 0, ctx.config.arm_list[0], save_to=None)
    assert result["final"] == pytest.approx(want["final"], nan_ok=True)
    assert "record_crc32" not in result and json.loads(done.read_text())["task"] == "plackett_luce"


def test_damaged_sft_model_runs_the_sft_task_again(finished: Path, tmp_path: Path):
    run = _copy(finished, tmp_path)
    model = run / "seed0" / "sft" / "model"
    raw = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(raw[:-7] + b"\x01" * 7)
    ctx = _context(run)
    with pytest.warns(
        DamagedFileWarning, match=rf"{re.escape(str(model))} \(its model\) has model.safetensors with other"
    ):
        run_sft_task(ctx, 0)
    a, b = _weights(finished / "seed0" / "sft" / "model"), _weights(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_processor_is_restored(finished: Path, tmp_path: Path):
    from rankloss.train.model import load_processor

    run = _copy(finished, tmp_path)
    tok = load_processor(str(finished / "processor")).tokenizer
    caption = "a big red circle moves left, then a small blue square appears."

    def same_tokenizer() -> None:
        again = load_processor(str(run / "processor")).tokenizer
        assert again.get_vocab() == tok.get_vocab() and again.pad_token_id == tok.pad_token_id
        assert again(caption)["input_ids"] == tok(caption)["input_ids"]

    want = (run / "processor" / "tokenizer.json").read_bytes()
    (run / "processor" / "tokenizer.json").write_bytes(want[:1000])
    with pytest.warns(
        DamagedFileWarning, match=r"processor cannot be loaded.*copied it back from .*sft.model"
    ):
        ctx = _context(run)
    same_tokenizer()
    assert ctx.collator.tokenizer(caption)["input_ids"] == tok(caption)["input_ids"]
    shutil.rmtree(run / "seed0")  # no saved model to copy it from: trained again
    (run / "processor" / "tokenizer_config.json").write_bytes(b"\x00" * 10)
    with pytest.warns(DamagedFileWarning, match="trained the tokenizer again"):
        _context(run)
    same_tokenizer()


# ------------------------------------------------------------------------------------------------------
# stage 0 (vision_pretrain/done.json + tower.pt)


@given(data=st.data(), kind=DAMAGE, which=st.sampled_from(["done.json", "tower.pt"]))
def test_stage0_damage_trains_it_again(data, kind, which):
    from rankloss.train.files import torch_save_atomic, write_json_atomic

    with tempfile.TemporaryDirectory() as d:
        tower = {"blocks.0.weight": torch.randn(4, 4)}
        size_crc = list(torch_save_atomic(tower, os.path.join(d, "tower.pt")))
        record = {
            "seed": 0,
            "task": "vision_pretrain",
            "heldout": {"f1": 0.5},
            "steps": 6,
            "tower_file": size_crc,
        }
        write_json_atomic(os.path.join(d, "done.json"), seal(record))
        assert _read_done(d) == record
        changed = _damage(os.path.join(d, which), kind, data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _read_done(d)
    messages = _damage_warnings(caught)
    if got is None:
        assert len(messages) == 1 and os.path.join(d, "") in messages[0] and "again" in messages[0]
    else:
        assert got == record and not messages
    if changed and which == "tower.pt":
        assert got is None
