"""Stage 0 (``--vision-pretrain proxy``): a pretrained vision tower, before SFT.

Real video-language models start from a pretrained vision encoder that instruction tuning keeps frozen.
The tiny model of the example trainer has none, so stage 0 makes one on a cheap proxy task that needs
static appearance but not the dynamic facts the chains also degrade: from a *single* frame shown twice
(two identical frames are one temporal patch, so the tower sees one frame), predict which colour x shape
combinations are visible in that frame (multi-label, binary cross-entropy over
``len(COLOURS) * len(SHAPES)`` classes, a linear head on each patch of the tower output, max-pooled over
the frame: :class:`_ProxyModel`; the head is discarded afterwards). Frames are drawn at random from the
*training* videos; the labels come from the true scene (the objects drawn at that frame's clip time:
:func:`visible_objects`).

What is trained is the Qwen2.5-VL vision tower without its merger (``model.model.visual``: the patch
embedding and the blocks); the merger (the projector into the LLM) keeps its initial weights here and is
trained in SFT, where the tower is frozen (:func:`freeze_tower`).

The result is cached per seed in ``<run>/seed<k>/vision_pretrain/`` (``tower.pt``, the tower's state dict,
then ``done.json`` with the held-out proxy metrics and the tower file's size and CRC-32, both written
atomically; a damaged one is reported and the stage trained again): ``--resume`` and every arm of
the seed reuse it. The stage is short (~30 s at the default sizes) and is not checkpointed: an interrupted
stage 0 starts again from its first step, with the same result (batches are a function of seed and step).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..synthetic import COLOURS, SHAPES, SIZES, Scene, _state
from .config import write_json_atomic
from .files import (
    DamagedFileError,
    DamagedFileWarning,
    describe_error,
    file_digest,
    read_json,
    seal,
    torch_save_atomic,
    unseal,
)

__all__ = [
    "PROXY_CLASSES",
    "proxy_class",
    "frame_time",
    "visible_objects",
    "proxy_labels",
    "check_supported",
    "tower_named_parameters",
    "tower_state",
    "load_tower",
    "freeze_tower",
    "pixel_values",
    "proxy_f1",
    "pretrain_dir",
    "pretrain_tower",
    "run_vision_pretrain",
]

#: The proxy task's classes: every colour x shape combination, colour-major.
PROXY_CLASSES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
#: Model types whose vision tower stage 0 knows (patch embedding + blocks, then a merger).
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


def proxy_class(colour: str, shape: str) -> int:
    """Index of ``(colour, shape)`` in :data:`PROXY_CLASSES`."""
    return _COLOUR_INDEX[colour] * len(SHAPES) + _SHAPE_INDEX[shape]


def frame_time(t: int, num_frames: int) -> float:
    """Clip time of frame ``t`` of ``num_frames``, as :func:`rankloss.synthetic.render` draws it."""
    return (t + 0.5) / num_frames


def visible_objects(scene: Scene, tau: float, frame_size: int) -> list[int]:
    """Indices of the scene's objects drawn at clip time ``tau`` in a ``frame_size`` frame: visible, and
    not shrunk below half a pixel (an appearing / disappearing object at its window's edge), exactly as
    :func:`rankloss.synthetic.render` decides. Occlusion by another object is not modelled."""
    out = []
    for i, obj in enumerate(scene.objects):
        _, _, _, scale, visible = _state(scene, i, tau)
        if visible and SIZES[obj.size] * frame_size * scale >= 0.5:
            out.append(i)
    return out


def proxy_labels(scene: Scene, tau: float, frame_size: int) -> np.ndarray:
    """``float32 [len(PROXY_CLASSES)]``: 1 for each colour x shape drawn at clip time ``tau``."""
    y = np.zeros(len(PROXY_CLASSES), dtype=np.float32)
    for i in visible_objects(scene, tau, frame_size):
        o = scene.objects[i]
        y[proxy_class(o.colour, o.shape)] = 1.0
    return y


# ------------------------------------------------------------------------------------------------------
# The tower


def _visual(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    visual = getattr(base, "visual", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or visual is None or not hasattr(visual, "merger"):
        raise ValueError(
            f"--vision-pretrain proxy trains a Qwen2.5-VL vision tower (patch embedding + blocks, then a "
            f"merger); model_type {model_type!r} is not supported: use --vision-pretrain none"
        )
    return visual


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError`` naming ``--vision-pretrain`` unless stage 0 can train ``model``'s tower."""
    _visual(model)


def tower_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The tower's parameters (names relative to ``visual``): everything but the merger."""
    return [(n, p) for n, p in _visual(model).named_parameters() if not n.startswith("merger.")]


def tower_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tower's weights (a copy on the CPU), names relative to ``visual``."""
    return {n: p.detach().to("cpu", copy=True) for n, p in tower_named_parameters(model)}


def load_tower(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`tower_state`) into ``model``'s tower; every tower weight must be there."""
    params = dict(tower_named_parameters(model))
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(
            f"the cached stage-0 tower does not fit this model (missing {missing[:3]}, "
            f"unexpected {extra[:3]})"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(device=p.device, dtype=p.dtype))


def freeze_tower(model: nn.Module) -> None:
    """Freeze the tower (patch embedding + blocks); the merger's ``requires_grad`` is left as it is."""
    for _, p in tower_named_parameters(model):
        p.requires_grad_(False)


def _patchify(frames: torch.Tensor, vp: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Qwen2-VL video processor does to ``B`` two-frame videos of ``frames`` (uint8 ``[B, 3, H,
    W]``, each frame twice) without resizing: rescale, normalise, cut into merge-ordered patches."""
    ps, ms, tp = int(vp.patch_size), int(vp.merge_size), int(vp.temporal_patch_size)
    b, c, h, w = frames.shape
    mean = torch.tensor(vp.image_mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(vp.image_std, dtype=torch.float32).view(1, c, 1, 1)
    x = (frames.float() * float(vp.rescale_factor) - mean) / std
    x = x[:, None].expand(b, tp, c, h, w)  # one temporal patch of identical frames
    gh, gw = h // ps, w // ps
    x = x.reshape(b, 1, tp, c, gh // ms, ms, ps, gw // ms, ms, ps)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    x = x.reshape(b * gh * gw, c * tp * ps * ps)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long)
    return x, grid


def pixel_values(
    frames: np.ndarray, video_processor: Any, *, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values_videos, video_grid_thw)`` of ``B`` single frames (``uint8 [B, 3, H, W]``), each shown
    twice as a two-frame video: the processor's own output (``fast=False``) or the same computed here."""
    if fast:
        return _patchify(torch.from_numpy(np.ascontiguousarray(frames)), video_processor)
    videos = [np.stack([f, f]) for f in frames]
    out = video_processor(videos=videos, return_tensors="pt")
    return out["pixel_values_videos"], out["video_grid_thw"]


class _ProxyModel(nn.Module):
    """The tower and a linear head on every patch of its output (before the merger), max-pooled over the
    frame's patches: a class is present when some patch shows it.

    The max makes each patch's features carry the colour x shape of what it shows, which is what the LLM
    reads through the merger token by token. A head on the mean-pooled output instead (measured, 1000 steps,
    default sizes) reached a held-out proxy F1 of 0.50 (colour 0.75, shape 0.67) against 0.78 (0.90, 0.84)
    with the max: averaging 16 patches, mostly background, blurs which colour belongs to which shape."""

    def __init__(self, visual: nn.Module, width: int, classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(width, classes)

    def forward(self, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        hidden = self.visual(pixels, grid_thw=grid).last_hidden_state  # [sum of patches, width]
        per = int(grid[0].prod())  # every frame has the same patches; windows stay within a frame
        per_patch = self.head(hidden.reshape(grid.shape[0], per, hidden.shape[-1]).float())  # [B, P, C]
        return per_patch.amax(1)


def proxy_f1(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Micro-F1 of ``logits > 0`` against ``labels`` (``[N, classes]``): over the colour x shape classes
    (``f1``), and over the colours (``colour_f1``) and shapes (``shape_f1``) that some class predicts."""
    pred = logits > 0
    gold = labels > 0.5

    def f1(p: torch.Tensor, g: torch.Tensor) -> float:
        tp = float((p & g).sum())
        denom = float(p.sum() + g.sum())
        return 2 * tp / denom if denom else 1.0

    n, nc, ns = pred.shape[0], len(COLOURS), len(SHAPES)
    pc, gc = pred.reshape(n, nc, ns), gold.reshape(n, nc, ns)
    return {
        "f1": f1(pred, gold),
        "colour_f1": f1(pc.any(2), gc.any(2)),
        "shape_f1": f1(pc.any(1), gc.any(1)),
    }


def _cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> Any:
    warmup = int(math.ceil(warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _label_table(chains: Sequence[Any], num_frames: int, frame_size: int) -> np.ndarray:
    """``float32 [len(chains), num_frames, classes]`` from the chains' scenes."""
    out = np.zeros((len(chains), num_frames, len(PROXY_CLASSES)), dtype=np.float32)
    for i, c in enumerate(chains):
        if c.scene is None:
            raise ValueError(
                f"--vision-pretrain proxy needs every video's scene (synthetic data, or chains made by "
                f"`rankloss synthetic make`); chain {c.id!r} has none: use --vision-pretrain none"
            )
        for t in range(num_frames):
            out[i, t] = proxy_labels(c.scene, frame_time(t, num_frames), frame_size)
    return out


def pretrain_tower(
    model: nn.Module,
    *,
    train: Sequence[Any],
    heldout: Sequence[Any],
    frames: np.ndarray,
    video_processor: Any,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    device: torch.device | str = "cpu",
    eval_frames: int = 2048,
    on_step: Any = None,
) -> dict[str, Any]:
    """Train ``model``'s tower (in place; the merger is untouched) on the proxy task; returns
    ``{"heldout": proxy_f1 metrics, "train_loss_first": ..., "train_loss_last": ..., "history": [...]}``.

    ``train`` / ``heldout``: chains with ``scene`` and ``index`` (row of ``frames``, ``uint8 [N, T, 3, H,
    W]``). The batch of step ``s`` is a function of ``(seed, s)``; the head is drawn with ``seed``.
    ``on_step(step, loss)`` is called after every step.
    """
    visual = _visual(model)
    num_frames, size = int(frames.shape[1]), int(min(frames.shape[-2:]))
    labels = torch.from_numpy(_label_table(train, num_frames, size))
    rows = np.asarray([c.index for c in train], dtype=np.int64)
    width = int(model.config.vision_config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _ProxyModel(visual, width, len(PROXY_CLASSES))
    net.head.to(device)
    was_training = visual.training
    named = tower_named_parameters(model)
    saved_flags = [p.requires_grad for _, p in named]
    merger_flags = [p.requires_grad for p in visual.merger.parameters()]
    for _, p in named:
        p.requires_grad_(True)
    for p in visual.merger.parameters():
        p.requires_grad_(False)
    params = [p for _, p in named] + list(net.head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = _cosine(optimizer, steps, warmup_ratio)
    vp = video_processor

    # The fast patchify must give what the processor gives (it always does for frames at the processor's
    # size); otherwise every batch goes through the processor.
    probe = frames[rows[0], :1]
    fast = True
    try:
        a, ga = pixel_values(probe, vp, fast=True)
        b, gb = pixel_values(probe, vp, fast=False)
        fast = a.shape == b.shape and torch.equal(ga, gb) and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    except Exception:
        fast = False

    history: list[dict[str, float]] = []
    net.train()
    for step in range(steps):
        rng = np.random.default_rng([seed, step, 0x5EED])
        pick = rng.integers(0, len(train), size=batch_size)
        t = rng.integers(0, num_frames, size=batch_size)
        pixels, grid = pixel_values(frames[rows[pick], t], vp, fast=fast)
        target = labels[pick, t].to(device)
        logits = net(pixels.to(device=device, dtype=next(visual.parameters()).dtype), grid.to(device))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        history.append({"step": step + 1, "loss": value, "lr": scheduler.get_last_lr()[0]})
        if on_step is not None:
            on_step(step + 1, value)

    # Held-out proxy F1: every frame of the held-out videos (evenly thinned to at most ``eval_frames``).
    net.eval()
    pairs = [(c.index, t) for c in heldout for t in range(num_frames)]
    if len(pairs) > eval_frames:
        keep = np.linspace(0, len(pairs) - 1, eval_frames).round().astype(int)
        pairs = [pairs[i] for i in keep]
    held_labels = _label_table(heldout, num_frames, size)
    pos = {c.index: k for k, c in enumerate(heldout)}
    all_logits, all_labels, losses = [], [], []
    with torch.no_grad():
        for s in range(0, len(pairs), 64):
            chunk = pairs[s : s + 64]
            imgs = np.stack([frames[i, t] for i, t in chunk])
            pixels, grid = pixel_values(imgs, vp, fast=fast)
            logits = net(pixels.to(device=device, dtype=next(visual.parameters()).dtype), grid.to(device))
            y = torch.from_numpy(np.stack([held_labels[pos[i], t] for i, t in chunk])).to(device)
            losses.append(float(nn.functional.binary_cross_entropy_with_logits(logits, y)) * len(chunk))
            all_logits.append(logits.cpu())
            all_labels.append(y.cpu())
    metrics: dict[str, float] = {}
    if pairs:
        metrics = proxy_f1(torch.cat(all_logits), torch.cat(all_labels))
        metrics["loss"] = sum(losses) / len(pairs)
        metrics["frames"] = float(len(pairs))
    # Leave the model as it was apart from the tower's weights.
    for (_, p), flag in zip(named, saved_flags):
        p.requires_grad_(flag)
    for p, flag in zip(visual.merger.parameters(), merger_flags):
        p.requires_grad_(flag)
    visual.train(was_training)
    return {
        "heldout": metrics,
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "history": history,
        "fast_patchify": fast,
    }


# ------------------------------------------------------------------------------------------------------
# The stage in a run


def pretrain_dir(run_dir: str, seed: int) -> str:
    return os.path.join(run_dir, f"seed{seed}", "vision_pretrain")


#: The keys of stage 0's ``done.json`` before it was sealed.
_STAGE0_KEYS = ("seed", "task", "heldout", "train_loss_first", "train_loss_last", "steps", "seconds")


def _read_done(directory: str, *, warn: bool = True) -> dict[str, Any] | None:
    """Stage 0's record when it finished and its tower is intact, else ``None`` (train it). A damaged
    ``done.json`` or ``tower.pt`` (empty, truncated, overwritten: the size and CRC-32 in ``done.json``, or,
    without them, a ``tower.pt`` that does not load) is reported with a
    :class:`~rankloss.train.files.DamagedFileWarning` naming it (``warn``): the stage is trained again
    (it is deterministic)."""
    path, tower_path = os.path.join(directory, "done.json"), os.path.join(directory, "tower.pt")
    if not os.path.exists(path):
        return None
    problem = None
    try:
        done = read_json(path)
    except DamagedFileError as exc:
        done, problem = None, str(exc)
    if problem is None:
        done, why = unseal(done, _STAGE0_KEYS)
        if done is None:
            problem = f"{path} {why} (damaged)"
    if problem is None and not isinstance(done.get("heldout"), dict):
        problem = f"{path} does not hold stage 0's record (damaged)"
    if problem is None and not os.path.exists(tower_path):
        problem = f"{tower_path} is missing"
    if problem is None:
        expected = done.get("tower_file")
        if expected is not None:
            if list(file_digest(tower_path)) != expected:
                problem = f"{tower_path} holds other bytes than were written (size or checksum: damaged)"
        else:  # written before done.json held the tower's checksum: check that it loads
            try:
                state = torch.load(tower_path, weights_only=True)
                if not isinstance(state, dict) or not all(
                    isinstance(v, torch.Tensor) for v in state.values()
                ):
                    problem = f"{tower_path} does not hold the tower's weights (damaged)"
            except Exception as exc:  # noqa: BLE001 - damaged: trained again
                problem = f"{tower_path} cannot be read ({describe_error(exc)})"
    if problem is None:
        return done
    if warn:
        warnings.warn(
            f"{problem}; pretraining the vision tower again (stage 0 is deterministic: the same tower)",
            DamagedFileWarning,
            stacklevel=3,
        )
    return None


def run_vision_pretrain(ctx: Any, seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Seed ``seed``'s stage 0 in the run of ``ctx`` (a :class:`rankloss.train.loop.Context`): the cached
    result when ``<run>/seed<k>/vision_pretrain/done.json`` exists, else train (main process), cache, and
    load. Returns ``(done record, tower state)``; the record has ``"cached": True`` when nothing was trained.
    """
    cfg, acc = ctx.config, ctx.accelerator
    directory = pretrain_dir(ctx.run_dir, seed)
    tower_path = os.path.join(directory, "tower.pt")
    done = _read_done(directory) if ctx.main else None
    if done is None and ctx.main:
        os.makedirs(directory, exist_ok=True)
        task = "vision_pretrain"
        t0 = time.perf_counter()
        model = ctx.new_model(seed)
        model.to(ctx.device)
        ctx.reporter.start(task, cfg.vision_pretrain_steps)
        log_path = os.path.join(directory, "metrics.jsonl")  # (a record of the stage, not read back)
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        running: list[float] = []
        last = [time.perf_counter()]

        def on_step(step: int, loss: float) -> None:
            running.append(loss)
            info = ""
            if step % cfg.log_every == 0 or step == cfg.vision_pretrain_steps:
                mean = sum(running) / len(running)
                now = time.perf_counter()
                rate = len(running) / max(1e-9, now - last[0])
                last[0] = now
                running.clear()
                log.write(
                    json.dumps(
                        {
                            "seed": seed,
                            "task": task,
                            "event": "train",
                            "step": step,
                            "loss": mean,
                            "steps_per_s": rate,
                        }
                    )
                )
                log.write("\n")
                info = f"loss {mean:.3f}"
            ctx.reporter.advance(task, 1, info)

        try:
            out = pretrain_tower(
                model,
                train=ctx.train,
                heldout=ctx.heldout,
                frames=ctx.frames.frames,
                video_processor=ctx.processor.video_processor,
                seed=seed,
                steps=cfg.vision_pretrain_steps,
                batch_size=cfg.vision_pretrain_batch_size,
                lr=cfg.vision_pretrain_lr,
                warmup_ratio=cfg.warmup_ratio,
                weight_decay=cfg.weight_decay,
                max_grad_norm=cfg.max_grad_norm,
                device=ctx.device,
                on_step=on_step,
            )
            ctx.reporter.phase(task, "")
            log.write(
                json.dumps(
                    {"seed": seed, "task": task, "event": "eval", "tag": "final", "metrics": out["heldout"]}
                )
                + "\n"
            )
        finally:
            log.close()
            ctx.reporter.finish(task)
        tower_file = list(torch_save_atomic(tower_state(model), tower_path))
        done = {
            "seed": seed,
            "task": task,
            "heldout": out["heldout"],
            "train_loss_first": out["train_loss_first"],
            "train_loss_last": out["train_loss_last"],
            "steps": cfg.vision_pretrain_steps,
            "seconds": time.perf_counter() - t0,
            "tower_file": tower_file,  # size and CRC-32 of tower.pt
        }
        write_json_atomic(os.path.join(directory, "done.json"), seal(done))
        ctx.reporter.message(
            f"seed {seed} vision pretrain: held-out proxy F1 {out['heldout'].get('f1', float('nan')):.3f} "
            f"(colour {out['heldout'].get('colour_f1', float('nan')):.3f}, shape "
            f"{out['heldout'].get('shape_f1', float('nan')):.3f}) in {done['seconds']:.0f} s"
        )
        del model
        done = {**done, "cached": False}
    acc.wait_for_everyone()
    if done is None:  # another process trained it
        done = _read_done(directory, warn=False)
        if done is None:
            raise DamagedFileError(
                os.path.join(directory, "done.json"),
                "is missing or damaged after the main process wrote it",
                f"delete {directory} and run the same command again with --resume",
            )
    done.setdefault("cached", True)
    try:
        state = torch.load(tower_path, weights_only=True)
    except Exception as exc:
        raise DamagedFileError(
            tower_path,
            f"cannot be read ({describe_error(exc)})",
            f"delete {directory} and run the same command again with --resume: stage 0 is trained again",
        ) from exc
    return done, state
