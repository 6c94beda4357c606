"""Chain records: what one is, how its fields are checked, and where records come from.

A **chain record** is one prompt (with its images or videos) and ``K >= 1`` completions ranked best
first, in the shape TRL's trainers read (a ``dict`` per example, e.g. a row of a ``datasets.Dataset``):

===============  ==========================================================================================
key              value
===============  ==========================================================================================
``prompt``       a string (*standard* format), or a list of messages ``[{"role": "user", "content":
                 ...}]`` (*conversational* format); ``messages`` is accepted as an alias of a
                 conversational prompt; absent or ``None``: the collator's ``default_prompt``
``completions``  ``K >= 1`` completions, best first: strings, or conversational completions (each a list
                 of messages, typically one ``{"role": "assistant", "content": ...}``)
``images``       optional list of images: ``PIL.Image``, ``uint8 [H, W, C]`` arrays, or file paths
``videos``       optional list of videos: file paths (decoded with :func:`rankloss.video.load_video`), or
                 ``uint8`` frame arrays ``[T, H, W, C]`` or ``[T, C, H, W]``
``video_fps``    optional: frames per second of the record's videos' frames (one number for all of them, or
                 one per video), for processors that take ``video_metadata`` (Qwen's temporal positions);
                 overrides the collator's ``video_fps``
``ref_scores``   optional ``K`` floats: the reference model's summed log-probs of the completions
``id``           optional: the record's id (becomes ``chain_ids``)
``edit_types``   optional ``K - 1`` strings: entry ``k - 1`` is the type of the edit that turned completion
                 ``k - 1`` into completion ``k`` (``object``, ``count``, ... as ``rankloss chains make``
                 records them), ``None`` or ``""`` where unknown; or ``edits``: the chains file's
                 ``[{"step": k, "type": ...}, ...]``. The trainer's per-edit-type metrics read them
                 (``batch["chain_edit_types"]``)
===============  ==========================================================================================

The checks name the record and the field (``records[3]['completions'][1] is an empty string``), so a bad
record in a dataset of 100k is found by its index. :class:`~rankloss.integrations.ChainCollator` calls
them record by record; :func:`read_chain_records` and :func:`load_chain_dataset` turn the
``rankloss chains make`` output (a chains JSONL file) into records.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "ChainFileRecord",
    "ParsedRecord",
    "check_videos_exist",
    "clean_messages",
    "describe",
    "is_messages",
    "load_chain_dataset",
    "read_chain_records",
    "record_completions",
    "record_id",
    "record_ref_scores",
    "record_edit_types",
    "record_video_fps",
]


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_optional_int(value: object, name: str, minimum: int) -> None:
    if value is None:
        return
    if not is_int(value):
        raise TypeError(f"{name} must be None or an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:  # type: ignore[operator]
        raise ValueError(f"{name} must be None or an int >= {minimum}, got {value!r}")


def is_messages(value: object) -> bool:
    """Whether ``value`` looks like a conversational list of messages (dicts with a ``role``)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(m, Mapping) and "role" in m for m in value)
    )


