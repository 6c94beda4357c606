"""``rankloss eval``: saved checkpoints + a chains JSONL -> report.json and report.md (the trainer's
ranking metrics, generated captions scored by a judge on loopback or the lexical fallback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

import transformers  # noqa: E402
from test_judge import StubJudge  # noqa: E402

from rankloss import cli  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402

CAPTIONS = [
    [
        "a red ball rolls left.",
        "a red ball rolls right.",
        "a blue ball rolls right.",
        "a blue box rolls right.",
    ],
    ["two cats sleep on a mat.", "three cats sleep on a mat.", "three dogs sleep on a mat."],
    ["a man opens the door.", "a man closes the door.", "a woman closes the door."],
    ["a green car drives away.", "a green car drives closer.", "a green car stops."],
    ["a dog jumps over a fence.", "a dog jumps under a fence.", "a cat jumps under a fence."],
]
TYPES = ["action", "attribute", "object", "count", "spatial"]


def _chains(path: Path) -> Path:
    with open(path, "w") as f:
        for i, chain in enumerate(CAPTIONS):
            edits = [{"step": k, "type": TYPES[(i + k) % len(TYPES)]} for k in range(1, len(chain))]
            split = "train" if i == 4 else "test"
            f.write(json.dumps({"id": f"c{i}", "chain": chain, "edits": edits, "split": split}) + "\n")
    return path


def _checkpoint(path: Path, tok, seed: int) -> Path:
    import torch

    config = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer([c for chain in CAPTIONS for c in chain] + ["Describe this video in detail."], 150)
    return {
        "data": _chains(root / "chains.jsonl"),
        "a": _checkpoint(root / "ckpt-a", tok, 0),
        "b": _checkpoint(root / "ckpt-b", tok, 1),
    }


def test_two_checkpoints_with_a_reference_and_a_judge(setup, tmp_path):
    out = tmp_path / "report"
    a, b = str(setup["a"]), str(setup["b"])
    with StubJudge() as srv:
        rc = cli.main(
            [
                "eval",
                a,
                b,
                "--data",
                str(setup["data"]),
                "--ref",
                a,
                "--split",
                "test",
                "--generate",
                "2",
                "--max-new-tokens",
                "5",
                "--judge-url",
                srv.url,
                "--judge-model",
                "stub",
                "--out",
                str(out),
                "--cpu",
            ]
        )
        assert srv.requests  # the judge was asked
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "implicit_reward" and report["records"] == 4 and report["split"] == "test"
    ra, rb = report["checkpoints"]
    assert (ra["label"], rb["label"]) == ("ckpt-a", "ckpt-b")
    # the reference is checkpoint a itself: every implicit reward is 0, ties count half
    assert ra["metrics"]["eval_pairwise_accuracy"] == pytest.approx(0.5)
    # (and top-1 is shared among the K tied captions: 1/K per chain, chains of 4, 3, 3, 3)
    assert ra["assessment"]["overall"]["rewards"]["top1_accuracy"] == pytest.approx((1 / 4 + 3 * (1 / 3)) / 4)
    # two different checkpoints give different reports: assessment and generation
    assert ra["assessment"]["overall"]["logps_per_token"] != rb["assessment"]["overall"]["logps_per_token"]
    assert ra["assessment"]["best_logp_per_token"] != rb["assessment"]["best_logp_per_token"]
    assert rb["metrics"]["eval_pairwise_accuracy"] != pytest.approx(0.5)
    assert [r["generated"] for r in ra["generation"]["rows"]] != [
        r["generated"] for r in rb["generation"]["rows"]
    ]
    # per edit type and per position, from the chains' edits
    assert set(ra["assessment"]["per_type"]) >= {"action", "attribute"}
    assert (
        "pos2" in ra["assessment"]["per_position"] and "rewards" in ra["assessment"]["per_position"]["pos2"]
    )
    for r in (ra, rb):
        g = r["generation"]
        assert g["scorer"] == "judge" and g["samples"] == 2 and len(g["rows"]) == 2
        assert [x["id"] for x in g["rows"]] == ["c0", "c1"]
        assert g["rows"][0]["reference"] == CAPTIONS[0][0]
        assert Path(g["file"]).is_file() and Path(g["file"]).parent == out / r["label"] / "generations"
        assert 0.0 <= g["f1"] <= 1.0
    md = (out / "report.md").read_text()
    assert "| | ckpt-a | ckpt-b |" in md and "implicit reward: pairwise_accuracy" in md
    assert "judge `stub`" in md and "by edit type" in md and "by chain position" in md
    assert not list(out.rglob("*.tmp"))


def test_same_checkpoint_twice_reference_free_lexical(setup, tmp_path):
    out = tmp_path / "report"
    a = str(setup["a"])
    rc = cli.main(
        [
            "eval",
            a,
            a,
            "--data",
            str(setup["data"]),
            "--generate",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--cpu",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "reference_free" and report["records"] == 5
    r1, r2 = report["checkpoints"]
    assert (r1["label"], r2["label"]) == ("ckpt-a", "ckpt-a-2")
    assert r1["metrics"] == r2["metrics"]  # deterministic: the same checkpoint gives the same report
    assert r1["generation"]["rows"] == r2["generation"]["rows"]
    assert "rewards" not in r1["assessment"]["overall"] and "logps" in r1["assessment"]["overall"]
    assert r1["generation"]["scorer"] == "lexical"
    md = (out / "report.md").read_text()
    assert "reference-free" in md and "lexical fallback" in md and "weaker" in md


def _usage(args, capsys) -> str:
    rc = cli.main(["eval", *args])
    assert rc == 2
    return capsys.readouterr().err


def test_options_are_checked_before_any_model_is_loaded(setup, tmp_path, capsys, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_load", no_load)
    a, data = str(setup["a"]), str(setup["data"])
    out = ["--out", str(tmp_path / "o")]
    assert "CHECKPOINT" in _usage([str(tmp_path), "--data", data, *out], capsys)
    assert "--ref" in _usage([a, "--data", data, "--ref", str(tmp_path), *out], capsys)
    assert "--data" in _usage([a, "--data", str(tmp_path / "none.jsonl"), *out], capsys)
    err = _usage([a, "--data", data, "--judge-url", "http://127.0.0.1:1/v1", *out], capsys)
    assert "--judge-url needs --judge-model" in err
    err = _usage(
        [a, "--data", data, "--judge-url", "http://x/v1", "--judge-model", "m", "--generate", "0", *out],
        capsys,
    )
    assert "--generate" in err
    assert "--judge-url" in _usage(
        [a, "--data", data, "--judge-url", "x", "--judge-model", "m", *out], capsys
    )
    assert "--generate must be >= 0" in _usage([a, "--data", data, "--generate", "-1", *out], capsys)
    err = _usage([a, "--data", data, "--split", "heldout", *out], capsys)
    assert "--split 'heldout'" in err and "test, train" in err
    videos = tmp_path / "v.jsonl"
    (tmp_path / "clip.mp4").write_bytes(b"")
    videos.write_text(json.dumps({"id": "v", "video": "clip.mp4", "chain": ["a b", "a c"]}) + "\n")
    assert "--num-frames is required" in _usage([a, "--data", str(videos), *out], capsys)
    with pytest.raises(SystemExit) as exc:  # argparse: mutually exclusive
        cli.main(["eval", a, "--data", data, "--ref", a, "--reference-free"])
    assert exc.value.code == 2
