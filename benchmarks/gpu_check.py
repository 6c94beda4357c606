"""GPU check of rankloss's LM-head log-prob paths at real sizes, within one device lease.

    python benchmarks/gpu_check.py              # needs CUDA: N=8192, D=4096, V=152064, bf16; budget 420 s
    python benchmarks/gpu_check.py --budget-s 200 --out $OUT
    python benchmarks/gpu_check.py --quick      # timings at N=8192 only, 3 repetitions
    python benchmarks/gpu_check.py --dry-run    # the same code on tiny CPU shapes with impl='torch'

On a bare machine (no network) it installs the repository first when ``import rankloss`` fails:
``python -m pip install --no-build-isolation --no-deps --no-index <repo>`` (torch and triton come with
the machine's image).

1. **Correctness** (``N=8192, D=4096, V=152064``, bf16 inputs, ~3% of the labels ``ignore_index``, random
   per-token upstream gradients): log-probs, ``d hidden`` and ``d weight`` of
   ``rankloss.linear_token_logprobs`` against a float32 computation done in row chunks from the same
   bf16 inputs (no TF32). With ``--impl auto`` on CUDA: the default (the vocabulary-chunked cuBLAS path)
   and the fused Triton kernels in both backward modes; reproducible paths run twice and are compared
   bitwise. The yardstick is the naive PyTorch path in the inputs' dtype (bf16 logits, float32
   ``log_softmax``): rankloss passes when its max and mean errors are no worse than twice the naive
   path's plus 16 float32 ulps of the truth's magnitude (DESIGN.md §5). Then ``token_logprobs``' backward
   with every label in the last vocabulary tile, 20 times, compared bitwise. Exit status 1 when a check
   fails (or when the budget let none run).
2. **Timings** at ``N`` in {16384, 8192} (``--quick``: 8192), forward + backward (``6 N V D`` FLOPs) and
   forward only (``2 N V D``), most important first: the GEMMs alone, the naive path and the rankloss
   default at each ``N``; then the other rankloss paths, Liger-Kernel's fused linear cross entropy (where
   installed) and ``torch.compile`` of the naive path (at the smaller ``N``). Minimum and median over
   repetitions (CUDA events), FLOP/s, the share of the measured matmul rate, the peak extra memory
   (``torch.cuda.max_memory_allocated`` above the inputs), the backward alone (difference of the two
   modes), the issue-3 GPU targets, and the registers/spills/shared memory of every compiled kernel.
3. **Chain forward** (optional, last, in what the budget has left; ``--skip-chain-forward``): a training
   step of a Qwen2.5-VL-shaped model built from a config (8 text layers of hidden 2048, 8 vision blocks,
   bf16, gradient checkpointing on) on video prompts of 2,048 and 8,192 tokens with K = 2 and 8 captions
   of 256 tokens: the chain tree (flex attention, or flash-attn's varlen kernel when installed) against
   full sequences: step time, tokens/s, peak memory, the loss difference
   (``benchmarks/chain_forward.py``'s ``gpu-vlm`` profile; the dry run runs ``quick-vlm`` on CPU).

``--budget-s`` (default 420) bounds the whole run: each case's first call sets how many repetitions fit,
and what does not fit is recorded as skipped. The report is rewritten after every result (atomically:
a temporary file, then a rename), so a run killed at the end of a lease leaves everything it measured.
It goes to ``benchmarks/results/gpu_check-<gpu name>[-quick].{json,md}`` (``--out`` elsewhere;
``--dry-run``: a temporary folder). Without CUDA the script stops with exit status 2 unless
``--dry-run`` (``--device cpu --tiny --impl torch``) is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _ensure_rankloss() -> None:
    """Install this repository (offline, no dependencies) when ``rankloss`` is not importable."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("rankloss") is not None:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--no-index"]
    print(f"gpu_check: rankloss is not installed; running {' '.join(cmd)} {HERE.parent}", flush=True)
    subprocess.run([*cmd, str(HERE.parent)], check=True)
    importlib.invalidate_caches()


if __name__ == "__main__":
    _ensure_rankloss()
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from cases import DTYPES, Case, Unavailable, describe_machine, device_tag, measure_peak, prepare  # noqa: E402
from torch import Tensor  # noqa: E402

