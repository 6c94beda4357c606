"""The chain forward benchmark (benchmarks/chain_forward.py) keeps working: its ``--quick`` mode runs both
paths (the chain tree and full sequences, gradient checkpointing on) on a tiny Qwen2 model, and its
``quick-vlm`` profile on a tiny Qwen2.5-VL with a video prompt; each writes the JSON and markdown report,
and the two paths give the same loss and gradients in that run. No time is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "chain_forward.py"


def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import chain_forward as cf
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return cf


@pytest.mark.parametrize("profile", ["quick", "quick-vlm"])
def test_quick_run_writes_the_report_and_both_paths_agree(tmp_path: Path, profile):
    cmd = [sys.executable, str(SCRIPT), "--profile", profile, "--out", str(tmp_path), "--threads", "2"]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    data = json.loads((tmp_path / f"chain-forward-cpu-{profile}.json").read_text())
    md = (tmp_path / f"chain-forward-cpu-{profile}.md").read_text()
    assert data["finished"] and not list(tmp_path.glob("*.tmp"))
    assert data["args"]["checkpointing"] is True and "gradient checkpointing on" in md
    assert "speed-up" in md and "token ratio" in md
    rows = data["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for r in rows:
        s = r["shape"]
        S = s["B"] * s["K"]
        assert r["tokens_tree"] == s["B"] * s["P"] + S * s["L"]
        assert r["tokens_full"] == S * (s["P"] + s["L"])
        assert len(r["times_tree"]) == len(r["times_full"]) == data["args"]["reps"]
        assert r["speedup"] == pytest.approx(r["median_full_s"] / r["median_tree_s"])
        # float32: the tree is exact, so the two paths agree to rounding
        assert r["max_abs_loss_diff"] <= 1e-4 * max(1.0, abs(r["loss_full"])), r
        assert r["grad_max_rel_diff"] <= 1e-4, r
        assert r["flops"]["flops_full"] > r["flops"]["flops_tree"] > 0
        # CPU peak memory is read from /proc (Linux): both paths have a figure
        if Path("/proc/self/clear_refs").exists():
            assert r["peak_bytes_tree"] is not None and r["peak_bytes_full"] is not None
        if profile == "quick-vlm":
            assert s["video"] and r["flops"]["vision_share_full"] > 0


def test_flop_model_and_token_counts():
    cf = _bench()
    spec = cf.PROFILES["cpu"].model
    one = cf.Shape(P=1024, L=64, K=1)
    # K = 1: the tree runs the same tokens and query-key pairs as the full sequence
    assert one.tokens_tree == one.tokens_full == 1088
    assert cf.step_flops(spec, one, True) == cf.step_flops(spec, one, False)
    eight = cf.Shape(P=4096, L=256, K=8, B=2)
    assert eight.tokens_tree == 2 * 4096 + 16 * 256 and eight.tokens_full == 16 * (4096 + 256)
    tree, full = cf.step_flops(spec, eight, True), cf.step_flops(spec, eight, False)
    assert tree["head"] == full["head"]  # the LM head scores the same S L tokens in both paths
    assert full["linear"] / tree["linear"] == pytest.approx(eight.tokens_full / eight.tokens_tree)
    assert 1 < cf.flop_model(spec, eight)["flop_ratio"] < eight.tokens_full / eight.tokens_tree
    # checkpointing recomputes the decoder's forward: 4/3 of its FLOPs, the LM head's unchanged
    plain = cf.step_flops(spec, eight, True, checkpointing=False)
    assert tree["linear"] * 3 == plain["linear"] * 4 and tree["head"] == plain["head"]
    # a video prompt: 16 frames of 448 x 448 are 8 x 16 x 16 tokens and 8 x 32 x 32 patches, the vision
    # tower runs once per video in the tree and once per completion in full sequences
    vlm = cf.PROFILES["gpu-vlm"]
    video = vlm.shapes[0]
    assert video.video == (16, 448, 448) and video.video_tokens == 2048 and video.patches == 8192
    tree, full = cf.step_flops(vlm.model, video, True), cf.step_flops(vlm.model, video, False)
    assert full["vision"] == video.K * tree["vision"] > 0
    with pytest.raises(ValueError, match="leaves no text"):
        cf.Shape(P=100, L=8, K=2, video=(16, 448, 448))


def test_cpu_peak_reads_a_tensor_it_allocates():
    import torch

    cf = _bench()
    peak = cf.CpuPeak()
    if not peak.ok:
        pytest.skip("no /proc/self/clear_refs here")
    with peak.measure():
        x = torch.ones(4096, 4096)  # 64 MiB
        del x
    assert 60 * 2**20 <= peak.bytes <= 200 * 2**20, peak.bytes
    with peak.measure():
        pass
    assert peak.bytes < 60 * 2**20, peak.bytes
