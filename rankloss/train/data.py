"""Chains of captions with their videos, turned into model batches with video tokens and 3-D positions.

A batch holds ``B`` videos and the ``S = sum_b K_b`` captions of their chains (best caption first in
each chain). The model reads each video **once**: the *prefix* (the prompt with the video's
``<|video_pad|>`` tokens, identical for every caption of a chain) is a row of ``prefix_ids [B, P]``
(left-padded when prompts differ in length), and each caption is a row of ``caption_ids [S, L]``
(right-padded) that continues its video's prefix. Positions follow Qwen2.5-VL's multimodal RoPE: the
prefix's ``[3, P]`` positions come from the model's own ``get_rope_index`` (video tokens get their
temporal/height/width indices, text tokens count on from there), and caption token ``t`` of video ``b``
sits at ``next_position_b + t`` on all three axes.

Labels are built already aligned (DESIGN.md §3): the hidden state that scores caption token ``t`` is
the one at the position *before* it (the last prefix token for ``t = 0``), so ``labels[s, t] =
caption_ids[s, t]`` pairs with ``hidden[s, t]`` of ``[last prefix, caption_0, ..., caption_{L-2}]``,
and padding is ``ignore_index``. This is :func:`rankloss.shift_labels` applied to the Hugging Face
labels of ``[last prefix token, caption]`` with the always-ignored last column dropped.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..synthetic import Scene, synthetic_record
from .config import TrainConfig

__all__ = [
    "IGNORE_INDEX",
    "VideoChain",
    "FrameStore",
    "ChainBatch",
    "VideoLayout",
    "BatchBuilder",
    "synthetic_chains",
    "synthetic_frames",
    "load_chains_file",
    "decode_videos",
    "split_by_video",
    "global_batch_indices",
    "SYNTHETIC_FPS",
]

IGNORE_INDEX = -100
#: Frames per second the synthetic clips are taken to have: with ``tokens_per_second = 2`` and two frames
#: per temporal patch, consecutive temporal patches are one position apart.
SYNTHETIC_FPS = 4.0


# ------------------------------------------------------------------------------------------------------
# Chains and frames


@dataclass
class VideoChain:
    """One video and its chain of captions (best first).

    Attributes:
        id: unique id (the chain record's ``id``).
        captions: ``K >= 2`` captions, ``captions[0]`` the correct one.
        video: path of the video file (real data), ``None`` for synthetic clips.
        scene: the true :class:`~rankloss.synthetic.Scene` when known (synthetic data, or a chains file
            whose records carry ``source.scene``): generated captions are then scored fact by fact.
        index: row of the video in its :class:`FrameStore`.
    """

    id: str
    captions: list[str]
    video: str | None = None
    scene: Scene | None = None
    index: int = 0


@dataclass
class FrameStore:
    """All videos' frames as one ``uint8 [N, T, 3, H, W]`` array (in memory or memory-mapped) and their
    sampled frame rates ``fps [N]`` (frames per second of the *sampled* frames, for temporal positions)."""

    frames: np.ndarray
    fps: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def synthetic_chains(config: TrainConfig) -> list[VideoChain]:
    """The synthetic dataset's chains and scenes (no frames: fast), record ``i`` at index ``i``."""
    out = []
    for i in range(config.num_videos):
        rec = synthetic_record(
            i,
            seed=config.data_seed,
            chain_length=config.synthetic_chain_length,
            num_frames=config.frames,
            size=config.frame_size,
            max_objects=config.max_objects,
            render_frames=False,
        )
        out.append(VideoChain(rec.id, list(rec.chain), None, rec.scene, i))
    return out


def synthetic_frames(config: TrainConfig, progress: Callable[[int], None] | None = None) -> FrameStore:
    """Render every synthetic video (``uint8 [N, T, 3, S, S]``); deterministic, so each process renders
    its own copy instead of reading one from disk."""
    n, t, s = config.num_videos, config.frames, config.frame_size
    frames = np.empty((n, t, 3, s, s), dtype=np.uint8)
    for i in range(n):
        frames[i] = synthetic_record(
            i,
            seed=config.data_seed,
            chain_length=config.synthetic_chain_length,
            num_frames=t,
            size=s,
            max_objects=config.max_objects,
        ).frames
        if progress is not None:
            progress(1)
    return FrameStore(frames, np.full(n, SYNTHETIC_FPS, dtype=np.float64))


def load_chains_file(
    path: str, video_root: str | None = None, chain_length: int | None = None
) -> tuple[list[VideoChain], list[str]]:
    """Read a chains JSONL file (the ``rankloss chains make`` output) into chains.

    Video paths are resolved against ``video_root`` (default: the chains file's folder). A record's
    ``source.scene`` (written by ``rankloss synthetic make``) becomes its scene. Chains are cut to
    ``chain_length`` captions when given.

    Returns:
        ``(chains, notes)``; ``notes`` says what was skipped (chains shorter than 2 captions).

    Raises:
        ValueError: a corrupt line, a record without a video, a repeated id, or no usable chain (the
            message names the file and line).
        FileNotFoundError: video files that do not exist (the message lists the first few).
    """
    from ..chains import read_chains

    root = video_root if video_root is not None else os.path.dirname(os.path.abspath(path))
    chains: list[VideoChain] = []
    seen: set[str] = set()
    short = 0
    for lineno, rec in enumerate(read_chains(path), 1):
        captions = rec["chain"]
        if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{path}:{lineno}: 'chain' must be a list of non-empty captions")
        if chain_length is not None:
            captions = captions[:chain_length]
        if len(captions) < 2:
            short += 1
            continue
        video = rec.get("video")
        if not isinstance(video, str) or not video:
            raise ValueError(f"{path}:{lineno}: record has no 'video' path")
        rid = str(rec.get("id", video))
        if rid in seen:
            raise ValueError(f"{path}:{lineno}: id {rid!r} appears twice")
        seen.add(rid)
        scene = None
        src = rec.get("source")
        if isinstance(src, dict) and isinstance(src.get("scene"), dict):
            scene = Scene.from_dict(src["scene"])
        chains.append(VideoChain(rid, list(captions), os.path.join(root, video), scene, len(chains)))
    if not chains:
        raise ValueError(f"--data {path!r}: no chain with at least 2 captions")
    missing = [c.video for c in chains if not os.path.isfile(c.video)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{len(missing)} video file(s) of {path!r} not found under {root!r}: "
            + ", ".join(repr(m) for m in missing[:3])
            + more
            + " (set --video-root to the folder the chains file's video paths are relative to)"
        )
    notes = [f"skipped {short} chain(s) with fewer than 2 captions"] if short else []
    return chains, notes


def _sampled_fps(path: str, num_frames: int) -> float:
    from ..video import video_info

    info = video_info(path)
    duration = info.get("duration")
    if not duration and info.get("frames") and info.get("fps"):
        duration = info["frames"] / info["fps"]
    return num_frames / duration if duration else 2.0


def decode_videos(
    chains: Sequence[VideoChain],
    cache_dir: str,
    num_frames: int,
    size: int,
    progress: Callable[[int], None] | None = None,
) -> FrameStore:
    """Decode every chain's video once into ``cache_dir/frames.npy`` (``uint8 [N, T, 3, size, size]``,
    memory-mapped) with :func:`rankloss.video.load_video`; reused when it already holds these videos."""
    from ..video import load_video

    os.makedirs(cache_dir, exist_ok=True)
    frames_path, meta_path = os.path.join(cache_dir, "frames.npy"), os.path.join(cache_dir, "frames.json")
    key = {"videos": [c.video for c in chains], "num_frames": num_frames, "size": size}
    if os.path.exists(frames_path) and os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("key") == key:
            return FrameStore(np.load(frames_path, mmap_mode="r"), np.asarray(meta["fps"], dtype=np.float64))
    tmp = frames_path + ".partial.npy"
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(len(chains), num_frames, 3, size, size)
    )
    fps = []
    for i, c in enumerate(chains):
        arr[i] = load_video(c.video, num_frames, size=size)
        fps.append(_sampled_fps(c.video, num_frames))
        if progress is not None:
            progress(1)
    arr.flush()
    del arr
    os.replace(tmp, frames_path)
    with open(meta_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"key": key, "fps": fps}, f)
    os.replace(meta_path + ".tmp", meta_path)
    return FrameStore(np.load(frames_path, mmap_mode="r"), np.asarray(fps, dtype=np.float64))


