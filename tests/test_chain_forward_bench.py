"""The chain forward benchmark (benchmarks/chain_forward.py) keeps working: its ``--quick`` mode runs both
paths (shared prefix and full sequences) on a tiny Qwen2 model, writes the JSON and markdown report, and
the two paths give the same loss and gradients in that run. No time is asserted."""

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


def test_quick_run_writes_the_report_and_both_paths_agree(tmp_path: Path):
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--threads", "2"]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    data = json.loads((tmp_path / "chain-forward-cpu-quick.json").read_text())
    md = (tmp_path / "chain-forward-cpu-quick.md").read_text()
    assert data["finished"] and not list(tmp_path.glob("*.tmp"))
    assert "speed-up" in md and "token ratio" in md
    rows = data["rows"]
    assert rows and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for r in rows:
        s = r["shape"]
        S = s["B"] * s["K"]
        assert r["tokens_shared"] == s["B"] * s["P"] + S * s["L"]
        assert r["tokens_full"] == S * (s["P"] + s["L"])
        assert len(r["times_shared"]) == len(r["times_full"]) == data["args"]["reps"]
        assert r["speedup"] == pytest.approx(r["median_full_s"] / r["median_shared_s"])
        # float32: the shared-prefix path is exact, so the two paths agree to rounding
        assert r["max_abs_loss_diff"] <= 1e-4 * max(1.0, abs(r["loss_full"])), r
        assert r["grad_max_rel_diff"] <= 1e-4, r
        assert r["flops"]["flops_full"] > r["flops"]["flops_shared"] > 0


def test_flop_model_and_token_counts():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import chain_forward as cf
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    spec = cf.PROFILES["cpu"].model
    one = cf.Shape(P=1024, L=64, K=1)
    # K = 1: the shared prefix runs the same tokens and query-key pairs as the full sequence
    assert one.tokens_shared == one.tokens_full == 1088
    assert cf.step_flops(spec, one, True) == cf.step_flops(spec, one, False)
    eight = cf.Shape(P=4096, L=256, K=8, B=2)
    assert eight.tokens_shared == 2 * 4096 + 16 * 256 and eight.tokens_full == 16 * (4096 + 256)
    shared, full = cf.step_flops(spec, eight, True), cf.step_flops(spec, eight, False)
    assert shared["head"] == full["head"]  # the LM head scores the same S L tokens in both paths
    assert full["linear"] / shared["linear"] == pytest.approx(eight.tokens_full / eight.tokens_shared)
    assert 1 < cf.flop_model(spec, eight)["flop_ratio"] < eight.tokens_full / eight.tokens_shared
