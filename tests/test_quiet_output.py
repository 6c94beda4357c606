"""Quiet, readable output (issue 23, part 7): ``chains summary`` of an existing file counts chains read,
and the example trainer's reports write no empty plot."""

from __future__ import annotations

import json

import pytest

from rankloss.chains import summarize_chains
from rankloss.cli import main


def _chains_file(tmp_path) -> str:
    captions = tmp_path / "captions.jsonl"
    captions.write_text(
        "".join(
            json.dumps({"video": f"v{i}.mp4", "caption": c}) + "\n"
            for i, c in enumerate(
                [
                    "A red ball rolls to the left while a blue cube stays still.",
                    "Two green squares move up and a yellow circle spins.",
                ]
            )
        )
    )
    out = tmp_path / "chains.jsonl"
    assert (
        main(["chains", "make", "--in", str(captions), "--out", str(out), "--no-progress", "--length", "3"])
        == 0
    )
    return str(out)


def test_chains_summary_of_a_file_says_chains_read(tmp_path, capsys):
    path = _chains_file(tmp_path)
    capsys.readouterr()
    assert main(["chains", "summary", path]) == 0
    text = capsys.readouterr().out
    assert "chains read: 2, complete" in text
    assert "input records" not in text and "written" not in text
    assert main(["chains", "summary", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chains_read"] == 2 and data["from_file"] is True
    assert "records_read" not in data and "lines_skipped" not in data
    s = summarize_chains(path)
    assert s.from_file and s.chains_written == 2 and s.records_read == 0


def test_a_run_summary_still_counts_input_records(tmp_path, capsys):
    _chains_file(tmp_path)
    err = capsys.readouterr().err
    assert "input records: 2 read, 0 skipped" in err and "chains: 2 written" in err


def _records(sft_steps: int, arm_steps: int) -> list[dict]:
    recs = [
        {"event": "train", "task": "sft", "seed": 0, "step": s, "loss": 1.0 / s}
        for s in range(1, sft_steps + 1)
    ]
    recs += [
        {"event": "train", "task": "plackett_luce", "seed": 0, "step": s, "loss": 2.0 / s}
        for s in range(1, arm_steps + 1)
    ]
    return recs


@pytest.fixture
def config():
    pytest.importorskip("matplotlib")
    from rankloss.train.config import TrainConfig

    config = TrainConfig()
    assert config.arm_list[0].name == "plackett_luce" and 0 in config.seed_list
    return config


def test_no_empty_training_loss_plot(tmp_path, config):
    from rankloss.train.report import plot_curves

    # Nothing trained (--sft-steps 0 and no arm step logged) and no evaluation: no plot at all.
    assert plot_curves(config, _records(0, 0), str(tmp_path)) == []
    assert not (tmp_path / "training_loss.png").exists() and not (tmp_path / "eval_curves.png").exists()
    # --sft-steps 0 with arm steps: the plot is written, with no (empty) SFT panel.
    paths = plot_curves(config, _records(0, 3), str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["training_loss.png"]


def test_training_loss_panels_are_the_trained_tasks(tmp_path, config, monkeypatch):
    from rankloss.train import report

    made = []
    real = report._pyplot

    def spy():
        plt = real()
        orig = plt.subplots

        def subplots(*args, **kwargs):
            made.append(args[:2])
            return orig(*args, **kwargs)

        monkeypatch.setattr(plt, "subplots", subplots)
        return plt

    monkeypatch.setattr(report, "_pyplot", spy)
    report.plot_curves(config, _records(0, 3), str(tmp_path))
    assert made == [(1, 1)]  # one panel (the arm), not an empty SFT one