IGNORE = -100


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------
def make_inputs(
    N: int, D: int, V: int, dtype: torch.dtype, device: str, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``hidden [N, D]``, ``weight [V, D]`` (logits of standard deviation ~2, so that some rows are
    peaked), ``labels [N]`` with ~3% ``ignore_index``, upstream gradient ``g [N]`` (float32)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(N, D, dtype=dtype, device=device, generator=gen)
    weight = torch.randn(V, D, dtype=dtype, device=device, generator=gen).mul_(2.0 * D**-0.5)
    labels = torch.randint(0, V, (N,), device=device, generator=gen)
    drop = torch.rand(N, device=device, generator=gen) < 0.03
    labels = labels.masked_fill(drop, IGNORE)
    g = torch.randn(N, device=device, generator=gen)
    return hidden, weight, labels, g


def float32_truth(
    hidden: Tensor, weight: Tensor, labels: Tensor, g: Tensor, chunk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs ``[N]``, ``d hidden [N, D]`` and ``d weight [V, D]`` in float32, ``chunk`` rows at a time.

    ``l_n = z_{n, y_n} - logsumexp(z_n)`` with ``z = h W^T`` computed in float32 from the given (rounded)
    inputs; ``dA = g (onehot(y) - softmax(z))`` (0 on ignored rows), ``dh = dA W``, ``dW = dA^T h``.
    """
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        w = weight.float()
        N, D = hidden.shape
        logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
        dw = torch.zeros_like(w)
        scored = labels != IGNORE
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            h = hidden[rows].float()
            z = h @ w.T
            lse = torch.logsumexp(z, dim=-1)
            ok = scored[rows]
            y = torch.where(ok, labels[rows], 0)
            logp[rows] = torch.where(ok, z.gather(1, y[:, None]).squeeze(1) - lse, 0.0)
            p = z.sub_(lse[:, None]).exp_()
            gc_ = torch.where(ok, g[rows], 0.0)
            da = p.mul_(-gc_[:, None])
            da.scatter_add_(1, y[:, None], gc_[:, None])
            dh[rows] = da @ w
            dw.addmm_(da.T, h)
            del z, p, da
        return logp, dh, dw
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def logprobs_and_grads(
    f: Callable[[Tensor, Tensor], Tensor], hidden: Tensor, weight: Tensor, g: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    logp = f(h, w)
    dh, dw = torch.autograd.grad(logp, (h, w), g)
    return logp.detach(), dh, dw


def errors(ours: Tensor, truth: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Max and mean absolute error (float32), the truth's max magnitude, and whether all are finite."""
    diff = (ours.float() - truth).abs()
    if mask is not None:
        diff = diff[mask]
        truth = truth[mask]
    return {
        "max_abs": diff.max().item() if diff.numel() else 0.0,
        "mean_abs": diff.mean().item() if diff.numel() else 0.0,
        "truth_max_abs": truth.abs().max().item() if truth.numel() else 0.0,
        "truth_mean_abs": truth.abs().mean().item() if truth.numel() else 0.0,
        "finite": bool(torch.isfinite(ours).all().item()),
    }


def _rankloss_paths(args: argparse.Namespace) -> list[tuple[str, str | None, bool, bool]]:
    """``(name, impl, deterministic, reproducible)`` of the rankloss paths checked and timed.

    ``--impl auto`` on CUDA: the default (the vocabulary-chunked cuBLAS path, deterministic by
    construction) and the fused Triton kernels in both backward modes. Otherwise the chosen ``impl``
    with and without ``deterministic=True``. ``reproducible`` paths are run twice and must agree bitwise
    (the atomic Triton backward need not).
    """
    if args.impl == "auto" and args.device == "cuda":
        return [
            ("rankloss", None, False, True),
            ("rankloss impl=triton", "triton", False, False),
            ("rankloss impl=triton deterministic", "triton", True, True),
        ]
    impl = None if args.impl == "auto" else args.impl
    return [
        ("rankloss", impl, False, impl != "triton"),
        ("rankloss deterministic", impl, True, True),
    ]


def check_correctness(
    args: argparse.Namespace,
    sizes: tuple[int, int, int],
    deadline: float = float("inf"),
    on_rows: Callable[[list[dict]], None] = lambda rows: None,
) -> tuple[list[dict], bool]:
    """Errors of every path against the float32 truth; returns the rows and whether rankloss passed.

    A path whose turn comes after ``deadline`` (``time.perf_counter()`` seconds) is recorded as skipped;
    ``on_rows`` sees the rows after every path (the caller saves the report then).
    """
    from cases import naive_logprobs

    import rankloss

    N, D, V = sizes
    dtype = DTYPES[args.dtype]
    hidden, weight, labels, g = make_inputs(N, D, V, dtype, args.device, args.seed)
    truth = float32_truth(hidden, weight, labels, g, chunk=args.truth_chunk)
    mask = labels != IGNORE
    paths: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        f"naive ({args.dtype} logits)": lambda h, w: torch.where(
            mask, naive_logprobs(h, w, torch.where(mask, labels, 0)), 0.0
        ),
    }
    reproducible = set()
    variant_of: dict[str, str] = {}
    checked = [(*p, None) for p in _rankloss_paths(args)]
    if args.impl == "auto" and args.device == "cuda":  # the fused kernels with TMA loads of the weight
        checked += [
            (f"{n} (TMA weight)", i, d, r, "TMA weight") for n, i, d, r, _ in checked if i == "triton"
        ]
    for name, path_impl, det, repro, variant in checked:
        paths[name] = lambda h, w, i=path_impl, d=det: rankloss.linear_token_logprobs(
            h, w, labels, impl=i, deterministic=d
        )
        if repro:
            reproducible.add(name)
        if variant:
            variant_of[name] = variant
    rows: list[dict] = []
    for name, f in paths.items():
        if time.perf_counter() > deadline:
            rows.append({"path": name, "status": "skipped: budget spent"})
            on_rows(rows)
            continue
        try:
            with _variant(variant_of.get(name)):
                out = logprobs_and_grads(f, hidden, weight, g)
        except torch.cuda.OutOfMemoryError:
            rows.append({"path": name, "status": "out of memory"})
            _free()
            continue
        except Exception as exc:  # noqa: BLE001 - a variant not on by default fails alone, recorded
            if name not in variant_of:
                raise
            rows.append({"path": name, "status": f"error: {type(exc).__name__}: {exc}"[:500]})
            _free()
            on_rows(rows)
            continue
        for what, ours, ref, m in zip(("log-probs", "d hidden", "d weight"), out, truth, (mask, None, None)):
            rows.append({"path": name, "quantity": what, **errors(ours, ref, m)})
        if name in reproducible:
            with _variant(variant_of.get(name)):
                again = logprobs_and_grads(f, hidden, weight, g)
            same = all(torch.equal(a, b) for a, b in zip(out, again))
            rows.append({"path": name, "quantity": "bitwise reproducible (2 runs)", "equal": same})
            del again
        del out
        _free()
        on_rows(rows)
    ok = _verdicts(rows)
    return rows, ok


# Absolute margin, relative to the truth's magnitude: 16 float32 ulps. It only matters when both paths
# are at float32 rounding level (float32 inputs); with bf16 inputs the naive path's error is far larger.
FP32_MARGIN = 16 * torch.finfo(torch.float32).eps


def _verdicts(rows: list[dict]) -> bool:
    """rankloss's errors must be finite and no worse than twice the naive path's (per quantity) plus
    :data:`FP32_MARGIN` times the truth's max (or mean) magnitude."""
    naive = {r["quantity"]: r for r in rows if r["path"].startswith("naive") and "max_abs" in r}
    ok = True
    checked = 0
    for r in rows:
        if not r["path"].startswith("rankloss"):
            continue
        if r.get("status", "").startswith("skipped"):
            continue  # not run (budget): neither a pass nor a failure
        if "equal" in r:
            r["pass"] = r["equal"]
        elif "max_abs" in r:
            base = naive.get(r["quantity"])
            if base is None:  # no yardstick (the naive path ran out of memory): finiteness only
                r["pass"] = r["finite"]
                r["bound"] = "finite"
            else:
                r["bound_max_abs"] = 2 * base["max_abs"] + FP32_MARGIN * r["truth_max_abs"]
                r["bound_mean_abs"] = 2 * base["mean_abs"] + FP32_MARGIN * r["truth_mean_abs"]
                r["pass"] = (
                    r["finite"]
                    and r["max_abs"] <= r["bound_max_abs"]
                    and r["mean_abs"] <= r["bound_mean_abs"]
                )
        else:
            r["pass"] = False
        checked += 1
        ok = ok and r["pass"]
    return ok and checked > 0  # a run that checked nothing (budget spent) does not pass


def check_last_tile_targets(args: argparse.Namespace, V: int, repeats: int = 20) -> tuple[list[dict], bool]:
    """``token_logprobs`` backward with every label in the last vocabulary tile, ``repeats`` times.

    The target entry of the gradient used to be written twice by different threads with no barrier
    between (a race on a GPU when the label lies in the last tile: ids >= 151552 at V=152064, Qwen's
    ``<|im_end|>`` among them). Checks the gradient against float32 autograd and that every repeat is
    bitwise equal to the first.
    """
    import rankloss

    N = 1024 if not args.tiny else 37
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    logits = torch.randn(N, V, device=args.device, generator=gen).mul_(2.0).to(DTYPES[args.dtype])
    tile = 4096 if args.device == "cuda" else 1024
    last = (V - 1) // tile * tile
    labels = torch.randint(last, V, (N,), device=args.device, generator=gen)
    g = torch.randn(N, device=args.device, generator=gen)
    impl = None if args.impl in ("auto", "cublas") else args.impl

    def grad() -> Tensor:
        z = logits.detach().requires_grad_()
        (out,) = torch.autograd.grad(rankloss.token_logprobs(z, labels, impl=impl), z, g)
        return out

    first = grad()
    same = all(torch.equal(first, grad()) for _ in range(repeats - 1))
    z = logits.detach().float().requires_grad_()
    lp = torch.log_softmax(z, dim=-1).gather(1, labels[:, None]).squeeze(1)
    (truth,) = torch.autograd.grad(lp, z, g)
    target = lambda t: t.gather(1, labels[:, None]).squeeze(1)  # noqa: E731
    err = errors(target(first), target(truth))
    name = "token_logprobs, labels in the last tile"
    rows = [
        {"path": name, "quantity": "target entries of d logits", **err},
        {"path": name, "quantity": f"bitwise equal over {repeats} runs", "equal": same},
    ]
    # The target entries must match float32 autograd to bf16/fp16 output rounding (or fp32 for fp32).
    tol = 2 * torch.finfo(DTYPES[args.dtype]).eps * max(err["truth_max_abs"], 1e-30) + 1e-6
    ok = same and err["finite"] and err["max_abs"] <= tol
    rows[0]["pass"] = err["finite"] and err["max_abs"] <= tol
    rows[0]["bound"] = f"{tol:.3g}"
    rows[1]["pass"] = same
    return rows, ok


# --------------------------------------------------------------------------------------------------
# Timings
# --------------------------------------------------------------------------------------------------
# Variants timed beside the defaults: what a setting chosen without a GPU costs or gains there.
# * The cuBLAS path's memory budget (MiB): 640 gives one group of 4096-column chunks at N=16384, D=4096
#   in bf16, as before the 240 MiB default (two groups of 2304 columns).
# * The fused forward's 16-bit tiles: 64 x 128 capped at 128 registers (two programs per SM), as before
#   the 128 x 128 default (one per SM).
# * TMA loads of the weight in the fused kernels (rankloss.kernels.linear_token_logprobs.TMA_WEIGHT), off
#   by default until measured; its correctness is checked with the other paths.
# * The cuBLAS path's logit cache (cache_bytes=N*V*4: no recomputation in the backward, 9.3 GiB at
#   N=16384), opt-in: what memory buys against the naive path.
WIDE_BUDGET_MIB = 640
OLD_FWD_TILES = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, maxnreg=128)
VARIANTS = {
    f"cuBLAS budget {WIDE_BUDGET_MIB} MiB": "budget",
    "forward tiles 64x128": "fwd_tiles",
    "TMA weight": "tma",  # the fused kernels load the weight through TMA descriptors (off by default)
    "logit cache": "cache",  # the cuBLAS path keeps every fp32 logit chunk: cache_bytes = N V 4
}


