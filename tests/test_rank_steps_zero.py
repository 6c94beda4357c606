"""``--rank-steps 0``: every arm of a seed is the SFT model unchanged, so the example trainer evaluates it
once per seed, not once per arm (issue 23), and every arm reports the same metrics; its rewards are all 0,
and the reward metrics count those ties as half (0.5), not as wrong (0)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("torchvision")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_damaged_files import _context  # noqa: E402

from rankloss.train import loop  # noqa: E402


def test_arms_without_steps_share_one_evaluation(tmp_path, monkeypatch):
    ctx = _context(tmp_path / "run", prepare=True, rank_steps=0, sft_steps=1, compare=True)
    calls = []
    original = loop.evaluate

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", counting)
    loop.run_sft_task(ctx, 0)
    before = len(calls)
    arms = ctx.config.arm_list[:3]
    assert len(arms) >= 2
    results = [loop.run_arm_task(ctx, 0, arm, save_to=None) for arm in arms]
    assert len(calls) - before == 1  # one evaluation for all the arms
    for r in results[1:]:
        assert {k: v for k, v in r["final"].items()} == results[0]["final"]
    # every reward is 0 (the policy is its reference): ties count as half, so the reward metrics read 0.5 and
    # a shared top-1, not 0
    final = results[0]["final"]
    assert final["reward_pair_acc"] == 0.5
    assert final["reward_tau"] == 0.0
    assert 0.0 < final["reward_top1"] < 1.0
