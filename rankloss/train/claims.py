"""The two claims of the study, tested as docs/training.md ("The claims, stated before the run") states them.

Claim 1: ranking optimisation over caption chains beats binary DPO for caption assessment and generation.
    Plackett-Luce (``plackett_luce``) against binary DPO with one pair per chain (``dpo:best_worst``).
Claim 2: the methods work only when the vision encoder is fine-tuned during preference training.
    Plackett-Luce against Plackett-Luce with the vision tower frozen (``plackett_luce:frozen``).

Each claim has two tests, one per decisive metric, each on the paired per-seed difference ``arm - baseline``
(same seed: same SFT model, data and batch order):

- assessment: ``probe_acc_matched``, the mean of the static and dynamic probe accuracies by log-prob (the
  true caption against one single-error caption per held-out video and error kind, length-matched or
  per-token where lengths differ: :mod:`rankloss.train.evaluate`), so no arm can win it by counting words;
- generation: ``gen_f1``, fact F1 of greedy captions against the scene (precision and recall together, so
  no arm can win it by writing more or fewer facts).

A test is *reproduced* when a one-sided paired t-test at the 5% level says the difference is above zero
(``t = mean / SE >= t_0.95(n - 1)``), *reversed* when it says the difference is below zero, and *undecided*
otherwise.

The SE a verdict must beat is not only the pair's own. Three per-seed differences can agree by chance far
more closely than the run's differences really vary: the same command on other processors' kernels
moved one difference by nine of its standard errors (issue 23). A kernel path changes every rounding
from the first step on, so each seed's SFT model and arms become another draw of the same experiment:
what a verdict must survive is the seed-to-seed spread of paired differences. Every pair of arms of the
run estimates that spread; pooled (the arm x seed residual of a two-way layout without replication,
``(n - 1)(k - 1)`` degrees of freedom for ``k`` arms and ``n`` seeds; a difference of two arms has twice
its variance), it is far steadier than one pair's 2 degrees of freedom. The test's SE is
``sqrt(max(s^2, s_pool^2) / n)`` (``s``: the pair's own standard deviation of per-seed differences) and
its critical t keeps the pair's ``n - 1`` degrees of freedom, so a verdict must beat both.

An arm named ``...:rerun`` (e.g. ``plackett_luce:rerun``: the same arm again from the same SFT model with
another batch order) adds an A/A check: its difference to the arm it repeats is tested the same way and
should read undecided.

A claim is reproduced when both of its tests are, not reproduced when either is reversed, and undecided
otherwise. The per-error-type differences (static, dynamic, reward-based accuracy) are reported
beside the claims as secondary numbers; they decide nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import TrainConfig, parse_arms

__all__ = [
    "Test",
    "CLAIMS",
    "SECONDARY",
    "t_critical",
    "paired_test",
    "derived_metrics",
    "pooled_spread",
    "claim_results",
    "aa_results",
    "claims_report",
]


@dataclass(frozen=True)
class Test:
    """One pre-stated comparison: ``arm - baseline`` on ``metric``, paired by seed."""

    claim: str  #: "1" or "2"
    name: str  #: "assessment" or "generation"
    arm: str  #: ``--arms`` spelling of the arm the claim favours
    baseline: str  #: ``--arms`` spelling of the arm it is compared with
    metric: str  #: metric key (after :func:`derived_metrics`)


CLAIM_TITLES = {
    "1": "ranking over caption chains beats binary DPO (Plackett-Luce vs one-pair DPO)",
    "2": "preference training needs the vision encoder fine-tuned (Plackett-Luce vs Plackett-Luce, frozen "
    "vision)",
}

#: The decisive tests, fixed before any run (docs/training.md).
CLAIMS: tuple[Test, ...] = (
    Test("1", "assessment", "plackett_luce", "dpo:best_worst", "probe_acc_matched"),
    Test("1", "generation", "plackett_luce", "dpo:best_worst", "gen_f1"),
    Test("2", "assessment", "plackett_luce", "plackett_luce:frozen", "probe_acc_matched"),
    Test("2", "generation", "plackett_luce", "plackett_luce:frozen", "gen_f1"),
)

#: Reported beside each claim, deciding nothing: metric key -> title.
SECONDARY: dict[str, str] = {
    "probe_acc_static": "static probes (log-prob)",
    "probe_acc_dynamic": "dynamic probes (log-prob)",
    "probe_reward_acc_static": "static probes (reward)",
    "probe_reward_acc_dynamic": "dynamic probes (reward)",
    "gen_f1_static": "gen F1 static",
    "gen_f1_dynamic": "gen F1 dynamic",
    "pair_acc": "chain pair acc (log-prob)",
}

_METRIC_TITLES = {
    "probe_acc_matched": "length-matched probe accuracy (log-prob; mean of static and dynamic)",
    "gen_f1": "gen F1 (facts)",
}

# One-sided 95% quantiles of Student's t with 1..30 degrees of freedom (beyond: the normal's 1.645).
_T95 = (
    6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812,
    1.796, 1.782, 1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725,
    1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697,
)  # fmt: skip


def t_critical(df: int) -> float:
    """One-sided 95% quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    return _T95[df - 1] if df <= len(_T95) else 1.645


