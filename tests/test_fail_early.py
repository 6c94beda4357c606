"""Issue 23, "fail early": every option and record requirement of examples/chain_rank_trainer.py is
checked before a model is loaded or a reference score computed, errors name the flag as typed,
``--resume_from_checkpoint`` is honoured; LossSpec validates at construction; the example trainer's
``--data`` path reads the records' ``split`` and takes ``--eval-data``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from rankloss.integrations.forward import LossSpec

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------
# LossSpec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss="dpo", pairs="best_vs_rest"), "pairs must be one of"),
        (dict(loss="dpo", dpo_loss_type="logistic"), "dpo_loss_type must be one of"),
        (dict(loss="listnet"), "loss must be one of"),
        (dict(pairs="all"), "applies to loss='dpo' only"),
        (dict(top_k=0), "top_k must be None or an int >= 1"),
        (dict(beta=0.0), "beta must be a positive"),
        (dict(sft_weight=float("nan")), "sft_weight must be a finite number"),
        (dict(filter_eps=2.0), "filter_eps must be"),
    ],
)
def test_loss_spec_refuses_bad_options_at_construction(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LossSpec(**kwargs)


def test_loss_spec_accepts_every_option_the_loss_accepts():
    from rankloss.reference import losses as ref

    for pairs in ref.PAIR_STRATEGIES:
        for loss_type in ref.DPO_LOSS_TYPES:
            LossSpec(loss="dpo", pairs=pairs, dpo_loss_type=loss_type)
    LossSpec(loss="plackett_luce", top_k=2, sft_weight=1.0, filter_eps=None)
    LossSpec(loss="lipo", beta=0.5)


# ------------------------------------------------------------------------------------------------------
# examples/chain_rank_trainer.py

pytest.importorskip("transformers")
pytest.importorskip("datasets")

COMMON = ["--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--seed", "0"]


def _example():
    spec = importlib.util.spec_from_file_location(
        "chain_rank_trainer", REPO / "examples" / "chain_rank_trainer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model or processor load, or a synthetic model build, fails the test."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("a model or processor was loaded before the options were checked")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", boom)
    example = _example()
    monkeypatch.setattr(example, "synthetic_setup", boom)
    return example


def _chains_file(tmp_path: Path, video: bool = True) -> Path:
    path = tmp_path / "chains.jsonl"
    (tmp_path / "v.mp4").write_bytes(b"")
    rows = [
        {"id": f"c{i}", "chain": [f"a red ball {i}", f"a blue ball {i}", f"a blue box {i}"]}
        | ({"video": "v.mp4"} if video else {})
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--loss", "dpo", "--pairs", "best_vs_rest"], "--pairs must be one of"),
        (["--loss", "dpo", "--loss-type", "logistic"], "--loss-type must be one of"),
        (["--loss", "dpo", "--loss_type", "logistic"], "--loss_type must be one of"),
        (["--pairs", "all"], "--pairs='all' applies to loss='dpo' only"),
        (["--loss", "listnet"], "--loss must be"),
        (["--top_k", "0"], "--top_k must be None or an int >= 1"),
        (["--beta", "0"], "--beta must be a positive"),
        (["--sft_weight", "nan"], "--sft_weight must be a finite number"),
        (["--resume_from_checkpoint", "nowhere/checkpoint-3"], "--resume_from_checkpoint 'nowhere"),
        (["--resume_from_checkpoint", "true"], "no checkpoint-* folder"),
    ],
)
def test_bad_options_fail_before_any_model_is_loaded(tmp_path, capsys, no_model_loads, flags, expected):
    with pytest.raises(SystemExit) as exc:
        no_model_loads.main(["--output_dir", str(tmp_path / "o"), *flags, *COMMON])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_video_records_without_num_frames_fail_before_the_model_loads(tmp_path, capsys, no_model_loads):
    chains = _chains_file(tmp_path)
    with pytest.raises(SystemExit) as exc:
        no_model_loads.main(
            ["--model", str(tmp_path), "--data", str(chains), "--output_dir", str(tmp_path / "o"), *COMMON]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--num_frames is required" in err and "'c0'" in err and "ChainCollator" not in err


def test_prompt_flag_needs_a_checkpoint(tmp_path, capsys, no_model_loads):
    with pytest.raises(SystemExit):
        no_model_loads.main(["--prompt", "Say it.", "--output_dir", str(tmp_path / "o"), *COMMON])
    assert "--prompt applies to --model" in capsys.readouterr().err


def test_resume_from_checkpoint_continues_at_the_checkpoint_step(tmp_path, monkeypatch):
    from rankloss.integrations import ChainRankModel

    # Trainer._issue_warnings_after_load reads model._keys_to_ignore_on_save of the wrapper; until
    # ChainRankTrainer handles that itself, give the wrapper the attribute (None: warn, don't tie)
    if not hasattr(ChainRankModel, "_keys_to_ignore_on_save"):
        monkeypatch.setattr(ChainRankModel, "_keys_to_ignore_on_save", None, raising=False)
    example = _example()
    out = tmp_path / "out"
    base = [
        "--output_dir", str(out), "--num_videos", "4", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--save_strategy", "steps", "--save_steps", "1", "--eval_strategy", "no",
        *COMMON,
    ]  # fmt: skip
    example.main([*base, "--max_steps", "2"])
    assert (out / "checkpoint-2").is_dir()
    state2 = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    example.main([*base, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    state3 = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state3["global_step"] == 3
    # the resumed run took one step (3), not three from 0: its log history continues checkpoint-2's
    steps = [h["step"] for h in state3["log_history"] if "loss" in h]
    assert steps[: len([h for h in state2["log_history"] if "loss" in h])] == [
        h["step"] for h in state2["log_history"] if "loss" in h
    ]
    # "last" (or "true") finds the newest checkpoint of --output_dir
    example.main([*base, "--max_steps", "4", "--resume_from_checkpoint", "last"])
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


# ------------------------------------------------------------------------------------------------------
# examples/train_video_rank.py --data: the records' split


def _split_chains(tmp_path: Path, splits) -> Path:
    path = tmp_path / "split_chains.jsonl"
    (tmp_path / "v.mp4").write_bytes(b"")
    rows = []
    for i, sp in enumerate(splits):
        row = {"id": f"s{i}", "video": "v.mp4", "chain": [f"a red ball {i}", f"a blue ball {i}"]}
        if sp is not None:
            row["split"] = sp
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_records_split_field_makes_the_split(tmp_path):
    from rankloss.train.data import load_chains_file, read_split

    chains, _ = load_chains_file(str(_split_chains(tmp_path, ["train", "test", "train", "val", "train"])))
    out = tmp_path / "split.json"
    split = read_split(str(out), chains, heldout=200, seed=0)  # --heldout does not apply
    assert split == {"train": ["s0", "s2", "s4"], "heldout": ["s1", "s3"]}
    assert read_split(str(out), chains, heldout=200, seed=0, write=False) == split  # read back


def test_records_without_split_keep_the_random_split(tmp_path):
    from rankloss.train.data import load_chains_file, read_split, split_by_video

    chains, _ = load_chains_file(str(_split_chains(tmp_path, [None] * 5)))
    train, held = split_by_video(chains, 2, 0)
    split = read_split(str(tmp_path / "split.json"), chains, heldout=2, seed=0)
    assert split == {"train": [c.id for c in train], "heldout": [c.id for c in held]}


@pytest.mark.parametrize(
    "splits, message",
    [
        (["train", None, "test"], "has none"),
        (["train", "holdout"], "split='holdout'"),
        (["train", "train"], "both sides"),
    ],
)
def test_bad_record_splits_are_refused(tmp_path, splits, message):
    from rankloss.train.data import load_chains_file, record_split

    chains, _ = load_chains_file(str(_split_chains(tmp_path, splits)))
    with pytest.raises(ValueError, match=message):
        record_split(chains)


def test_no_pinned_memory_without_an_accelerator(tmp_path, monkeypatch):
    """Pinned memory only helps copies to an accelerator; without one torch's DataLoader warns at every new
    iterator (each evaluation), so ChainRankConfig turns it off there, and leaves it on where one is."""
    import rankloss.integrations.trainer as tr
    from rankloss.integrations import ChainRankConfig

    monkeypatch.setattr(tr, "_has_accelerator", lambda: False)
    assert ChainRankConfig(output_dir=str(tmp_path), report_to=[]).dataloader_pin_memory is False
    on_cpu = ChainRankConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    assert on_cpu.dataloader_pin_memory is False
    monkeypatch.setattr(tr, "_has_accelerator", lambda: True)
    assert ChainRankConfig(output_dir=str(tmp_path), report_to=[]).dataloader_pin_memory is True
