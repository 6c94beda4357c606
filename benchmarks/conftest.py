"""pytest-benchmark plumbing for the rankloss benchmark suites.

``pytest benchmarks/ --benchmark-json=out.json [--bench-profile quick|full|gpu|smoke]`` runs every case of
the chosen profile (default: ``gpu`` when CUDA is available, else ``quick``; ``RANKLOSS_BENCH_PROFILE``
also sets it). Each test module declares ``SUITE``; its ``case`` argument is parametrised with that
suite's cases from :func:`cases.profile_cases`. ``python benchmarks/run.py`` wraps this and the report.

Plain ``pytest`` never collects this directory (``testpaths = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import pytest
import torch
from cases import (
    PROFILES,
    Case,
    Profile,
    Unavailable,
    default_profile,
    describe_machine,
    measure_peak,
    prepare,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-profile",
        choices=sorted(PROFILES),
        default=None,
        help="rankloss benchmark profile (default: gpu with CUDA, else quick; env RANKLOSS_BENCH_PROFILE)",
    )
    parser.addoption(
        "--bench-no-memory",
        action="store_true",
        help="skip the per-case peak-memory measurement (timings only)",
    )


def _profile(config: pytest.Config) -> Profile:
    return PROFILES[config.getoption("--bench-profile") or default_profile()]


def pytest_configure(config: pytest.Config) -> None:
    profile = _profile(config)
    if profile.name == "smoke":
        # Triton decides at decoration time whether to interpret: set before any kernel is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if profile.device == "cpu":
        torch.set_num_threads(int(os.environ.get("RANKLOSS_BENCH_THREADS", os.cpu_count() or 1)))
    config._rankloss_bench_start = describe_machine()  # type: ignore[attr-defined]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    from cases import profile_cases

    suite = metafunc.module.SUITE
    cases = profile_cases(_profile(metafunc.config))[suite]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    profile = _profile(config)
    start = getattr(config, "_rankloss_bench_start", None) or describe_machine()
    end = describe_machine()
    machine_info["rankloss"] = {
        **start,
        "loadavg_start": start.get("loadavg"),
        "loadavg_end": end.get("loadavg"),
        "profile": profile.name,
        "profile_description": profile.description,
        "rounds": profile.rounds,
        "warmup_rounds": profile.warmup_rounds,
    }


@pytest.fixture
def bench_profile(request: pytest.FixtureRequest) -> Profile:
    return _profile(request.config)


@pytest.fixture
def run_case(benchmark, bench_profile: Profile, request: pytest.FixtureRequest) -> Callable[[Case], None]:
    """Time ``case`` with pytest-benchmark and record its peak memory and throughput in ``extra_info``."""
    skip_memory = request.config.getoption("--bench-no-memory")

    def run(case: Case) -> None:
        try:
            prepared = prepare(case)
            memory = None
            if case.device == "cuda":
                prepared.fn()  # Triton JIT and autotuning happen here, outside the timing
                if not skip_memory and case.suite != "matmul":
                    memory = measure_peak(case, prepared)
        except Unavailable as exc:
            pytest.skip(str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            pytest.skip(f"out of memory: {str(exc).splitlines()[0]}")
        benchmark.group = case.group
        benchmark.extra_info.update(case.info())
        benchmark.pedantic(
            prepared.fn, rounds=bench_profile.rounds, warmup_rounds=bench_profile.warmup_rounds, iterations=1
        )
        del prepared
        gc.collect()
        if benchmark.stats is None:  # --benchmark-disable: the step ran once, untimed; nothing to record
            return
        if case.device == "cuda":
            torch.cuda.empty_cache()
        elif not skip_memory and case.suite != "matmul":
            memory = measure_peak(case)  # a fresh process per case
        stats = benchmark.stats.stats
        info = benchmark.extra_info
        for which in ("min", "median"):
            seconds = getattr(stats, which)
            info[f"tokens_per_s_{which}"] = case.N / seconds
            info[f"flop_per_s_{which}"] = case.flops / seconds
        info["threads"] = torch.get_num_threads()
        info["device_name"] = (
            torch.cuda.get_device_name(0) if case.device == "cuda" else describe_machine()["cpu"]
        )
        if memory is not None:
            info["peak_mem_bytes"] = memory["peak_bytes"]
            info["input_bytes"] = memory["input_bytes"]
            info["mem_method"] = memory["method"]

    return run
