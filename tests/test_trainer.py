"""examples/train_video_rank.py end to end, at tiny sizes: the comparison's outputs, flag validation,
``--stop-after-steps`` + ``--resume`` against an uninterrupted run, and two CPU processes (``torchrun
--nproc_per_node 2 ... --cpu``, gloo) against one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")
pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_video_rank.py"

# A run of a few seconds: 10 videos (3 held out), chains of 3, 4 frames of 56 x 56, a 32-wide model.
TINY = [
    "--vision-pretrain",  # stage 0 has its own tests (test_vision_pretrain.py)
    "none",
    "--num-videos",
    "10",
    "--heldout",
    "3",
    "--chain-length",
    "3",
    "--frames",
    "4",
    "--max-objects",
    "2",
    "--hidden-size",
    "32",
    "--num-layers",
    "1",
    "--vision-depth",
    "1",
    "--vision-hidden-size",
    "32",
    "--vocab-size",
    "300",
    "--batch-size",
    "2",
    "--eval-batch-size",
    "4",
    "--max-new-tokens",
    "6",
    "--log-every",
    "1",
    "--no-progress",
    "--threads",
    "1",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("train_video_rank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(
    args: list[str], *, launcher: list[str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = (launcher or [sys.executable]) + [str(SCRIPT), *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {folder}"
    return out


SYNTHETIC_ONLY = ("--num-videos", "--max-objects")  # do not apply to --data
TINY_MODEL = ("--hidden-size", "--num-layers", "--vision-depth", "--vision-hidden-size", "--vocab-size")


def _tiny_without(*flags: str) -> list[str]:
    """TINY minus ``flags`` and their values (the valueless ``--no-progress`` is kept)."""
    out, i = [], 0
    while i < len(TINY):
        if TINY[i] in flags:
            i += 2
            continue
        out.append(TINY[i])
        i += 1
    assert len(out) == len(TINY) - 2 * len(flags), flags
    return out


def _synthetic_chains_file(tmp_path: Path) -> Path:
    """`rankloss synthetic make`: 9 mp4 videos of 8 frames and their chains JSONL (with scenes)."""
    pytest.importorskip("av")
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "rankloss", "synthetic", "make", "--out", str(data), "--n", "9"]
        + ["--frames", "8", "--seed", "3"],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return data / "chains.jsonl"


def test_comparison_writes_every_output(tmp_path: Path):
    run = tmp_path / "run"
    result = _run(
        [
            *TINY,
            "--sft-steps",
            "4",
            "--rank-steps",
            "2",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--output-dir",
            str(run),
        ]
    )
    for name in (
        "config.json",
        "metrics.jsonl",
        "summary.md",
        "comparison.md",
        "comparison.png",
        "training_loss.png",
        "eval_curves.png",
    ):
        assert (run / name).is_file(), f"{name} missing; output:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert (run / "model" / "config.json").is_file()
    records = _records(run / "metrics.jsonl")
    arms = {
        "sft",
        "plackett_luce",
        "dpo_best_worst",
        "dpo",
        "plackett_luce_frozen",
        "sft_control",
    }  # DEFAULT_ARMS
    for seed in (0, 1):
        tasks = {r["task"] for r in records if r["seed"] == seed}
        assert tasks == arms, tasks
        finals = [r for r in records if r["seed"] == seed and r.get("tag") == "final"]
        assert {r["task"] for r in finals} == arms - {"sft"}
        for r in finals:
            m = r["metrics"]
            assert 0.0 <= m["pair_acc"] <= 1.0 and 0.0 <= m["gen_f1"] <= 1.0, m
            assert math.isfinite(m["best_logp_tok"]), m
        train = [
            r for r in records if r["seed"] == seed and r["event"] == "train" and r["task"] == "plackett_luce"
        ]
        assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    table = (run / "comparison.md").read_text()
    assert "mean ± standard error over 2 seeds" in table
    for title in ("Plackett-Luce", "DPO (one pair: best vs worst)", "DPO (adjacent)", "frozen"):
        assert title in table, table
    assert "Difference to" in table
    assert "comparison" in result.stdout  # the table is printed at the end


def test_single_arm_trains_the_vision_tower_unless_frozen(tmp_path: Path):
    """--no-compare --loss plackett_luce changes the vision tower's weights; --freeze-vision keeps them."""
    base = [
        *TINY,
        "--sft-steps",
        "2",
        "--rank-steps",
        "2",
        "--no-compare",
        "--loss",
        "plackett_luce",
        "--save-models",
        "all",
        "--lr",
        "1e-2",
    ]
    _run([*base, "--output-dir", str(tmp_path / "a")])
    _run([*base, "--freeze-vision", "--output-dir", str(tmp_path / "b")])
    sft = _weights(tmp_path / "a" / "seed0" / "sft" / "model")
    trained = _weights(tmp_path / "a" / "seed0" / "plackett_luce" / "model")
    frozen = _weights(tmp_path / "b" / "seed0" / "plackett_luce_frozen" / "model")
    vision = [k for k in sft if "visual." in k]
    text = [k for k in sft if "layers." in k and "visual." not in k]
    assert vision and text
    assert any(not torch.equal(sft[k], trained[k]) for k in vision)
    assert all(torch.equal(sft[k], frozen[k]) for k in vision)
    assert any(not torch.equal(sft[k], frozen[k]) for k in text)


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path: Path):
    args = [
        *TINY,
        "--sft-steps",
        "5",
        "--rank-steps",
        "4",
        "--no-compare",
        "--loss",
        "dpo",
        "--pairs",
        "all",
        "--save-every",
        "1",
        "--jobs",
        "1",
    ]
    _run([*args, "--output-dir", str(tmp_path / "full")])
    first = _run([*args, "--output-dir", str(tmp_path / "cut"), "--stop-after-steps", "3"])
    assert "--resume" in first.stdout + first.stderr
    assert not (tmp_path / "cut" / "summary.md").exists()
    second = _run([*args, "--output-dir", str(tmp_path / "cut"), "--resume", "--stop-after-steps", "4"])
    assert "resumed" in second.stdout + second.stderr
    _run([*args, "--output-dir", str(tmp_path / "cut"), "--resume"])
    a, b = _weights(tmp_path / "full" / "model"), _weights(tmp_path / "cut" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)

    def train_losses(run: Path) -> list[tuple[str, int, float]]:
        return [
            (r["task"], r["step"], r["loss"])
            for r in _records(run / "metrics.jsonl")
            if r["event"] == "train"
        ]

    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")


