"""The benchmark tooling works as documented (docs/benchmarks.md): the report script turns the committed
pytest-benchmark JSON into markdown and a PNG, the smoke profile runs every suite end to end (timings,
per-case memory probes in fresh processes, the report), and the GPU check's dry run passes on CPU.

These check the harness, not the numbers: no time is asserted anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"


def _env() -> dict[str, str]:
    env = {**os.environ, "RANKLOSS_BENCH_THREADS": "2"}
    env.pop("RANKLOSS_BENCH_PROFILE", None)
    return env


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def test_report_of_the_committed_cpu_results(tmp_path: Path):
    src = RESULTS / "cpu-quick.json"
    assert src.is_file(), "benchmarks/results/cpu-quick.json is the committed CPU report"
    data = json.loads(src.read_text())
    impls = {b["extra_info"].get("impl") for b in data["benchmarks"]}
    assert {"naive", "rankloss", "matmul"} <= impls, impls
    for b in data["benchmarks"]:
        info = b["extra_info"]
        for key in ("N", "D", "V", "dtype", "device", "flops", "tokens_per_s_min", "flop_per_s_min"):
            assert key in info, (b["name"], key)
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    _run([sys.executable, str(BENCH / "report.py"), str(src), "--md", str(md), "--png", str(png)], 300)
    text = md.read_text()
    assert "## Targets" in text and "Issue 4" in text and "time vs naive" in text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_smoke_profile_runs_every_suite_and_writes_the_report(tmp_path: Path):
    result = _run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--profile",
            "smoke",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
        ],
        1500,
    )
    data = json.loads((tmp_path / "smoke.json").read_text())
    suites = {b["extra_info"]["suite"] for b in data["benchmarks"]}
    assert suites == {"logprobs", "chain", "matmul"}, suites
    measured = [b for b in data["benchmarks"] if b["extra_info"].get("peak_mem_bytes") is not None]
    assert measured, "no case has a peak-memory figure"
    assert (tmp_path / "smoke.md").is_file() and (tmp_path / "smoke.png").is_file()
    assert "benchmarks:" in result.stdout


def test_gpu_check_dry_run_on_cpu(tmp_path: Path):
    result = _run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)], 600)
    assert list(tmp_path.glob("*.md")) and list(tmp_path.glob("*.json")), result.stdout[-2000:]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["finished"] and data["pass"] is True
    timed = {(t["N"], t["mode"], t["impl"]) for t in data["timings"] if t["status"] == "ok"}
    # Both modes of the core paths, and the extra rankloss path (deterministic=True).
    assert {(257, "fwd", "rankloss"), (257, "fwdbwd", "rankloss"), (257, "fwdbwd", "naive")} <= timed
    assert any(t["impl"] == "rankloss_deterministic" for t in data["timings"])
    assert any(r["path"].startswith("token_logprobs, labels in the last tile") for r in data["correctness"])
    # the last step: a VLM training step, chain tree vs full sequences (a video prompt, checkpointing on)
    cf = data["chain_forward"]
    assert cf["status"] == "ok" and cf["profile"] == "quick-vlm", cf.get("status")
    assert cf["rows"] and all(r["status"] == "ok" for r in cf["rows"]), [r["status"] for r in cf["rows"]]
    for r in cf["rows"]:
        assert r["shape"]["video"] and r["tokens_tree"] < r["tokens_full"]
        assert r["max_abs_loss_diff"] <= 1e-4 * max(1.0, abs(r["loss_full"])), r


def test_gpu_check_budget_skips_the_tail_and_keeps_a_complete_report(tmp_path: Path):
    # A budget spent by the correctness checks: every timing is recorded as skipped (none is lost), and
    # the report on disk is complete JSON.
    script = str(BENCH / "gpu_check.py")
    cmd = [sys.executable, script, "--dry-run", "--budget-s", "0", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["finished"] and data["pass"] is False, result.stdout[-2000:]  # nothing was checked
    assert result.returncode == 1
    assert data["timings"] and all(t["status"] == "skipped: budget spent" for t in data["timings"])
    assert all(r.get("status") == "skipped: budget spent" for r in data["correctness"])
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_check_report_is_saved_after_every_row(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check

    args = gpu_check.parse_args(["--dry-run"])
    machine = {"torch": "t", "triton": "t", "liger_kernel": None, "rankloss": "r"}
    report = gpu_check.Report(tmp_path / "gpu_check-x", machine, args, "x")
    row = gpu_check.Timing("naive", "naive PyTorch", 257, "ok", 0.01, 0.01, 10, 100, 0, reps=3)
    report.timings.append(row)
    report.save()
    data = json.loads((tmp_path / "gpu_check-x.json").read_text())
    assert data["finished"] is False and data["pass"] is None and len(data["timings"]) == 1
    assert "INCOMPLETE" in (tmp_path / "gpu_check-x.md").read_text()


def test_gpu_check_times_the_settings_chosen_without_a_gpu_against_the_old_ones(monkeypatch):
    # On CUDA the default is the cuBLAS path: after the defaults, one row with a wider memory budget
    # measures what the 240 MiB default costs in time, and two rows time the fused forward alone with its
    # 128 x 128 tiles and with the old 64 x 128 ones. Each setting is restored afterwards.
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_check
    from rankloss.kernels import linear_token_logprobs as kernels

    from rankloss.ops import _common, cublas_chunk_plan

    args = gpu_check.parse_args([])
    args.device = "cuda"
    plan = gpu_check._timed(args)
    variants = [(e[0], e[1], e[2], e[6]) for e in plan if e[5] == "triton" and e[1] == "fwd" or e[6]]
    assert variants == [
        (16384, "fwdbwd", "rankloss_cache", "logit cache"),
        (16384, "fwdbwd", "rankloss_budget", "cuBLAS budget 640 MiB"),
        (16384, "fwd", "rankloss_impl_triton", None),
        (16384, "fwd", "rankloss_impl_triton_fwd_tiles", "forward tiles 64x128"),
        (16384, "fwd", "rankloss_impl_triton_tma", "TMA weight"),
        (16384, "fwdbwd", "rankloss_impl_triton_tma", "TMA weight"),
    ]
    last_default = max(i for i, e in enumerate(plan) if e[2] == "rankloss")
    first_variant = min(i for i, e in enumerate(plan) if e[6])
    first_fused_fwdbwd = min(
        i for i, e in enumerate(plan) if e[5] == "triton" and e[1] == "fwdbwd" and not e[6]
    )
    last_variant = max(i for i, e in enumerate(plan) if e[6])
    assert last_default < first_variant < last_variant < first_fused_fwdbwd
    assert [e for e in gpu_check._timed(gpu_check.parse_args(["--dry-run"])) if e[6]] == []
    before = (_common.VOCAB_CHUNK_BUDGET_BYTES, dict(kernels.GPU_FWD_BLOCKS["16-bit"]))
    with gpu_check._variant("cuBLAS budget 640 MiB"):
        wide = cublas_chunk_plan(16384, 152064, 4096, torch.bfloat16, backward=True)
    assert (wide.rows, wide.columns) == (16384, 4096)  # one group of the old default's width
    with gpu_check._variant("forward tiles 64x128"):
        assert kernels._blocks(torch.device("cuda"), torch.bfloat16, forward=True)["BLOCK_N"] == 64
        assert kernels.GPU_FWD_CTAS_PER_SM["16-bit"] == 2
    with gpu_check._variant("TMA weight"):
        assert kernels.TMA_WEIGHT is True
    assert kernels.TMA_WEIGHT is False
    import cases

    with gpu_check._variant("logit cache", 16384, 152064):
        assert cases.RANKLOSS_OPTIONS == {"cache_bytes": 16384 * 152064 * 4}
    assert cases.RANKLOSS_OPTIONS == {}
    assert (_common.VOCAB_CHUNK_BUDGET_BYTES, kernels.GPU_FWD_BLOCKS["16-bit"]) == before
    assert kernels.GPU_FWD_CTAS_PER_SM["16-bit"] == 1


@pytest.mark.triton
def test_gpu_check_variants_run_the_paths_they_name(monkeypatch):
    # What the variants switch really reaches the op: the logit cache goes through cases.py's rankloss
    # case into linear_token_logprobs (a tiny cuBLAS-path step under the interpreter), and the TMA switch
    # reaches the fused kernels' launcher.
    monkeypatch.syspath_prepend(str(BENCH))
    import cases
    import gpu_check
    from rankloss.kernels import linear_token_logprobs as kernels

    import rankloss.logprobs as logprobs_module

    seen = []
    real = logprobs_module.linear_token_logprobs_op
    monkeypatch.setattr(
        logprobs_module, "linear_token_logprobs_op", lambda *a: seen.append(a[11]) or real(*a)
    )
    case = cases.Case("logprobs", "rankloss", "fwdbwd", 37, 16, 101, backend="cublas")
    with gpu_check._variant("logit cache", case.N, case.V):
        prepared = cases.prepare(case)
    prepared.fn()
    assert seen == [37 * 101 * 4]
    used = []
    real_operand = kernels._weight_operand
    monkeypatch.setattr(
        kernels, "_weight_operand", lambda w, b: used.append(real_operand(w, b)[1]) or real_operand(w, b)
    )
    with gpu_check._variant("TMA weight"):
        prepared = cases.prepare(cases.Case("logprobs", "rankloss", "fwdbwd", 37, 16, 101, backend="triton"))
        prepared.fn()
    assert used == [True, True]
