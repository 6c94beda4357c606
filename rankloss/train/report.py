"""Reports of a run: the merged ``metrics.jsonl``, the summary table, the comparison table (mean ± standard
error over seeds per arm, and paired differences to the SFT-continuation control) and PNG plots.

Everything here reads the per-task ``metrics.jsonl`` files, so a report can be rebuilt from a finished
(or resumed) run folder at any time with :func:`write_reports`.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .claims import CLAIM_TITLES, claim_results, claims_report
from .config import TrainConfig
from .files import atomic_write
from .loop import read_jsonl, task_dir

__all__ = [
    "METRIC_TITLES",
    "collect_records",
    "final_metrics",
    "mean_se",
    "summary_table",
    "comparison_table",
    "TYPE_TITLES",
    "plot_curves",
    "plot_comparison",
    "plot_claims",
    "write_reports",
]

#: Table columns: metric key -> title. Only metrics present in the run are shown.
METRIC_TITLES: dict[str, str] = {
    "pair_acc": "pair acc (log-prob)",
    "top1": "top-1 (log-prob)",
    "tau": "Kendall τ (log-prob)",
    "reward_pair_acc": "pair acc (reward)",
    "best_logp_tok": "best caption log-prob/token",
    "gen_f1": "gen F1",
    "gen_precision": "gen precision",
    "gen_recall": "gen recall",
    "gen_word_f1": "gen word F1",
    "tokens": "LLM tokens",
}
_DIFF_KEYS = ("pair_acc", "reward_pair_acc", "best_logp_tok", "gen_f1", "gen_word_f1")
#: The per-error-type table's columns (``--probes``; gen F1 by fact group): metric key -> title.
TYPE_TITLES: dict[str, str] = {
    "probe_acc_static": "static (log-prob)",
    "probe_acc_dynamic": "dynamic (log-prob)",
    "probe_acc_insertion": "insertion (log-prob)",
    "probe_acc_omission": "omission (log-prob)",
    "probe_reward_acc_static": "static (reward)",
    "probe_reward_acc_dynamic": "dynamic (reward)",
    "probe_reward_acc_insertion": "insertion (reward)",
    "probe_reward_acc_omission": "omission (reward)",
    "gen_f1_static": "gen F1 static",
    "gen_f1_dynamic": "gen F1 dynamic",
}
_TYPE_NOTE = (
    "Per error type: accuracy of score(true caption) > score(one single-error caption) per held-out video, "
    "static = colour, size, shape, count (one frame shows them), dynamic = motion, order (they need "
    "time); summed log-probs where the two captions have equal token counts, per-token means where they "
    "differ; gen F1 over the facts of each group."
)


def collect_records(config: TrainConfig, run_dir: str) -> list[dict[str, Any]]:
    """All tasks' records, seed by seed, SFT first then the arms in ``--arms`` order."""
    out = []
    for seed in config.seed_list:
        for task in ["sft"] + [a.name for a in config.arm_list]:
            out.extend(read_jsonl(os.path.join(task_dir(run_dir, seed, task), "metrics.jsonl")))
    return out


def _final_eval(records: Sequence[dict[str, Any]], seed: int, task: str, tag: str) -> dict[str, float] | None:
    for r in records:
        if r.get("event") == "eval" and r["seed"] == seed and r["task"] == task and r.get("tag") == tag:
            return r["metrics"]
    return None