def split_by_video(
    chains: Sequence[VideoChain], heldout: int, seed: int
) -> tuple[list[VideoChain], list[VideoChain]]:
    """``(train, heldout)``: ``heldout`` videos drawn at random (``seed``), the rest for training; a video
    and all its captions are on one side only."""
    if not 0 < heldout < len(chains):
        raise ValueError(
            f"--heldout must be in [1, {len(chains) - 1}] for {len(chains)} videos, got {heldout}"
        )
    order = list(range(len(chains)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:heldout])
    train = sorted(order[heldout:])
    return [chains[i] for i in train], [chains[i] for i in held]


def global_batch_indices(num_items: int, batch_size: int, step: int, seed: int, salt: str) -> list[int]:
    """Items of optimizer step ``step``: a pure function of its arguments, so a resumed run (and every
    process of a distributed run) sees exactly the batches an uninterrupted single process would.

    The stream is the concatenation of per-epoch permutations of ``range(num_items)`` (epoch ``e``'s is
    seeded by a hash of ``(seed, salt, e)``); step ``s`` takes items ``[s * batch_size, (s+1) * batch_size)``.
    """
    out = []
    start = step * batch_size
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, num_items)
        out.append(_epoch_permutation(num_items, seed, salt, epoch)[offset])
    return out


