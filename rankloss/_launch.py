"""Launch checks shared by the example trainer (:mod:`rankloss.train.loop`) and
:class:`~rankloss.integrations.ChainRankTrainer`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

__all__ = ["leave_process_group", "process_group_problem"]


def process_group_problem(accelerator: Any, env: Mapping[str, str], *, cpu_hint: str = "") -> str | None:
    """Why this launch's processes did not join one group, or ``None`` when they did.

    A launcher (``torchrun``, ``python -m torch.distributed.run``) sets ``WORLD_SIZE=N``. If
    ``accelerator`` (anything with ``num_processes``) then sees a single process, the N copies would each
    train the whole model on the whole batch and write into the same output folder. accelerate 1.x does
    this on a machine without GPUs unless it is told to run on CPU (``Accelerator(cpu=True)``, the
    Trainer's ``use_cpu=True``), and for ``--use_fsdp`` / ``--use_deepspeed`` without accelerators.
    ``cpu_hint`` names the caller's CPU switch in the advice (e.g. ``"--cpu"``). A ``WORLD_SIZE`` that
    is not an integer is a problem too.
    """
    world = env.get("WORLD_SIZE")
    try:
        world_size = int(world) if world is not None else 1
    except ValueError:
        return f"WORLD_SIZE={world!r} in the environment is not an integer"
    have = int(getattr(accelerator, "num_processes", 1))
    if world_size > 1 and have != world_size:
        kind = getattr(accelerator, "distributed_type", "?")
        device = getattr(accelerator, "device", "?")
        switch = f" with {cpu_hint}" if cpu_hint else ""
        return (
            f"launched as {world_size} processes (WORLD_SIZE={world_size}) but accelerate set up {have} "
            f"({kind}, device {device}); the processes would run as independent copies, each on the whole "
            f"batch, into the same output folder. On CPU launch with `torchrun --nproc_per_node "
            f"{world_size}`{switch} (accelerate forms a gloo group on CPU only when told to run on CPU; "
            "`accelerate launch --cpu` starts a single process, and accelerate's FSDP and DeepSpeed need "
            "GPUs)."
        )
    return None


def leave_process_group(*, settle_s: float = 0.2) -> bool:
    """End this process's part in a ``torch.distributed`` run; call it last, on every rank.

    A barrier (no rank leaves while another still works), ``destroy_process_group()``, then ``settle_s``
    seconds with the GIL released. The pause is what makes a gloo (CPU) run exit cleanly: gloo's worker
    thread frees a finished collective's work object, and with it the Python tensors that work held,
    *after* the caller's ``wait()`` has returned, and freeing a Python tensor takes the GIL. When the main
    thread has meanwhile entered interpreter finalization, that worker is killed inside a ``noexcept``
    destructor and the process aborts ("terminate called without an active exception", SIGABRT) with
    all its work done, so ``torchrun`` reports a finished run as failed. A core dump of one such abort
    shows ``ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject ->
    take_gil -> PyThread_exit_thread``; it hit 3 of 47 two-process ChainRankTrainer runs here with a
    barrier and ``destroy_process_group()`` alone, and none of 60 with a 0.05 s pause. Returns
    ``False`` (and does nothing) when no process group is initialized.
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    dist.destroy_process_group()
    if settle_s > 0:
        time.sleep(settle_s)
    return True