def paired_test(diffs: Sequence[float], spread: float | None = None) -> dict[str, float | str]:
    """``{"n", "mean", "se", "se_pair", "spread", "t", "t_crit", "verdict"}`` of the paired differences
    ``diffs``.

    ``spread``: the standard deviation a per-seed difference between two arms has from run to run, pooled
    over the run's arms (:func:`pooled_spread`). With it the SE is ``sqrt(max(s^2, spread^2) / n)``
    (``s``: the sample standard deviation of ``diffs``), so a verdict must beat both the pair's own
    spread and the run's; ``se_pair`` is the pair's own SE (``s / sqrt(n)``). ``t_crit`` has ``n - 1``
    degrees of freedom either way.

    ``verdict``: ``"reproduced"`` (``t >= t_crit``), ``"reversed"`` (``t <= -t_crit``), else
    ``"undecided"``; one difference cannot decide (``"undecided"``, ``se`` and ``t`` NaN)."""
    n = len(diffs)
    spread = math.nan if spread is None else float(spread)
    if n == 0:
        return {"n": 0, "mean": math.nan, "se": math.nan, "se_pair": math.nan, "spread": spread,
                "t": math.nan, "t_crit": math.nan, "verdict": "undecided"}  # fmt: skip
    mean = sum(diffs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "se": math.nan, "se_pair": math.nan, "spread": spread,
                "t": math.nan, "t_crit": math.nan, "verdict": "undecided"}  # fmt: skip
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    se_pair = math.sqrt(var / n)
    if not math.isnan(spread):
        var = max(var, spread**2)
    se = math.sqrt(var / n)
    if se > 0:
        t = mean / se
    else:
        t = math.copysign(math.inf, mean) if mean else 0.0
    crit = t_critical(n - 1)
    verdict = "reproduced" if t >= crit else "reversed" if t <= -crit else "undecided"
    return {"n": n, "mean": mean, "se": se, "se_pair": se_pair, "spread": spread, "t": t,
            "t_crit": crit, "verdict": verdict}  # fmt: skip


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus ``probe_acc_matched`` (mean of the static and dynamic probe accuracies by log-prob)
    where both are present."""
    out = dict(metrics)
    if "probe_acc_static" in metrics and "probe_acc_dynamic" in metrics:
        out["probe_acc_matched"] = 0.5 * (metrics["probe_acc_static"] + metrics["probe_acc_dynamic"])
    return out


def _diffs(
    rows: dict[str, dict[int, dict[str, float]]], arm: str, baseline: str, metric: str, seeds: Sequence[int]
) -> list[float]:
    a, b = rows.get(arm, {}), rows.get(baseline, {})
    out = []
    for s in seeds:
        if s in a and s in b:
            ma, mb = derived_metrics(a[s]), derived_metrics(b[s])
            if metric in ma and metric in mb:
                out.append(ma[metric] - mb[metric])
    return out


def pooled_spread(
    config: TrainConfig, rows: dict[str, dict[int, dict[str, float]]], metric: str
) -> tuple[float, int]:
    """``(sd, df)``: the standard deviation of a per-seed difference of ``metric`` between two arms, pooled
    over every arm of the run that has it for every seed, and its degrees of freedom.

    A two-way layout without replication (``k`` arms x ``n`` seeds, ``y[a, s]``): the residual
    ``y[a, s] - mean_a - mean_s + grand mean`` has variance ``sigma^2`` with ``(n - 1)(k - 1)`` degrees of
    freedom, and a difference of two arms on the same seed varies by ``2 sigma^2`` (with two arms this is
    exactly the pair's own sample variance). ``(nan, 0)`` when fewer than two arms or two seeds have the
    metric."""
    seeds = list(config.seed_list)
    table = []
    for a in config.arm_list:
        per_seed = rows.get(a.name, {})
        values = [derived_metrics(per_seed[s]).get(metric) if s in per_seed else None for s in seeds]
        if all(v is not None for v in values):
            table.append([float(v) for v in values])
    k, n = len(table), len(seeds)
    if k < 2 or n < 2:
        return math.nan, 0
    grand = sum(map(sum, table)) / (k * n)
    arm_mean = [sum(row) / n for row in table]
    seed_mean = [sum(row[j] for row in table) / k for j in range(n)]
    ss = sum((table[i][j] - arm_mean[i] - seed_mean[j] + grand) ** 2 for i in range(k) for j in range(n))
    df = (n - 1) * (k - 1)
    return math.sqrt(2 * ss / df), df


def claim_results(
    config: TrainConfig, rows: dict[str, dict[int, dict[str, float]]]
) -> list[tuple[Test, list[float], dict[str, float | str]]]:
    """``(test, per-seed differences, paired_test result)`` for every decisive test whose two arms the
    run has, in :data:`CLAIMS` order; each test's SE counts the run's pooled spread of its metric
    (:func:`pooled_spread`, :func:`paired_test`)."""
    names = {a.spec: a.name for a in config.arm_list}
    out = []
    for t in CLAIMS:
        if t.arm in names and t.baseline in names:
            d = _diffs(rows, names[t.arm], names[t.baseline], t.metric, config.seed_list)
            out.append((t, d, paired_test(d, pooled_spread(config, rows, t.metric)[0])))
    return out


def aa_results(
    config: TrainConfig, rows: dict[str, dict[int, dict[str, float]]]
) -> list[tuple[str, str, dict[str, float | str]]]:
    """``(rerun arm spec, metric, paired_test result)`` of every ``...:rerun`` arm against the arm it
    repeats, on each decisive metric, tested as the claims are: an A/A check that should read
    undecided."""
    out = []
    metrics = list(dict.fromkeys(t.metric for t in CLAIMS))
    for a in config.arm_list:
        if a.rerun:
            for metric in metrics:
                d = _diffs(rows, a.name, a.original.name, metric, config.seed_list)
                if d:
                    out.append((a.spec, metric, paired_test(d, pooled_spread(config, rows, metric)[0])))
    return out


def _num(x: float, digits: int = 3, signed: bool = True) -> str:
    if math.isnan(x):
        return "–"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def claims_report(config: TrainConfig, rows: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown: the decisive tests with per-seed differences, mean ± SE, t and verdict; each claim's verdict;
    the secondary per-error-type differences. ``rows`` is :func:`rankloss.train.report.final_metrics`'s
    ``{arm name: {seed: metrics}}``. Empty when the run lacks a claim's arms."""
    names = {a.spec: a.name for a in config.arm_list}
    seeds = config.seed_list
    results = claim_results(config, rows)
    lines: list[str] = []
    for claim in ("1", "2"):
        tests = [(t, d, r) for t, d, r in results if t.claim == claim]
        if len(tests) != sum(t.claim == claim for t in CLAIMS):
            continue
        first = tests[0][0]
        arm, base = parse_arms([first.arm, first.baseline])
        lines += [
            f"**Claim {claim}: {CLAIM_TITLES[claim]}.** Paired by seed: {arm.title(config.pairs)} minus "
            f"{base.title(config.pairs)}.",
            "",
            "| test | metric | difference per seed | mean ± SE (pair's own SE) | t (needed) | verdict |",
            "|---|---|---|---:|---:|---|",
        ]
        for t, d, r in tests:
            per_seed = ", ".join(_num(x) for x in d) or "–"
            crit = "" if math.isnan(r["t_crit"]) else f" ({r['t_crit']:.2f})"
            lines.append(
                f"| {t.name} | {_METRIC_TITLES.get(t.metric, t.metric)} | {per_seed} | "
                f"{_num(r['mean'])} ± {_num(r['se'], signed=False)} ({_num(r['se_pair'], signed=False)}) | "
                f"{_num(r['t'], 2)}{crit} | **{r['verdict']}** |"
            )
        verdicts = [r["verdict"] for _, _, r in tests]
        if all(v == "reproduced" for v in verdicts):
            outcome = "reproduced"
        elif any(v == "reversed" for v in verdicts):
            outcome = "not reproduced"
        else:
            outcome = "undecided at this size"
        n = len(seeds)
        lines += ["", f"Claim {claim}: **{outcome}** ({n} seed{'s' if n != 1 else ''}).", ""]
        sec = [
            (title, paired_test(_diffs(rows, names[first.arm], names[first.baseline], k, seeds)))
            for k, title in SECONDARY.items()
        ]
        sec = [(title, r) for title, r in sec if r["n"]]
        if sec:
            lines.append(
                "Secondary (decides nothing): "
                + "; ".join(f"{title} {_num(r['mean'])} ± {_num(r['se'], signed=False)}" for title, r in sec)
                + "."
            )
            lines.append("")
    if not lines:
        return ""
    spreads = []
    for metric in dict.fromkeys(t.metric for t, _, _ in results):
        sd, df = pooled_spread(config, rows, metric)
        if df:
            spreads.append(f"{_METRIC_TITLES.get(metric, metric).split(' (')[0]} {sd:.3f} ({df} df)")
    if spreads:
        k = len(config.arm_list)
        lines.append(
            f"Run-to-run spread of a per-seed difference between two arms, pooled over the {k} arms "
            f"(arm x seed residual): {'; '.join(spreads)}. Each test's SE is the larger of its pair's own "
            "and this, over the square root of the seeds."
        )
        lines.append("")
    aa = aa_results(config, rows)
    if aa:
        lines.append(
            "A/A check (an arm run again with another batch order, minus the arm; should read undecided): "
            + "; ".join(
                f"{spec} {_METRIC_TITLES.get(m, m).split(' (')[0]} {_num(r['mean'])} ± "
                f"{_num(r['se'], signed=False)} **{r['verdict']}**"
                for spec, m, r in aa
            )
            + "."
        )
        lines.append("")
    head = [
        "The claims, as docs/training.md states them before the run: each test is a one-sided paired t-test "
        "at 5% on the per-seed difference; reproduced = above zero, reversed = below zero, undecided "
        "otherwise; a claim is reproduced when both its tests are, not reproduced when either is reversed. "
        "The SE is the larger of the pair's own and the run's spread pooled over all arms (below), so a "
        "verdict must beat the run-to-run spread, not only three seeds' agreement.",
        "",
    ]
    return "\n".join(head + lines)
