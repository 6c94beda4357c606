"""Token log-probs from hidden states and the LM head: naive, torch.compile, rankloss, Liger (GPU).

Cases and what each implementation runs: see ``benchmarks/cases.py``; sizes: its ``PROFILES``.
"""

from __future__ import annotations

from collections.abc import Callable

from cases import Case

SUITE = "logprobs"


def test_logprobs(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)
