"""One command for a benchmark report: run the suites, then write the JSON, a markdown table and a plot.

    python benchmarks/run.py --quick          # CPU: the issue-3/issue-4 target sizes, a few minutes
    python benchmarks/run.py --profile full   # CPU: more sizes, 5 rounds
    python benchmarks/run.py                  # the default profile: gpu with CUDA, else quick

Writes ``<out>/<name>.json`` (pytest-benchmark), ``<name>.md`` and ``<name>.png``; ``<name>`` defaults to
``cpu-<profile>`` or ``<gpu name>-<profile>`` (e.g. ``nvidia-h100-80gb-hbm3-gpu``). Extra arguments after
``--`` go to pytest (e.g. ``-- -k chain``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from cases import PROFILES, default_profile, device_tag  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), help="default: gpu with CUDA, else quick")
    parser.add_argument("--quick", action="store_true", help="same as --profile quick")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument("--name", help="file name stem (default: cpu-<profile> or <gpu>-<profile>)")
    parser.add_argument("--note", help="a line for the report (e.g. 'shared machine, other jobs running')")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.quick and args.profile not in (None, "quick"):
        parser.error("--quick contradicts --profile " + args.profile)
    profile = "quick" if args.quick else (args.profile or default_profile())
    name = args.name or f"{device_tag(PROFILES[profile].device)}-{profile}"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        f"--bench-profile={profile}",
        f"--benchmark-json={json_path}",
        "--benchmark-sort=name",
        "--benchmark-columns=min,median,max,rounds",
        "-p",
        "no:cacheprovider",
        "-q",
        *args.pytest_args,
    ]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    status = subprocess.call(cmd, cwd=HERE.parent, env={**os.environ, "RANKLOSS_BENCH_PROFILE": profile})
    wall = time.perf_counter() - start
    if status != 0 or not json_path.exists():
        print(f"pytest failed with status {status} after {wall:.0f} s; no report written", file=sys.stderr)
        return status or 1
    report.main([str(json_path)] + (["--note", args.note] if args.note else []))
    print(f"benchmarks: {wall:.0f} s wall for profile {profile!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