# Runs the example under a launcher and, in each process, records what make_accelerator set up.
CHECKED_LAUNCH = """
import json, os, runpy, sys
import torch
import rankloss.train.loop as loop

real = loop.make_accelerator


def checked(config):
    acc = real(config)
    seen = {
        "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
        "initialized": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "num_processes": acc.num_processes,
        "process_index": acc.process_index,
    }
    with open(os.path.join(os.environ["RANKLOSS_SEEN_DIR"], f"rank{acc.process_index}.json"), "w") as f:
        json.dump(seen, f)
    return acc


loop.make_accelerator = checked
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path: Path, monkeypatch):
    """Two gloo processes (``torchrun --nproc_per_node 2`` with ``--cpu``), each half of the global batch,
    give the same model and losses as one process. Each process checks it is one of two in one group
    (``accelerate launch --cpu --num_processes 2`` would start a single process: accelerate 1.16)."""
    from test_chain_trainer import _free_port

    args = [
        *TINY,
        "--sft-steps",
        "3",
        "--rank-steps",
        "2",
        "--no-compare",
        "--loss",
        "plackett_luce",
        "--batch-size",
        "4",
        "--jobs",
        "1",
        "--cpu",
    ]
    _run([*args, "--output-dir", str(tmp_path / "one")])
    wrapper = tmp_path / "checked_launch.py"
    wrapper.write_text(CHECKED_LAUNCH)
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    monkeypatch.setenv("RANKLOSS_SEEN_DIR", str(seen_dir))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(wrapper),
    ]
    result = _run([*args, "--output-dir", str(tmp_path / "two")], launcher=launcher, timeout=600)
    for rank in (0, 1):
        seen = json.loads((seen_dir / f"rank{rank}.json").read_text())
        assert seen == {"WORLD_SIZE": "2", "initialized": True, "num_processes": 2, "process_index": rank}
    assert "2 process(es)" in result.stdout
    a, b = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    one = [r["loss"] for r in _records(tmp_path / "one" / "metrics.jsonl") if r["event"] == "train"]
    two = [r["loss"] for r in _records(tmp_path / "two" / "metrics.jsonl") if r["event"] == "train"]
    assert len(one) == len(two) == 5
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--loss", "dpo"], "--loss sets the single run's arm"),
        (["--no-compare", "--pairs", "all"], "--pairs applies to the dpo loss only"),
        (["--frame-size", "50"], "--frame-size must be a multiple of 28"),
        (["--heldout", "20", "--num-videos", "10"], "--heldout (20) must be smaller than --num-videos (10)"),
        (["--resume"], "--resume needs --output-dir"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--data", "/nonexistent/chains.jsonl"], "--data: chains file not found"),
        (["--model", "/nonexistent/ckpt"], "--model: not a local checkpoint directory"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, message, capsys):
    module = _load_script()
    with pytest.raises(SystemExit) as exc:
        module.parse_config(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_refuses_changed_settings(tmp_path: Path):
    args = [*TINY, "--sft-steps", "2", "--rank-steps", "1", "--no-compare", "--jobs", "1"]
    _run([*args, "--output-dir", str(tmp_path / "r"), "--stop-after-steps", "1"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        *args,
        "--lr",
        "3e-3",
        "--output-dir",
        str(tmp_path / "r"),
        "--resume",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "differ from the run's config.json" in result.stderr and "lr" in result.stderr


@pytest.mark.parametrize("with_scenes", [True, False])
def test_chains_file_with_video_files(tmp_path: Path, with_scenes: bool):
    """--data: the `rankloss synthetic make` output (mp4 files decoded with PyAV, chains JSONL); with its
    scenes generation is scored fact by fact, without them (as for real captions) by word overlap."""
    chains = _synthetic_chains_file(tmp_path)
    if not with_scenes:
        rows = [json.loads(line) for line in chains.read_text().splitlines()]
        for r in rows:
            r.pop("source", None)
        chains.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = _tiny_without(*SYNTHETIC_ONLY)
    run = tmp_path / "run"
    result = _run(
        [
            *args,
            "--data",
            str(chains),
            "--sft-steps",
            "2",
            "--rank-steps",
            "2",
            "--no-compare",
            "--jobs",
            "1",
            "--output-dir",
            str(run),
        ]
    )
    assert (run / "data" / "frames.npy").is_file()  # decoded once, memory-mapped
    final = [r for r in _records(run / "metrics.jsonl") if r.get("tag") == "final"]
    assert len(final) == 1
    metrics = final[0]["metrics"]
    if with_scenes:
        assert "gen_f1" in metrics and "gen_word_f1" not in metrics
    else:
        assert "gen_word_f1" in metrics and "gen_f1" not in metrics
        assert "word overlap" in result.stdout


def test_saved_model_loads_back_with_model_flag(tmp_path: Path):
    """--model PATH: the folder a run writes (``save_pretrained`` model + processor) is a real local
    checkpoint to the trainer. On the same chains file and split, the second run starts exactly where
    the first ended: its before-SFT evaluation equals the first run's final one."""
    chains = _synthetic_chains_file(tmp_path)
    common = ["--data", str(chains), "--sft-steps", "2", "--rank-steps", "2", "--no-compare", "--jobs", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    _run([*common, *_tiny_without(*SYNTHETIC_ONLY), "--output-dir", str(first)])
    for name in ("config.json", "processor_config.json", "model.safetensors"):
        assert (first / "model" / name).is_file(), name
    data_flags = _tiny_without(*SYNTHETIC_ONLY, *TINY_MODEL)  # the model's sizes come from its folder
    _run([*common, *data_flags, "--model", str(first / "model"), "--output-dir", str(second)])

    def full_eval(run: Path, tag: str) -> dict:
        rows = [r for r in _records(run / "metrics.jsonl") if r.get("tag") == tag]
        assert len(rows) == 1, (run, tag)
        return rows[0]

    ended, started = full_eval(first, "final"), full_eval(second, "init")
    for key in ("best_logp", "best_logp_tok", "pair_acc", "top1", "tau"):
        assert math.isclose(started["metrics"][key], ended["metrics"][key], rel_tol=1e-5, abs_tol=1e-6), key
    assert [s["generated"] for s in started["samples"]] == [s["generated"] for s in ended["samples"]]
    # the loaded model is trained further, not replaced by a fresh tiny one
    assert json.loads((second / "config.json").read_text())["model"] == str(first / "model")


def test_launch_whose_processes_did_not_join_one_group_is_refused():
    """WORLD_SIZE=2 but a single-process Accelerator (torchrun on CPU without --cpu, accelerate's
    --use_fsdp without GPUs): the two copies would each train alone into the same folder, so the trainer
    stops and says why (the check ChainRankTrainer shares: rankloss._launch.process_group_problem)."""
    from types import SimpleNamespace

    from rankloss.train.loop import check_process_group

    alone = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO", device="cpu")
    check_process_group(alone, {})
    check_process_group(alone, {"WORLD_SIZE": "1"})
    check_process_group(SimpleNamespace(num_processes=2), {"WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match=r"launched as 2 processes \(WORLD_SIZE=2\) but accelerate set up 1"):
        check_process_group(alone, {"WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match=r"torchrun --nproc_per_node 2` with --cpu"):
        check_process_group(alone, {"WORLD_SIZE": "2"})
    with pytest.raises(SystemExit, match="WORLD_SIZE='two'"):
        check_process_group(alone, {"WORLD_SIZE": "two"})


def test_example_trainer_refuses_deepspeed(monkeypatch):
    """``accelerate launch --config_file examples/accelerate/zero3.yaml examples/train_video_rank.py``:
    the example's stages prepare several models, which a DeepSpeed engine does not allow, so it stops at
    once and points to ChainRankTrainer (DeepSpeed needs accelerators, so the Accelerator is a stand-in)."""
    from types import SimpleNamespace

    import accelerate

    from rankloss.train.config import TrainConfig
    from rankloss.train.loop import make_accelerator

    made = []

    def fake(**kwargs):
        made.append(kwargs)
        return SimpleNamespace(num_processes=1, distributed_type="DistributedType.DEEPSPEED", device="cpu")

    monkeypatch.setattr(accelerate, "Accelerator", fake)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=r"not DeepSpeed.*ChainRankTrainer.*zero3\.yaml"):
        make_accelerator(TrainConfig())
    assert made, "the stand-in Accelerator was not used"


def _tiny_llava_onevision(folder: Path) -> None:
    """A tiny random LLaVA-OneVision (SigLIP tower, Qwen2 decoder) and its processor, saved to ``folder``:
    a non-Qwen family for ``--model``."""
    import transformers
    from transformers.models.llava_onevision.image_processing_llava_onevision import (
        LlavaOnevisionImageProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    from rankloss.train.config import TrainConfig
    from rankloss.train.data import synthetic_chains
    from rankloss.train.model import train_tokenizer

    frame = 28
    chains = synthetic_chains(TrainConfig(num_videos=10, max_objects=2))
    tok = train_tokenizer([c for ch in chains for c in ch.captions], 300)
    size, pinpoints = {"height": frame, "width": frame}, [[frame, frame]]
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tok,
        video_processor=LlavaOnevisionVideoProcessor(size=size, do_sample_frames=False),
        num_image_tokens=(frame // 14) ** 2,
        vision_feature_select_strategy="full",
    )
    text = dict(
        model_type="qwen2",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=frame,
        patch_size=14,
    )
    config = transformers.LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids(processor.image_token),
        video_token_index=tok.convert_tokens_to_ids(processor.video_token),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


def test_model_flag_takes_another_vlm_family(tmp_path: Path):
    """--model with a LLaVA-OneVision checkpoint: the same stages run through the shared chain forward
    (SFT, reference scores, a ranking arm with and without the vision tower, generation), and
    --freeze-vision freezes the family's vision tower."""
    ckpt = tmp_path / "llava"
    _tiny_llava_onevision(ckpt)
    args = [
        *_tiny_without(*TINY_MODEL),
        "--model",
        str(ckpt),
        "--sft-steps",
        "2",
        "--rank-steps",
        "2",
        "--arms",
        "plackett_luce,plackett_luce:frozen",
        "--seeds",
        "1",
        "--save-models",
        "all",
        "--lr",
        "1e-2",
        "--jobs",
        "1",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    _run(args)
    run = tmp_path / "run"
    finals = [r for r in _records(run / "metrics.jsonl") if r.get("tag") == "final"]
    assert len(finals) == 2
    for r in finals:
        assert {"pair_acc", "reward_pair_acc", "gen_f1"} <= set(r["metrics"])
        assert all(s["generated"] for s in r["samples"])
    sft = _weights(run / "seed0" / "sft" / "model")
    trained = _weights(run / "seed0" / "plackett_luce" / "model")
    frozen = _weights(run / "seed0" / "plackett_luce_frozen" / "model")
    vision = [k for k in sft if "vision_tower." in k]
    assert vision
    assert any(not torch.equal(sft[k], trained[k]) for k in vision)
    assert all(torch.equal(sft[k], frozen[k]) for k in vision)


@pytest.mark.parametrize(
    "config, what",
    [
        ({"model_type": "qwen2"}, "model_type 'qwen2', a text-only model"),
        ({"model_type": "mamba"}, "model_type 'mamba', a text-only model"),
        ({"model_type": "shiny_vlm", "vision_config": {}}, "model_type 'shiny_vlm', a multimodal model"),
    ],
)
def test_model_flag_refuses_other_model_types(tmp_path: Path, config: dict, what: str, capsys):
    (tmp_path / "config.json").write_text(json.dumps(config))
    module = _load_script()
    with pytest.raises(SystemExit) as exc:
        module.parse_config(["--model", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert what in err and "qwen2_5_vl" in err and "llava_onevision" in err
