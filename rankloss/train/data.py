"""Chains of captions with their videos, and the chain batches the model reads.

A batch holds ``B`` videos and the ``S = sum_b K_b`` captions of their chains (best caption first in
each chain): the trainer turns them into chain records (:func:`chain_records`: the video's frames and
frame rate, the captions) and :class:`~rankloss.integrations.ChainCollator` turns those into the chain
batch documented in :mod:`rankloss.integrations` (what ``ChainRankTrainer`` reads too): the prompt with
the video's placeholder tokens once per chain (left-padded), the captions right-padded, each ending
with the end-of-text token, labels already aligned with the hidden states that score them, and the
processor's video tensors. Positions are the model family's business
(:class:`~rankloss.integrations.ChainForward`): for Qwen2.5-VL, the prompt's 3-D multimodal RoPE
positions from the model's own ``get_rope_index`` and caption token ``t`` at the position it gives text
after the prompt ``+ t``.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..integrations.collator import IGNORE_INDEX, ChainCollator
from ..integrations.layout import ChainTree
from ..integrations.media import sampled_fps
from ..synthetic import Scene, synthetic_record
from .config import TrainConfig
from .files import (
    DamagedFileError,
    DamagedFileWarning,
    describe_error,
    file_digest,
    fsync_dir,
    read_json,
    seal,
    unseal,
    write_json_atomic,
)

__all__ = [
    "IGNORE_INDEX",
    "VideoChain",
    "FrameStore",
    "DEFAULT_PROMPT",
    "has_chat_template",
    "make_collator",
    "chain_records",
    "collate_chains",
    "batch_to",
    "synthetic_chains",
    "synthetic_frames",
    "load_chains_file",
    "decode_videos",
    "read_split",
    "record_split",
    "HELDOUT_SPLITS",
    "split_by_video",
    "global_batch_indices",
    "SYNTHETIC_FPS",
]

#: The instruction after the video for chat-template models (``--prompt`` replaces it).
DEFAULT_PROMPT = "Describe this video in detail."
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
        split: the record's ``split`` field (``"train"``, or a held-out name: see :data:`HELDOUT_SPLITS`),
            ``None`` when it has none.
    """

    id: str
    captions: list[str]
    video: str | None = None
    scene: Scene | None = None
    index: int = 0
    split: str | None = None


#: record ``split`` values that put a video in the held-out set (``"train"`` puts it in training)
HELDOUT_SPLITS = ("heldout", "held_out", "test", "val", "valid", "validation", "eval", "dev")


