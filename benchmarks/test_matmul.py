"""The GEMMs alone, on every shape of the other suites: the machine's own matmul rate.

Cases and what each implementation runs: see ``benchmarks/cases.py``; sizes: its ``PROFILES``.
"""

from __future__ import annotations

from collections.abc import Callable

from cases import Case

SUITE = "matmul"


def test_matmul(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)