def clean_messages(messages: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """``messages`` checked (each a dict with a string ``role`` and string or list ``content``) and copied
    without ``None`` values inside content entries (a ``datasets`` row fills the keys an entry lacks with
    ``None``: ``{"type": "video", "text": None}``, which some chat templates read as text)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError(f"{where} must be a non-empty list of messages, got {describe(messages)}")
    out = []
    for j, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TypeError(f"{where}[{j}] must be a message dict, got {describe(msg)}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise TypeError(f"{where}[{j}] needs a string 'role', got {describe(role)}")
        if isinstance(content, (list, tuple)):
            entries = []
            for k, entry in enumerate(content):
                if not isinstance(entry, Mapping) or not isinstance(entry.get("type"), str):
                    raise TypeError(
                        f"{where}[{j}]['content'][{k}] must be a dict with a 'type' (e.g. "
                        f'{{"type": "text", "text": ...}} or {{"type": "video"}}), got {describe(entry)}'
                    )
                entries.append({key: val for key, val in entry.items() if val is not None})
            content = entries
        elif not isinstance(content, str):
            raise TypeError(
                f"{where}[{j}]['content'] must be a string or a list of content entries, got "
                f"{describe(content)}"
            )
        out.append({**{k: v for k, v in msg.items() if v is not None}, "role": role, "content": content})
    return out


def describe(value: object) -> str:
    if isinstance(value, str):
        return f"the string {value[:60]!r}"
    if isinstance(value, (list, tuple)) and not value:
        return f"an empty {type(value).__name__}"
    return type(value).__name__


@dataclass
class ParsedRecord:
    """One record, checked: the prompt text, its media, the completions' token ids."""

    prompt: str
    images: list[Any]
    videos: list[np.ndarray]
    video_fps: list[float]
    completions: list[list[int]]
    ref_scores: list[float] | None
    id: str | None
    #: ``(k, j)`` for every completion ``k`` dropped as token-identical to the better-ranked ``j`` (the
    #: indices in the record's ``completions``).
    dropped: list[tuple[int, int]] = field(default_factory=list)
    #: the index in the record's ``completions`` of each kept completion (``completions`` minus ``dropped``).
    kept: list[int] = field(default_factory=list)
    #: the record's edit types (:func:`record_edit_types`), ``None`` when it gives none.
    edit_types: list[str | None] | None = None


# ------------------------------------------------------------------------------------------------------
# A record's fields


def record_completions(i: int, rec: Mapping[str, Any]) -> tuple[list[Any], bool]:
    """``records[i]``'s completions, checked, and whether they are conversational."""
    where = f"records[{i}]['completions']"
    if rec.get("completions") is None:
        raise ValueError(
            f"records[{i}] has no 'completions': each record needs a list of K >= 1 completions, "
            f"best first (its keys: {sorted(rec)})"
        )
    comps = rec["completions"]
    if not isinstance(comps, (list, tuple)):
        raise TypeError(f"{where} must be a list of completions (best first), got {describe(comps)}")
    if not comps:
        raise ValueError(f"{where} is an empty list: a chain needs at least one completion")
    conversational = not isinstance(comps[0], str)
    for k, c in enumerate(comps):
        if isinstance(c, str):
            if conversational:
                raise TypeError(f"{where} mixes strings and conversational completions ({where}[{k}])")
            if not c.strip():
                raise ValueError(f"{where}[{k}] is an empty string: completions need text")
        elif is_messages(c):
            if not conversational:
                raise TypeError(f"{where} mixes strings and conversational completions ({where}[{k}])")
        else:
            raise TypeError(
                f"{where}[{k}] must be a non-empty string or a list of messages "
                f'([{{"role": "assistant", "content": ...}}]), got {describe(c)}'
            )
    return list(comps), conversational


def record_video_fps(i: int, value: Any, n_videos: int) -> list[float] | None:
    """``records[i]``'s ``video_fps`` (a number, or one per video) as one rate per video, or ``None``."""
    if value is None:
        return None
    where = f"records[{i}]['video_fps']"

    def is_number(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if is_number(value):
        rates = [value] * n_videos
    elif isinstance(value, (list, tuple)) and all(is_number(x) for x in value):
        if len(value) != n_videos:
            raise ValueError(f"{where} has {len(value)} rates for {n_videos} video(s)")
        rates = list(value)
    else:
        raise TypeError(
            f"{where} must be a positive number or a list of them (one per video), got {describe(value)}"
        )
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise ValueError(f"{where} must be positive and finite, got {value!r}")
    return [float(r) for r in rates]


def record_ref_scores(i: int, rec: Mapping[str, Any], num_completions: int) -> list[float] | None:
    """``records[i]``'s ``ref_scores`` (one float per completion), or ``None`` when it has none."""
    refs = rec.get("ref_scores")
    if refs is None:
        return None
    where = f"records[{i}]['ref_scores']"
    if isinstance(refs, (torch.Tensor, np.ndarray)):
        refs = refs.tolist()
    if not isinstance(refs, (list, tuple)) or not all(
        isinstance(r, numbers.Real) and not isinstance(r, bool) for r in refs
    ):
        raise TypeError(f"{where} must be a list of floats (one per completion), got {describe(refs)}")
    if len(refs) != num_completions:
        raise ValueError(f"{where} has {len(refs)} scores for {num_completions} completions")
    return [float(r) for r in refs]


def _edits_to_types(where: str, edits: Any, num_completions: int) -> list[str | None]:
    """A chains file's ``edits`` (``[{"step": k, "type": t, ...}]``) as ``K - 1`` types by step."""
    if not isinstance(edits, (list, tuple)):
        raise TypeError(
            f"{where} must be a list of edits ({{'step': k, 'type': ...}}), got {describe(edits)}"
        )
    types: list[str | None] = [None] * max(num_completions - 1, 0)
    for j, e in enumerate(edits):
        if not isinstance(e, Mapping) or "step" not in e or "type" not in e:
            raise TypeError(f"{where}[{j}] must be a dict with 'step' and 'type', got {describe(e)}")
        step, etype = e["step"], e["type"]
        if not is_int(step) or step < 1:
            raise ValueError(f"{where}[{j}]['step'] must be an int >= 1, got {step!r}")
        if etype is not None and not isinstance(etype, str):
            raise TypeError(f"{where}[{j}]['type'] must be a string, got {describe(etype)}")
        if step <= len(types):  # edits past a chain cut to fewer captions are not in it
            types[step - 1] = etype or None
    return types


def record_edit_types(i: int, rec: Mapping[str, Any], num_completions: int) -> list[str | None] | None:
    """``records[i]``'s edit types by step: ``K - 1`` entries, entry ``k - 1`` the type of the edit that
    turned completion ``k - 1`` into completion ``k`` (``None`` where unknown), from its ``edit_types``
    (or, without them, the chains file's ``edits``); ``None`` when it gives neither (or an empty list).
    A longer list is cut to ``K - 1`` (a chain cut to fewer captions)."""
    value = rec.get("edit_types")
    if value is None:
        edits = rec.get("edits")
        if edits is None or (isinstance(edits, (list, tuple)) and not edits):
            return None
        return _edits_to_types(f"records[{i}]['edits']", edits, num_completions)
    where = f"records[{i}]['edit_types']"
    if not isinstance(value, (list, tuple)) or not all(v is None or isinstance(v, str) for v in value):
        raise TypeError(f"{where} must be a list of strings (one per edit, K - 1), got {describe(value)}")
    if not value:
        return None
    if len(value) < num_completions - 1:
        raise ValueError(
            f"{where} has {len(value)} types for {num_completions} completions (needs K - 1 = "
            f"{num_completions - 1}: the type of the edit that made each completion after the first)"
        )
    return [v or None for v in list(value)[: max(num_completions - 1, 0)]]


def record_id(rec: Mapping[str, Any]) -> str | None:
    """``rec``'s ``id`` as a string, or ``None``."""
    rid = rec.get("id")
    return None if rid is None else str(rid)


# ------------------------------------------------------------------------------------------------------
# Chains files


@dataclass(frozen=True)
class ChainFileRecord:
    """One usable record of a chains file: its id, captions (best first, cut to ``chain_length``), the
    video path resolved against the video root (``None`` without a video), and the raw record."""

    id: str
    captions: list[str]
    video: str | None
    record: Mapping[str, Any]


def read_chain_records(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    video_root: str | os.PathLike[str] | None = None,
    chain_length: int | None = None,
    require_video: bool = False,
) -> tuple[list[ChainFileRecord], int]:
    """The ``rankloss chains make`` output (a chains JSONL file, or a list of its records), checked:
    ``(records, skipped)`` where ``skipped`` counts chains left with fewer than 2 distinct
    captions.

    The one reader of chains files: :func:`load_chain_dataset` and the example trainer's ``--data`` use it.
    Video paths are joined to ``video_root`` (default: the chains file's folder; for a list of records,
    the paths are kept as they are).

    Raises:
        ValueError: a corrupt line, a malformed chain, a repeated id, a missing video with
            ``require_video`` (the message names the file and record).
        FileNotFoundError: the chains file does not exist (the videos: :func:`check_videos_exist`).
    """
    from ..chains import read_chains

    check_optional_int(chain_length, "chain_length", 2)
    if isinstance(path_or_records, (str, os.PathLike)):
        source = os.fspath(path_or_records)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"path_or_records: chains file not found: {source!r}")
        records: Any = read_chains(source)
        default_root: str | None = os.path.dirname(os.path.abspath(source))
        name = lambda n: f"{source}: record {n}"  # noqa: E731
    elif isinstance(path_or_records, Sequence):
        records = path_or_records
        default_root = None
        name = lambda n: f"path_or_records[{n}]"  # noqa: E731
    else:
        raise TypeError(
            "path_or_records must be a chains JSONL path or a list of chain records, got "
            f"{describe(path_or_records)}"
        )
    root = os.fspath(video_root) if video_root is not None else default_root

    out: list[ChainFileRecord] = []
    seen: set[str] = set()
    short = 0
    for n, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "chain" not in rec:
            raise ValueError(
                f"{name(n)}: not a chain record (a dict with a 'chain' list), got {describe(rec)}"
            )
        captions = rec["chain"]
        if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"{name(n)}: 'chain' must be a list of non-empty captions (best first)")
        if chain_length is not None:
            captions = captions[:chain_length]
        if len(set(captions)) < 2:  # nothing to rank (a repeated caption is dropped by the collator)
            short += 1
            continue
        video = rec.get("video")
        if video is not None and (not isinstance(video, str) or not video):
            raise ValueError(f"{name(n)}: 'video' must be a non-empty path string, got {describe(video)}")
        if video is None and require_video:
            raise ValueError(f"{name(n)}: record has no 'video' path")
        rid = str(rec.get("id", video if video is not None else n))
        if rid in seen:
            raise ValueError(f"{name(n)}: id {rid!r} appears twice")
        seen.add(rid)
        path = None if video is None else (os.path.join(root, video) if root else video)
        out.append(ChainFileRecord(rid, list(captions), path, rec))
    return out, short


