"""The ``rankloss`` command line: chains make/summary/show, synthetic make, video probe, ``python -m``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from rankloss.chains import read_chains
from rankloss.chains.progress import Progress
from rankloss.cli import main

CAPTIONS = [
    "A man in a red shirt walks two dogs along a wooden pier. He throws a ball into the water. Then the dogs "
    "jump in after it.",
    "A chef slices a tomato on a cutting board, then he pours oil into a pan. Three eggs sit in a bowl.",
    "A girl in a yellow jacket rides a bicycle down a street. A black car is parked on the left.",
]


@pytest.fixture
def captions_file(tmp_path) -> str:
    path = tmp_path / "captions.jsonl"
    lines = [
        json.dumps({"video": f"v{i}.mp4", "caption": c, "split": "train"}) for i, c in enumerate(CAPTIONS)
    ]
    lines.insert(1, '{"video": "bad.mp4"')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_chains_make_writes_chains_and_a_summary(captions_file, tmp_path, capsys) -> None:
    out = tmp_path / "chains.jsonl"
    rc = main(
        [
            "chains",
            "make",
            "--in",
            captions_file,
            "--out",
            str(out),
            "--length",
            "4",
            "--seed",
            "0",
            "--no-progress",
            "--summary-json",
            str(tmp_path / "s.json"),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "chains: 3 written" in err and "1 skipped" in err and f"{captions_file}:2: invalid JSON" in err
    assert "edits: 9" in err and "chains shorter than asked (4): 0" in err
    recs = list(read_chains(out))
    assert [len(r["chain"]) for r in recs] == [4, 4, 4] and recs[0]["source"] == {"split": "train"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["chains_written"] == 3 and sum(summary["edit_types"].values()) == 9
    # the same again refuses to clobber; --overwrite replaces
    assert main(["chains", "make", "--in", captions_file, "--out", str(out), "--no-progress"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["chains", "make", "--in", captions_file, "--out", str(out), "--no-progress", "--overwrite"])
        == 0
    )


def test_chains_make_strict_fails_with_file_and_line(captions_file, tmp_path, capsys) -> None:
    rc = main(
        [
            "chains",
            "make",
            "--in",
            captions_file,
            "--out",
            str(tmp_path / "o.jsonl"),
            "--strict",
            "--no-progress",
        ]
    )
    assert rc == 1
    assert f"{captions_file}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_chains_make_resumes(captions_file, tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    args = ["chains", "make", "--in", captions_file, "--out", str(out), "--no-progress", "--length", "3"]
    assert main([*args, "--max-chains", "2"]) == 0
    assert "INCOMPLETE" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0
    assert "3 written (2 from an earlier run), complete" in capsys.readouterr().err
    assert [r["id"] for r in read_chains(out)] == ["v0.mp4", "v1.mp4", "v2.mp4"]


def test_chains_make_types_and_usage_errors(captions_file, tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    assert (
        main(
            [
                "chains",
                "make",
                "--in",
                captions_file,
                "--out",
                str(out),
                "--types",
                "spatial,count",
                "--length",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert {e["type"] for r in read_chains(out) for e in r["edits"]} <= {"spatial", "count"}
    assert (
        main(
            [
                "chains",
                "make",
                "--in",
                captions_file,
                "--out",
                str(tmp_path / "p.jsonl"),
                "--types",
                "colour",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "types must only hold" in capsys.readouterr().err
    assert (
        main(
            [
                "chains",
                "make",
                "--in",
                captions_file,
                "--out",
                str(tmp_path / "p.jsonl"),
                "--length",
                "1",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "length must be >= 2" in capsys.readouterr().err
    assert (
        main(
            [
                "chains",
                "make",
                "--in",
                captions_file,
                "--out",
                str(tmp_path / "p.jsonl"),
                "--llm-model",
                "x",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "--engine llm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["chains", "make", "--in", captions_file])
    assert exc.value.code == 2


def test_chains_summary_and_show(captions_file, tmp_path, capsys) -> None:
    out = tmp_path / "o.jsonl"
    main(["chains", "make", "--in", captions_file, "--out", str(out), "--no-progress", "--length", "3"])
    capsys.readouterr()
    assert main(["chains", "summary", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["chains_written"] == 3 and s["lengths"] == {"3": 3}
    assert main(["chains", "summary", str(out)]) == 0
    assert "edits: 6" in capsys.readouterr().out
    assert main(["chains", "show", str(out), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert (
        shown.startswith("=== v0.mp4") and "edit 1:" in shown and "edit 2:" in shown and "v1.mp4" not in shown
    )


def test_synthetic_make_and_video_probe(tmp_path, capsys) -> None:
    pytest.importorskip("av")
    out = tmp_path / "syn"
    assert (
        main(
            [
                "synthetic",
                "make",
                "--out",
                str(out),
                "--n",
                "2",
                "--length",
                "4",
                "--frames",
                "8",
                "--size",
                "32x48",
            ]
        )
        == 0
    )
    assert "wrote 2 synthetic mp4 videos" in capsys.readouterr().err
    recs = list(read_chains(out / "chains.jsonl"))
    assert len(recs) == 2 and all(len(r["chain"]) == 4 for r in recs)
    video = out / recs[0]["video"]
    assert video.exists()
    assert main(["video", "probe", str(video), "--frames", "4", "--size", "16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loaded_shape"] == [4, 3, 16, 16] and (info["height"], info["width"]) == (32, 48)
    # the captions file made for the text engines goes through `chains make` as it is
    assert (
        main(
            [
                "chains",
                "make",
                "--in",
                str(out / "captions.jsonl"),
                "--out",
                str(tmp_path / "c.jsonl"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["video", "probe", str(tmp_path / "nope.mp4")]) == 1
    assert "video file not found" in capsys.readouterr().err


def test_progress_without_tqdm(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = io.StringIO()
    bar = Progress(10, "chains", interval=0.0, stream=stream)
    assert bar._bar is None
    for _ in range(3):
        bar.update()
    bar.set_postfix("written=3")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert (
        len(lines) == 4 and lines[-1].startswith("chains: 3/10 records") and lines[-1].endswith("written=3")
    )
    quiet = io.StringIO()
    Progress(5, enabled=False, stream=quiet).close()
    assert quiet.getvalue() == ""


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, *args] if not code else [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_python_m_rankloss_and_lazy_imports(captions_file, tmp_path) -> None:
    # One subprocess does both checks: importing the tools must not import av, transformers or tqdm
    # (torch itself may import tqdm when it is installed: only what rankloss adds counts).
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import rankloss, rankloss.chains, rankloss.synthetic, rankloss.video, rankloss.cli\n"
        "new = set(sys.modules) - before\n"
        "heavy = [m for m in new if m.split('.')[0] in ('av', 'transformers', 'tqdm')]\n"
        "assert not heavy, heavy\n"
        "from rankloss.cli import main\n"
        f"sys.exit(main(['chains', 'make', '--in', {captions_file!r}, "
        f"'--out', {str(tmp_path / 'o.jsonl')!r}, '--no-progress']))\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o.jsonl").exists()
    r = _run("", "-m", "rankloss", "chains", "make", "--help")
    assert r.returncode == 0 and "--llm-model" in r.stdout and "--strict" in r.stdout