def _timed(args: argparse.Namespace) -> list[tuple[int, str, str, str, str, str | None, str | None]]:
    """The timing plan, most important first: ``(N, mode, key, cases.py impl, label, rankloss impl=,
    variant)`` (a key of ``VARIANTS`` or None).

    First the GEMMs alone, the naive path and the rankloss default at the largest ``N``, forward +
    backward then forward only; then the same at the other ``N``; then at the largest ``N``, when the
    default is the cuBLAS path, the same with a ``WIDE_BUDGET_MIB`` memory budget, and on CUDA the fused
    Triton forward alone with its tiles and with the old ones (forward-only scoring is where it could
    beat the cuBLAS path, which writes fp32 logits chunks); then the other rankloss paths (the fused
    Triton backward is slow), ``torch.compile`` of the naive path at the smallest ``N`` and Liger. A
    budget that runs out skips the tail of this list, not its head.
    """
    Ns = sorted(args.timing_Ns, reverse=True)
    paths = _rankloss_paths(args)
    default, others = paths[0], paths[1:]

    def rankloss_entry(N, mode, path, variant=None):
        name, impl, det, _ = path
        key = "rankloss" if name == "rankloss" else name.replace(" ", "_").replace("=", "_")
        if variant:
            name, key = f"{name} ({variant})", f"{key}_{VARIANTS[variant]}"
        return (N, mode, key, "rankloss_det" if det else "rankloss", name, impl, variant)

    plan = []
    for N in Ns:
        for mode in ("fwdbwd", "fwd"):
            plan.append((N, mode, "matmul", "matmul", "matmul only (GEMMs)", None, None))
            plan.append((N, mode, "naive", "naive", "naive PyTorch", None, None))
            plan.append(rankloss_entry(N, mode, default))
    cublas_default = default[1] == "cublas" or (default[1] is None and args.device == "cuda")
    if cublas_default:
        plan.append(rankloss_entry(Ns[0], "fwdbwd", default, "logit cache"))
        plan.append(rankloss_entry(Ns[0], "fwdbwd", default, f"cuBLAS budget {WIDE_BUDGET_MIB} MiB"))
    triton_atomic = next((p for p in others if p[1] == "triton" and not p[2]), None)
    if triton_atomic is not None and args.device == "cuda":
        plan.append(rankloss_entry(Ns[0], "fwd", triton_atomic))
        plan.append(rankloss_entry(Ns[0], "fwd", triton_atomic, "forward tiles 64x128"))
        plan.append(rankloss_entry(Ns[0], "fwd", triton_atomic, "TMA weight"))
        plan.append(rankloss_entry(Ns[0], "fwdbwd", triton_atomic, "TMA weight"))
    for N in Ns:
        for path in others:
            plan.append(rankloss_entry(N, "fwdbwd", path))
        plan.append((N, "fwdbwd", "liger", "liger", "Liger fused linear CE", None, None))
    if not args.tiny:  # compiling takes longer than the whole tiny dry run
        plan.append((Ns[-1], "fwdbwd", "compile", "compile", "torch.compile(naive)", None, None))
    return plan


