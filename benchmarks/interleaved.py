"""Round-robin timings for shared machines: every round runs one step of each case in turn.

pytest-benchmark runs all rounds of one case before the next case, so when other jobs come and go the
cases of one report see different loads and their ratios drift. Here each round times every case once,
so all cases sample the same load; ratios of minimums over rounds are then the steadiest comparison a
busy machine allows. Peak memory is not measured here (use the pytest suites).

    python benchmarks/interleaved.py                    # issue-3 and issue-4 target cases, 5 rounds
    python benchmarks/interleaved.py --rounds 9 --suite chain
    python benchmarks/interleaved.py --json out.json    # also save the raw times
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import Case, describe_machine, prepare  # noqa: E402

TARGET_CASES = {
    "logprobs": [
        Case("matmul", "matmul", "fwdbwd", 4096, 512, 32000),
        Case("logprobs", "naive", "fwdbwd", 4096, 512, 32000),
        Case("logprobs", "compile", "fwdbwd", 4096, 512, 32000),
        Case("logprobs", "rankloss", "fwdbwd", 4096, 512, 32000),
    ],
    "chain": [
        Case("chain", "naive", "fwdbwd", 4096, 512, 32000, K=8, T=128),
        Case("chain", "rankloss", "fwdbwd", 4096, 512, 32000, K=8, T=128),
        Case("chain", "liger_dpo", "fwdbwd", 4096, 512, 32000, K=2, T=128),
    ],
}


def run(cases: Sequence[Case], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of every case, ``rounds`` round-robin passes (after one untimed warm-up pass)."""
    prepared = {c.id: prepare(c) for c in cases}
    times: dict[str, list[float]] = {c.id: [] for c in cases}
    for r in range(rounds + 1):
        for c in cases:
            gc.collect()
            t0 = time.perf_counter()
            prepared[c.id].fn()
            if r:  # round 0 warms up
                times[c.id].append(time.perf_counter() - t0)
        if r:
            print(
                f"round {r}/{rounds}: " + ", ".join(f"{c.impl} {times[c.id][-1]:.2f}s" for c in cases),
                flush=True,
            )
    return times


def table(cases: Sequence[Case], times: dict[str, list[float]]) -> list[str]:
    naive = next((c for c in cases if c.impl == "naive"), None)
    base = min(times[naive.id]) if naive else None
    lines = ["| case | min s | median s | max s | min vs naive |", "|---|--:|--:|--:|--:|"]
    for c in cases:
        t = times[c.id]
        ratio = f"{min(t) / base:.2f}x" if base and c.suite != "matmul" else "-"
        lines.append(f"| {c.id} | {min(t):.3f} | {statistics.median(t):.3f} | {max(t):.3f} | {ratio} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=(*TARGET_CASES, "all"), default="all")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="save the raw times and the machine description")
    args = p.parse_args(argv)
    suites = list(TARGET_CASES) if args.suite == "all" else [args.suite]
    machine = describe_machine()
    print(f"{machine['cpu']}, {machine['cpu_cores']} cores, load average {machine.get('loadavg')}")
    results = {}
    for suite in suites:
        cases = TARGET_CASES[suite]
        times = run(cases, args.rounds)
        print("\n".join(table(cases, times)), flush=True)
        results[suite] = times
    if args.json:
        end = describe_machine().get("loadavg")
        args.json.write_text(json.dumps({"machine": machine, "loadavg_end": end, "times": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
