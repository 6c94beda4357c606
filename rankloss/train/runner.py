"""Running a plan of tasks: in this process (one after another, under ``accelerate`` possibly several
processes in lockstep) or in ``--jobs`` worker processes (one CPU thread group each).

The plan: for every seed an SFT task, and after it one task per arm. With ``jobs > 1`` the SFT tasks are
queued first and each seed's arms as soon as its SFT task is done, so both CPU cores stay busy on a
2-core machine; every worker builds its own context once (data, processor) and reports progress through
a queue to the parent, which draws one progress bar for the whole run.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import Arm, TrainConfig
from .loop import (
    Context,
    NullReporter,
    StopRequested,
    build_context,
    make_accelerator,
    run_arm_task,
    run_sft_task,
)

__all__ = ["Task", "plan_tasks", "TqdmReporter", "run_plan"]


@dataclass(frozen=True)
class Task:
    """One unit of work: ``kind`` is ``"sft"`` or ``"arm"``."""

    kind: str
    seed: int
    arm: Arm | None = None

    @property
    def key(self) -> str:
        return f"seed{self.seed}/{'sft' if self.arm is None else self.arm.name}"

    def steps(self, config: TrainConfig) -> int:
        """Optimizer steps of the task (an SFT task's include stage 0's with ``--vision-pretrain``)."""
        if self.kind != "sft":
            return config.rank_steps
        return config.sft_steps + (config.vision_pretrain_steps if config.vision_pretrain == "proxy" else 0)


def plan_tasks(config: TrainConfig) -> list[Task]:
    """Every task of the run, in dependency order (each seed's SFT before its arms)."""
    tasks = []
    for seed in config.seed_list:
        tasks.append(Task("sft", seed))
        tasks.extend(Task("arm", seed, arm) for arm in config.arm_list)
    return tasks


def model_path_for(config: TrainConfig, run_dir: str, task: Task) -> str | None:
    """Where an arm's final model is saved (``--save-models``), or ``None``."""
    if task.arm is None or config.save_models == "none":
        return None
    if config.save_models == "all":
        return os.path.join(run_dir, f"seed{task.seed}", task.arm.name, "model")
    if task.seed == config.seed_list[0] and task.arm == config.primary_arm:
        return os.path.join(run_dir, "model")
    return None


def _run_task(ctx: Context, task: Task) -> dict[str, Any]:
    if task.kind == "sft":
        return run_sft_task(ctx, task.seed)
    assert task.arm is not None
    return run_arm_task(ctx, task.seed, task.arm, save_to=model_path_for(ctx.config, ctx.run_dir, task))


# ------------------------------------------------------------------------------------------------------
# Progress


class TqdmReporter:
    """One tqdm bar per running task (``seed0/sft``), with the last logged loss and the current phase;
    plain lines on stderr when ``enabled`` is false or tqdm is missing."""

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.bars: dict[str, Any] = {}
        self.info: dict[str, str] = {}
        self.phases: dict[str, str] = {}
        self.totals: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.t0: dict[str, float] = {}
        self.prefix = ""

    def _postfix(self, task: str) -> str:
        parts = [p for p in (self.info.get(task, ""), self.phases.get(task, "")) if p]
        return " | ".join(parts)

    def start(self, task: str, total: int) -> None:
        name = self.prefix + task
        self.totals[name], self.counts[name], self.t0[name] = total, 0, time.perf_counter()
        if self.enabled and total > 0:
            try:
                from tqdm.auto import tqdm

                self.bars[name] = tqdm(
                    total=total, desc=name, unit="step", dynamic_ncols=True, file=self.stream
                )
            except ImportError:
                self.enabled = False

    def advance(self, task: str, n: int, info: str) -> None:
        name = self.prefix + task
        self.counts[name] = self.counts.get(name, 0) + n
        if info:
            self.info[name] = info
        bar = self.bars.get(name)
        if bar is not None:
            bar.update(n)
            bar.set_postfix_str(self._postfix(name), refresh=False)

    def phase(self, task: str, text: str) -> None:
        name = self.prefix + task
        self.phases[name] = text
        bar = self.bars.get(name)
        if bar is not None:
            bar.set_postfix_str(self._postfix(name))
        elif text and not self.enabled:
            print(f"{name}: {text}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bars:
            from tqdm.auto import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def finish(self, task: str) -> None:
        name = self.prefix + task
        bar = self.bars.pop(name, None)
        if bar is not None:
            bar.close()
        elif self.totals.get(name):
            sec = time.perf_counter() - self.t0[name]
            print(
                f"{name}: {self.counts[name]}/{self.totals[name]} steps in {sec:.0f} s "
                f"{self.info.get(name, '')}",
                file=self.stream,
                flush=True,
            )


class _QueueReporter:
    """A worker's reporter: forwards everything to the parent through ``q``."""

    def __init__(self, q: Any, prefix: str) -> None:
        self.q, self.prefix = q, prefix

    def start(self, task: str, total: int) -> None:
        self.q.put(("start", self.prefix + task, total, ""))

    def advance(self, task: str, n: int, info: str) -> None:
        self.q.put(("advance", self.prefix + task, n, info))

    def phase(self, task: str, text: str) -> None:
        self.q.put(("phase", self.prefix + task, 0, text))

    def message(self, text: str) -> None:
        self.q.put(("message", "", 0, text))

    def finish(self, task: str) -> None:
        self.q.put(("finish", self.prefix + task, 0, ""))


class _OverallBar:
    """The parent's single bar over all tasks' steps; the postfix lists the running tasks."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.active: dict[str, str] = {}
        self.bar = None
        self.done = 0
        self.total = total
        self.t0 = time.perf_counter()
        self.last_print = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="all tasks", unit="step", dynamic_ncols=True)
            except ImportError:
                self.enabled = False

    def handle(self, kind: str, name: str, n: int, text: str) -> None:
        if kind == "start":
            self.active[name] = ""
        elif kind == "advance":
            self.done += n
            if text:
                self.active[name] = text
            if self.bar is not None:
                self.bar.update(n)
        elif kind == "phase":
            self.active[name] = text or self.active.get(name, "")
        elif kind == "finish":
            self.active.pop(name, None)
        elif kind == "message":
            self.write(text)
        if self.bar is not None:
            self.bar.set_postfix_str(
                "; ".join(f"{k} {v}".strip() for k, v in sorted(self.active.items())), refresh=False
            )
        elif time.perf_counter() - self.last_print > 30:
            self.last_print = time.perf_counter()
            print(
                f"[{time.perf_counter() - self.t0:.0f} s] {self.done}/{self.total} steps; "
                + "; ".join(sorted(self.active)),
                file=sys.stderr,
                flush=True,
            )

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------------
# Workers

_WORKER: dict[str, Any] = {}


def _worker_init(config: TrainConfig, run_dir: str, threads: int, q: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(config=config, run_dir=run_dir, queue=q)


def _worker_run(task: Task) -> dict[str, Any]:
    ctx = _WORKER.get("ctx")
    if ctx is None:
        config, run_dir, q = _WORKER["config"], _WORKER["run_dir"], _WORKER["queue"]
        ctx = build_context(config, run_dir, make_accelerator(config), _QueueReporter(q, ""))
        _WORKER["ctx"] = ctx
    ctx.reporter.prefix = f"seed{task.seed}/"  # type: ignore[attr-defined]
    try:
        return _run_task(ctx, task)
    except StopRequested as exc:
        return {"stopped": str(exc)}


def run_plan(
    config: TrainConfig,
    run_dir: str,
    *,
    accelerator: Any | None,
    jobs: int,
    threads: int,
    show_progress: bool,
    on_context: Callable[[Context], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every task of :func:`plan_tasks`; returns ``{task key: result}``.

    Raises:
        StopRequested: ``--stop-after-steps`` stopped the run (checkpoints are written; ``--resume`` goes on).
    """
    tasks = plan_tasks(config)
    results: dict[str, dict[str, Any]] = {}
    if jobs <= 1:
        assert accelerator is not None
        reporter = TqdmReporter(show_progress) if accelerator.is_main_process else NullReporter()
        ctx = build_context(config, run_dir, accelerator, reporter)
        if on_context is not None:
            on_context(ctx)
        for task in tasks:
            if isinstance(reporter, TqdmReporter):
                reporter.prefix = f"seed{task.seed}/"
            results[task.key] = _run_task(ctx, task)
        return results

    manager = mp.get_context("spawn").Manager()
    q = manager.Queue()
    bar = _OverallBar(sum(t.steps(config) for t in tasks), show_progress)
    pending_arms = {
        seed: [t for t in tasks if t.kind == "arm" and t.seed == seed] for seed in config.seed_list
    }
    stopped: list[str] = []
    try:
        with cf.ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=mp.get_context("spawn"),
            initializer=_worker_init,
            initargs=(config, run_dir, threads, q),
        ) as pool:
            futures: dict[cf.Future, Task] = {
                pool.submit(_worker_run, t): t for t in tasks if t.kind == "sft"
            }
            while futures:
                _drain(q, bar)
                finished = [f for f in futures if f.done()]
                if not finished:
                    time.sleep(0.1)
                    continue
                for f in finished:
                    task = futures.pop(f)
                    _drain(q, bar)
                    bar.handle("finish", task.key, 0, "")  # evaluations after the last step re-add it
                    try:
                        result = f.result()
                    except Exception as exc:
                        for other in futures:
                            other.cancel()
                        raise RuntimeError(f"task {task.key} failed: {type(exc).__name__}: {exc}") from exc
                    if "stopped" in result:
                        stopped.append(result["stopped"])
                        continue
                    results[task.key] = result
                    if task.kind == "sft" and not stopped:
                        for arm_task in pending_arms.pop(task.seed, []):
                            futures[pool.submit(_worker_run, arm_task)] = arm_task
            _drain(q, bar)
    finally:
        bar.close()
        manager.shutdown()
    if stopped:
        raise StopRequested("; ".join(stopped))
    return results


def _drain(q: Any, bar: _OverallBar) -> None:
    while True:
        try:
            kind, name, n, text = q.get_nowait()
        except queue_mod.Empty:
            return
        bar.handle(kind, name, n, text)
