"""Where one forward + backward of ``linear_token_logprobs`` spends its GPU time: a kernel table.

    python benchmarks/profile_step.py --impl cublas --N 16384        # D=4096, V=152064, bf16 by default
    python benchmarks/profile_step.py --impl triton --N 8192 --mode fwd

Runs the step twice to warm up (JIT, cuBLAS heuristics), then once under ``torch.profiler`` and prints
the CUDA kernels sorted by their total time (``--top`` rows), with the step's wall time from CUDA events
and its share of the ``6 N V D`` (``2 N V D`` forward only) FLOPs at the rate given by ``--matmul-tflops``
when given. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="cublas", help="rankloss impl= (triton, cublas, torch)")
    p.add_argument("--N", type=int, default=16384)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--V", type=int, default=152064)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--mode", default="fwdbwd", choices=("fwd", "fwdbwd"))
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--deterministic", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device", file=sys.stderr)
        return 2

    import rankloss

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(args.N, args.D, dtype=dtype, device="cuda", generator=gen)
    weight = torch.randn(args.V, args.D, dtype=dtype, device="cuda", generator=gen).mul_(2.0 * args.D**-0.5)
    labels = torch.randint(0, args.V, (args.N,), device="cuda", generator=gen)
    g = torch.randn(args.N, device="cuda", generator=gen)
    backward = args.mode == "fwdbwd"
    h = hidden.requires_grad_(backward)
    w = weight.requires_grad_(backward)

    def step() -> None:
        out = rankloss.linear_token_logprobs(
            h, w, labels, impl=args.impl, chunk_size=args.chunk_size, deterministic=args.deterministic
        )
        if backward:
            torch.autograd.grad(out, (h, w), g)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    flops = (6 if backward else 2) * args.N * args.V * args.D
    print(
        f"impl={args.impl} mode={args.mode} N={args.N} D={args.D} V={args.V} {args.dtype}: "
        f"{ms:.1f} ms, {flops / ms / 1e9:.0f} TFLOP/s on {'6' if backward else '2'} N V D"
    )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
