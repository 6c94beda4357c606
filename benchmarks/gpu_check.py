"""GPU check of the fused LM-head log-prob op at real sizes: correctness against float32, and timings.

    python benchmarks/gpu_check.py            # needs CUDA: N=8192, D=4096, V=152064, bf16
    python benchmarks/gpu_check.py --quick    # same correctness check, timings at N=8192 only, fewer reps
    python benchmarks/gpu_check.py --dry-run  # the same code on tiny CPU shapes with impl='torch'

1. **Correctness** (``N=8192, D=4096, V=152064``, bf16 inputs, ~3% of the labels ``ignore_index``, random
   per-token upstream gradients): log-probs, ``d hidden`` and ``d weight`` of
   ``rankloss.linear_token_logprobs`` (``impl=None``: the Triton kernels on CUDA; and
   ``deterministic=True``, run twice to check that it is bitwise reproducible) against a float32
   computation done in row chunks from the same bf16 inputs (no TF32). The yardstick is the naive PyTorch
   path in the inputs' dtype (bf16 logits, float32 ``log_softmax``): rankloss passes when its max and mean
   errors are no worse than twice the naive path's plus 16 float32 ulps of the truth's magnitude
   (DESIGN.md §5). Exit status 1 when a check fails.
2. **Timings** of forward + backward (``6 N V D`` FLOPs) at ``N`` in {8192, 16384} (``--quick``: 8192):
   rankloss, rankloss deterministic, the naive path (where it fits in memory), Liger-Kernel's fused
   linear cross entropy (where installed) and the three GEMMs alone (``hidden @ W^T``, ``logits @ W``,
   ``logits^T @ hidden``): minimum and median over repetitions (CUDA events), FLOP/s, the share of the
   measured matmul rate, and the peak extra memory (``torch.cuda.max_memory_allocated`` above the
   inputs). The issue-3 GPU targets are checked at ``N=16384``.

The table is printed and saved as ``benchmarks/results/gpu_check-<gpu name>[-quick].{json,md}``
(``--dry-run``: a temporary folder unless ``--out`` is given). Without CUDA the script stops with exit
status 2 unless ``--dry-run`` (``--device cpu --tiny --impl torch``) is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
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


def check_correctness(args: argparse.Namespace, sizes: tuple[int, int, int]) -> tuple[list[dict], bool]:
    """Errors of every path against the float32 truth; returns the rows and whether rankloss passed."""
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
    for name, path_impl, det, repro in _rankloss_paths(args):
        paths[name] = lambda h, w, i=path_impl, d=det: rankloss.linear_token_logprobs(
            h, w, labels, impl=i, deterministic=d
        )
        if repro:
            reproducible.add(name)
    rows: list[dict] = []
    for name, f in paths.items():
        try:
            out = logprobs_and_grads(f, hidden, weight, g)
        except torch.cuda.OutOfMemoryError:
            rows.append({"path": name, "status": "out of memory"})
            _free()
            continue
        for what, ours, ref, m in zip(("log-probs", "d hidden", "d weight"), out, truth, (mask, None, None)):
            rows.append({"path": name, "quantity": what, **errors(ours, ref, m)})
        if name in reproducible:
            again = logprobs_and_grads(f, hidden, weight, g)
            same = all(torch.equal(a, b) for a, b in zip(out, again))
            rows.append({"path": name, "quantity": "bitwise reproducible (2 runs)", "equal": same})
            del again
        del out
        _free()
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
    for r in rows:
        if not r["path"].startswith("rankloss"):
            continue
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
        ok = ok and r["pass"]
    return ok


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
def _timed(args: argparse.Namespace) -> list[tuple[str, str, str, str | None]]:
    """``(key, benchmarks/cases.py impl, label, rankloss impl=)`` of every timed implementation."""
    out = [("matmul", "matmul", "matmul only (3 GEMMs)", None), ("naive", "naive", "naive PyTorch", None)]
    for name, impl, det, _ in _rankloss_paths(args):
        key = "rankloss" if name == "rankloss" else name.replace(" ", "_").replace("=", "_")
        out.append((key, "rankloss_det" if det else "rankloss", name, impl))
    out.append(("liger", "liger", "Liger fused linear CE", None))
    return out


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


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


def run_timings(args: argparse.Namespace, Ns: Sequence[int], D: int, V: int) -> list[Timing]:
    rows = []
    for N in Ns:
        for impl, case_impl, label, backend in _timed(args):
            case = Case(
                "matmul" if impl == "matmul" else "logprobs",
                case_impl,
                "fwdbwd",
                N,
                D,
                V,
                dtype=args.dtype,
                device=args.device,
                backend=backend if impl.startswith("rankloss") else None,
            )
            try:
                prepared = prepare(case, seed=args.seed)
                prepared.fn()  # JIT, autotuning
                peak = None
                if impl != "matmul":
                    peak = measure_peak(case, prepared if args.device == "cuda" else None)["peak_bytes"]
                times = time_step(prepared.fn, args.device, args.warmup, args.reps)
            except Unavailable as exc:
                rows.append(Timing(impl, label, N, f"skipped: {exc}"))
                continue
            except torch.cuda.OutOfMemoryError:
                rows.append(Timing(impl, label, N, "out of memory"))
                prepared = None
                _free()
                continue
            rows.append(
                Timing(
                    impl,
                    label,
                    N,
                    "ok",
                    min(times),
                    statistics.median(times),
                    case.flops,
                    peak,
                    case.grad_bytes,
                )
            )
            del prepared
            _free()
    return rows


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
            lines.append(f"| {r['path']} | {r['quantity']} | | | | | {'yes' if r['pass'] else 'NO'} |")
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
        "| N | implementation | min ms | median ms | TFLOP/s (6NVD) | of matmul rate | time vs naive "
        "| peak extra MiB | beyond the gradients MiB |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for t in rows:
        if t.status != "ok":
            lines.append(f"| {t.N} | {t.label} | {t.status} | | | | | | |")
            continue
        mm = next((m for m in rows if m.N == t.N and m.impl == "matmul" and m.status == "ok"), None)
        naive = next((m for m in rows if m.N == t.N and m.impl == "naive" and m.status == "ok"), None)
        frac = f"{100 * _rate(t) / _rate(mm):.0f}%" if mm and t.impl != "matmul" else "-"
        vs = f"{t.t_min / naive.t_min:.2f}x" if naive and t.impl != "matmul" else "-"
        peak = f"{t.peak_bytes / 2**20:,.0f}" if t.peak_bytes is not None else "-"
        beyond = f"{(t.peak_bytes - t.grad_bytes) / 2**20:,.0f}" if t.peak_bytes is not None else "-"
        lines.append(
            f"| {t.N} | {t.label} | {t.t_min * 1e3:.3g} | {t.t_median * 1e3:.3g} | {_rate(t) / 1e12:.3g} "
            f"| {frac} | {vs} | {peak} | {beyond} |"
        )
    return lines


def target_lines(rows: list[Timing]) -> list[str]:
    """Issue 3's GPU targets on the largest N timed (16384 in the full run)."""
    N = max(t.N for t in rows)
    get = lambda impl: next((t for t in rows if t.N == N and t.impl == impl and t.status == "ok"), None)  # noqa: E731
    ours, mm, liger = get("rankloss"), get("matmul"), get("liger")
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
    if liger:
        r = ours.t_min / liger.t_min
        out.append(
            f"- faster than Liger's fused linear CE: {'met' if r < 1 else 'missed'} ({r:.2f}x its time)"
        )
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
        args.timing_Ns = (args.sizes[0],) if args.quick else (args.sizes[0], 2 * args.sizes[0])
    else:
        args.timing_Ns = (args.sizes[0],) if args.quick else (args.sizes[0], 16384)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is available (torch.cuda.is_available() is False). This script checks "
            "the Triton kernels at real sizes on a GPU; run it on a CUDA machine, or use --dry-run to check "
            "its logic on tiny CPU shapes.",
            file=sys.stderr,
        )
        return 2
    if args.impl == "triton" and args.device == "cpu":
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    N, D, V = args.sizes
    machine = describe_machine()
    name = machine.get("gpu") if args.device == "cuda" else f"{machine['cpu']}, {machine['cpu_cores']} cores"
    print(f"gpu_check on {name}: N={N} D={D} V={V} {args.dtype}, rankloss impl={args.impl}", flush=True)

    t0 = time.perf_counter()
    correctness, ok = check_correctness(args, args.sizes)
    last_tile, ok_last = check_last_tile_targets(args, V)
    correctness += last_tile
    ok = ok and ok_last
    md = [
        f"# gpu_check: {name}",
        "",
        f"- torch {machine['torch']}, triton {machine['triton']}, liger-kernel {machine['liger_kernel']}, "
        f"rankloss {machine['rankloss']}; rankloss impl={args.impl}",
        f"- Correctness at N={N}, D={D}, V={V}, {args.dtype} inputs, ~3% ignored labels, random upstream "
        "gradients, against float32 computed in chunks from the same inputs (no TF32); bound: twice the "
        "naive path's error plus 16 float32 ulps of the truth's magnitude",
        "",
        *correctness_table(correctness),
        "",
    ]
    print("\n".join(md[4:]), flush=True)
    timings: list[Timing] = []
    if not args.skip_timings:
        timings = run_timings(args, args.timing_Ns, D, V)
        tmd = [
            f"Forward + backward timings, D={D}, V={V}, {args.dtype}: minimum and median of {args.reps} "
            f"repetitions after {args.warmup} warm-up calls",
            "",
            *timing_table(timings, D, V),
            "",
            *target_lines(timings),
            "",
        ]
        print("\n".join(tmd), flush=True)
        md += tmd
    kernels = compiled_kernels()
    if kernels:
        kmd = [
            "Compiled Triton kernels (every specialisation this run launched)",
            "",
            "| kernel | registers | spills (B) | shared memory (B) | warps | stages |",
            "|---|--:|--:|--:|--:|--:|",
            *(
                f"| {k['kernel']} | {k['n_regs']} | {k['n_spills']} | {k['shared']} | {k['num_warps']} "
                f"| {k['num_stages']} |"
                for k in kernels
            ),
            "",
        ]
        print("\n".join(kmd), flush=True)
        md += kmd
    wall = time.perf_counter() - t0
    md.append(f"Wall time: {wall:.0f} s. Result: {'PASS' if ok else 'FAIL'}.")

    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check-")) if args.dry_run else HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = device_tag(args.device) + ("-tiny" if args.tiny else "") + ("-quick" if args.quick else "")
    stem = out_dir / f"gpu_check-{tag}"
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "machine": machine,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "correctness": correctness,
                "timings": [t.__dict__ for t in timings],
                "kernels": kernels,
                "pass": ok,
                "wall_s": wall,
            },
            indent=1,
        )
    )
    print(f"{'PASS' if ok else 'FAIL'} in {wall:.0f} s; wrote {stem}.md and {stem}.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