def record_split(chains: Sequence[VideoChain]) -> tuple[list[VideoChain], list[VideoChain]] | None:
    """``(train, heldout)`` from the records' ``split`` fields, or ``None`` when no record has one.

    Raises:
        ValueError: some records have a ``split`` and others not, an unknown value, or a side left empty.
    """
    tagged = [c for c in chains if c.split is not None]
    if not tagged:
        return None
    if len(tagged) != len(chains):
        first = next(c for c in chains if c.split is None)
        raise ValueError(
            f"{len(tagged)} of {len(chains)} records have a 'split' field but record {first.id!r} has none: "
            "give every record a split, or none (then --heldout videos are drawn at random)"
        )
    train, held = [], []
    for c in chains:
        value = str(c.split).strip().lower()
        if value == "train":
            train.append(c)
        elif value in HELDOUT_SPLITS:
            held.append(c)
        else:
            raise ValueError(
                f"record {c.id!r}: split={c.split!r}; use 'train' or one of {HELDOUT_SPLITS} (held out)"
            )
    if not train or not held:
        raise ValueError(
            f"the records' 'split' fields give {len(train)} training and {len(held)} held-out videos; "
            "both sides need at least one"
        )
    return train, held


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
    path: str,
    video_root: str | None = None,
    chain_length: int | None = None,
    *,
    eval_path: str | None = None,
) -> tuple[list[VideoChain], list[str]]:
    """Read a chains JSONL file (the ``rankloss chains make`` output) into chains.

    Video paths are resolved against ``video_root`` (default: the chains file's folder). A record's
    ``source.scene`` (written by ``rankloss synthetic make``) becomes its scene. Chains are cut to
    ``chain_length`` captions when given. With ``eval_path`` (``--eval-data``), a second chains file's
    chains follow, as the held-out set: every chain of ``path`` gets ``split="train"`` and every chain of
    ``eval_path`` ``split="heldout"`` (a record whose own ``split`` says otherwise is an error, not
    silently moved), and an id may not be in both files.

    Returns:
        ``(chains, notes)``; ``notes`` says what was skipped (chains shorter than 2 captions).

    Raises:
        ValueError: a corrupt line, a record without a video, a repeated id, or no usable chain (the
            message names the file and line).
        FileNotFoundError: video files that do not exist (the message lists the first few).
    """
    from ..integrations.collator import check_videos_exist, read_chain_records

    chains: list[VideoChain] = []
    notes: list[str] = []
    files = [("--data", path, None)] + ([("--eval-data", eval_path, "heldout")] if eval_path else [])
    first_file: dict[str, str] = {}
    for flag, file, side in files:
        records, short = read_chain_records(
            file, video_root=video_root, chain_length=chain_length, require_video=True
        )
        if not records:
            raise ValueError(f"{flag} {file!r}: no chain with at least 2 captions")
        root = video_root if video_root is not None else os.path.dirname(os.path.abspath(file))
        check_videos_exist(
            records, root, "set --video-root to the folder the chains file's video paths are relative to"
        )
        for r in records:
            if r.id in first_file:
                raise ValueError(
                    f"{flag} {file!r}: id {r.id!r} is also in {first_file[r.id]!r}: a video is either "
                    "trained on or held out, not both"
                )
            first_file[r.id] = file
            src = r.record.get("source")
            scene = (
                Scene.from_dict(src["scene"])
                if isinstance(src, dict) and isinstance(src.get("scene"), dict)
                else None
            )
            split = r.record.get("split")
            split = None if split is None else str(split)
            if eval_path:
                want = side or "train"
                own = None if split is None else ("train" if split.strip().lower() == "train" else "heldout")
                if own is not None and own != want:
                    raise ValueError(
                        f"{flag} {file!r}: record {r.id!r} has split={split!r}, but with --eval-data every "
                        f"record of {flag} is {'held out' if side else 'for training'}: move it to the other "
                        "file or drop its split field"
                    )
                split = want
            chains.append(VideoChain(r.id, r.captions, r.video, scene, len(chains), split))
        if short:
            notes.append(f"{flag}: skipped {short} chain(s) with fewer than 2 distinct captions")
    return chains, notes


