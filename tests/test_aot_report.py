"""The sm_90 resource report in CI (benchmarks/aot_report.py; no GPU needed).

Every Triton kernel, compiled for an H100/H200 (sm_90) with the specialisation a CUDA launch of the GPU
profile gives it (bf16, fp16, fp32 with and without TF32; D=4096; V in {32000, 152064}; N in {8192, 16384};
with and without bias and soft-cap; both backward modes; the cuBLAS-chunked path's epilogues; the
log-probs-from-logits kernels; every chain-loss variant), must fit in the 232,448 B of shared memory a
block may have, spill no registers, use Hopper tensor cores (HGMMA) for every tl.dot on bf16/fp16 (or
TF32) operands, and have no fenced atomics. The interpreter checks none of this.

The report runs in a fresh process (it compiles: TRITON_INTERPRET=0). These tests skip only when Triton's
CUDA toolchain (its nvidia backend with ptxas and cuobjdump) is missing: the report exits with status 3.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.triton]

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "benchmarks" / "aot_report.py"
NO_TOOLCHAIN = 3  # aot_report.EXIT_NO_TOOLCHAIN (not imported here: the module switches the interpreter off)


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == NO_TOOLCHAIN:
        pytest.skip(f"no sm_90 toolchain for ahead-of-time compilation: {proc.stderr.strip()[-300:]}")
    return proc


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "report.json"
    proc = _run([sys.executable, str(REPORT), "--json", str(out), "--jobs", "2"], timeout=1800)
    # Status 1 means violations: the tests below name them.
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_no_kernel_of_the_gpu_profile_breaks_a_resource_rule(report):
    bad = [
        f"{b['module']}.{b['kernel']} [{b['variant']}]: {'; '.join(b['violations'])}"
        for b in report["binaries"]
        if b["violations"]
    ]
    assert not bad, "\n".join(bad)
    for b in report["binaries"]:  # the rules, restated on the numbers themselves
        assert b["shared"] <= report["machine"]["smem_per_block"], b["variant"]
        assert b["spill_stores"] == b["spill_loads"] == 0, b["variant"]
        assert b["fenced_atomics"] == 0, b["variant"]
        if {"bf16", "f16"} & set(b["dot_types"]):
            assert b["hgmma"] > 0, b["variant"]
        assert b["ctas_per_sm"] >= 1, b["variant"]


def _defined_kernels() -> set[tuple[str, str]]:
    """``(module, name)`` of every ``@triton.jit`` function named ``*_kernel`` in kernels/ (read from the
    source, independently of the report)."""
    found = set()
    for path in (REPO / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                    found.add((path.stem, node.name))
    return found


def test_the_report_covers_every_kernel_and_the_whole_profile(report):
    compiled = {(b["module"], b["kernel"]) for b in report["binaries"]}
    assert compiled == _defined_kernels()
    linear = {
        (
            e["case"]["path"],
            e["case"]["dtype"],
            e["case"]["N"],
            e["case"]["V"],
            e["case"]["bias"],
            e["case"]["softcap"],
        )
        for e in report["estimates"].values()
    }
    expected = itertools.product(
        ("triton", "triton-det", "cublas"),
        ("bf16", "fp16", "fp32-tf32", "fp32-ieee"),
        (8192, 16384),
        (32000, 152064),
        (False, True),
        (False, True),
    )
    tma = itertools.product(
        ("triton-tma", "triton-det-tma", "cublas-cache"),
        ("bf16", "fp16", "fp32-tf32"),
        (16384,),
        (152064,),
        (False, True),
        (False, True),
    )
    assert linear == set(expected) | set(tma)
    assert all(e["case"]["D"] == 4096 for e in report["estimates"].values())
    # Each fused kernel compiles to one binary per dtype and bias/soft-cap flag pair: N and V (both
    # multiples of 16) change the grid, not the binary.
    fused = [b for b in report["binaries"] if b["module"] == "linear_token_logprobs"]
    assert len(fused) == 4 * 4 * 4 + 4 * 3 * 4, len(
        fused
    )  # and with TMA loads of the weight (not exact fp32)


def test_tma_weight_loads_compile_to_tma_instructions(report):
    # With W_TMA (16-bit and TF32 inputs) the weight tiles come through a tensor descriptor: UTMALDG in the
    # SASS of every fused kernel (the gathered rows of hidden stay cp.async); without it no kernel has a
    # TMA instruction.
    fused = [b for b in report["binaries"] if b["module"] == "linear_token_logprobs"]
    with_tma = [b for b in fused if b["constexprs"].get("W_TMA")]
    assert len(with_tma) == 4 * 3 * 4  # kernels x tensor-core dtypes x bias/soft-cap
    assert {b["kernel"] for b in with_tma} == {
        "_fwd_kernel",
        "_bwd_atomic_kernel",
        "_bwd_dhidden_kernel",
        "_bwd_dweight_kernel",
    }
    for b in fused:
        assert (b["tma"] > 0) == bool(b["constexprs"].get("W_TMA")), (b["kernel"], b["variant"], b["tma"])


def _binary(report, kernel: str, dtype: str, **constexprs) -> dict:
    hits = [
        b
        for b in report["binaries"]
        if b["kernel"] == kernel
        and dtype in b["dtypes"]
        and all(b["constexprs"].get(k) == v for k, v in constexprs.items())
    ]
    assert len(hits) == 1, (kernel, dtype, constexprs, [h["variant"] for h in hits])
    return hits[0]


def test_the_cublas_path_stays_within_256_mb_beyond_its_gradients(report):
    # The memory goal, on the simulated run's fake CUDA storages (the peak beyond the inputs and
    # the returned gradients, as gpu_check.py measures it with torch.cuda.max_memory_allocated): every
    # dtype, N, V, bias and soft-cap of the profile. The fused Triton path keeps fp32 accumulators of
    # both gradients in 16-bit dtypes (d weight alone is V x D x 4 bytes).
    for e in report["estimates"].values():
        c = e["case"]
        if c["path"] == "cublas":
            assert 200 * 2**20 < e["extra_bytes"] <= 256e6, (c, e["extra_bytes"])
        elif c["path"] == "cublas-cache":  # every logit chunk kept: N V 4 bytes, and the buffers
            assert c["N"] * c["V"] * 4 < e["extra_bytes"] <= c["N"] * c["V"] * 4 + 1024 * 2**20, c
        elif c["dtype"] in ("bf16", "fp16"):
            assert e["extra_bytes"] >= c["V"] * c["D"] * 4, (c, e["extra_bytes"])


def test_the_forward_launcher_knows_how_many_programs_an_sm_holds(report):
    # The forward splits the vocabulary until the resident programs' rows fit in half the L2; it takes
    # their number from GPU_FWD_CTAS_PER_SM, which must be what the compiled binaries allow.
    from rankloss.kernels import linear_token_logprobs as kernels

    config = {"bf16": "16-bit", "fp16": "16-bit", "fp32-tf32": "tf32", "fp32-ieee": "ieee"}
    fwd = [b for b in report["binaries"] if b["kernel"] == "_fwd_kernel"]
    assert len(fwd) == 16 + 12  # 4 dtypes x bias x soft-cap; with TMA loads of the weight, 3 dtypes
    for b in fwd:
        (dtype,) = b["dtypes"]
        assert b["ctas_per_sm"] == kernels.GPU_FWD_CTAS_PER_SM[config[dtype]], (
            b["variant"],
            b["ctas_per_sm"],
        )


def test_binaries_carry_the_launch_specialisation(report):
    # What Triton's launcher derives from the arguments of a real launch: contiguous inputs have unit
    # inner strides (constexpr 1), allocations are 16-byte aligned and D, V, N are multiples of 16; and
    # what the launchers choose per dtype (tiles, warps, the forward's register cap).
    fwd = _binary(report, "_fwd_kernel", "bf16", HAS_BIAS=False, HAS_SOFTCAP=False, W_TMA=False)
    assert fwd["constexprs"]["stride_hd"] == 1 and fwd["constexprs"]["stride_wd"] == 1
    assert fwd["constexprs"]["UPCAST_DOT"] is False and fwd["constexprs"]["DOT_PRECISION"] == "ieee"
    assert {"h_ptr", "w_ptr", "labels_ptr", "D", "stride_hn", "stride_wv"} <= set(fwd["divisible_by_16"])
    assert fwd["options"]["maxnreg"] is None and fwd["options"]["num_warps"] == 8
    assert (fwd["constexprs"]["BLOCK_N"], fwd["constexprs"]["BLOCK_V"], fwd["constexprs"]["BLOCK_D"]) == (
        128,
        128,
        64,
    )
    tf32_fwd = _binary(report, "_fwd_kernel", "fp32-tf32", HAS_BIAS=False, HAS_SOFTCAP=False, W_TMA=False)
    assert tf32_fwd["options"]["maxnreg"] == 128
    tf32 = _binary(report, "_bwd_atomic_kernel", "fp32-tf32", HAS_BIAS=True, HAS_SOFTCAP=True, W_TMA=False)
    assert tf32["constexprs"]["DOT_PRECISION"] == "tf32" and tf32["constexprs"]["BLOCK_D"] == 32
    assert tf32["hgmma"] > 0 and "f32/tf32" in tf32["dot_types"]
    ieee = _binary(report, "_bwd_atomic_kernel", "fp32-ieee", HAS_BIAS=True, HAS_SOFTCAP=True, W_TMA=False)
    assert ieee["constexprs"]["DOT_PRECISION"] == "ieee" and ieee["hgmma"] == 0
    assert _binary(report, "_token_logprobs_bwd_kernel", "bf16")["constexprs"]["BLOCK_V"] == 4096


_DETECTOR = """
import json, sys
sys.path.insert(0, {bench!r})
import aot_report as A
import triton
import triton.language as tl