@contextlib.contextmanager
def _variant(variant: str | None, N: int = 0, V: int = 0):
    """Run with the setting of ``variant`` (a key of ``VARIANTS``; None: the defaults), restored after;
    ``N`` and ``V`` size the logit cache."""
    import cases
    from rankloss.kernels import linear_token_logprobs as kernels

    from rankloss.ops import _common

    saved = (
        _common.VOCAB_CHUNK_BUDGET_BYTES,
        kernels.GPU_FWD_BLOCKS["16-bit"],
        dict(kernels.GPU_FWD_CTAS_PER_SM),
        kernels.TMA_WEIGHT,
    )
    kind = VARIANTS[variant] if variant else None
    if kind == "budget":
        _common.VOCAB_CHUNK_BUDGET_BYTES = WIDE_BUDGET_MIB * 2**20
    elif kind == "fwd_tiles":
        kernels.GPU_FWD_BLOCKS["16-bit"] = dict(OLD_FWD_TILES)
        kernels.GPU_FWD_CTAS_PER_SM["16-bit"] = 2
    elif kind == "tma":
        kernels.TMA_WEIGHT = True
    elif kind == "cache":
        cases.RANKLOSS_OPTIONS["cache_bytes"] = N * V * 4
    try:
        yield
    finally:
        cases.RANKLOSS_OPTIONS.pop("cache_bytes", None)
        _common.VOCAB_CHUNK_BUDGET_BYTES = saved[0]
        kernels.GPU_FWD_BLOCKS["16-bit"] = saved[1]
        kernels.GPU_FWD_CTAS_PER_SM.update(saved[2])
        kernels.TMA_WEIGHT = saved[3]