def check_videos_exist(
    records: Sequence[ChainFileRecord],
    video_root: str | os.PathLike[str] | None,
    hint: str = "set video_root to the folder the records' video paths are relative to",
) -> None:
    """Raise ``FileNotFoundError`` listing the first few of ``records``' video files that do not exist."""
    missing = [r.video for r in records if r.video is not None and not os.path.isfile(r.video)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{len(missing)} video file(s) not found"
            + (f" under {os.fspath(video_root)!r}" if video_root is not None else "")
            + ": "
            + ", ".join(repr(m) for m in missing[:3])
            + more
            + f" ({hint})"
        )


def _file_edit_types(r: ChainFileRecord) -> list[str | None] | None:
    """``r``'s edit types by step (``K - 1``, after any ``chain_length`` cut), ``None`` without edits."""
    edits = r.record.get("edits")
    if not edits:
        return None
    return _edits_to_types(f"record {r.id!r}: 'edits'", edits, len(r.captions))


def load_chain_dataset(
    path_or_records: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    prompt: str | None = None,
    video_root: str | os.PathLike[str] | None = None,
    chain_length: int | None = None,
) -> Any:
    """The ``rankloss chains make`` output (a chains JSONL file, or a list of its records) as a
    ``datasets.Dataset`` of chain records for :class:`ChainCollator`.

    Each record ``{"id", "video", "chain": [captions, best first], ...}`` becomes a row ``{"id": str,
    "prompt": prompt, "videos": [video path] (or [] for a record without a video), "completions":
    chain}``, and, when any record of the file has ``edits`` (``rankloss chains make`` writes them), an
    ``edit_types`` column: ``K - 1`` strings per row, the type of the edit that made each caption after
    the first (``None`` where the record has no edit for that step; an empty list for a record without
    ``edits``). The trainer's per-edit-type metrics read it. Video paths are joined to ``video_root``
    (default: the chains file's folder; for a list of records, the paths are kept as they are). Chains
    are cut to ``chain_length`` captions when given; chains left with fewer than 2 distinct captions
    are skipped, with one warning that counts them.

    Args:
        path_or_records: a chains JSONL file, or a list of chain records (dicts).
        prompt: the ``prompt`` column (a string), or ``None``: the collator's ``default_prompt``.
        video_root: the folder the records' video paths are relative to.
        chain_length: keep the first ``chain_length >= 2`` captions of each chain.

    Returns:
        a ``datasets.Dataset`` with columns ``id``, ``prompt``, ``videos``, ``completions`` (and
        ``edit_types`` when the file records edits).

    Raises:
        ValueError: a corrupt line, a malformed chain, a repeated id, or no chain with 2 captions (the
            message names the file and record).
        FileNotFoundError: video files that do not exist (the message lists the first few).
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - the train extra is installed in the dev env
        raise ImportError(
            "load_chain_dataset needs the datasets package: pip install 'rankloss[train]'"
        ) from exc

    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"prompt must be None or a string, got {describe(prompt)}")
    records, short = read_chain_records(path_or_records, video_root=video_root, chain_length=chain_length)
    if short:
        warnings.warn(
            f"load_chain_dataset: skipped {short} chain(s) with fewer than 2 distinct captions"
            + (f" (after chain_length={chain_length})" if chain_length is not None else ""),
            stacklevel=2,
        )
    if not records:
        label = (
            os.fspath(path_or_records)
            if isinstance(path_or_records, (str, os.PathLike))
            else "path_or_records"
        )
        raise ValueError(f"{label}: no chain with at least 2 distinct captions")
    check_videos_exist(records, video_root)
    rows = {
        "id": [r.id for r in records],
        "prompt": [prompt] * len(records),
        "videos": [[] if r.video is None else [r.video] for r in records],
        "completions": [r.captions for r in records],
    }
    columns = {
        "id": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "videos": datasets.List(datasets.Value("string")),
        "completions": datasets.List(datasets.Value("string")),
    }
    types = [_file_edit_types(r) for r in records]
    if any(t is not None for t in types):
        rows["edit_types"] = [t or [] for t in types]
        columns["edit_types"] = datasets.List(datasets.Value("string"))
    features = datasets.Features(columns)
    return datasets.Dataset.from_dict(rows, features=features)