@triton.jit
def acq_rel_kernel(p, x):
    offs = tl.arange(0, 256)
    tl.atomic_add(p + offs, tl.load(x + offs))


@triton.jit
def relaxed_kernel(p, x):
    offs = tl.arange(0, 256)
    tl.atomic_add(p + offs, tl.load(x + offs), sem="relaxed")


tools = A.toolchain()
out = {{}}
for fn in (acq_rel_kernel, relaxed_kernel):
    aligned = [["tt.divisibility", 16]]
    kernel, log = A.compile_specialised(
        fn, {{"p": "*fp32", "x": "*fp32"}}, {{}}, {{(0,): aligned, (1,): aligned}}, {{"num_warps": 4}}
    )
    res = A.inspect_binary(kernel, tools, log)
    out[fn.__name__] = dict(res, violations=A.violations(res, A.H200))
print(json.dumps(out))
"""


def test_the_fenced_atomic_check_catches_the_default_semantics(tmp_path):
    # The check the report applies, on two tiny kernels: tl.atomic_add's default (acq_rel) puts a MEMBAR
    # next to the atomic and is a violation; sem="relaxed" is a plain reduction.
    script = tmp_path / "detector.py"  # @triton.jit needs the kernels' source in a file
    script.write_text(textwrap.dedent(_DETECTOR.format(bench=str(REPORT.parent))))
    proc = _run([sys.executable, str(script)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    fenced, relaxed = out["acq_rel_kernel"], out["relaxed_kernel"]
    assert fenced["atomics"] > 0 and fenced["fenced_atomics"] == fenced["atomics"]
    assert any(v.startswith("fenced atomics") for v in fenced["violations"])
    assert relaxed["atomics"] > 0 and relaxed["fenced_atomics"] == 0 and relaxed["membar"] == 0
    assert relaxed["violations"] == []