def final_metrics(
    config: TrainConfig, records: Sequence[dict[str, Any]]
) -> dict[str, dict[int, dict[str, float]]]:
    """``{row: {seed: metrics}}`` with rows ``"@init"`` (before SFT), ``"@sft"`` (after SFT) and every arm's
    name."""
    out: dict[str, dict[int, dict[str, float]]] = defaultdict(dict)
    for seed in config.seed_list:
        for row, task, tag in [("@init", "sft", "init"), ("@sft", "sft", "sft")] + [
            (a.name, a.name, "final") for a in config.arm_list
        ]:
            m = _final_eval(records, seed, task, tag)
            if m is not None:
                out[row][seed] = m
    return out


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` (``nan`` for one value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _fmt(mean: float, se: float, digits: int = 3, key: str = "") -> str:
    if math.isnan(mean):
        return "–"
    if key == "tokens":  # counts: whole numbers with thousands separators
        return f"{mean:,.0f}" if math.isnan(se) else f"{mean:,.0f} ± {se:,.0f}"
    if math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def _row_titles(config: TrainConfig) -> dict[str, str]:
    titles = {"@init": "initial model (before SFT)", "@sft": f"after SFT ({config.sft_steps} steps)"}
    for a in config.arm_list:
        titles[a.name] = a.title(config.pairs) + f" (+{config.rank_steps} steps)"
    return titles


def _columns(
    rows: dict[str, dict[int, dict[str, float]]], titles: dict[str, str] = METRIC_TITLES
) -> list[str]:
    present = {k for per_seed in rows.values() for m in per_seed.values() for k in m}
    return [k for k in titles if k in present]


def summary_table(config: TrainConfig, records: Sequence[dict[str, Any]]) -> str:
    """Markdown: held-out metrics of every seed before SFT, after SFT and after each arm (``LLM tokens``:
    the tokens the stage processed); then, with probes, the same rows per error type."""
    rows = final_metrics(config, records)
    text = _summary(config, rows, METRIC_TITLES)
    if _columns(rows, TYPE_TITLES):
        text += "\n" + _TYPE_NOTE + "\n\n" + _summary(config, rows, TYPE_TITLES)
    return text


def _summary(
    config: TrainConfig, rows: dict[str, dict[int, dict[str, float]]], col_titles: dict[str, str]
) -> str:
    cols = _columns(rows, col_titles)
    titles = _row_titles(config)
    lines = [
        "| seed | model | " + " | ".join(col_titles[c] for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for seed in config.seed_list:
        for row in ["@init", "@sft"] + [a.name for a in config.arm_list]:
            m = rows.get(row, {}).get(seed)
            if m is None:
                continue
            cells = [_fmt(m[c], math.nan, key=c) if c in m else "–" for c in cols]
            lines.append(f"| {seed} | {titles[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(config: TrainConfig, records: Sequence[dict[str, Any]]) -> str:
    """Markdown: per arm, mean ± standard error over seeds of the final held-out metrics; then, for each
    ranking arm, the per-seed (paired) difference to the SFT-continuation control; then the claims
    (:func:`rankloss.train.claims.claims_report`) when the run has their arms."""
    rows = final_metrics(config, records)
    text = _comparison(config, rows, METRIC_TITLES, _DIFF_KEYS, "Held-out metrics")
    if _columns(rows, TYPE_TITLES):
        text += "\n" + _TYPE_NOTE + "\n\n"
        text += _comparison(config, rows, TYPE_TITLES, tuple(TYPE_TITLES), "Held-out metrics per error type")
    claims = claims_report(config, rows)
    if claims:
        text += "\n" + claims
    return text


def _comparison(
    config: TrainConfig,
    rows: dict[str, dict[int, dict[str, float]]],
    col_titles: dict[str, str],
    diff_keys: tuple[str, ...],
    what: str,
) -> str:
    cols = _columns(rows, col_titles)
    titles = _row_titles(config)
    seeds = config.seed_list
    n = len(seeds)
    lines = [
        f"{what}, mean ± standard error over {n} seed{'s' if n != 1 else ''} ({', '.join(map(str, seeds))}):",
        "",
        "| model | " + " | ".join(col_titles[c] for c in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for row in ["@sft"] + [a.name for a in config.arm_list]:
        per_seed = rows.get(row, {})
        if not per_seed:
            continue
        cells = []
        for c in cols:
            mean, se = mean_se([m[c] for m in per_seed.values() if c in m])
            cells.append(_fmt(mean, se, key=c))
        lines.append(f"| {titles[row]} | " + " | ".join(cells) + " |")
    control = next(
        (a for a in config.arm_list if a.loss == "sft" and not a.frozen_vision and not a.rerun), None
    )
    ranking = [a for a in config.arm_list if a.loss != "sft"]
    if control is not None and ranking and control.name in rows:
        dcols = [c for c in diff_keys if c in cols]
        lines += [
            "",
            f"Difference to {control.title()} (same seed), mean ± standard error:",
            "",
            "| model | " + " | ".join("Δ " + col_titles[c] for c in dcols) + " |",
            "|---|" + "---:|" * len(dcols),
        ]
        for a in ranking:
            cells = []
            for c in dcols:
                diffs = [
                    rows[a.name][s][c] - rows[control.name][s][c]
                    for s in seeds
                    if s in rows.get(a.name, {})
                    and s in rows[control.name]
                    and c in rows[a.name][s]
                    and c in rows[control.name][s]
                ]
                mean, se = mean_se(diffs)
                cells.append(_fmt(mean, se))
            lines.append(f"| {a.title(config.pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------
# Plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(series: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for s in series:
        for x, y in s:
            by_step[x].append(y)
    return sorted((x, sum(v) / len(v)) for x, v in by_step.items())


def plot_curves(config: TrainConfig, records: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """``training_loss.png`` (one panel per task, one line per seed) and ``eval_curves.png`` (held-out
    metrics against the global step: SFT steps, then each arm's steps; mean over seeds). Returns paths.

    Empty plots are not written: a task with no training steps logged (``--sft-steps 0``) gets no panel,
    and a plot with no panel at all (nothing trained, or no evaluation) is left out of the paths."""
    plt = _pyplot()
    titles = {"sft": "SFT"} | {a.name: a.title(config.pairs) for a in config.arm_list}
    losses = {
        task: {
            seed: [
                (r["step"], r["loss"])
                for r in records
                if r.get("event") == "train" and r["task"] == task and r["seed"] == seed
            ]
            for seed in config.seed_list
        }
        for task in ["sft"] + [a.name for a in config.arm_list]
    }
    tasks = [t for t, by_seed in losses.items() if any(by_seed.values())]
    paths = []
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for seed, pts in losses[task].items():
                if pts:
                    ax.plot(*zip(*pts), label=f"seed {seed}", lw=1.2)
            ax.set_title(titles[task], fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("training loss")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "training_loss.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    keys = [
        k
        for k in ("pair_acc", "reward_pair_acc", "best_logp_tok", "gen_f1", "gen_word_f1")
        if any(k in r.get("metrics", {}) for r in records if r.get("event") == "eval")
    ]
    if not keys:
        return paths
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        sft = _mean_curve(
            [
                [
                    (r["step"], r["metrics"][key])
                    for r in records
                    if r.get("event") == "eval"
                    and r["task"] == "sft"
                    and r["seed"] == s
                    and key in r["metrics"]
                ]
                for s in config.seed_list
            ]
        )
        if sft:
            ax.plot(*zip(*sft), color="black", marker=".", label="SFT")
        for a in config.arm_list:
            curve = _mean_curve(
                [
                    [
                        (config.sft_steps + r["step"], r["metrics"][key])
                        for r in records
                        if r.get("event") == "eval"
                        and r["task"] == a.name
                        and r["seed"] == s
                        and key in r["metrics"]
                    ]
                    for s in config.seed_list
                ]
            )
            if curve:
                start = [x for x in sft[-1:] if key != "reward_pair_acc"]
                ax.plot(*zip(*(start + curve)), marker=".", label=a.title(config.pairs))
        ax.set_title(METRIC_TITLES.get(key, key), fontsize=9)
        ax.set_xlabel("step (SFT, then the arm)")
        ax.axvline(config.sft_steps, color="grey", lw=0.6, ls="--")
        ax.grid(alpha=0.3)
    if any(ax.get_legend_handles_labels()[0] for ax in axes[0][:1]):
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "eval_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_comparison(config: TrainConfig, records: Sequence[dict[str, Any]], path: str) -> str | None:
    """Bar charts of the final held-out metrics per arm with standard-error bars (``comparison.png``);
    ``None`` (nothing written) when there is no final metric to show."""
    plt = _pyplot()
    rows = final_metrics(config, records)
    keys = [
        k
        for k in ("pair_acc", "reward_pair_acc", "best_logp_tok", "gen_f1", "gen_word_f1")
        if k in _columns(rows)
    ]
    if not keys:
        return None
    names = ["@sft"] + [a.name for a in config.arm_list]
    labels = ["after SFT"] + [a.title(config.pairs).replace(", ", ",\n") for a in config.arm_list]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.9 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        means, ses = [], []
        for name in names:
            mean, se = mean_se([m[key] for m in rows.get(name, {}).values() if key in m])
            means.append(mean)
            ses.append(0.0 if math.isnan(se) else se)
        ax.bar(range(len(names)), means, yerr=ses, capsize=3, color=["grey"] + ["C0"] * (len(names) - 1))
        ax.set_xticks(range(len(names)), labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(METRIC_TITLES[key], fontsize=9)
        finite = [m for m in means if not math.isnan(m)]
        if finite and key != "best_logp_tok":
            lo = min(m - s for m, s in zip(means, ses) if not math.isnan(m))
            hi = max(m + s for m, s in zip(means, ses) if not math.isnan(m))
            pad = max(0.02, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1 else hi + pad)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"held-out metrics, mean ± SE over {len(config.seed_list)} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_claims(config: TrainConfig, records: Sequence[dict[str, Any]], path: str) -> str | None:
    """``claims.png``: one panel per decisive test of the claims (:mod:`rankloss.train.claims`), the
    per-seed differences as dots, their mean ± standard error (the test's: the pair's own or the run's
    pooled spread, the larger) as a bar, zero as a line, the verdict in the title.
    ``None`` (nothing written) when the run has no claim's arms."""
    results = claim_results(config, final_metrics(config, records))
    if not results:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.4 * len(results), 3.4), squeeze=False)
    for ax, (test, diffs, r) in zip(axes[0], results):
        mean = float(r["mean"])
        se = 0.0 if math.isnan(float(r["se"])) else float(r["se"])
        colour = {"reproduced": "C2", "reversed": "C3"}.get(str(r["verdict"]), "C7")
        if diffs:
            ax.bar([0], [mean], yerr=[se], capsize=4, color=colour, alpha=0.6, width=0.5)
            ax.scatter([0.0] * len(diffs), diffs, color="black", s=12, zorder=3, label="seeds")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks([])
        ax.set_xlim(-0.8, 0.8)
        metric = "probe accuracy" if test.metric == "probe_acc_matched" else "gen F1"
        ax.set_title(f"claim {test.claim}, {test.name}: {r['verdict']}", fontsize=9)
        ax.set_ylabel(f"Δ {metric} ({test.arm} − {test.baseline})", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        "; ".join(f"claim {k}: {v.split(' (')[0]}" for k, v in CLAIM_TITLES.items())
        + f" — paired differences over {len(config.seed_list)} seeds",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(config: TrainConfig, run_dir: str) -> dict[str, str]:
    """Merge the metrics into ``<run>/metrics.jsonl`` and write ``summary.md``, the plots and, with
    ``--compare``, ``comparison.md`` and ``comparison.png``. Returns ``{name: path}``."""
    records = collect_records(config, run_dir)
    out: dict[str, str] = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    out["metrics"] = path
    out["summary"] = os.path.join(run_dir, "summary.md")
    atomic_write(out["summary"], summary_table(config, records).encode("utf-8"))
    for p in plot_curves(config, records, run_dir):
        out[os.path.splitext(os.path.basename(p))[0]] = p
    if config.compare:
        out["comparison"] = os.path.join(run_dir, "comparison.md")
        atomic_write(out["comparison"], comparison_table(config, records).encode("utf-8"))
        comparison_plot = plot_comparison(config, records, os.path.join(run_dir, "comparison.png"))
        if comparison_plot is not None:
            out["comparison_plot"] = comparison_plot
        claims_plot = plot_claims(config, records, os.path.join(run_dir, "claims.png"))
        if claims_plot is not None:
            out["claims_plot"] = claims_plot
    return out
