"""The claims' tests (``rankloss.train.claims``) and ``--preset``: the paired t-test and its verdicts, the
report's per-seed differences and claim verdicts from hand-made per-seed metrics, and preset defaults
that typed flags override."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from rankloss.train.claims import (
    CLAIMS,
    claims_report,
    derived_metrics,
    paired_test,
    pooled_spread,
    t_critical,
)
from rankloss.train.config import PRESETS, TrainConfig, parse_arms

REPO = Path(__file__).resolve().parents[1]


def test_t_critical_table():
    assert t_critical(1) == pytest.approx(6.314)
    assert t_critical(2) == pytest.approx(2.920)
    assert t_critical(5) == pytest.approx(2.015)
    assert t_critical(30) == pytest.approx(1.697)
    assert t_critical(500) == pytest.approx(1.645)
    # the table decreases towards the normal quantile
    values = [t_critical(df) for df in range(1, 40)]
    assert values == sorted(values, reverse=True)
    with pytest.raises(ValueError, match="df"):
        t_critical(0)


@pytest.mark.parametrize(
    "diffs, verdict",
    [
        ([0.03, 0.025, 0.035], "reproduced"),  # t = 0.03 / 0.00289 = 10.4 > 2.92
        ([-0.03, -0.025, -0.035], "reversed"),
        ([0.03, -0.01, 0.02], "undecided"),  # t = 0.0133 / 0.0120 = 1.11
        ([0.02, 0.02, 0.02], "reproduced"),  # no spread: t = +inf
        ([0.0, 0.0, 0.0], "undecided"),
        ([0.05], "undecided"),  # one seed cannot decide
        ([], "undecided"),
    ],
)
def test_paired_test_verdicts(diffs, verdict):
    r = paired_test(diffs)
    assert r["verdict"] == verdict
    assert r["n"] == len(diffs)
    if len(diffs) >= 2:
        mean = sum(diffs) / len(diffs)
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
        assert r["mean"] == pytest.approx(mean)
        assert r["se"] == pytest.approx(sd / math.sqrt(len(diffs)))
        assert r["t_crit"] == pytest.approx(t_critical(len(diffs) - 1))


def test_paired_test_threshold_is_inclusive_on_both_sides():
    # two differences: se = |a - b| / 2, t = (a + b) / |a - b|; a=3, b=1 -> t = 2 < 6.314; a=1.1, b=0.9 -> 10
    assert paired_test([3.0, 1.0])["verdict"] == "undecided"
    assert paired_test([1.1, 0.9])["verdict"] == "reproduced"
    assert paired_test([-1.1, -0.9])["verdict"] == "reversed"


def test_derived_metric_is_the_mean_of_static_and_dynamic_probes():
    m = derived_metrics({"probe_acc_static": 0.9, "probe_acc_dynamic": 0.6, "gen_f1": 0.4})
    assert m["probe_acc_matched"] == pytest.approx(0.75)
    assert m["gen_f1"] == 0.4
    assert "probe_acc_matched" not in derived_metrics({"probe_acc_static": 0.9})


def _metrics(static: float, dynamic: float, gen: float) -> dict[str, float]:
    return {
        "probe_acc_static": static,
        "probe_acc_dynamic": dynamic,
        "gen_f1": gen,
        "gen_f1_static": gen,
        "gen_f1_dynamic": gen / 4,
        "pair_acc": 0.8,
    }


def test_claims_report_from_hand_made_runs():
    config = TrainConfig(seeds=3)  # the default arms
    names = {a.spec: a.name for a in config.arm_list}
    base = {s: 0.01 * s for s in (0, 1, 2)}
    rows = {
        names["plackett_luce"]: {s: _metrics(0.80 + b, 0.60 + b, 0.50 + b) for s, b in base.items()},
        # claim 1: PL ahead on both tests in every seed (by 0.04 / 0.03 +- small noise) -> reproduced
        names["dpo:best_worst"]: {
            s: _metrics(0.76 + b + 0.002 * s, 0.56 + b, 0.47 + b - 0.001 * s) for s, b in base.items()
        },
        # claim 2: PL ahead on assessment, clearly behind on generation -> not reproduced
        names["plackett_luce:frozen"]: {s: _metrics(0.78 + b, 0.58 + b, 0.55 + b) for s, b in base.items()},
        names["dpo"]: {s: _metrics(0.7, 0.5, 0.4) for s in base},
        names["sft"]: {s: _metrics(0.7, 0.5, 0.4) for s in base},
    }
    text = claims_report(config, rows)
    c1 = text[text.index("**Claim 1") : text.index("**Claim 2")]
    c2 = text[text.index("**Claim 2") :]
    assert "Claim 1: **reproduced** (3 seeds)" in c1
    assert c1.count("**reproduced** |") == 2
    assert "Plackett-Luce minus DPO (one pair: best vs worst)" in c1
    # the per-seed differences of the assessment test: mean of static and dynamic, PL - DPO
    d = [0.5 * ((0.80 - 0.76 - 0.002 * s) + (0.60 - 0.56)) for s in (0, 1, 2)]
    assert ", ".join(f"{x:+.3f}" for x in d) in c1
    assert "Claim 2: **not reproduced** (3 seeds)" in c2
    assert "**reversed** |" in c2
    assert "Secondary (decides nothing)" in c2 and "dynamic probes (log-prob)" in c2


def test_claims_need_their_arms():
    config = TrainConfig(arms=("plackett_luce", "sft"), seeds=2)
    names = {a.spec: a.name for a in config.arm_list}
    rows = {names["plackett_luce"]: {0: _metrics(0.8, 0.6, 0.5)}, names["sft"]: {0: _metrics(0.8, 0.6, 0.5)}}
    assert claims_report(config, rows) == ""
    config = TrainConfig(arms=("plackett_luce", "plackett_luce:frozen"), seeds=2)
    names = {a.spec: a.name for a in config.arm_list}
    rows = {
        names["plackett_luce"]: {0: _metrics(0.8, 0.6, 0.5), 1: _metrics(0.8, 0.6, 0.5)},
        names["plackett_luce:frozen"]: {0: _metrics(0.7, 0.6, 0.5), 1: _metrics(0.8, 0.6, 0.5)},
    }
    text = claims_report(config, rows)
    assert "Claim 2" in text and "Claim 1" not in text
    assert "undecided at this size" in text


def test_the_claims_name_arms_of_the_default_comparison():
    specs = {a.spec for a in TrainConfig().arm_list}
    for t in CLAIMS:
        assert t.arm in specs and t.baseline in specs
        parse_arms([t.arm, t.baseline])


def _script():
    spec = importlib.util.spec_from_file_location(
        "train_video_rank_claims", REPO / "examples" / "train_video_rank.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_presets_set_defaults_that_typed_flags_override(capsys):
    script = _script()
    default = script.parse_config([])
    assert default.preset == "default" and default.seeds == 3 and default.rank_steps == 100
    long = script.parse_config(["--preset", "long"])
    for name, value in PRESETS["long"].items():
        assert getattr(long, name) == value, name
    assert long.preset == "long"
    assert not set(PRESETS["long"]) & set(long.given)  # preset values are not "typed"
    mixed = script.parse_config(["--preset", "long", "--seeds", "2", "--rank-steps", "7"])
    assert (mixed.seeds, mixed.rank_steps, mixed.num_videos) == (2, 7, PRESETS["long"]["num_videos"])
    with pytest.raises(SystemExit):
        script.parse_config(["--preset", "huge"])
    assert "--preset" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--preset"):
        TrainConfig(preset="huge").validate()


def test_a_run_spread_widens_the_se_a_verdict_must_beat():
    # the README's earlier claim-2 assessment differences: the seeds agree closely (t = -4.2, "reversed")
    diffs = [-0.003, -0.007, -0.007]
    alone = paired_test(diffs)
    assert alone["verdict"] == "reversed"
    assert math.isnan(alone["spread"]) and alone["se"] == pytest.approx(alone["se_pair"])
    # the run's arms say a per-seed difference varies by ~0.008 from seed to seed: far more than these 3
    r = paired_test(diffs, 0.008)
    assert r["se_pair"] == pytest.approx(alone["se"])
    assert r["se"] == pytest.approx(0.008 / math.sqrt(3))
    assert r["t"] == pytest.approx(r["mean"] / r["se"])
    assert r["t_crit"] == pytest.approx(t_critical(2))  # the pair's degrees of freedom, not the pool's
    assert r["verdict"] == "undecided"
    # a run spread below the pair's own changes nothing: the larger of the two counts
    small = paired_test(diffs, 0.0001)
    assert small["se"] == pytest.approx(alone["se"]) and small["verdict"] == "reversed"
    # a difference far beyond both still decides
    assert paired_test([0.05, 0.06, 0.055], 0.008)["verdict"] == "reproduced"


def test_pooled_spread_is_the_arm_by_seed_residual():
    config = TrainConfig(arms=("plackett_luce", "dpo", "sft"), seeds=3)
    names = [a.name for a in config.arm_list]
    # additive arm + seed effects only: no residual, no spread
    y = {names[0]: (0.80, 0.82, 0.78), names[1]: (0.70, 0.72, 0.68), names[2]: (0.75, 0.77, 0.73)}
    rows = {a: {s: {"gen_f1": v} for s, v in zip(config.seed_list, vals)} for a, vals in y.items()}
    sd, df = pooled_spread(config, rows, "gen_f1")
    assert df == 4 and sd == pytest.approx(0.0, abs=1e-12)
    # one interaction: y[0][0] + 0.03; residual SS = 0.03^2 * (2/3)^2 * (2/3)^2 * 9 / ... (hand: 4e-4)
    rows[names[0]][config.seed_list[0]]["gen_f1"] += 0.03
    sd, df = pooled_spread(config, rows, "gen_f1")
    resid = [[0.03 * (1 - 1 / 3) * (1 - 1 / 3)] + [-0.03 * (1 - 1 / 3) / 3] * 2]
    resid += [[-0.03 * (1 - 1 / 3) / 3] + [0.03 / 9] * 2] * 2
    ss = sum(x * x for row in resid for x in row)
    assert sd == pytest.approx(math.sqrt(2 * ss / 4))
    # two arms: exactly the pair's own sample standard deviation of its differences
    two = TrainConfig(arms=("plackett_luce", "dpo"), seeds=3)
    d = [rows[names[0]][s]["gen_f1"] - rows[names[1]][s]["gen_f1"] for s in two.seed_list]
    mean = sum(d) / 3
    assert pooled_spread(two, rows, "gen_f1")[0] == pytest.approx(
        math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    )
    # an arm missing a seed is left out; fewer than two complete arms: no estimate
    del rows[names[2]][config.seed_list[1]]
    assert pooled_spread(config, rows, "gen_f1")[1] == 2
    del rows[names[1]][config.seed_list[1]]
    assert pooled_spread(config, rows, "gen_f1") == (pytest.approx(math.nan, nan_ok=True), 0)


def test_rerun_arm_parses_and_needs_the_arm_it_repeats():
    arms = parse_arms(
        "plackett_luce, plackett_luce:rerun, dpo:best_worst:frozen, dpo:best_worst:frozen:rerun"
    )
    rerun = arms[1]
    assert rerun.rerun and rerun.name == "plackett_luce_rerun" and rerun.original == arms[0]
    assert arms[3].spec == "dpo:best_worst:frozen:rerun" and arms[3].name == "dpo_best_worst_frozen_rerun"
    assert parse_arms([a.spec for a in arms]) == arms
    assert rerun.title() == "Plackett-Luce, rerun"
    with pytest.raises(ValueError, match=r"--arms: 'plackett_luce:rerun' repeats 'plackett_luce'"):
        parse_arms("dpo, plackett_luce:rerun")
    # the rerun is never the primary arm
    cfg = TrainConfig(arms=("plackett_luce:rerun", "plackett_luce", "sft"), seeds=2)
    assert not cfg.primary_arm.rerun


def test_claims_report_counts_the_run_spread_and_the_aa_check():
    config = TrainConfig(arms=(*TrainConfig().arms, "plackett_luce:rerun"), seeds=3)
    names = {a.spec: a.name for a in config.arm_list}
    pl = {s: _metrics(0.80, 0.60, 0.50 + 0.01 * s) for s in (0, 1, 2)}
    steady = {
        names["plackett_luce"]: pl,
        names["dpo:best_worst"]: {s: _metrics(0.80, 0.60, 0.50 + 0.01 * s) for s in pl},
        # claim 2: PL behind the frozen arm by a steady ~0.005 on assessment: "reversed" on its own
        names["plackett_luce:frozen"]: {s: _metrics(0.805 + 0.0005 * s, 0.605, 0.50 + 0.01 * s) for s in pl},
        names["dpo"]: pl,
        names["sft"]: pl,
        names["plackett_luce:rerun"]: pl,
    }
    text = claims_report(config, steady)
    c2 = text[text.index("**Claim 2") :]
    assert "Claim 2: **not reproduced**" in c2 and "**reversed** |" in c2
    assert "A/A check" in text and "plackett_luce:rerun" in text
    # the other arms' per-seed differences vary by ~0.02: the same claim-2 differences no longer decide
    noisy = dict(steady)
    noisy[names["dpo"]] = {s: _metrics(0.80 + d, 0.60 + d, 0.50) for s, d in zip(pl, (0.02, -0.015, 0.025))}
    noisy[names["sft"]] = {s: _metrics(0.80 + d, 0.60 - d, 0.50) for s, d in zip(pl, (-0.02, 0.03, 0.0))}
    text = claims_report(config, noisy)
    c2 = text[text.index("**Claim 2") :]
    assert "Claim 2: **undecided at this size**" in c2 and "**reversed**" not in c2
    sd, df = pooled_spread(config, noisy, "probe_acc_matched")
    assert df == 10 and f"length-matched probe accuracy {sd:.3f} (10 df)" in text
    assert "A/A check" in text and "**undecided**" in text[text.index("A/A check") :]