@dataclass
class Timing:
    impl: str
    label: str
    N: int
    status: str
    t_min: float = float("nan")
    t_median: float = float("nan")
    flops: int = 0
    peak_bytes: int | None = None
    grad_bytes: int = 0
    mode: str = "fwdbwd"
    reps: int = 0


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(fn: Callable[[], object], device: str, warmup: int, reps: int) -> list[float]:
    """Seconds per call: CUDA events on CUDA, ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def run_timings(
    args: argparse.Namespace, D: int, V: int, deadline: float, on_row: Callable[[Timing], None]
) -> list[Timing]:
    """Time the plan of :func:`_timed` until ``deadline`` (``time.perf_counter()`` seconds).

    Each case is set up and called once (JIT compilation, autotuning, cuBLAS heuristics); that call's
    time sets how many repetitions fit before the deadline (at most ``--reps``, after ``--warmup``
    calls). A case that does not fit at all is recorded as skipped. ``on_row`` sees every row as soon as
    it exists (the caller saves the report then, so a killed run keeps what it measured).
    """
    rows = []
    for N, mode, impl, case_impl, label, backend, variant in _timed(args):
        left = deadline - time.perf_counter()
        if left < 2.0:
            rows.append(Timing(impl, label, N, "skipped: budget spent", mode=mode))
            on_row(rows[-1])
            continue
        case = Case(
            "matmul" if impl == "matmul" else "logprobs",
            case_impl,
            mode,
            N,
            D,
            V,
            dtype=args.dtype,
            device=args.device,
            backend=backend if impl.startswith("rankloss") else None,
        )
        try:
            with _variant(variant, N, V):
                row = _time_case(args, case, impl, label, N, mode, deadline)
        except Unavailable as exc:
            row = Timing(impl, label, N, f"skipped: {exc}", mode=mode)
        except torch.cuda.OutOfMemoryError:
            row = Timing(impl, label, N, "out of memory", mode=mode)
        except Exception as exc:  # noqa: BLE001 - a variant not on by default fails alone, recorded
            if not variant:
                raise
            row = Timing(impl, label, N, f"error: {type(exc).__name__}: {exc}"[:300], mode=mode)
        rows.append(row)
        on_row(row)
        _free()
    return rows


def _time_case(
    args: argparse.Namespace, case: Case, impl: str, label: str, N: int, mode: str, deadline: float
) -> Timing:
    """One row of :func:`run_timings`: set up, call once, measure the peak memory, time what fits.

    An out-of-memory error during the step frees the case before it propagates (the caller records it)."""
    prepared = prepare(case, seed=args.seed)
    try:
        _sync(args.device)
        t0 = time.perf_counter()
        prepared.fn()  # JIT, autotuning
        _sync(args.device)
        first = time.perf_counter() - t0
        # The peak-memory run, the warm-up calls and the timed ones must fit in what is left.
        fit = int((deadline - time.perf_counter()) / max(first, 1e-4)) - args.warmup - 2
        reps = min(args.reps, fit)
        if reps < 1:
            return Timing(impl, label, N, f"skipped: budget (one call took {first:.2f} s)", mode=mode)
        peak = None
        if impl != "matmul":
            peak = measure_peak(case, prepared if args.device == "cuda" else None)["peak_bytes"]
        times = time_step(prepared.fn, args.device, args.warmup, reps)
    finally:
        del prepared
    return Timing(
        impl,
        label,
        N,
        "ok",
        min(times),
        statistics.median(times),
        case.flops,
        peak,
        case.grad_bytes,
        mode=mode,
        reps=len(times),
    )


def _rate(t: Timing) -> float:
    return t.flops / t.t_min if t.status == "ok" else float("nan")


def compiled_kernels() -> list[dict]:
    """Registers, spills, shared memory, warps and stages of every compiled rankloss kernel in this process.

    Read from Triton's in-memory cache of each ``@triton.jit`` function (empty under the interpreter).
    The cache's layout differs between Triton releases, so unknown layouts give an empty list.
    """
    import importlib

    out = []
    for module in ("linear_logprobs_chunked", "linear_token_logprobs", "token_logprobs", "chain_loss"):
        try:
            mod = importlib.import_module(f"rankloss.kernels.{module}")
        except ImportError:
            continue
        for name, fn in sorted(vars(mod).items()):
            caches = getattr(fn, "device_caches", None)
            if not isinstance(caches, dict):
                continue
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                if not isinstance(cache, dict):
                    continue
                for compiled in cache.values():
                    try:
                        compiled._init_handles()
                    except Exception:  # noqa: BLE001 - metadata is best effort
                        pass
                    meta = getattr(compiled, "metadata", None)
                    out.append(
                        {
                            "kernel": f"{module}.{name}",
                            "n_regs": getattr(compiled, "n_regs", None),
                            "n_spills": getattr(compiled, "n_spills", None),
                            "shared": getattr(meta, "shared", None),
                            "num_warps": getattr(meta, "num_warps", None),
                            "num_stages": getattr(meta, "num_stages", None),
                        }
                    )
    return out


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def correctness_table(rows: list[dict]) -> list[str]:
    lines = [
        "| path | quantity | max abs err | mean abs err | max abs of truth | bound (max / mean) | pass |",
        "|---|---|--:|--:|--:|--:|:-:|",
    ]
    for r in rows:
        if "status" in r:
            lines.append(f"| {r['path']} | - | {r['status']} | | | | |")
        elif "equal" in r:
            verdict = {True: "yes", False: "NO"}.get(r.get("pass"), "")
            lines.append(f"| {r['path']} | {r['quantity']} | | | | | {verdict} |")
        else:
            bound = (
                f"{r['bound_max_abs']:.3g} / {r['bound_mean_abs']:.3g}"
                if "bound_max_abs" in r
                else r.get("bound", "(yardstick)")
            )
            verdict = {True: "yes", False: "NO"}.get(r.get("pass"), "")
            lines.append(
                f"| {r['path']} | {r['quantity']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} "
                f"| {r['truth_max_abs']:.3g} | {bound} | {verdict} |"
            )
    return lines


def timing_table(rows: list[Timing], D: int, V: int) -> list[str]:
    lines = [
        "| N | mode | implementation | min ms | median ms | reps | TFLOP/s | of matmul rate | time vs naive "
        "| peak extra MiB | beyond the gradients MiB |",
        "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in rows:
        if t.status != "ok":
            lines.append(f"| {t.N} | {t.mode} | {t.label} | {t.status} | | | | | | | |")
            continue
        same = [m for m in rows if m.N == t.N and m.mode == t.mode and m.status == "ok"]
        mm = next((m for m in same if m.impl == "matmul"), None)
        naive = next((m for m in same if m.impl == "naive"), None)
        frac = f"{100 * _rate(t) / _rate(mm):.0f}%" if mm and t.impl != "matmul" else "-"
        vs = f"{t.t_min / naive.t_min:.2f}x" if naive and t.impl != "matmul" else "-"
        peak = f"{t.peak_bytes / 2**20:,.0f}" if t.peak_bytes is not None else "-"
        beyond = f"{(t.peak_bytes - t.grad_bytes) / 2**20:,.0f}" if t.peak_bytes is not None else "-"
        lines.append(
            f"| {t.N} | {t.mode} | {t.label} | {t.t_min * 1e3:.3g} | {t.t_median * 1e3:.3g} | {t.reps} "
            f"| {_rate(t) / 1e12:.3g} | {frac} | {vs} | {peak} | {beyond} |"
        )
    return lines


def backward_lines(rows: list[Timing]) -> list[str]:
    """Backward alone, as forward + backward minus forward (minimum times), where both were measured."""
    out = []
    for t in rows:
        if t.mode != "fwdbwd" or t.status != "ok":
            continue
        f = next((m for m in rows if (m.N, m.impl, m.mode, m.status) == (t.N, t.impl, "fwd", "ok")), None)
        if f is not None:
            out.append(
                f"| {t.N} | {t.label} | {f.t_min * 1e3:.3g} | {(t.t_min - f.t_min) * 1e3:.3g} "
                f"| {t.t_min * 1e3:.3g} |"
            )
    if not out:
        return []
    return [
        "Forward and backward separately (backward = forward + backward minus forward, minimum times, ms)",
        "",
        "| N | implementation | forward | backward | forward + backward |",
        "|--:|---|--:|--:|--:|",
        *out,
        "",
    ]


def target_lines(rows: list[Timing]) -> list[str]:
    """Issue 3's GPU targets on the largest N timed forward + backward (16384 in the full run)."""
    timed = [t for t in rows if t.mode == "fwdbwd" and t.status == "ok"]
    if not timed:
        return ["no forward + backward timing completed"]
    N = max(t.N for t in timed)
    get = lambda impl: next((t for t in timed if t.N == N and t.impl == impl), None)  # noqa: E731
    ours, mm = get("rankloss"), get("matmul")
    if ours is None:
        return [f"rankloss did not run at N={N}"]
    out = [f"Issue 3 GPU targets at N={N} (defined at N=16384, D=4096, V=152064, bf16, on an H100):"]
    if mm:
        frac = _rate(ours) / _rate(mm)
        out.append(
            f"- >= 75% of the measured matmul rate: {'met' if frac >= 0.75 else 'missed'} ({100 * frac:.0f}%)"
        )
    if ours.peak_bytes is not None:
        beyond = ours.peak_bytes - ours.grad_bytes
        out.append(
            f"- extra memory <= 256 MB: {'met' if beyond <= 256e6 else 'missed'} ({beyond / 2**20:,.0f} MiB "
            f"beyond the inputs and the returned gradients; {ours.peak_bytes / 2**20:,.0f} MiB with them)"
        )
    others = (
        ("naive", "naive PyTorch"),
        ("compile", "torch.compile(naive)"),
        ("liger", "Liger's fused linear CE"),
    )
    for key, what in others:
        other = get(key)
        if other is not None:
            r = ours.t_min / other.t_min
            out.append(f"- faster than {what}: {'met' if r < 1 else 'missed'} ({r:.2f}x its time)")
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="timings at N=8192 only, 3 repetitions")
    p.add_argument(
        "--dry-run", action="store_true", help="= --device cpu --tiny --impl torch (a logic check)"
    )
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny odd shapes (N=257, D=67, V=1031)")
    p.add_argument(
        "--impl", choices=("auto", "torch", "triton", "cublas"), default="auto", help="rankloss impl="
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bfloat16 (tiny: float32)")
    p.add_argument("--N", type=int, help="tokens for the correctness check (default 8192)")
    p.add_argument("--D", type=int, help="hidden size (default 4096)")
    p.add_argument("--V", type=int, help="vocabulary (default 152064)")
    p.add_argument("--reps", type=int, help="timed repetitions (default 10, --quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--truth-chunk", type=int, default=1024, help="rows per chunk of the float32 truth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-timings", action="store_true")
    p.add_argument(
        "--skip-chain-forward",
        action="store_true",
        help="skip the last, optional step (chain forward: chain tree vs full sequences, video prompts)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="seconds for the whole check (default 420: a 15-minute device lease minus the machine's start, "
        "the install and a rerun); what does not fit is skipped, most important first",
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results; dry run: a temp folder)"
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.tiny = "cpu", True
        if args.impl == "auto":
            args.impl = "torch"
    tiny = (257, 67, 1031)
    real = (8192, 4096, 152064)
    base = tiny if args.tiny else real
    args.sizes = (args.N or base[0], args.D or base[1], args.V or base[2])
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.reps = args.reps or (3 if args.quick or args.tiny else 10)
    if args.tiny:
        args.timing_Ns = (args.sizes[0],)  # one size: the logic is the same at every size
    else:
        args.timing_Ns = (args.sizes[0],) if args.quick else (args.sizes[0], 16384)
    return args


class Report:
    """What the run has measured so far, rewritten to ``<stem>.md`` and ``<stem>.json`` after every result.

    Each write goes to a temporary file that then replaces the old one, so a run killed at any moment
    (the end of a device lease) leaves a complete report of what it had measured.
    """

    def __init__(self, stem: Path, machine: dict, args: argparse.Namespace, name: str) -> None:
        self.stem, self.machine, self.args, self.name = stem, machine, args, name
        self.correctness: list[dict] = []
        self.timings: list[Timing] = []
        self.kernels: list[dict] = []
        self.chain_forward: dict = {}
        self.ok = True
        self.finished = False
        self.t0 = time.perf_counter()

    def markdown(self) -> list[str]:
        a = self.args
        N, D, V = a.sizes
        md = [
            f"# gpu_check: {self.name}",
            "",
            f"- torch {self.machine['torch']}, triton {self.machine['triton']}, liger-kernel "
            f"{self.machine['liger_kernel']}, rankloss {self.machine['rankloss']}; rankloss impl={a.impl}; "
            f"budget {a.budget_s:.0f} s",
            f"- Correctness at N={N}, D={D}, V={V}, {a.dtype} inputs, ~3% ignored labels, random upstream "
            "gradients, against float32 computed in chunks from the same inputs (no TF32); bound: twice the "
            "naive path's error plus 16 float32 ulps of the truth's magnitude",
            "",
            *correctness_table(self.correctness),
            "",
        ]
        if self.timings:
            md += [
                f"Timings, D={D}, V={V}, {a.dtype}: minimum and median of up to {a.reps} repetitions after "
                f"{a.warmup} warm-up calls (fewer when the budget was short: see reps); TFLOP/s count "
                "6 N V D for forward + backward and 2 N V D for forward only",
                "",
                *timing_table(self.timings, D, V),
                "",
                *backward_lines(self.timings),
                *target_lines(self.timings),
                "",
            ]
        if self.kernels:
            md += [
                "Compiled Triton kernels (every specialisation this run launched)",
                "",
                "| kernel | registers | spills (B) | shared memory (B) | warps | stages |",
                "|---|--:|--:|--:|--:|--:|",
                *(
                    f"| {k['kernel']} | {k['n_regs']} | {k['n_spills']} | {k['shared']} | {k['num_warps']} "
                    f"| {k['num_stages']} |"
                    for k in self.kernels
                ),
                "",
            ]
        md += chain_forward_lines(self.chain_forward)
        wall = time.perf_counter() - self.t0
        state = ("PASS" if self.ok else "FAIL") if self.finished else "INCOMPLETE (still running or killed)"
        md.append(f"Wall time: {wall:.0f} s. Result: {state}.")
        return md

    def save(self) -> None:
        self.stem.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": self.machine,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()},
            "correctness": self.correctness,
            "timings": [t.__dict__ for t in self.timings],
            "kernels": self.kernels,
            "chain_forward": self.chain_forward,
            "pass": self.ok if self.finished else None,
            "finished": self.finished,
            "wall_s": time.perf_counter() - self.t0,
        }
        texts = {".md": "\n".join(self.markdown()) + "\n", ".json": json.dumps(payload, indent=1)}
        for suffix, text in texts.items():
            target = self.stem.with_suffix(suffix)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available (torch.cuda.is_available() is False). This script checks "
            "rankloss's GPU paths at real sizes; run it on a CUDA machine, or use --dry-run to check its "
            "logic on tiny CPU shapes.",
            file=sys.stderr,
        )
        return 2
    if args.impl in ("triton", "cublas") and args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    N, D, V = args.sizes
    machine = describe_machine()
    name = machine.get("gpu") if args.device == "cuda" else f"{machine['cpu']}, {machine['cpu_cores']} cores"
    print(
        f"gpu_check on {name}: N={N} D={D} V={V} {args.dtype}, rankloss impl={args.impl}, "
        f"budget {args.budget_s:.0f} s",
        flush=True,
    )
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.dry_run else HERE / "results")
    tag = device_tag(args.device) + ("-tiny" if args.tiny else "") + ("-quick" if args.quick else "")
    report = Report(out_dir / f"gpu_check-{tag}", machine, args, name)
    deadline = report.t0 + args.budget_s

    def correctness_rows(rows: list[dict]) -> None:
        report.correctness = rows
        report.save()

    correctness, ok = check_correctness(args, args.sizes, deadline, correctness_rows)
    if time.perf_counter() < deadline:
        last_tile, ok_last = check_last_tile_targets(args, V)
        correctness += last_tile
        ok = ok and ok_last
    report.correctness, report.ok = correctness, ok
    report.save()
    print("\n".join(correctness_table(correctness)), flush=True)
    if not args.skip_timings:

        def timing_row(row: Timing) -> None:
            report.timings.append(row)
            report.save()
            speed = f"{row.t_min * 1e3:.3g} ms (x{row.reps})" if row.status == "ok" else row.status
            print(f"  N={row.N} {row.mode} {row.label}: {speed}", flush=True)

        run_timings(args, D, V, deadline, timing_row)
    if not args.skip_chain_forward:
        run_chain_forward(args, report, deadline)
    report.kernels = compiled_kernels()
    report.finished = True
    report.save()
    summary = [*backward_lines(report.timings), *target_lines(report.timings)] if report.timings else []
    print("\n".join(["", *timing_table(report.timings, D, V), "", *summary]), flush=True)
    print(f"{'PASS' if ok else 'FAIL'}; wrote {report.stem}.md and {report.stem}.json")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------------
