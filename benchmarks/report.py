"""Turn a pytest-benchmark JSON file of the rankloss suites into a markdown report and a PNG plot.

    python benchmarks/report.py benchmarks/results/cpu-quick.json [--md OUT.md] [--png OUT.png] [--note TEXT]

Every figure is also given as a ratio against the naive path of the same suite, mode and size (for the
chain suite: the same tokens and ``K``; Liger's DPO on pairs is compared with the naive path at
``K = 2``). Ratios of times use the **minimum over rounds** (on a shared machine other jobs only ever add
time, so the minimum is the least noisy estimate of a step's own cost); medians and the spread
``(max - min) / min`` over rounds are shown beside them. Achieved FLOP/s count ``6 N V D`` per forward and
backward (``2 N V D`` forward only) and are compared with the ``matmul`` case of the same shape: the
machine's own rate on those GEMMs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMPL_ORDER = ("naive", "compile", "rankloss", "rankloss_det", "liger", "liger_dpo", "matmul")
IMPL_LABEL = {
    "naive": "naive PyTorch",
    "compile": "torch.compile(naive)",
    "rankloss": "rankloss",
    "rankloss_det": "rankloss deterministic",
    "liger": "Liger fused linear CE",
    "liger_dpo": "Liger fused linear DPO (pairs)",
    "matmul": "matmul only",
}
SUITE_TITLE = {
    "logprobs": "Token log-probs from hidden states + LM head",
    "chain": "Chain loss (Plackett-Luce) from hidden states",
    "matmul": "Matmul only (the GEMMs of the same shapes)",
}
MODE_TITLE = {"fwd": "forward", "fwdbwd": "forward + backward"}


@dataclass
class Row:
    suite: str
    impl: str
    mode: str
    N: int
    D: int
    V: int
    dtype: str
    device: str
    K: int
    T: int
    t_min: float
    t_median: float
    t_max: float
    rounds: int
    flops: int
    peak: int | None
    grad_bytes: int = 0

    @property
    def size_key(self) -> tuple:
        return (self.suite, self.mode, self.N, self.D, self.V, self.dtype, self.device, self.K)

    @property
    def shape_key(self) -> tuple:
        return (self.mode, self.N, self.D, self.V, self.dtype, self.device)

    @property
    def size(self) -> str:
        s = f"N={self.N} D={self.D} V={self.V}"
        if self.suite == "chain":
            s = f"{self.N // self.T // self.K}x{self.K}x{self.T} (K={self.K}) " + s
        return s

    @property
    def spread(self) -> float:
        return (self.t_max - self.t_min) / self.t_min


def load_rows(data: dict) -> list[Row]:
    rows = []
    for bench in data["benchmarks"]:
        e, s = bench["extra_info"], bench["stats"]
        if "suite" not in e:
            continue
        rows.append(
            Row(
                suite=e["suite"],
                impl=e["impl"],
                mode=e["mode"],
                N=e["N"],
                D=e["D"],
                V=e["V"],
                dtype=e["dtype"],
                device=e["device"],
                K=e.get("K", 0),
                T=e.get("T", 0),
                t_min=s["min"],
                t_median=s["median"],
                t_max=s["max"],
                rounds=s["rounds"],
                flops=e["flops"],
                peak=e.get("peak_mem_bytes"),
                grad_bytes=e.get("grad_bytes", 0),
            )
        )
    order = {name: i for i, name in enumerate(IMPL_ORDER)}
    rows.sort(key=lambda r: (r.suite, r.mode, r.dtype, r.V, r.N, r.K, order.get(r.impl, 99)))
    return rows


class Index:
    """Baselines for the ratios: the naive row and the matmul row of each size."""

    def __init__(self, rows: Sequence[Row]):
        self.naive = {r.size_key: r for r in rows if r.impl == "naive"}
        self.matmul = {r.shape_key: r for r in rows if r.suite == "matmul"}

    def naive_of(self, row: Row) -> Row | None:
        key = row.size_key
        if row.impl == "liger_dpo":  # pairs: the naive chain loss at K = 2 on the same tokens
            key = key[:-1] + (2,)
        return self.naive.get(key)

    def matmul_of(self, row: Row) -> Row | None:
        return self.matmul.get(row.shape_key)


def _fmt_time(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _fmt_ratio(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def _fmt_mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:,.0f}" if mib >= 10 else f"{mib:.1f}"


def _fmt_rate(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def machine_lines(data: dict, note: str | None) -> list[str]:
    m = data.get("machine_info", {}).get("rankloss", {})
    device = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores"
    lines = [
        f"- Machine: **{device}**"
        + (f" (host CPU {m.get('cpu')}, {m.get('cpu_cores')} cores)" if m.get("gpu") else "")
        + (f"; SIMD {', '.join(m['cpu_simd'])}" if m.get("cpu_simd") and not m.get("gpu") else ""),
        f"- Software: torch {m.get('torch')}, triton {m.get('triton')}, "
        f"liger-kernel {m.get('liger_kernel')}, rankloss {m.get('rankloss')}, Python {m.get('python')}; "
        f"{m.get('torch_threads')} torch threads",
        f"- Profile `{m.get('profile')}` ({m.get('profile_description')}): {m.get('rounds')} timed rounds "
        f"per case after {m.get('warmup_rounds')} warm-up rounds (torch.compile compiles at setup, untimed)",
        f"- Run: {data.get('datetime', '?')}; load average (1, 5, 15 min) at start "
        f"{_fmt_load(m.get('loadavg_start'))}, at end {_fmt_load(m.get('loadavg_end'))}",
    ]
    if note:
        lines.append(f"- Note: {note}")
    return lines


def _fmt_load(load: Sequence[float] | None) -> str:
    return "?" if not load else "(" + ", ".join(f"{x:.2f}" for x in load) + ")"


def suite_table(rows: Sequence[Row], index: Index) -> list[str]:
    head = (
        "| size | implementation | min ms | median ms | spread | time vs naive | tokens/s | FLOP/s "
        "| of matmul rate | peak extra MiB | memory vs naive |"
    )
    lines = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        base = index.naive_of(r)
        mm = index.matmul_of(r)
        rate = r.flops / r.t_min
        t_ratio = r.t_min / base.t_min if base else None
        m_ratio = r.peak / base.peak if base and base.peak and r.peak is not None else None
        mm_frac = f"{100 * rate / (mm.flops / mm.t_min):.0f}%" if mm and r.suite != "matmul" else "-"
        lines.append(
            f"| {r.size} | {IMPL_LABEL.get(r.impl, r.impl)} | {_fmt_time(r.t_min)} | {_fmt_time(r.t_median)} "
            f"| {100 * r.spread:.0f}% | {_fmt_ratio(t_ratio) if r.suite != 'matmul' else '-'} "
            f"| {_fmt_rate(r.N / r.t_min)} | {_fmt_rate(rate)} | {mm_frac} | {_fmt_mib(r.peak)} "
            f"| {_fmt_ratio(m_ratio)} |"
        )
    return lines


def _find(rows: Sequence[Row], **kw: object) -> Row | None:
    for r in rows:
        if all(getattr(r, k) == v for k, v in kw.items()):
            return r
    return None


def _verdict(ok: bool, detail: str) -> str:
    return ("**met**" if ok else "**missed**") + f" ({detail})"


def _vs_naive(ours: Row, naive: Row) -> list[str]:
    assert ours.peak is not None and naive.peak
    m, t = ours.peak / naive.peak, ours.t_min / naive.t_min
    m_detail = f"{m:.3f}x = 1/{1 / m:.1f} ({_fmt_mib(ours.peak)} vs {_fmt_mib(naive.peak)} MiB)"
    t_detail = f"{t:.2f}x by min over rounds, {ours.t_median / naive.t_median:.2f}x by median"
    return [
        f"- peak memory <= 1/8 of naive: {_verdict(m <= 1 / 8, m_detail)}",
        f"- time <= 1.0x naive: {_verdict(t <= 1.0, t_detail)}",
    ]


def target_lines(rows: Sequence[Row], index: Index) -> list[str]:
    """Check the issue-3 and issue-4 targets on the rows present."""
    out: list[str] = []
    size = {"N": 4096, "D": 512, "V": 32000, "dtype": "float32", "device": "cpu", "mode": "fwdbwd"}
    ours = _find(rows, suite="logprobs", impl="rankloss", **size)
    naive = _find(rows, suite="logprobs", impl="naive", **size)
    if ours and naive and ours.peak is not None and naive.peak:
        out += ["Issue 3, CPU fp32 N=4096 D=512 V=32000 forward+backward (rankloss chunked path vs naive):"]
        out += _vs_naive(ours, naive)
    chain = {"N": 4096, "T": 128, "K": 8, "D": 512, "V": 32000, "dtype": "float32", "device": "cpu"}
    ours = _find(rows, suite="chain", impl="rankloss", **chain)
    naive = _find(rows, suite="chain", impl="naive", **chain)
    liger = _find(rows, suite="chain", impl="liger_dpo", **{**chain, "K": 2})
    if ours and naive and ours.peak is not None and naive.peak:
        out += [
            "",
            "Issue 4, CPU fp32, 4 chains x 8 captions x 128 tokens, D=512, V=32000 "
            "(fused_linear_chain_loss):",
        ]
        out += _vs_naive(ours, naive)
        # Liger's DPO takes the same tokens as S / 2 pairs: rankloss on the same pairs is its K = 2 row
        # (16 chains of 2), the like-for-like comparison; the K = 8 chains are shown beside it.
        pairs = _find(rows, suite="chain", impl="rankloss", **{**chain, "K": 2})
        if liger and liger.peak and pairs and pairs.peak is not None:
            lm, lt = pairs.peak / liger.peak, pairs.t_min / liger.t_min
            t_detail = f"{lt:.2f}x its time by min, {pairs.t_median / liger.t_median:.2f}x by median"
            k8 = (
                f"; as 4 chains of 8 instead: {ours.t_min / liger.t_min:.2f}x its time by min, "
                f"{ours.peak / liger.peak:.2f}x its peak memory"
            )
            out += [
                "- faster than Liger's DPO, rankloss on the same tokens as the same pairs (K = 2): "
                + _verdict(lt < 1.0, t_detail),
                "- leaner than Liger's DPO on the same pairs: "
                + _verdict(lm < 1.0, f"{lm:.2f}x its peak memory" + k8),
            ]
    gpu = {"N": 16384, "D": 4096, "V": 152064, "dtype": "bfloat16", "device": "cuda", "mode": "fwdbwd"}
    ours = _find(rows, suite="logprobs", impl="rankloss", **gpu)
    if ours:
        mm = index.matmul_of(ours)
        liger = _find(rows, suite="logprobs", impl="liger", **gpu)
        out += ["", "Issue 3, GPU bf16 N=16384 D=4096 V=152064 forward+backward (rankloss Triton path):"]
        if mm:
            frac = (ours.flops / ours.t_min) / (mm.flops / mm.t_min)
            out.append(
                f"- >= 75% of the measured matmul rate: {_verdict(frac >= 0.75, f'{100 * frac:.0f}%')}"
            )
        if ours.peak is not None:
            beyond = ours.peak - ours.grad_bytes
            ok = beyond <= 256e6
            detail = f"{beyond / 2**20:,.0f} MiB beyond the inputs and the returned gradients"
            out.append(f"- extra memory <= 256 MB: {_verdict(ok, detail)}")
        if liger:
            r = ours.t_min / liger.t_min
            out.append(f"- faster than Liger's fused linear CE: {_verdict(r < 1.0, f'{r:.2f}x its time')}")
    return out


def k_sweep_lines(rows: Sequence[Row]) -> list[str]:
    """rankloss's peak memory and time against K at a fixed number of tokens."""
    chain = [r for r in rows if r.suite == "chain" and r.impl in ("rankloss", "naive")]
    if not chain:
        return []
    lines = [
        "| K | chains | rankloss min ms | rankloss peak MiB | naive min ms | naive peak MiB |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for K in sorted({r.K for r in chain}):
        ours = _find(chain, impl="rankloss", K=K)
        naive = _find(chain, impl="naive", K=K)
        if not ours:
            continue
        lines.append(
            f"| {K} | {ours.N // ours.T // K} | {_fmt_time(ours.t_min)} | {_fmt_mib(ours.peak)} "
            f"| {_fmt_time(naive.t_min) if naive else '-'} | {_fmt_mib(naive.peak) if naive else '-'} |"
        )
    return lines


def markdown(data: dict, note: str | None = None, png_name: str | None = None) -> str:
    rows = load_rows(data)
    index = Index(rows)
    out = ["# rankloss benchmarks", ""] + machine_lines(data, note) + [""]
    out += [
        "Times are per step (one forward, or one forward and backward to `hidden` and `weight`). "
        "**Ratios use the minimum over rounds**; `spread` is (max - min) / min over the rounds. "
        "FLOP/s count 6·N·V·D for forward+backward and 2·N·V·D for forward only; `of matmul rate` "
        "compares them with the matmul-only case of the same shape. Peak extra memory: "
        + _memory_method(data)
        + ".",
        "",
    ]
    targets = target_lines(rows, index)
    if targets:
        out += ["## Targets", ""] + targets + [""]
    for suite in ("logprobs", "chain", "matmul"):
        for mode in ("fwd", "fwdbwd"):
            sel = [r for r in rows if r.suite == suite and r.mode == mode]
            if sel:
                out += [f"## {SUITE_TITLE[suite]}: {MODE_TITLE[mode]}", ""] + suite_table(sel, index) + [""]
    sweep = k_sweep_lines(rows)
    if sweep:
        out += ["## Chain loss against K at a fixed number of tokens", ""] + sweep + [""]
    if png_name:
        out += [f"![time and peak memory against the naive path]({png_name})", ""]
    return "\n".join(out)


def _memory_method(data: dict) -> str:
    methods = {b["extra_info"].get("mem_method") for b in data["benchmarks"]} - {None}
    if not methods:
        return "not measured"
    device = "CUDA" if any(b["extra_info"].get("device") == "cuda" for b in data["benchmarks"]) else "CPU"
    where = "in this process" if device == "CUDA" else "each case in its own fresh process"
    return f"{'; '.join(sorted(methods))} ({where}; includes the gradients a step returns)"


def plot(data: dict, path: Path) -> None:
    """Two panels of horizontal bars: time and peak memory of every non-naive case against the naive path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(data)
    index = Index(rows)
    items = []
    for r in rows:
        base = index.naive_of(r)
        if r.impl == "naive" or r.suite == "matmul" or base is None:
            continue
        label = f"{r.suite} {r.mode} {r.size}: {IMPL_LABEL.get(r.impl, r.impl)}"
        t = r.t_min / base.t_min
        m = r.peak / base.peak if r.peak is not None and base.peak else float("nan")
        items.append((label, t, m))
    if not items:
        raise ValueError("no case with a naive baseline to plot")
    height = 1.2 + 0.32 * len(items)
    fig, axes = plt.subplots(1, 2, figsize=(14, height), sharey=True)
    ys = list(range(len(items)))[::-1]
    m = data.get("machine_info", {}).get("rankloss", {})
    machine = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores"
    for ax, col, title, target in (
        (axes[0], 1, "time / naive (min over rounds)", 1.0),
        (axes[1], 2, "peak extra memory / naive", 1 / 8),
    ):
        vals = [it[col] for it in items]
        colors = ["tab:green" if v <= target else "tab:orange" for v in vals]
        ax.barh(ys, [v if math.isfinite(v) else 0 for v in vals], color=colors)
        ax.axvline(1.0, color="black", lw=1)
        if target != 1.0:
            ax.axvline(target, color="tab:red", lw=1, ls="--", label="target 1/8")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xscale("log")
        finite = [v for v in vals if math.isfinite(v) and v > 0]
        if finite:
            ax.set_xlim(min(min(finite), target) / 2, max(max(finite), 1.0) * 4)
        ax.set_title(title)
        for y, v in zip(ys, vals):
            if math.isfinite(v):
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([it[0] for it in items], fontsize=8)
    fig.suptitle(f"rankloss against the naive path: {machine}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--md", type=Path, help="markdown output (default: the JSON's path with .md)")
    parser.add_argument("--png", type=Path, help="PNG plot output (default: the JSON's path with .png)")
    parser.add_argument("--no-png", action="store_true", help="write no plot")
    parser.add_argument("--note", help="a line added under the machine description")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    md_path = args.md or args.json.with_suffix(".md")
    png_path = None if args.no_png else (args.png or args.json.with_suffix(".png"))
    if png_path is not None:
        plot(data, png_path)
    md_path.write_text(markdown(data, args.note, png_path.name if png_path else None))
    print(f"wrote {md_path}" + (f" and {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
