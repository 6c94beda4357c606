"""``examples/train_video_rank.py --data FILE --eval-data FILE``: a second chains file is the held-out set
(issue 23): every chain of --data trains, every chain of --eval-data is held out, an id in both or a
record whose own ``split`` disagrees is an error, and --heldout does not apply."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("av")
pytest.importorskip("transformers")

from rankloss.train.data import load_chains_file, read_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    data = tmp_path_factory.mktemp("evaldata") / "data"
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
            "7",
            "--frames",
            "4",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    lines = (data / "chains.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:5]) + "\n")
    (data / "eval.jsonl").write_text("\n".join(lines[5:]) + "\n")
    return data / "train.jsonl", data / "eval.jsonl"


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_eval_data_is_the_held_out_set(files, tmp_path):
    train, held = files
    chains, notes = load_chains_file(str(train), eval_path=str(held))
    assert [c.id for c in chains] == _ids(train) + _ids(held)
    split = read_split(str(tmp_path / "split.json"), chains, heldout=200, seed=0)
    assert split == {"train": _ids(train), "heldout": _ids(held)}  # --heldout and the seed do not apply


def test_an_id_in_both_files_is_refused(files, tmp_path):
    train, held = files
    both = tmp_path / "both.jsonl"
    both.write_text(held.read_text() + train.read_text().splitlines()[0] + "\n")
    both_videos = tmp_path / "videos"
    both_videos.symlink_to(train.parent / "videos")
    with pytest.raises(ValueError, match=r"--eval-data .*: id .* is also in .*train\.jsonl.*not both"):
        load_chains_file(str(train), eval_path=str(both))


def test_a_record_whose_split_disagrees_is_refused(files, tmp_path):
    train, held = files
    recs = [json.loads(line) for line in train.read_text().splitlines()]
    recs[1]["split"] = "heldout"
    tagged = train.parent / "tagged.jsonl"
    tagged.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(
        ValueError, match=r"--data .*: record .* has split='heldout', but with --eval-data every "
    ):
        load_chains_file(str(tagged), eval_path=str(held))
    recs[1]["split"] = "train"  # agreeing tags are fine
    tagged.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert len(load_chains_file(str(tagged), eval_path=str(held))[0]) == 7


def test_eval_data_flag_checks(files, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "train_video_rank_evaldata", REPO / "examples" / "train_video_rank.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    train, held = files
    out = ["--output-dir", str(tmp_path / "run")]
    config = script.parse_config(["--data", str(train), "--eval-data", str(held), *out])
    assert config.eval_data == str(held)
    for argv, match in [
        (["--data", str(train), "--eval-data", str(held), "--heldout", "2"], "give one of them"),
        (["--eval-data", str(held)], "--eval-data applies to --data"),
        (
            ["--data", str(train), "--eval-data", str(tmp_path / "none.jsonl")],
            "--eval-data: chains file not found",
        ),
    ]:
        capsys.readouterr()
        try:
            script.parse_config([*argv, *out])
        except SystemExit as exc:
            message = capsys.readouterr().err + str(exc)
        except ValueError as exc:
            message = str(exc)
        else:
            raise AssertionError(f"{argv} was accepted")
        assert match in message, (argv, message)
