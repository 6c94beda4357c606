"""The claims' tests (``rankloss.train.claims``) and ``--preset``: the paired t-test and its verdicts, the
report's per-seed differences and claim verdicts from hand-made per-seed metrics, and preset defaults
that typed flags override."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from rankloss.train.claims import CLAIMS, claims_report, derived_metrics, paired_test, t_critical
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
