"""The stages: SFT, cached reference scores, the ranking arms, with held-out evaluation around each.

A run is a set of *tasks*: per seed, one SFT task (evaluate the initial model, SFT on the best caption
of each chain, evaluate, save the SFT model, score every caption once with it: the cached reference
scores), then one task per arm (load the SFT model, train ``rank_steps`` steps with the arm's loss
against the cached reference scores, or continue SFT for the control arm; evaluate). Each task owns a
folder ``<run>/seed<k>/<task>/`` with its ``metrics.jsonl``, its checkpoints and, when finished, a
``done.json``; every arm of a seed reuses that seed's SFT model and reference scores.

Training goes through ``accelerate``: the :class:`~rankloss.integrations.ChainRankModel` wrapper (the
chain forward ``ChainRankTrainer`` uses; batches from :class:`~rankloss.integrations.ChainCollator`), the
optimizer and the scheduler are prepared together; ``--batch-size`` is the *global* number of chains per
optimizer step, split evenly over processes and then over ``--grad-accum`` micro-batches (so one process
and two processes with the same batch size compute the same update). Batches are a pure function of
``(seed, task, step)``. Checkpoints (``accelerator.save_state`` + the step and the size and CRC-32 of every
file) are written to a temporary folder, ``fsync``'d and renamed into place; ``--resume`` loads the newest
intact one and continues with the same batches, optimizer, scheduler and RNG state.

Files read back on ``--resume`` that were damaged (truncated, emptied, overwritten; see
:mod:`rankloss.train.files`) are never read as they are: a damaged checkpoint is set aside and the previous
one used (or the task starts over), a damaged ``done.json`` or saved SFT model makes the task run again,
damaged reference scores, split or processor are made again, a damaged ``metrics.jsonl`` line is skipped;
each with a :class:`~rankloss.train.files.DamagedFileWarning` naming the file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .._launch import process_group_problem
from ..integrations.collator import ChainCollator
from ..integrations.forward import ChainRankModel, LossSpec, keep_precision
from .config import Arm, TrainConfig, write_json_atomic
from .data import (
    IGNORE_INDEX,
    FrameStore,
    VideoChain,
    batch_to,
    collate_chains,
    decode_videos,
    global_batch_indices,
    load_chains_file,
    make_collator,
    read_split,
    synthetic_chains,
    synthetic_frames,
)
from .evaluate import (
    EvalResult,
    ProbeSet,
    assessment_metrics,
    generation_metrics,
    probe_metrics,
    probe_set,
    score_chains,
)
from .files import (
    DamagedFileError,
    DamagedFileWarning,
    atomic_write,
    describe_error,
    folder_manifest,
    fsync_dir,
    fsync_tree,
    manifest_problem,
    read_json,
    seal,
    torch_save_atomic,
    unseal,
)
from .model import (
    build_tiny_model,
    build_tiny_processor,
    load_pretrained,
    load_processor,
    pick_attn_implementation,
    set_vision_trainable,
    tiny_config,
    train_tokenizer,
)
from .vision_pretrain import freeze_tower as freeze_tower_
from .vision_pretrain import load_tower, run_vision_pretrain

__all__ = [
    "Reporter",
    "NullReporter",
    "StopRequested",
    "Context",
    "build_context",
    "make_accelerator",
    "run_sft_task",
    "run_arm_task",
    "task_dir",
    "read_jsonl",
]


class StopRequested(Exception):
    """Raised after ``--stop-after-steps`` optimizer steps (a checkpoint was written): resume later."""


class Reporter(Protocol):
    """Where progress goes: a tqdm bar in the main process, a queue in a worker process."""

    def start(self, task: str, total: int) -> None: ...

    def advance(self, task: str, n: int, info: str) -> None: ...

    def phase(self, task: str, text: str) -> None: ...

    def message(self, text: str) -> None: ...

    def finish(self, task: str) -> None: ...


class NullReporter:
    """Shows nothing (non-main processes)."""

    def start(self, task: str, total: int) -> None:
        pass

    def advance(self, task: str, n: int, info: str) -> None:
        pass

    def phase(self, task: str, text: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self, task: str) -> None:
        pass


# ------------------------------------------------------------------------------------------------------
# Context


@dataclass
class Context:
    """Everything a task needs: the settings, the accelerator, the data, the processor and collator."""

    config: TrainConfig
    run_dir: str
    accelerator: Any
    train: list[VideoChain]
    heldout: list[VideoChain]
    frames: FrameStore
    processor: Any
    model_config: Any
    collator: ChainCollator
    attn_implementation: str
    reporter: Reporter
    steps_done: int = 0  # optimizer steps taken in this invocation (for --stop-after-steps)
    notes: list[str] = field(default_factory=list)
    _probes: ProbeSet | None = None  # the held-out probes (--probes), built on first use
    # --rank-steps 0: every arm of a seed is the SFT model unchanged; its evaluation, made once per seed
    _zero_step_eval: dict[int, Any] = field(default_factory=dict)

    def probes(self) -> ProbeSet | None:
        """The per-error-type probes of the held-out videos with scenes (``None`` with ``--no-probes`` or
        without scenes), length-matched in this tokenizer's tokens where the kind allows."""
        if not self.config.probes or not any(c.scene is not None for c in self.heldout):
            return None
        if self._probes is None:
            tok = self.collator.tokenizer

            def length(text: str) -> int:
                return len(tok(text, add_special_tokens=False)["input_ids"])

            self._probes = probe_set(self.heldout, seed=self.config.data_seed, length=length)
        return self._probes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def new_model(self, seed: int) -> nn.Module:
        """The starting model of ``seed``: the tiny model drawn with ``seed``, or the ``--model``
        checkpoint."""
        if self.config.model is None:
            return build_tiny_model(
                self.model_config, seed=seed, attn_implementation=self.attn_implementation
            )
        return self.load_model(self.config.model)

    def load_model(self, path: str) -> nn.Module:
        return load_pretrained(path, dtype=self.config.dtype, attn_implementation=self.attn_implementation)


