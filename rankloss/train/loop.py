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
``(seed, task, step)``. Checkpoints (``accelerator.save_state`` + the step) are written to a temporary
folder and renamed into place; ``--resume`` loads the newest one and continues with the same batches,
optimizer, scheduler and RNG state.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..integrations.collator import ChainCollator
from ..integrations.forward import ChainRankModel, LossSpec
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
from .model import (
    build_tiny_model,
    load_pretrained,
    load_processor,
    pick_attn_implementation,
    set_vision_trainable,
    tiny_config,
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
    return accelerator


def check_process_group(accelerator: Any, env: Any) -> None:
    """Refuse a launch whose processes did not join one group.

    ``accelerate launch --num_processes N`` (or ``torchrun``) sets ``WORLD_SIZE=N``; if ``Accelerator``
    then sees a single process (accelerate 1.x does this for ``--use_fsdp`` without GPUs: distributed
    type ``NO``), the N copies would each train the whole model on the whole batch and write into the
    same run folder. Stop before that, naming both numbers.
    """
    world = env.get("WORLD_SIZE")
    try:
        world_size = int(world) if world is not None else 1
    except ValueError:
        raise SystemExit(f"error: WORLD_SIZE={world!r} in the environment is not an integer") from None
    if world_size > 1 and accelerator.num_processes != world_size:
        raise SystemExit(
            f"error: launched as {world_size} processes (WORLD_SIZE={world_size}) but accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type}, device {accelerator.device}); "
            "the processes would run as independent copies. On CPU use `accelerate launch --num_processes "
            f"{world_size}` without --use_fsdp (accelerate's FSDP needs GPUs)."
        )


def task_dir(run_dir: str, seed: int, task: str) -> str:
    return os.path.join(run_dir, f"seed{seed}", task)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a half-written last line of an interrupted run
                    break
    return out


def build_context(config: TrainConfig, run_dir: str, accelerator: Any, reporter: Reporter) -> Context:
    """Load the chains (split from ``<run>/data/split.json``), frames, processor and model config."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bars would cut through the run's own
    with open(os.path.join(run_dir, "data", "split.json"), encoding="utf-8") as f:
        split = json.load(f)
    if config.synthetic:
        chains = synthetic_chains(config)
        frames = synthetic_frames(config)
    else:
        chains, _ = load_chains_file(config.data, config.video_root, config.chain_length)
        frames = decode_videos(chains, os.path.join(run_dir, "data"), config.frames, config.frame_size)
    by_id = {c.id: c for c in chains}
    train = [by_id[i] for i in split["train"]]
    heldout = [by_id[i] for i in split["heldout"]]
    processor = load_processor(
        config.model if config.model is not None else os.path.join(run_dir, "processor")
    )
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
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**self.base, **record}) + "\n")


# ------------------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoints(directory: str) -> list[tuple[int, str]]:
    root = os.path.join(directory, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        if name.startswith("step-") and not name.endswith(".tmp"):
            path = os.path.join(root, name)
            if os.path.exists(os.path.join(path, "trainer_state.json")):
                out.append((int(name[5:]), path))
    return sorted(out)


def _save_checkpoint(ctx: Context, directory: str, step: int, tokens: int = 0) -> None:
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
        write_json_atomic(os.path.join(tmp, "trainer_state.json"), {"step": step, "tokens": tokens})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
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
    start = tokens = 0
    ckpts = _checkpoints(directory)
    if ckpts:
        start, path = ckpts[-1]
        acc.load_state(path)
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            tokens = int(json.load(f).get("tokens", 0))
        log.truncate_after(start)
        ctx.reporter.message(f"seed {seed} {task}: resumed from {path} (step {start})")
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
                out = wrapper(batch, mode=mode, spec=spec)
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


def _save_model(ctx: Context, wrapper: Any, path: str) -> None:
    """``save_pretrained`` of the trained model plus its processor, loadable with ``--model path``."""
    acc = ctx.accelerator
    state = _unwrapped_state(ctx, wrapper)
    if ctx.main:
        inner = acc.unwrap_model(wrapper).model
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        ctx.processor.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    acc.wait_for_everyone()


def _load_done(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, "done.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return None


def _finish_task(ctx: Context, directory: str, result: dict[str, Any]) -> dict[str, Any]:
    if ctx.main:
        write_json_atomic(os.path.join(directory, "done.json"), result)
        shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)
    ctx.accelerator.wait_for_everyone()
    return result


def run_sft_task(ctx: Context, seed: int) -> dict[str, Any]:
    """Seed ``seed``'s SFT stage: evaluate the start model, SFT, evaluate, save, cache reference scores."""
    cfg, acc = ctx.config, ctx.accelerator
    directory = task_dir(ctx.run_dir, seed, "sft")
    done = _load_done(directory)
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
        tmp = os.path.join(ctx.run_dir, f"seed{seed}", "ref_scores.pt.tmp")
        torch.save(ref, tmp)
        os.replace(tmp, os.path.join(ctx.run_dir, f"seed{seed}", "ref_scores.pt"))
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
    done = _load_done(directory)
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
    model = ctx.load_model(_sft_model_path(ctx, seed))
    ref = torch.load(os.path.join(ctx.run_dir, f"seed{seed}", "ref_scores.pt"), weights_only=True)
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
    res = evaluate(ctx, wrapper, arm.name, ref_scores=ref, generate=True, beta=cfg.beta)
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
