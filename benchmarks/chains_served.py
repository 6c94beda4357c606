"""Throughput of the ``openai`` chains engine against a loopback server with fixed latency.

    python benchmarks/chains_served.py [--n 200] [--latency 0.05] [--concurrency 1 32]

Starts the tests' OpenAI-compatible fake server (tests/test_chains_served.py: deterministic answers, here
with a fixed ``--latency`` per request, standing in for a GPU server's time per request), makes chains of
length 6 for ``--n`` captions at each ``--concurrency`` and writes records/s, requests/s and edits/s to
benchmarks/results/chains-served.json and .md. Every run's output must be byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_chains_served import FakeServer, write_captions  # noqa: E402

from rankloss.chains import make_chains_file  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "chains-served"))
    args = ap.parse_args()
    rows, outputs = [], set()
    with tempfile.TemporaryDirectory() as tmp, FakeServer(latency=args.latency) as srv:
        inp = write_captions(Path(tmp) / "captions.jsonl", args.n)
        for c in args.concurrency:
            out = Path(tmp) / f"chains-{c}.jsonl"
            t0 = time.perf_counter()
            s = make_chains_file(inp, out, length=6, seed=0, engine="openai", base_url=srv.url, model="fake",
                                 concurrency=c)  # fmt: skip
            dt = time.perf_counter() - t0
            outputs.add(out.read_bytes())
            edits = sum(s.edit_types.values())
            rows.append({"concurrency": c, "records": s.chains_written, "seconds": round(dt, 2),
                         "records_per_s": round(s.chains_written / dt, 2), "requests": s.requests,
                         "requests_per_s": round(s.requests / dt, 1), "edits_per_s": round(edits / dt, 1),
                         "llm_edits": s.llm_edits, "fallbacks": s.llm_fallbacks})  # fmt: skip
            print(rows[-1], flush=True)
    assert len(outputs) == 1, "outputs differ between concurrency settings"
    base = rows[0]["records_per_s"]
    for r in rows:
        r["speedup"] = round(r["records_per_s"] / base, 1)
    meta = {"n": args.n, "length": 6, "latency_s": args.latency, "identical_outputs": True,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                       f"Python {platform.python_version()}"}  # fmt: skip
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# openai chains engine, loopback server with {int(args.latency * 1000)} ms per request",
             "", f"{args.n} captions, chains of 6, {meta['machine']}; outputs byte-identical across runs.",
             "", "| concurrency | records/s | requests/s | edits/s | seconds | speedup |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['records_per_s']} | {r['requests_per_s']} | "
                     f"{r['edits_per_s']} | {r['seconds']} | {r['speedup']}x |")  # fmt: skip
    lines.append("\nCommand: `python benchmarks/chains_served.py " + " ".join(sys.argv[1:]) + "`")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
