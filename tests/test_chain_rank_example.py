"""examples/chain_rank_trainer.py: ChainRankTrainer with every config field as a flag, on the built-in
tiny Qwen2.5-VL and synthetic videos, and on a saved checkpoint (``--model``) with a chains JSONL of mp4
files (``--data``): the real-data path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

REPO = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location(
        "chain_rank_trainer", REPO / "examples" / "chain_rank_trainer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


COMMON = [
    "--report_to",
    "none",
    "--use_cpu",
    "--save_strategy",
    "no",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
]


def test_default_run_and_a_saved_checkpoint_with_video_files(tmp_path: Path):
    example = _example()
    out = tmp_path / "out"
    metrics = example.main(
        [
            "--output_dir",
            str(out),
            "--num_videos",
            "8",
            "--max_steps",
            "3",
            "--learning_rate",
            "1e-3",
            "--per_device_train_batch_size",
            "4",
            *COMMON,
        ]
    )
    for key in ("eval_pairwise_accuracy", "eval_top1_accuracy", "eval_kendall_tau", "eval_loss"):
        assert key in metrics
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()

    pytest.importorskip("av")
    data = tmp_path / "data"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "rankloss",
            "synthetic",
            "make",
            "--out",
            str(data),
            "--n",
            "6",
            "--frames",
            "4",
            "--size",
            "56",
            "--seed",
            "1",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    again = tmp_path / "again"
    example.main(
        [
            "--model",
            str(out),
            "--data",
            str(data / "chains.jsonl"),
            "--eval_data",
            str(data / "chains.jsonl"),
            "--num_frames",
            "4",
            "--chain_length",
            "3",
            "--output_dir",
            str(again),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "3",
            "--loss",
            "dpo",
            "--pairs",
            "all",
            *COMMON,
        ]
    )
    assert (again / "model.safetensors").is_file()


def test_model_without_data_is_refused(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        _example().main(["--model", str(tmp_path), "--output_dir", str(tmp_path / "o"), *COMMON])
    assert "--model needs --data" in capsys.readouterr().err