def make_accelerator(config: TrainConfig) -> Any:
    """``Accelerator`` with ``split_batches=True`` (``--batch-size`` is global; one scheduler step per
    optimizer step), ``--mixed-precision``, ``--grad-accum`` and ``--cpu``."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=config.cpu,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    check_process_group(accelerator, os.environ)
    if "DEEPSPEED" in str(accelerator.distributed_type):
        raise SystemExit(
            "error: the example trainer runs under DDP or FSDP (examples/accelerate/ddp.yaml, fsdp2.yaml), "
            "not DeepSpeed: its stages swap models and optimizers, which a DeepSpeed engine does not allow. "
            "Train with DeepSpeed ZeRO-3 through ChainRankTrainer (examples/chain_rank_trainer.py with "
            "examples/accelerate/zero3.yaml)."
        )
    return accelerator


def check_process_group(accelerator: Any, env: Any) -> None:
    """Refuse a launch whose processes did not join one group.

    ``torchrun --nproc_per_node N`` sets ``WORLD_SIZE=N``; if ``Accelerator`` then sees a single process
    (accelerate 1.x does this on CPU without ``--cpu``, and for ``--use_fsdp`` without GPUs: distributed
    type ``NO``), the N copies would each train the whole model on the whole batch and write into the
    same run folder. Stop before that, naming both numbers (:func:`rankloss._launch.process_group_problem`,
    which ``ChainRankTrainer`` uses too).
    """
    problem = process_group_problem(accelerator, env, cpu_hint="--cpu")
    if problem is not None:
        raise SystemExit(f"error: {problem}")


def task_dir(run_dir: str, seed: int, task: str) -> str:
    return os.path.join(run_dir, f"seed{seed}", task)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records (JSON objects, one a line) of a task's ``metrics.jsonl``; ``[]`` when there is none.

    A last line without its newline that is not a record is the append an interrupted run cut short: it
    is dropped silently. Any other line that is not a record (the file was damaged: overwritten bytes,
    zeros after a crash) is skipped with one :class:`~rankloss.train.files.DamagedFileWarning` naming
    ``file:line`` of each (up to 5) and how many records were kept; the lines after it are kept.
    """
    if not os.path.exists(path):
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DamagedFileError(path, f"cannot be read ({describe_error(exc)})") from exc
    lines = data.split(b"\n")
    out: list[dict[str, Any]] = []
    bad: list[int] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            out.append(record)
        elif number < len(lines):  # (the last piece has no newline: a cut-short append, dropped)
            bad.append(number)
    if bad:
        where = ", ".join(f"{path}:{n}" for n in bad[:5]) + (
            f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        )
        warnings.warn(
            f"{where}: not a JSON record (the file is damaged); skipped {len(bad)} line(s) and kept the "
            f"{len(out)} other record(s), later ones included (resuming the task rewrites the file "
            "without the damaged lines)",
            DamagedFileWarning,
            stacklevel=2,
        )
    return out


