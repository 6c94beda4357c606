"""Chain loss from hidden states: rankloss.fused_linear_chain_loss, the naive reference path, Liger DPO.

Cases and what each implementation runs: see ``benchmarks/cases.py``; sizes: its ``PROFILES``.
"""

from __future__ import annotations

from collections.abc import Callable

from cases import Case

SUITE = "chain"


def test_chain(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)