def decode_videos(
    chains: Sequence[VideoChain],
    cache_dir: str,
    num_frames: int,
    size: int,
    progress: Callable[[int], None] | None = None,
) -> FrameStore:
    """Decode every chain's video once into ``cache_dir/frames.npy`` (``uint8 [N, T, 3, size, size]``,
    memory-mapped) with :func:`rankloss.video.load_video`; reused when it already holds these videos.

    ``frames.json`` next to it holds what was decoded (the video paths, ``num_frames``, ``size``), the
    sampled frame rates and the size and CRC-32 of ``frames.npy``. The cache is a derived file: a damaged
    one (either file empty, truncated, overwritten, or not matching the other) is reported with a
    :class:`~rankloss.train.files.DamagedFileWarning` naming it and decoded again; a cache of other videos
    or settings is decoded again without one. Both files are written atomically (unique temporary name,
    ``fsync``, rename), so processes that decode at the same time do not collide.
    """
    from ..video import load_video

    os.makedirs(cache_dir, exist_ok=True)
    frames_path, meta_path = os.path.join(cache_dir, "frames.npy"), os.path.join(cache_dir, "frames.json")
    key = {"videos": [c.video for c in chains], "num_frames": num_frames, "size": size}
    shape = (len(chains), num_frames, 3, size, size)
    if os.path.exists(meta_path):
        cached, problem = _cached_frames(frames_path, meta_path, key, shape)
        if cached is not None:
            return cached
        if problem is not None:
            warnings.warn(
                f"{problem}; decoding the {len(chains)} videos again into {frames_path}",
                DamagedFileWarning,
                stacklevel=2,
            )
    fd, tmp = tempfile.mkstemp(prefix=".frames.", suffix=".partial.npy", dir=cache_dir)
    os.close(fd)
    try:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fps = []
        for i, c in enumerate(chains):
            arr[i] = load_video(c.video, num_frames, size=size)
            fps.append(sampled_fps(c.video, num_frames))
            if progress is not None:
                progress(1)
        arr.flush()
        del arr
        nbytes, crc = _fsync_digest(tmp)
        os.replace(tmp, frames_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(cache_dir)
    write_json_atomic(meta_path, seal({"key": key, "fps": fps, "bytes": nbytes, "crc32": crc}), indent=None)
    return FrameStore(np.load(frames_path, mmap_mode="r"), np.asarray(fps, dtype=np.float64))


def _fsync_digest(path: str) -> tuple[int, str]:
    """``fsync`` ``path``, then its :func:`~rankloss.train.files.file_digest`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return file_digest(path)


def _cached_frames(
    frames_path: str, meta_path: str, key: dict[str, Any], shape: tuple[int, ...]
) -> tuple[FrameStore | None, str | None]:
    """``(store, None)`` when the cache holds these videos intact; ``(None, None)`` when it holds other
    videos or settings (or ``frames.npy`` is missing: a decode that did not finish); ``(None, problem)``
    when it is damaged, ``problem`` naming the file and what is wrong."""
    try:
        meta = read_json(meta_path)
    except FileNotFoundError:
        return None, None
    except DamagedFileError as exc:
        return None, str(exc)
    meta, problem = unseal(meta, ("key", "fps"))
    if meta is None:
        return None, f"{meta_path} {problem} (damaged)"
    if "key" not in meta:
        return None, f"{meta_path} does not describe a frame cache (damaged)"
    if meta["key"] != key:
        return None, None  # other videos or settings: a cache miss, not damage
    fps = meta.get("fps")
    if (
        not isinstance(fps, list)
        or len(fps) != shape[0]
        or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
            for x in fps
        )
    ):
        return None, f"{meta_path} does not hold {shape[0]} positive frame rates (damaged)"
    if not os.path.exists(frames_path):
        return None, None
    expected = meta.get("bytes"), meta.get("crc32")
    if expected != (None, None):
        if not isinstance(expected[0], int) or not isinstance(expected[1], str):
            return None, f"{meta_path} holds no valid checksum of frames.npy (damaged)"
        actual_size = os.path.getsize(frames_path)
        if actual_size != expected[0]:
            return (
                None,
                f"{frames_path} has {actual_size} bytes, written with {expected[0]} (truncated or damaged)",
            )
        if file_digest(frames_path)[1] != expected[1]:
            return None, f"{frames_path} holds other bytes than were written (checksum mismatch: damaged)"
    try:
        frames = np.load(frames_path, mmap_mode="r")
    except Exception as exc:  # noqa: BLE001 - a damaged header or a short file: decode again
        return None, f"{frames_path} cannot be read ({describe_error(exc)})"
    if frames.shape != shape or frames.dtype != np.uint8:
        return (
            None,
            f"{frames_path} holds {frames.dtype} {list(frames.shape)}, not uint8 {list(shape)} (damaged)",
        )
    return FrameStore(frames, np.asarray(fps, dtype=np.float64)), None


def read_split(
    path: str, chains: Sequence[VideoChain], heldout: int, seed: int, *, write: bool = True
) -> dict[str, list[str]]:
    """The run's train/held-out split (``<run>/data/split.json``: ``{"train": [ids], "heldout": [ids]}``).

    The split is a pure function of the chains (their order), ``heldout`` and ``seed``
    (:func:`split_by_video`), so a missing file is made, and a damaged one (empty, truncated, not a split)
    is made again; with ``write`` (the main process), the file is written and a damaged one reported with
    a :class:`~rankloss.train.files.DamagedFileWarning` naming it.

    Raises:
        DamagedFileError: the file is a split, but not of these chains (an id the chains do not hold, an
            id twice, or another number held out): the file was overwritten or ``--data`` changed since
            the run started; the message names the file and the id and says what to do.
    """
    ids = [c.id for c in chains]

    by_record = record_split(chains)
    if by_record is not None:  # the records' own split: --heldout and --data-seed do not apply
        heldout = len(by_record[1])

    def make() -> dict[str, list[str]]:
        train, held = by_record if by_record is not None else split_by_video(chains, heldout, seed)
        split = {"train": [c.id for c in train], "heldout": [c.id for c in held]}
        if write:
            write_json_atomic(path, split, indent=None)
        return split

    try:
        raw = read_json(path)
    except FileNotFoundError:
        return make()
    except DamagedFileError as exc:
        problem = exc.problem
    else:
        problem = None
        if not (
            isinstance(raw, dict)
            and all(
                isinstance(raw.get(k), list) and all(isinstance(i, str) for i in raw[k])
                for k in ("train", "heldout")
            )
        ):
            problem = "is not a split (a JSON object with lists of ids 'train' and 'heldout')"
    if problem is not None and write:
        warnings.warn(
            f"{path} {problem}; made it again from the chains, --heldout and --data-seed (the same split "
            "as before when the chains file is unchanged)",
            DamagedFileWarning,
            stacklevel=2,
        )
    if problem is not None:
        return make()
    known, seen = set(ids), set()
    advice = (
        "the file was overwritten or the chains file (--data) changed since the run started: run with the "
        f"chains file the run started with, or, if it is unchanged, delete {path} and it is made again"
    )
    for k in ("train", "heldout"):
        for i in raw[k]:
            if i not in known:
                raise DamagedFileError(path, f"lists {k} id {i!r}, which the chains do not hold", advice)
            if i in seen:
                raise DamagedFileError(path, f"lists id {i!r} twice", advice)
            seen.add(i)
    if len(raw["heldout"]) != heldout or not raw["train"]:
        raise DamagedFileError(
            path,
            f"holds {len(raw['train'])} training and {len(raw['heldout'])} held-out ids, but --heldout is "
            f"{heldout}",
            advice,
        )
    return {"train": list(raw["train"]), "heldout": list(raw["heldout"])}


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


def has_chat_template(processor: Any) -> bool:
    """Whether ``processor`` (or its tokenizer) has a chat template."""
    tok = getattr(processor, "tokenizer", None)
    return bool(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None))


def make_collator(processor: Any, prompt: str | None = None) -> ChainCollator:
    """The :class:`~rankloss.integrations.ChainCollator` of the trainer's batches.

    With a chat template (a real checkpoint's processor) the prompt is one user message: the video, then
    ``prompt`` (default :data:`DEFAULT_PROMPT`). Without one (the tiny model's processor) the prompt is the
    video's placeholder between its start and end markers, nothing else (``--prompt`` does not apply).
    """
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"{type(processor).__name__} has no tokenizer or no video processor: the trainer needs a "
            "video-language model's processor"
        )
    text = (prompt or DEFAULT_PROMPT) if has_chat_template(processor) else ""
    return ChainCollator(processor, default_prompt=text)


def chain_records(
    chains: Sequence[VideoChain],
    frames: FrameStore,
    *,
    best_only: bool = False,
    ref_scores: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> list[dict[str, Any]]:
    """Chain records (:mod:`rankloss.integrations.collator`) of ``chains``: ``{"id", "videos": [frames
    uint8 [T, 3, H, W]], "video_fps": the frames' rate, "completions": the captions, best first}``, only
    the best caption with ``best_only``; ``ref_scores`` maps a chain id to ``(scores [K], num_tokens [K])``
    of the reference model (its first scores become the record's ``ref_scores``)."""
    records = []
    for c in chains:
        captions = c.captions[:1] if best_only else list(c.captions)
        rec: dict[str, Any] = {
            "id": c.id,
            "videos": [frames.frames[c.index]],
            "video_fps": float(frames.fps[c.index]),
            "completions": captions,
        }
        if ref_scores is not None:
            rec["ref_scores"] = ref_scores[c.id][0][: len(captions)].tolist()
        records.append(rec)
    return records


def collate_chains(
    collator: ChainCollator,
    chains: Sequence[VideoChain],
    frames: FrameStore,
    *,
    best_only: bool = False,
    ref_scores: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> dict[str, Any]:
    """The chain batch (:mod:`rankloss.integrations`) of ``chains``: :func:`chain_records` through
    ``collator``."""
    return collator(chain_records(chains, frames, best_only=best_only, ref_scores=ref_scores))


def batch_to(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with its tensors and chain tree on ``device`` (other values, e.g. ``chain_ids``, as they
    are)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, (Tensor, ChainTree)) else v
        for k, v in batch.items()
    }