def build_context(config: TrainConfig, run_dir: str, accelerator: Any, reporter: Reporter) -> Context:
    """Load the chains (split from ``<run>/data/split.json``), frames, processor and model config."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars would cut through the run's own
    if config.synthetic:
        chains = synthetic_chains(config)
        frames = synthetic_frames(config)
    else:
        chains, _ = load_chains_file(
            config.data, config.video_root, config.chain_length, eval_path=config.eval_data
        )
        frames = decode_videos(chains, os.path.join(run_dir, "data"), config.frames, config.frame_size)
    # (a damaged split is made again: it is a function of the chains, --heldout and --data-seed)
    split = read_split(
        os.path.join(run_dir, "data", "split.json"),
        chains,
        config.heldout,
        config.data_seed,
        write=bool(accelerator.is_main_process),
    )
    by_id = {c.id: c for c in chains}
    train = [by_id[i] for i in split["train"]]
    heldout = [by_id[i] for i in split["heldout"]]
    if config.model is not None:
        processor = load_processor(config.model)
    else:
        processor = _run_processor(config, run_dir, train, bool(accelerator.is_main_process))
    attn = pick_attn_implementation(config.attn_implementation, accelerator.device)
    if config.model is None:
        model_config = tiny_config(
            processor.tokenizer,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            vision_depth=config.vision_depth,
            vision_hidden_size=config.vision_hidden_size,
        )
    else:
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(config.model, local_files_only=True)
    collator = make_collator(processor, config.prompt)
    return Context(
        config,
        run_dir,
        accelerator,
        train,
        heldout,
        frames,
        processor,
        model_config,
        collator,
        attn,
        reporter,
    )


def _run_processor(config: TrainConfig, run_dir: str, train: list[VideoChain], main: bool) -> Any:
    """The run's own processor (``<run>/processor``: the tokenizer trained on the training captions). When
    it cannot be loaded (a damaged file), it is copied back from a model this run saved (every saved model
    holds it) or, failing that, trained again (deterministic: the same captions and ``--vocab-size`` give
    the same tokenizer), with a :class:`~rankloss.train.files.DamagedFileWarning` naming it, and rewritten
    (main process)."""
    path = os.path.join(run_dir, "processor")
    try:
        return load_processor(path)
    except Exception as exc:  # noqa: BLE001 - any damaged file of the folder: made again below
        problem = f"cannot be loaded ({describe_error(exc)})"
    source: Any = None
    how = "trained the tokenizer again on the training captions"
    for seed in config.seed_list:
        copy = os.path.join(task_dir(run_dir, seed, "sft"), "model")
        if os.path.isdir(copy) and _model_folder_problem(copy) is None:
            try:
                source, how = load_processor(copy), f"copied it back from {copy}"
                break
            except Exception:  # noqa: BLE001 - try the next copy, then train it again
                continue
    if source is None:
        tokenizer = train_tokenizer([t for c in train for t in c.captions], config.vocab_size)
        source = build_tiny_processor(tokenizer, config.frame_size)
    if main:
        warnings.warn(f"{path} {problem}; {how} and rewrote it", DamagedFileWarning, stacklevel=3)
    tmp = f"{path}.tmp{os.getpid()}"  # (each process its own: CPU workers may do this at the same time)
    shutil.rmtree(tmp, ignore_errors=True)
    source.save_pretrained(tmp)
    processor = load_processor(tmp)  # as a run reads it back
    if main:
        fsync_tree(tmp)
        aside = f"{path}.damaged{os.getpid()}"
        try:
            if os.path.exists(path):
                os.replace(path, aside)
            os.replace(tmp, path)
            fsync_dir(run_dir)
        except OSError:  # another worker put its (identical) copy in place first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return processor


# ------------------------------------------------------------------------------------------------------
# Metrics log


class MetricsLog:
    """Appends JSON records to a task's ``metrics.jsonl`` (main process only), each tagged with ``base``."""

    def __init__(self, path: str, base: dict[str, Any], enabled: bool) -> None:
        self.path, self.base, self.enabled = path, base, enabled

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written after the checkpoint a resumed run restarts from)."""
        if not self.enabled:
            return
        keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode("utf-8"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one line (``fsync``'d); after a last line an interrupted run left without its newline,
        on a line of its own."""
        if not self.enabled:
            return
        line = (json.dumps({**self.base, **record}) + "\n").encode("utf-8")
        with open(self.path, "ab+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = b"\n" + line
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------
# Checkpoints


_STEP_DIR = re.compile(r"step-(\d+)")


def _checkpoints(directory: str) -> list[tuple[int, str]]:
    """``(step, folder)`` of the task's checkpoints, oldest first: every ``checkpoints/step-<n>`` folder
    (a folder is renamed into place only once written; ``.tmp`` and set-aside ``.damaged`` ones are not
    listed). Whether one is intact is :func:`_checkpoint_problem`'s business."""
    root = os.path.join(directory, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.fullmatch(name)
        path = os.path.join(root, name)
        if m is not None and os.path.isdir(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def _checkpoint_problem(path: str, step: int) -> tuple[str | None, int]:
    """``(problem, tokens)``: what is wrong with the checkpoint in ``path`` (``None`` when it is as written:
    its ``trainer_state.json`` is intact and every file it lists has its size and CRC-32), and the tokens
    it records."""
    state_path = os.path.join(path, "trainer_state.json")
    if not os.path.exists(state_path):
        return "has no trainer_state.json (incomplete)", 0
    try:
        state = read_json(state_path)
    except DamagedFileError as exc:
        return f"has a damaged trainer_state.json ({exc.problem})", 0
    state, problem = unseal(state, ("step", "tokens"))
    if state is None:
        return f"has a damaged trainer_state.json ({problem})", 0
    if (
        not isinstance(state, dict)
        or state.get("step") != step
        or not isinstance(state.get("tokens", 0), int)
        or isinstance(state.get("step"), bool)
    ):
        return f"has a trainer_state.json that does not describe step {step} (damaged)", 0
    tokens = int(state.get("tokens", 0))
    if "files" not in state:
        return None, tokens  # written before checkpoints listed their files: loaded as it is
    problem = manifest_problem(path, state["files"])
    return (f"{problem} (damaged)" if problem is not None else None), tokens


def _lists_its_files(path: str) -> bool:
    try:
        state = read_json(os.path.join(path, "trainer_state.json"))
    except (OSError, DamagedFileError):
        return False
    return isinstance(state, dict) and "files" in state


def _set_aside(path: str) -> str:
    aside = path + ".damaged"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    fsync_dir(os.path.dirname(path))
    return aside


def _main_decides(ctx: Context, decide: Any) -> Any:
    """``decide()`` on the main process, its (picklable) value on every process."""
    if ctx.accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    box = [decide() if ctx.main else None]
    broadcast_object_list(box)
    return box[0]


def _resume_point(ctx: Context, directory: str, seed: int, task: str) -> tuple[int, str | None, int, bool]:
    """``(step, folder, tokens, had_checkpoints)`` of the newest intact checkpoint (``(0, None, 0, ...)``
    when none is). Each newer damaged one is set aside as ``<folder>.damaged`` (deleted with the task's
    other checkpoints when it finishes) with a :class:`~rankloss.train.files.DamagedFileWarning` naming
    it. Decided by the main process."""

    def decide() -> tuple[int, str | None, int, bool]:
        found = _checkpoints(directory)
        damaged, chosen = [], (0, None, 0)
        for step, path in reversed(found):
            problem, tokens = _checkpoint_problem(path, step)
            if problem is None:
                chosen = (step, path, tokens)
                break
            damaged.append((path, problem))
        then = (
            f"seed {seed} {task} resumes from {chosen[1]} (step {chosen[0]})"
            if chosen[1] is not None
            else f"no intact checkpoint is left: seed {seed} {task} starts over from step 0"
        )
        for path, problem in damaged:
            aside = _set_aside(path)
            warnings.warn(
                f"checkpoint {path} {problem}; set it aside as {aside}; {then}",
                DamagedFileWarning,
                stacklevel=4,
            )
        return (*chosen, bool(found))

    point = _main_decides(ctx, decide)
    ctx.accelerator.wait_for_everyone()
    return point


def _save_checkpoint(ctx: Context, directory: str, step: int, tokens: int = 0) -> None:
    """``accelerator.save_state`` into ``step-<n>.tmp``, then ``trainer_state.json`` (step, tokens, and the
    size and CRC-32 of every file, each ``fsync``'d), then the rename into ``step-<n>``; older ones past
    ``--keep-checkpoints`` are deleted."""
    acc = ctx.accelerator
    final = os.path.join(directory, "checkpoints", f"step-{step:06d}")
    tmp = final + ".tmp"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    acc.wait_for_everyone()
    acc.save_state(tmp)
    acc.wait_for_everyone()
    if ctx.main:
        files = folder_manifest(tmp, exclude=("trainer_state.json",))
        write_json_atomic(
            os.path.join(tmp, "trainer_state.json"), seal({"step": step, "tokens": tokens, "files": files})
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(final))
        for _, old in _checkpoints(directory)[: -ctx.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _make_scheduler(optimizer: torch.optim.Optimizer, name: str, steps: int, warmup_ratio: float) -> Any:
    warmup = int(math.ceil(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------------------------
# Evaluation


def _score(ctx: Context, model: Any, chains: list[Any]) -> dict[str, Any]:
    """:func:`score_chains` of ``chains`` with the run's collator and batch size, split over the processes
    and gathered."""
    from accelerate.utils import gather_object

    acc = ctx.accelerator
    return score_chains(
        model,
        chains,
        ctx.frames,
        ctx.collator,
        batch_size=ctx.config.eval_batch_size,
        device=ctx.device,
        rank=acc.process_index,
        world=acc.num_processes,
        gather=gather_object if acc.num_processes > 1 else None,
    )


def evaluate(
    ctx: Context,
    model: Any,
    task: str,
    *,
    ref_scores: dict[str, Any] | None,
    generate: bool,
    beta: float,
) -> EvalResult:
    """Assessment (and, with ``generate``, generation) metrics on the held-out chains."""
    from accelerate.utils import gather_object

    acc, cfg = ctx.accelerator, ctx.config
    world, rank = acc.num_processes, acc.process_index
    gather = gather_object if world > 1 else None
    was_training = model.training
    model.eval()
    ctx.reporter.phase(task, "eval")
    scores = _score(ctx, model, ctx.heldout)
    metrics = assessment_metrics(
        ctx.heldout, scores, ref_scores, beta=beta, length_normalize=cfg.length_normalize
    )
    samples: list[dict[str, Any]] = []
    if generate:
        ctx.reporter.phase(task, "generate")
        fsdp = "FSDP" in str(acc.distributed_type)
        gen = generation_metrics(
            model,
            ctx.heldout,
            ctx.frames,
            ctx.collator,
            batch_size=cfg.eval_batch_size,
            device=ctx.device,
            max_new_tokens=cfg.max_new_tokens,
            stop_when_done=not fsdp,
            rank=rank,
            world=world,
            gather=gather,
        )
        metrics.update(gen.metrics)
        samples = gen.samples
        probes = ctx.probes()
        if probes is not None:
            ctx.reporter.phase(task, "probes")
            pscores = _score(ctx, model, probes.chains)
            metrics.update(probe_metrics(probes, pscores, ref_scores))
    model.train(was_training)
    ctx.reporter.phase(task, "")
    return EvalResult(metrics, samples)


def _reference_scores(ctx: Context, model: Any, task: str) -> dict[str, Any]:
    """The reference scores of every chain, then (``--probes``) of the held-out probes, scored apart so
    that the chains' batches, hence their scores, are the same with or without probes."""
    ctx.reporter.phase(task, "reference scores")
    model.eval()
    probes = ctx.probes()
    scores = {}
    for chains in (ctx.train + ctx.heldout, probes.chains if probes is not None else []):
        if not chains:
            continue
        scores.update(_score(ctx, model, chains))
    ctx.reporter.phase(task, "")
    return scores


# ------------------------------------------------------------------------------------------------------
# Training


def _check_batch(ctx: Context) -> int:
    cfg, world = ctx.config, ctx.accelerator.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"--batch-size ({cfg.batch_size}, chains per optimizer step over all processes) must be "
            f"divisible by the number of processes ({world}) x --grad-accum ({cfg.grad_accum})"
        )
    return cfg.batch_size // (world * cfg.grad_accum)


@dataclass
class _Running:
    """Sums of per-micro-batch values since the last log line (reduced over processes when logged)."""

    names: tuple[str, ...] = ()
    sums: list[float] = field(default_factory=list)
    count: int = 0

    def add(self, values: dict[str, float]) -> None:
        if not self.names:
            self.names = tuple(sorted(values))
            self.sums = [0.0] * len(self.names)
        for i, k in enumerate(self.names):
            self.sums[i] += float(values[k])
        self.count += 1

    def reduce(self, acc: Any) -> dict[str, float]:
        t = torch.tensor(self.sums + [float(self.count)], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            t = acc.reduce(t, reduction="sum")
        vals = t.tolist()
        out = {k: v / max(1.0, vals[-1]) for k, v in zip(self.names, vals[:-1])}
        self.names, self.sums, self.count = (), [], 0
        return out


@dataclass
class Stage:
    """A prepared training stage: the wrapped model, optimizer, scheduler, and the step to start from."""

    wrapper: Any
    optimizer: Any
    scheduler: Any
    params: list[nn.Parameter]
    start: int
    steps: int
    tokens: int = 0  # LLM tokens processed before ``start`` (from the checkpoint)


def setup_stage(
    ctx: Context,
    model: nn.Module,
    *,
    seed: int,
    task: str,
    directory: str,
    steps: int,
    lr: float,
    freeze_vision: bool,
    log: MetricsLog,
    freeze_tower: bool = False,
) -> Stage:
    """Wrap ``model``, build AdamW and the warmup + ``--lr-scheduler`` schedule over ``steps``, prepare all
    three with the accelerator, and load the task's newest checkpoint if there is one (``--resume``).
    ``freeze_tower``: the vision tower's patch embedding and blocks get no updates, its merger does (SFT
    after stage 0, :func:`rankloss.train.vision_pretrain.freeze_tower`)."""
    acc, cfg = ctx.accelerator, ctx.config
    _check_batch(ctx)
    set_vision_trainable(model, not freeze_vision)
    if freeze_tower:
        freeze_tower_(model)
    # --share-prefix: the chain tree wherever it is exact (full sequences otherwise, with a warning)
    wrapper = ChainRankModel(model, share_prefix=None if cfg.share_prefix else False)
    if cfg.gradient_checkpointing:
        wrapper.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in wrapper.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = _make_scheduler(optimizer, cfg.lr_scheduler, steps, cfg.warmup_ratio)
    wrapper, optimizer, scheduler = acc.prepare(wrapper, optimizer, scheduler)
    start, path, tokens, had_checkpoints = _resume_point(ctx, directory, seed, task)
    if path is not None:
        try:
            acc.load_state(path)
        except Exception as exc:
            if _lists_its_files(path):  # intact (checked above): not damage, so left where it is
                raise RuntimeError(
                    f"checkpoint {path} is as it was written but cannot be loaded ({describe_error(exc)}): "
                    "it was written by another version of the model code, transformers or accelerate; "
                    f"continue with that version, or delete {path} to resume from an earlier checkpoint"
                ) from exc
            # (a checkpoint from before checkpoints listed their files, damaged: the model may be partly
            # loaded, so this process cannot start the task over)
            aside = _main_decides(ctx, lambda: _set_aside(path))
            raise DamagedFileError(
                path,
                f"cannot be loaded ({describe_error(exc)})",
                f"it was set aside as {aside}: run the same command again (with --resume) to continue "
                f"seed {seed} {task} from the previous checkpoint, or from its start when there is none",
            ) from exc
        ctx.reporter.message(f"seed {seed} {task}: resumed from {path} (step {start})")
    if had_checkpoints:
        log.truncate_after(start)  # (records past the step the task continues from)
    return Stage(wrapper, optimizer, scheduler, params, start, steps, tokens)


def run_steps(
    ctx: Context,
    stage: Stage,
    *,
    seed: int,
    task: str,
    directory: str,
    mode: str,
    spec: LossSpec | None,
    ref_scores: dict[str, Any] | None,
    log: MetricsLog,
    beta: float,
) -> int:
    """Optimizer steps ``stage.start .. stage.steps - 1``: train records every ``--log-every`` steps,
    assessment every ``--eval-every``, a checkpoint every ``--save-every``; ``--stop-after-steps`` stops
    (after a checkpoint) by raising :class:`StopRequested`. Returns the LLM tokens the stage processed
    over all processes (each chain's prompt once, plus its captions' tokens)."""
    acc, cfg = ctx.accelerator, ctx.config
    micro = _check_batch(ctx)
    wrapper, optimizer, scheduler, params = stage.wrapper, stage.optimizer, stage.scheduler, stage.params
    rank, world = acc.process_index, acc.num_processes
    per_process = cfg.batch_size // world
    running = _Running()
    ctx.reporter.start(task, stage.steps)
    if stage.start:
        ctx.reporter.advance(task, stage.start, "")
    wrapper.train()
    info = ""
    t_last, s_last = time.perf_counter(), stage.start
    local_tokens = 0

    def tokens_so_far() -> int:
        t = torch.tensor([local_tokens], dtype=torch.float64, device=acc.device)
        if world > 1:
            t = acc.reduce(t, reduction="sum")
        return stage.tokens + int(t.item())

    for step in range(stage.start, stage.steps):
        if cfg.stop_after_steps is not None and ctx.steps_done >= cfg.stop_after_steps:
            _save_checkpoint(ctx, directory, step, tokens_so_far())
            raise StopRequested(
                f"stopped after {ctx.steps_done} optimizer steps at seed {seed} {task} step {step}"
            )
        indices = global_batch_indices(len(ctx.train), cfg.batch_size, step, seed, task)
        mine = indices[rank * per_process : (rank + 1) * per_process]
        for m in range(cfg.grad_accum):
            chains = [ctx.train[i] for i in mine[m * micro : (m + 1) * micro]]
            with acc.accumulate(wrapper):
                batch = collate_chains(
                    ctx.collator,
                    chains,
                    ctx.frames,
                    best_only=mode == "sft",
                    ref_scores=ref_scores if mode == "rank" else None,
                )
                local_tokens += int(batch["prompt_attention_mask"].sum()) + int(
                    (batch["completion_labels"] != IGNORE_INDEX).sum()
                )
                batch = batch_to(batch, acc.device)
                # keep_precision: FSDP's mixed-precision input cast would turn ref_scores into bf16
                out = wrapper(keep_precision(batch), mode=mode, spec=spec)
                acc.backward(out["loss"])
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            values = {"loss": float(out["loss"].detach())}
            if mode == "rank":
                ch = out["chain"]
                values["pair_acc"] = float(ch.pairwise_accuracy.float().mean())
                values["margin"] = float(ch.neighbour_margin.float().mean())
                if ch.sft_loss is not None:
                    values["sft_term"] = float(ch.sft_loss.float().mean())
            running.add(values)
        ctx.steps_done += 1
        done = step + 1
        if done % cfg.log_every == 0 or done == stage.steps:
            vals = running.reduce(acc)
            now = time.perf_counter()
            rate = (done - s_last) / max(1e-9, now - t_last)
            t_last, s_last = now, done
            log.write(
                {
                    "event": "train",
                    "step": done,
                    "lr": scheduler.get_last_lr()[0],
                    "steps_per_s": rate,
                    "tokens": tokens_so_far(),
                    **vals,
                }
            )
            info = f"loss {vals['loss']:.3f}"
        ctx.reporter.advance(task, 1, info)
        every = cfg.eval_interval(stage.steps)
        if every and done % every == 0 and done < stage.steps:
            res = evaluate(
                ctx,
                wrapper,
                task,
                ref_scores=ref_scores if mode == "rank" or task != "sft" else None,
                generate=False,
                beta=beta,
            )
            log.write({"event": "eval", "kind": "assess", "step": done, "metrics": res.metrics})
        if cfg.save_every and done % cfg.save_every == 0 and done < stage.steps:
            _save_checkpoint(ctx, directory, done, tokens_so_far())
    ctx.reporter.finish(task)
    return tokens_so_far()


def _unwrapped_state(ctx: Context, wrapper: Any) -> dict[str, torch.Tensor]:
    state = ctx.accelerator.get_state_dict(wrapper)
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


#: The file of a saved model folder listing its other files' sizes and CRC-32 (:func:`_model_folder_problem`).
MODEL_MANIFEST = "rankloss_files.json"


def _save_model(ctx: Context, wrapper: Any, path: str) -> None:
    """``save_pretrained`` of the trained model plus its processor, loadable with ``--model path``, and
    :data:`MODEL_MANIFEST`; written to ``<path>.tmp``, ``fsync``'d, renamed into place."""
    acc = ctx.accelerator
    state = _unwrapped_state(ctx, wrapper)
    if ctx.main:
        inner = acc.unwrap_model(wrapper).model
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        ctx.processor.save_pretrained(tmp)
        write_json_atomic(os.path.join(tmp, MODEL_MANIFEST), seal({"files": folder_manifest(tmp)}))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    acc.wait_for_everyone()


def _model_folder_problem(path: str) -> str | None:
    """What is wrong with a model folder this run saved (missing, or a file not as written: see
    :data:`MODEL_MANIFEST`), ``None`` when it is intact or predates the manifest."""
    if not os.path.isdir(path):
        return "is missing"
    manifest_path = os.path.join(path, MODEL_MANIFEST)
    if not os.path.exists(manifest_path):
        return None  # saved before model folders listed their files
    try:
        raw = read_json(manifest_path)
    except DamagedFileError as exc:
        return f"has a damaged {MODEL_MANIFEST} ({exc.problem})"
    raw, problem = unseal(raw)  # (always sealed)
    if raw is None:
        return f"has a damaged {MODEL_MANIFEST} ({problem})"
    problem = manifest_problem(path, raw.get("files"))
    return f"{problem} (damaged)" if problem is not None else None


def _load_done(ctx: Context, directory: str, seed: int, task: str) -> dict[str, Any] | None:
    """The task's result when it is finished (``done.json``), else ``None``. A damaged ``done.json``
    (not this task's result) is deleted with a :class:`~rankloss.train.files.DamagedFileWarning` naming
    it, and the task is done again. Decided by the main process."""
    path = os.path.join(directory, "done.json")

    def decide() -> dict[str, Any] | None:
        if not os.path.exists(path):
            return None
        try:
            raw = read_json(path)
        except DamagedFileError as exc:
            problem = exc.problem
        else:
            raw, problem = unseal(raw, ("seed", "task", "final", "seconds", "model", "vision_pretrain"))
            if raw is None:
                _redo(path, str(problem), seed, task)
                return None
            if raw.get("seed") == seed and raw.get("task") == task and isinstance(raw.get("final"), dict):
                return raw
            problem = f"does not hold the result of seed {seed} {task} (damaged)"
        _redo(path, problem, seed, task)
        return None

    return _main_decides(ctx, decide)


def _redo(done_path: str, problem: str, seed: int, task: str, what: str | None = None) -> None:
    """Delete a finished task's ``done.json`` (main process) so that it is done again, with a warning."""
    with_ = f"{what} {problem}" if what is not None else f"{done_path} {problem}"
    warnings.warn(
        f"{with_}; deleted {done_path}: seed {seed} {task} is done again (it writes its result again when "
        "it finishes)",
        DamagedFileWarning,
        stacklevel=4,
    )
    if os.path.exists(done_path):
        os.remove(done_path)
        fsync_dir(os.path.dirname(done_path))


#: ``format`` of ``seed<k>/ref_scores.pt`` (``{"format", "scores": {chain id: (scores [K], num_tokens
#: [K])}, "crc32"}``); a bare ``{chain id: ...}`` is the format before it (no checksum).
REF_SCORES_FORMAT = "rankloss.train.ref_scores/1"


def _ref_scores_checksum(scores: dict[str, Any]) -> str:
    crc = 0
    for cid in sorted(scores):
        s, n = scores[cid]
        crc = zlib.crc32(cid.encode("utf-8"), crc)
        crc = zlib.crc32(s.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(), crc)
        crc = zlib.crc32(n.detach().to("cpu", torch.int64).contiguous().numpy().tobytes(), crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def save_ref_scores(path: str, scores: dict[str, Any]) -> None:
    """``scores`` (``{chain id: (scores [K], num_tokens [K])}``) in ``path`` with a checksum, atomically."""
    torch_save_atomic(
        {"format": REF_SCORES_FORMAT, "scores": scores, "crc32": _ref_scores_checksum(scores)}, path
    )


def read_ref_scores(path: str, chains: list[Any]) -> tuple[dict[str, Any] | None, str | None]:
    """``(scores, None)`` when ``path`` holds intact reference scores of every chain in ``chains`` (``K``
    finite scores and token counts each), else ``(None, what is wrong)``."""
    if not os.path.exists(path):
        return None, "is missing"
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - empty, truncated or overwritten: the caller recomputes
        return None, f"cannot be read ({describe_error(exc)})"
    checksum = None
    if isinstance(obj, dict) and obj.get("format") == REF_SCORES_FORMAT:
        obj, checksum = obj.get("scores"), obj.get("crc32")
    if not isinstance(obj, dict):
        return None, "does not hold reference scores (damaged)"
    for c in chains:
        entry = obj.get(c.id)
        k = len(c.captions)
        if not (
            isinstance(entry, (tuple, list))
            and len(entry) == 2
            and all(isinstance(t, torch.Tensor) and t.shape == (k,) for t in entry)
            and entry[0].is_floating_point()
            and not entry[1].is_floating_point()
        ):
            return None, f"holds no {k} scores of chain {c.id!r} (damaged, or not this run's chains)"
        if not bool(torch.isfinite(entry[0]).all()):
            return None, f"holds a non-finite score of chain {c.id!r} (damaged)"
    if checksum is not None and checksum != _ref_scores_checksum(
        {
            k: v
            for k, v in obj.items()
            if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(t, torch.Tensor) for t in v)
        }
    ):
        return None, "holds other scores than were written (checksum mismatch: damaged)"
    return obj, None


def _ref_chains(ctx: Context) -> list[Any]:
    probes = ctx.probes()
    return ctx.train + ctx.heldout + (list(probes.chains) if probes is not None else [])


def _load_sft_model(ctx: Context, seed: int) -> nn.Module:
    path = _sft_model_path(ctx, seed)
    try:
        return ctx.load_model(path)
    except Exception as exc:
        if path == ctx.config.model:
            raise
        done = os.path.join(task_dir(ctx.run_dir, seed, "sft"), "done.json")
        raise DamagedFileError(
            path,
            f"(seed {seed}'s SFT model) cannot be loaded ({describe_error(exc)})",
            f"delete {done} and run the same command with --resume: the SFT task is done again",
        ) from exc


def _seed_ref_scores(ctx: Context, seed: int) -> dict[str, Any]:
    """Seed ``seed``'s cached reference scores; when the file is missing or damaged, a
    :class:`~rankloss.train.files.DamagedFileWarning` names it and they are computed again with the SFT
    model (and rewritten)."""
    path = os.path.join(ctx.run_dir, f"seed{seed}", "ref_scores.pt")
    chains = _ref_chains(ctx)
    problem = _main_decides(ctx, lambda: read_ref_scores(path, chains)[1])
    if problem is None:
        ref, again = read_ref_scores(path, chains)
        if ref is None:
            raise DamagedFileError(path, str(again), "run the same command again")
        return ref
    if ctx.main:
        warnings.warn(
            f"{path} {problem}; computing seed {seed}'s reference scores again with its SFT model "
            f"{_sft_model_path(ctx, seed)}",
            DamagedFileWarning,
            stacklevel=3,
        )
    model = _load_sft_model(ctx, seed)
    wrapper = ctx.accelerator.prepare(
        ChainRankModel(model, share_prefix=None if ctx.config.share_prefix else False)
    )
    ref = _reference_scores(ctx, wrapper, "sft")
    if ctx.main:
        save_ref_scores(path, ref)
    del wrapper, model
    ctx.accelerator.free_memory()
    ctx.accelerator.wait_for_everyone()
    return ref


def _sft_done(ctx: Context, seed: int, directory: str) -> dict[str, Any] | None:
    """Seed ``seed``'s finished SFT result, or ``None`` (not finished, or done again: its ``done.json``
    or saved model is damaged). Its reference scores are checked (computed again when damaged)."""
    done = _load_done(ctx, directory, seed, "sft")
    if done is None:
        return None
    cfg = ctx.config
    model = os.path.join(directory, "model")
    expected = cfg.sft_steps > 0 or cfg.model is None or cfg.vision_pretrain == "proxy"

    def decide() -> bool:
        problem = _model_folder_problem(model) if expected or os.path.isdir(model) else None
        if problem is not None:
            _redo(os.path.join(directory, "done.json"), problem, seed, "sft", what=f"{model} (its model)")
        return problem is None

    if not _main_decides(ctx, decide):
        return None
    _seed_ref_scores(ctx, seed)
    return done


def _finish_task(ctx: Context, directory: str, result: dict[str, Any]) -> dict[str, Any]:
    if ctx.main:
        write_json_atomic(os.path.join(directory, "done.json"), seal(result))
        shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
    ctx.accelerator.wait_for_everyone()
    return result


def run_sft_task(ctx: Context, seed: int) -> dict[str, Any]:
    """Seed ``seed``'s SFT stage: evaluate the start model, SFT, evaluate, save, cache reference scores."""
    cfg, acc = ctx.config, ctx.accelerator
    directory = task_dir(ctx.run_dir, seed, "sft")
    done = _sft_done(ctx, seed, directory)
    if done is not None:
        return done
    if ctx.main:
        os.makedirs(directory, exist_ok=True)
    acc.wait_for_everyone()
    log = MetricsLog(
        os.path.join(directory, "metrics.jsonl"), {"seed": seed, "task": "sft", "stage": "sft"}, ctx.main
    )
    if not _checkpoints(directory) and ctx.main and os.path.exists(log.path):
        os.remove(log.path)
    pretrained = cfg.vision_pretrain == "proxy"
    stage0: dict[str, Any] | None = None
    model = ctx.new_model(seed)
    if pretrained:
        # Stage 0 (cached per seed): the tower pretrained on the proxy task, then frozen through SFT.
        stage0, tower = run_vision_pretrain(ctx, seed)
        load_tower(model, tower)
        if not any(r.get("event") == "vision_pretrain" for r in read_jsonl(log.path)):
            log.write({"event": "vision_pretrain", "step": 0, "metrics": stage0["heldout"]})
    t0 = time.perf_counter()
    stage = setup_stage(
        ctx,
        model,
        seed=seed,
        task="sft",
        directory=directory,
        steps=cfg.sft_steps,
        lr=cfg.sft_lr,
        freeze_vision=False,
        log=log,
        freeze_tower=pretrained,
    )
    if stage.start == 0 and not any(r.get("tag") == "init" for r in read_jsonl(log.path)):
        res = evaluate(ctx, stage.wrapper, "sft", ref_scores=None, generate=True, beta=cfg.beta)
        log.write(
            {
                "event": "eval",
                "kind": "full",
                "tag": "init",
                "step": 0,
                "metrics": res.metrics,
                "samples": res.samples,
            }
        )
    tokens = run_steps(
        ctx,
        stage,
        seed=seed,
        task="sft",
        directory=directory,
        mode="sft",
        spec=None,
        ref_scores=None,
        log=log,
        beta=cfg.beta,
    )
    res = evaluate(ctx, stage.wrapper, "sft", ref_scores=None, generate=True, beta=cfg.beta)
    res.metrics["tokens"] = float(tokens)
    log.write(
        {
            "event": "eval",
            "kind": "full",
            "tag": "sft",
            "step": cfg.sft_steps,
            "metrics": res.metrics,
            "samples": res.samples,
        }
    )
    if cfg.sft_steps > 0 or cfg.model is None or pretrained:  # (stage 0 changed the --model's tower)
        _save_model(ctx, stage.wrapper, os.path.join(directory, "model"))
    ref = _reference_scores(ctx, stage.wrapper, "sft")
    if ctx.main:
        save_ref_scores(os.path.join(ctx.run_dir, f"seed{seed}", "ref_scores.pt"), ref)
    acc.free_memory()
    result = {"seed": seed, "task": "sft", "final": res.metrics, "seconds": time.perf_counter() - t0}
    if stage0 is not None:
        result["vision_pretrain"] = {k: stage0[k] for k in ("heldout", "seconds", "steps") if k in stage0}
    return _finish_task(ctx, directory, result)


def _sft_model_path(ctx: Context, seed: int) -> str:
    path = os.path.join(task_dir(ctx.run_dir, seed, "sft"), "model")
    if not os.path.isdir(path) and ctx.config.model is not None and ctx.config.sft_steps == 0:
        return ctx.config.model
    return path


def run_arm_task(ctx: Context, seed: int, arm: Arm, *, save_to: str | None) -> dict[str, Any]:
    """One arm of seed ``seed``: from the SFT model, ``rank_steps`` steps of the arm's loss; evaluate."""
    cfg, acc = ctx.config, ctx.accelerator
    directory = task_dir(ctx.run_dir, seed, arm.name)
    done = _load_done(ctx, directory, seed, arm.name)
    if done is not None:
        return done
    if ctx.main:
        os.makedirs(directory, exist_ok=True)
    acc.wait_for_everyone()
    stage = "sft" if arm.loss == "sft" else "rank"
    log = MetricsLog(
        os.path.join(directory, "metrics.jsonl"), {"seed": seed, "task": arm.name, "stage": stage}, ctx.main
    )
    if not _checkpoints(directory) and ctx.main and os.path.exists(log.path):
        os.remove(log.path)
    t0 = time.perf_counter()
    ref = _seed_ref_scores(ctx, seed)
    model = _load_sft_model(ctx, seed)
    options = cfg.loss_options(arm)
    spec = LossSpec(length_normalize=cfg.length_normalize, **options) if stage == "rank" else None
    st = setup_stage(
        ctx,
        model,
        seed=seed,
        task=arm.name,
        directory=directory,
        steps=cfg.rank_steps,
        lr=cfg.lr,
        freeze_vision=arm.frozen_vision,
        log=log,
    )
    tokens = run_steps(
        ctx,
        st,
        seed=seed,
        task=arm.name,
        directory=directory,
        mode=stage,
        spec=spec,
        ref_scores=ref,
        log=log,
        beta=cfg.beta,
    )
    wrapper = st.wrapper
    if cfg.rank_steps == 0 and seed in ctx._zero_step_eval:
        # no step taken: this arm's model is the SFT model every other arm of this seed evaluated
        res = copy.deepcopy(ctx._zero_step_eval[seed])
    else:
        res = evaluate(ctx, wrapper, arm.name, ref_scores=ref, generate=True, beta=cfg.beta)
        if cfg.rank_steps == 0:
            ctx._zero_step_eval[seed] = copy.deepcopy(res)
    res.metrics["tokens"] = float(tokens)
    log.write(
        {
            "event": "eval",
            "kind": "full",
            "tag": "final",
            "step": cfg.rank_steps,
            "metrics": res.metrics,
            "samples": res.samples,
        }
    )
    if save_to is not None:
        _save_model(ctx, wrapper, save_to)
    acc.free_memory()
    result = {
        "seed": seed,
        "task": arm.name,
        "final": res.metrics,
        "seconds": time.perf_counter() - t0,
        "model": save_to,
    }
    return _finish_task(ctx, directory, result)
