"""Input and output formats of caption chains, and the atomic, resumable chains writer.

Input (JSON Lines, one object per line; a ``.json`` file holding one JSON array is read too):

* plain: ``{"video": "clips/001.mp4", "caption": "A man ...", ...}``
* ShareGPT4Video style: ``{"video_id": "...", "captions": [{"idx": "-1", "content": "..."}, ...]}``;
  the whole-video caption (``idx`` -1) is used, else the longest one.
* LLaVA-Video style: ``{"id": ..., "video": "...", "conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": "<caption>"}]}``; the first ``gpt``/``assistant`` turn is the caption and
  the human turn before it is kept as ``source["prompt"]``.

The video is read from the first of ``video``, ``video_path``, ``path``, ``video_id``. The record id is
``id`` when present, else the video; a repeated id gets ``#2``, ``#3``... in input order. Every other
field is carried into the output's ``source``.

Output (JSON Lines), one chain per line::

    {"id": ..., "video": ..., "chain": [y_0, ..., y_{K-1}], "edits": [{step, type, subtype, before,
     after, position, engine}, ...], "source": {...}}

plus ``"short_reason"`` when the chain is shorter than asked and ``"llm_fallbacks"`` when the ``llm``
engine fell back to ``rules``. ``chain[0]`` is the correct caption; ``chain[k]`` holds ``k`` errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CaptionRecord",
    "InputError",
    "ChainWriter",
    "parse_record",
    "iter_records",
    "count_records",
    "read_chains",
    "chain_record",
    "VIDEO_KEYS",
]

VIDEO_KEYS = ("video", "video_path", "path", "video_id")
_ASSISTANT = ("gpt", "assistant", "model", "bot")
_USER = ("human", "user")


class InputError(ValueError):
    """A bad input record; the message starts with ``file:line:``."""


@dataclass
class CaptionRecord:
    """One caption to turn into a chain."""

    id: str
    video: str
    caption: str
    source: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    return value.strip()


def _sharegpt4video_caption(captions: object) -> tuple[str, Any]:
    if not isinstance(captions, list) or not captions:
        raise ValueError("'captions' must be a non-empty list of {idx, content} objects")
    items = []
    for i, c in enumerate(captions):
        if not isinstance(c, dict) or "content" not in c:
            raise ValueError(f"'captions'[{i}] must be an object with 'idx' and 'content'")
        items.append((c.get("idx"), _text(c["content"], f"'captions'[{i}].content")))
    for idx, content in items:
        if str(idx).strip() == "-1":
            return content, idx
    idx, content = max(items, key=lambda it: len(it[1]))
    return content, idx


def _conversation_caption(conversations: object) -> tuple[str, str | None]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list of turns")
    prompt = None
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise ValueError(f"'conversations'[{i}] must be an object, got {type(turn).__name__}")
        who = str(turn.get("from", turn.get("role", ""))).lower()
        value = turn.get("value", turn.get("content"))
        if who in _USER and isinstance(value, str):
            prompt = value
        elif who in _ASSISTANT:
            return _text(value, f"'conversations'[{i}].value"), prompt
    raise ValueError("'conversations' has no gpt/assistant turn")


def parse_record(obj: object, where: str = "") -> CaptionRecord:
    """Turn one input object into a :class:`CaptionRecord` (raises :class:`InputError` naming ``where``)."""
    try:
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        source = dict(obj)
        if "caption" in obj:
            caption = _text(source.pop("caption"), "'caption'")
        elif "captions" in obj:
            caption, idx = _sharegpt4video_caption(source.pop("captions"))
            source["caption_idx"] = idx
        elif "conversations" in obj:
            caption, prompt = _conversation_caption(source.pop("conversations"))
            if prompt is not None:
                source["prompt"] = prompt
        else:
            raise ValueError(
                "no caption: expected 'caption', 'captions' (ShareGPT4Video) or 'conversations' (LLaVA)"
            )
        video = None
        for key in VIDEO_KEYS:
            if key in obj:
                video = source.pop(key)
                break
        if video is None:
            raise ValueError(f"no video: expected one of {', '.join(repr(k) for k in VIDEO_KEYS)}")
        if not isinstance(video, (str, int)) or not str(video).strip():
            raise ValueError(f"the video must be a non-empty string, got {video!r}")
        rid = source.pop("id", None)
        if rid is not None and not isinstance(rid, (str, int)):
            raise ValueError(f"'id' must be a string or an int, got {type(rid).__name__}")
        rid = str(video) if rid is None else str(rid)
        return CaptionRecord(id=rid, video=str(video), caption=caption, source=source, where=where)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}" if where else str(exc)) from None


def _is_json_array(path: str) -> bool:
    if not path.endswith(".json"):
        return False
    with open(path, encoding="utf-8") as f:
        while True:
            c = f.read(1)
            if not c:
                return False
            if not c.isspace():
                return c == "["


def iter_records(path: str | os.PathLike[str]) -> Iterator[CaptionRecord | InputError]:
    """Yield a :class:`CaptionRecord` per good record and an :class:`InputError` per bad one, in order.

    Blank lines are ignored. Ids are made unique (``#2``, ``#3``...) in input order.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path!r}")
    seen: dict[str, int] = {}

    def unique(rec: CaptionRecord) -> CaptionRecord:
        n = seen.get(rec.id, 0) + 1
        seen[rec.id] = n
        if n > 1:
            rec.id = f"{rec.id}#{n}"
        return rec

    if _is_json_array(path):
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        for i, obj in enumerate(items):
            where = f"{path}:item {i}"
            try:
                yield unique(parse_record(obj, where))
            except InputError as exc:
                yield exc
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            try:
                yield unique(parse_record(obj, where))
            except InputError as exc:
                yield exc


def count_records(path: str | os.PathLike[str]) -> int:
    """The number of records :func:`iter_records` will yield (non-blank lines, or array items)."""
    path = os.fspath(path)
    if _is_json_array(path):
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError:
                return 0
        return len(items) if isinstance(items, list) else 1
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def chain_record(rec: CaptionRecord, chain: Any) -> dict[str, Any]:
    """The output object of one chain (see the module docstring)."""
    out: dict[str, Any] = {
        "id": rec.id,
        "video": rec.video,
        "chain": list(chain.captions),
        "edits": [e.to_dict() for e in chain.edits],
        "source": rec.source,
    }
    if chain.short_reason:
        out["short_reason"] = chain.short_reason
        out["requested_length"] = chain.requested_length
    if getattr(chain, "fallbacks", 0):
        out["llm_fallbacks"] = chain.fallbacks
    return out


def read_chains(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Read a chains JSONL file (raises ``ValueError`` naming ``file:line`` on a corrupt line)."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON in a chains file: {exc.msg}") from None
            if not isinstance(rec, dict) or "chain" not in rec:
                raise ValueError(f"{path}:{lineno}: not a chain record (no 'chain' field)")
            yield rec


class ChainWriter:
    """Writes chain records atomically and resumably.

    Lines go to ``<out>.partial`` (same directory), each one complete and flushed before the next
    record is made. :meth:`finish` syncs it and renames it to ``out`` with ``os.replace``, so ``out``
    either does not exist or is complete. A stopped run leaves the ``.partial`` file; a new writer with
    ``resume=True`` reads back the ids already written (cutting off a truncated last line) and
    :meth:`is_done` tells the caller which records to skip, so no chain is written twice.

    Args:
        out_path: the final output file.
        resume: continue an existing ``.partial`` file (else it is discarded).
        overwrite: replace an existing ``out_path`` (else its existence is an error).
        on_resumed: called with every record read back from an earlier run (e.g. to count it).
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        *,
        resume: bool = True,
        overwrite: bool = False,
        on_resumed: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.out_path = os.fspath(out_path)
        self.partial_path = self.out_path + ".partial"
        if os.path.exists(self.out_path) and not overwrite:
            raise FileExistsError(
                f"output {self.out_path!r} already exists (a finished run); pass overwrite=True "
                "(--overwrite) to replace it, or choose another output path"
            )
        parent = os.path.dirname(os.path.abspath(self.out_path))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"the output directory {parent!r} does not exist")
        self.done_ids: set[str] = set()
        self.resumed = 0
        if os.path.exists(self.partial_path):
            if resume:
                self._read_back(on_resumed)
            else:
                os.remove(self.partial_path)
        self._f = open(self.partial_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by finish/close
        self.written = 0

    def _read_back(self, on_resumed: Callable[[dict[str, Any]], None] | None) -> None:
        good_end = 0
        bad_line = 0
        with open(self.partial_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if bad_line:  # a corrupt line followed by more lines: not a simple interruption
                    if line.strip():
                        raise ValueError(
                            f"{self.partial_path}:{bad_line}: corrupt line in the middle of a partial "
                            "output; delete the file (or pass resume=False / --no-resume) to start over"
                        )
                    continue
                if not line.endswith(b"\n"):  # a truncated last line: the run stopped while writing it
                    break
                if line.strip():
                    try:
                        rec = json.loads(line)
                        rid = str(rec["id"])
                    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                        bad_line = lineno
                        continue
                    if rid not in self.done_ids:
                        self.done_ids.add(rid)
                        self.resumed += 1
                        if on_resumed is not None:
                            on_resumed(rec)
                good_end += len(line)
        if good_end < os.path.getsize(self.partial_path):
            with open(self.partial_path, "r+b") as f:
                f.truncate(good_end)

    def is_done(self, record_id: str) -> bool:
        """Whether a chain for ``record_id`` is already in the output (from an earlier run)."""
        return record_id in self.done_ids

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as a complete, flushed line."""
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done_ids.add(str(record["id"]))
        self.written += 1

    def finish(self) -> str:
        """Sync, close and move the partial file to the output path; returns the output path."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.partial_path, self.out_path)
        return self.out_path

    def close(self) -> None:
        """Close without finishing (the ``.partial`` file stays for a later resume)."""
        if not self._f.closed:
            self._f.flush()
            self._f.close()

    def __enter__(self) -> ChainWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