# Optional last step: the chain forward, chain tree vs full sequences (benchmarks/chain_forward.py)
# --------------------------------------------------------------------------------------------------
def run_chain_forward(args: argparse.Namespace, report: Report, deadline: float) -> None:
    """The lowest-priority step: a training step of a Qwen2.5-VL-shaped model built from a config
    (``benchmarks/chain_forward.py``'s ``gpu-vlm`` profile: 8 text layers of hidden 2048, 8 vision blocks
    of 1280, bf16, gradient checkpointing on; a video prompt of 2,048 or 8,192 tokens, captions of 256,
    K = 2 and 8), the chain tree (its ``auto`` attention path: flash-attn's varlen kernel when the wheel
    is installed, else flex attention) against full sequences: step time, tokens/s, peak memory and the
    loss difference, in what is left of the budget, into ``report.chain_forward`` (saved after every
    shape). ``--quick``: the 2,048-token video only; the dry run: the ``quick-vlm`` profile on CPU. It
    never changes the verdict."""
    import chain_forward as cfb

    tiny = args.tiny or args.device == "cpu"
    profile = cfb.PROFILES["quick-vlm" if tiny else "gpu-vlm"]
    reps = 2 if tiny else profile.reps
    if args.quick and not tiny:
        profile = dataclasses.replace(profile, shapes=profile.shapes[:2])
    section = report.chain_forward
    section.update(
        {"model": profile.model.describe(), "profile": profile.name, "reps": reps, "rows": [], "status": "ok"}
    )
    try:
        import transformers  # noqa: F401
    except ImportError:
        section["status"] = "skipped: transformers is not installed"
        report.save()
        return
    from rankloss.integrations.attention import flash_attn_available

    section["attention"] = "flash" if flash_attn_available() and not tiny else ("sdpa" if tiny else "flex")
    # The larger model takes a few seconds to build: start only with room for a shape or two.
    if deadline - time.perf_counter() < (2.0 if tiny else 60.0):
        deadline = -1.0

    def on_row(row) -> None:
        section["rows"].append(dataclasses.asdict(row))
        report.save()
        s = row.shape
        what = f"{row.speedup:.2f}x (tokens {row.token_ratio:.2f}x)" if row.status == "ok" else row.status
        print(f"  chain forward P={s['P']} L={s['L']} K={s['K']}: {what}", flush=True)

    try:
        cfb.run_profile(profile, device=args.device, reps=reps, deadline=deadline, on_row=on_row)
    except Exception as exc:  # noqa: BLE001 - optional step: record, never fail the check
        section["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    _free()
    report.save()


def chain_forward_lines(section: dict) -> list[str]:
    """The chain-forward section of the markdown report (empty when the step did not run)."""
    if not section:
        return []
    import chain_forward as cfb

    rows = [cfb.Row(**r) for r in section.get("rows", [])]
    return [
        f"Chain forward, chain tree vs full sequences (optional last step; {section['model']}; gradient "
        f"checkpointing on; tree attention: {section.get('attention', 'auto')}; forward + backward of the "
        f"chain loss, median of {section['reps']} interleaved repetitions; status: {section['status']})",
        "",
        *cfb.table(rows),
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