_PERM_CACHE: dict[tuple[int, int, str, int], list[int]] = {}


def _epoch_permutation(n: int, seed: int, salt: str, epoch: int) -> list[int]:
    key = (n, seed, salt, epoch)
    perm = _PERM_CACHE.get(key)
    if perm is None:
        digest = hashlib.blake2b(f"{seed}|{salt}|{epoch}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
        perm = torch.randperm(n, generator=g).tolist()
        if len(_PERM_CACHE) > 64:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = perm
    return perm


# ------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class ChainBatch:
    """Model inputs for ``B`` videos and their ``S`` captions (see the module docstring for the layout).

    Attributes:
        pixel_values_videos: ``[N_patches, C * t_p * p * p]`` the videos as the processor flattens them.
        video_grid_thw: ``[B, 3]`` each video's patch grid.
        prefix_ids: ``[B, P]`` prompt + video tokens, left-padded with the pad id.
        prefix_mask: ``[B, P]`` 1 at real tokens, or ``None`` when no prefix is padded.
        prefix_positions: ``[3, B, P]`` multimodal RoPE positions of the prefix.
        caption_ids: ``[S, L]`` caption tokens (ending with the end-of-text token), right-padded.
        caption_positions: ``[3, S, L]``.
        labels: ``[S, L]`` aligned labels (``caption_ids`` with padding set to ``ignore_index``).
        caption_video: ``[S]`` the video (row of the prefix) each caption continues.
        chain_sizes: ``[B]`` captions per video (1 per video for SFT batches).
        ref_scores: ``[S]`` cached reference scores (sum of token log-probs), or ``None``.
        ref_num_tokens: ``[S]`` scored tokens of each caption (for length-normalised references), or ``None``.
        next_positions: ``[B]`` the position the first caption token of each video takes.
        ids: the chains' ids, in batch order.
    """

    pixel_values_videos: Tensor
    video_grid_thw: Tensor
    prefix_ids: Tensor
    prefix_mask: Tensor | None
    prefix_positions: Tensor
    caption_ids: Tensor
    caption_positions: Tensor
    labels: Tensor
    caption_video: Tensor
    chain_sizes: Tensor
    next_positions: Tensor
    ref_scores: Tensor | None = None
    ref_num_tokens: Tensor | None = None
    ids: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ChainBatch:
        """Tensors moved to ``device``; ``pixel_values_videos`` also cast to ``dtype`` when given."""
        moved: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if isinstance(value, Tensor):
                value = value.to(device, non_blocking=True)
                if name == "pixel_values_videos" and dtype is not None:
                    value = value.to(dtype)
            moved[name] = value
        return ChainBatch(**moved)

    @property
    def num_videos(self) -> int:
        return int(self.prefix_ids.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.caption_ids.shape[0])


@dataclass(frozen=True)
class VideoLayout:
    """The prefix of every video with one patch grid and frame timing: token ids, ``[3, P]`` positions,
    and the position the first caption token takes."""

    prefix_ids: tuple[int, ...]
    positions: Tensor
    next_position: int


class BatchBuilder:
    """Turns chains + frames into :class:`ChainBatch` es with a processor and the model's RoPE indexer.

    Args:
        processor: a Qwen2.5-VL processor (``tokenizer`` and ``video_processor``; a chat template is used
            when the tokenizer or processor has one).
        rope_index: the model's ``get_rope_index`` (``model.model.get_rope_index``).
        prompt: the user instruction placed after the video for chat-template models.
        video_token_id: the model config's ``video_token_id``.
    """

    def __init__(
        self,
        processor: Any,
        rope_index: Callable[..., tuple[Tensor, Tensor]],
        *,
        prompt: str | None = None,
        video_token_id: int,
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.video_processor = processor.video_processor
        self.rope_index = rope_index
        self.video_token_id = int(video_token_id)
        self.video_token = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.merge = int(getattr(self.video_processor, "merge_size", 2))
        self.temporal_patch = int(getattr(self.video_processor, "temporal_patch_size", 2))
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        if self.tokenizer.eos_token_id is None:
            raise ValueError(
                "the tokenizer has no eos_token: captions need an end-of-text token to learn to stop"
            )
        self.end_id = int(self.tokenizer.eos_token_id)
        self.prompt_text = self._prompt_text(prompt)
        self._layouts: dict[tuple, VideoLayout] = {}
        self._rope_takes_types = "mm_token_type_ids" in inspect.signature(rope_index).parameters
        self._caption_cache: dict[str, list[int]] = {}

    def _prompt_text(self, prompt: str | None) -> str:
        template = getattr(self.processor, "chat_template", None) or getattr(
            self.tokenizer, "chat_template", None
        )
        if template:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "video"},
                        {"type": "text", "text": prompt or "Describe this video in detail."},
                    ],
                }
            ]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if self.video_token not in text:
                raise ValueError(
                    f"the chat template did not place the video token {self.video_token!r} in the prompt: "
                    f"{text!r}"
                )
            return text
        start = getattr(self.tokenizer, "vision_start_token", None) or "<|vision_start|>"
        end = getattr(self.tokenizer, "vision_end_token", None) or "<|vision_end|>"
        return f"{start}{self.video_token}{end}"

    # -------------------------------------------------------------------------------------------------
    def caption_tokens(self, caption: str) -> list[int]:
        """Token ids of ``caption`` followed by the end-of-text token (memoised)."""
        ids = self._caption_cache.get(caption)
        if ids is None:
            ids = list(self.tokenizer(caption, add_special_tokens=False)["input_ids"]) + [self.end_id]
            if len(self._caption_cache) < 200_000:
                self._caption_cache[caption] = ids
        return ids

    def layout(self, grid_thw: Sequence[int], second_per_grid: float) -> VideoLayout:
        """Prefix ids and positions of a video with patch grid ``grid_thw`` (memoised)."""
        key = (tuple(int(v) for v in grid_thw), round(float(second_per_grid), 6))
        lay = self._layouts.get(key)
        if lay is not None:
            return lay
        n_tokens = math.prod(key[0]) // (self.merge * self.merge)
        text = self.prompt_text.replace(self.video_token, self.video_token * n_tokens, 1)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if sum(i == self.video_token_id for i in ids) != n_tokens:
            raise ValueError(
                f"the tokenizer does not keep {self.video_token!r} as one token per video patch group"
            )
        input_ids = torch.tensor([ids])
        types = (input_ids == self.video_token_id).long() * 2  # 0 text, 2 video (transformers' convention)
        kwargs: dict[str, Any] = {
            "video_grid_thw": torch.tensor([key[0]]),
            "second_per_grid_ts": torch.tensor([key[1]]),
        }
        if self._rope_takes_types:
            kwargs["mm_token_type_ids"] = types
        positions, _ = self.rope_index(input_ids, **kwargs)
        lay = VideoLayout(tuple(ids), positions[:, 0].clone(), int(positions.max()) + 1)
        self._layouts[key] = lay
        return lay

    def build(
        self,
        chains: Sequence[VideoChain],
        frames: FrameStore,
        *,
        best_only: bool = False,
        ref_scores: dict[str, tuple[Tensor, Tensor]] | None = None,
        with_captions: bool = True,
    ) -> ChainBatch:
        """One batch of ``chains`` (all their captions, or only the best one with ``best_only``).

        ``ref_scores`` maps a chain id to ``(scores [K], num_tokens [K])`` of the reference model.
        ``with_captions=False`` builds prefixes only (for generation); ``caption_*`` are then empty.
        """
        videos = [frames.frames[c.index] for c in chains]
        fps = [float(frames.fps[c.index]) for c in chains]
        metadata = [
            {"total_num_frames": int(v.shape[0]), "fps": f, "frames_indices": list(range(int(v.shape[0])))}
            for v, f in zip(videos, fps)
        ]
        vp = self.video_processor(
            videos=[np.asarray(v) for v in videos], video_metadata=metadata, return_tensors="pt"
        )
        grids = vp["video_grid_thw"]
        layouts = [self.layout(g.tolist(), self.temporal_patch / f) for g, f in zip(grids, fps)]
        P = max(len(lay.prefix_ids) for lay in layouts)
        B = len(chains)
        prefix_ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        prefix_mask = torch.zeros((B, P), dtype=torch.long)
        prefix_pos = torch.zeros((3, B, P), dtype=torch.long)
        for b, lay in enumerate(layouts):
            n = len(lay.prefix_ids)
            prefix_ids[b, P - n :] = torch.tensor(lay.prefix_ids)
            prefix_mask[b, P - n :] = 1
            prefix_pos[:, b, P - n :] = lay.positions
        padded = bool((prefix_mask == 0).any())
        next_positions = torch.tensor([lay.next_position for lay in layouts], dtype=torch.long)

        tokens: list[list[int]] = []
        owner: list[int] = []
        sizes: list[int] = []
        refs: list[Tensor] = []
        ref_n: list[Tensor] = []
        for b, c in enumerate(chains):
            caps = c.captions[:1] if best_only else c.captions
            if not with_captions:
                caps = []
            sizes.append(len(caps))
            for cap in caps:
                tokens.append(self.caption_tokens(cap))
                owner.append(b)
            if ref_scores is not None and caps:
                s, n = ref_scores[c.id]
                refs.append(s[: len(caps)])
                ref_n.append(n[: len(caps)])
        S = len(tokens)
        L = max((len(t) for t in tokens), default=0)
        caption_ids = torch.full((S, L), self.pad_id, dtype=torch.long)
        labels = torch.full((S, L), IGNORE_INDEX, dtype=torch.long)
        for s, t in enumerate(tokens):
            caption_ids[s, : len(t)] = torch.tensor(t)
            labels[s, : len(t)] = torch.tensor(t)
        owner_t = torch.tensor(owner, dtype=torch.long)
        cap_pos = (next_positions[owner_t][:, None] + torch.arange(L)[None, :]).expand(3, S, L).contiguous()
        return ChainBatch(
            pixel_values_videos=vp["pixel_values_videos"],
            video_grid_thw=grids.long(),
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask if padded else None,
            prefix_positions=prefix_pos,
            caption_ids=caption_ids,
            caption_positions=cap_pos,
            labels=labels,
            caption_video=owner_t,
            chain_sizes=torch.tensor(sizes, dtype=torch.long),
            next_positions=next_positions,
            ref_scores=torch.cat(refs) if refs else None,
            ref_num_tokens=torch.cat(ref_n) if ref_n else None,
            ids=[c.id for c in chains],
        )
