"""Input and output formats of caption chains, and the atomic, resumable chains writer.

Input (JSON Lines, one object per line; a ``.json`` file holding one JSON array is read too):

* plain: ``{"video": "clips/001.mp4", "caption": "A man ...", ...}``
* ShareGPT4Video style: ``{"video_id": "...", "captions": [{"idx": "-1", "content": "..."}, ...]}``;
  the whole-video caption (``idx`` -1) is used, else the longest one.
* LLaVA-Video style: ``{"id": ..., "video": "...", "conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": "<caption>"}]}``; the first ``gpt``/``assistant`` turn is the caption and
  the human turn before it is kept as ``source["prompt"]``.

The video is read from the first of ``video``, ``video_path``, ``path``, ``video_id``. The record id is
``id`` when present, else the video. A repeated id gets the first free suffix of ``#2``, ``#3``...
(in input order) that no record of the whole input uses as its id, so a renamed record never takes a
real record's id (input ids ``a``, ``a``, ``a#2`` become ``a``, ``a#3``, ``a#2``). Every other field is
carried into the output's ``source``.

Input files are UTF-8 (a leading byte-order mark is skipped) unless an ``encoding`` is given. A line
(or ``.json`` array item) holding bytes that are not valid in that encoding is a bad record, reported
as ``file:line`` with the first bad byte, never decoded into replacement characters.

Output (JSON Lines), one chain per line::

    {"id": ..., "video": ..., "chain": [y_0, ..., y_{K-1}], "edits": [{step, type, subtype, before,
     after, position, engine}, ...], "source": {...}}

plus ``"short_reason"`` when the chain is shorter than asked and ``"llm_fallbacks"`` when the ``llm``
engine fell back to ``rules``. ``chain[0]`` is the correct caption; ``chain[k]`` holds ``k`` errors.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CaptionRecord",
    "InputError",
    "ChainWriter",
    "parse_record",
    "iter_records",
    "input_index",
    "count_records",
    "file_identity",
    "writer_paths",
    "check_not_same_file",
    "read_chains",
    "chain_record",
    "check_encoding",
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
    #: the id as read, when it repeated an earlier record's and got a ``#n`` suffix (``id`` then holds
    #: a name no other record of the input has)
    renamed_from: str | None = None


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


# Undecodable bytes, read with errors="surrogateescape": byte 0xNN becomes the lone surrogate U+DCNN,
# which no valid input text can hold (a strict decoder rejects surrogates), so finding one finds the
# byte. A lone surrogate can also come from a JSON escape ("\\ud800"): not text either (it cannot be
# written out as UTF-8), so such a record is bad too.
_BAD_BYTE_RE = re.compile("[\udc80-\udcff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_input_file(path: str) -> None:
    """``FileNotFoundError`` / ``IsADirectoryError`` naming ``path`` unless it is a file."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"input {path!r} is a directory, expected a captions file (JSONL or .json)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file not found: {path!r}")


def check_encoding(encoding: object) -> str:
    """A codec name Python knows (``ValueError`` naming it otherwise)."""
    if not isinstance(encoding, str):
        raise TypeError(f"encoding must be a codec name such as 'utf-8', got {encoding!r}")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r} (e.g. 'utf-8', 'latin-1', 'cp1252')") from None
    return encoding


def _open_text(path: str, encoding: str):
    """The file as text; UTF-8 skips a leading byte-order mark; bad bytes become lone surrogates."""
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    return open(path, encoding=codec, errors="surrogateescape")


def _bad_byte(char: str, encoding: str) -> str:
    return f"not valid {encoding} text: byte 0x{ord(char) - 0xDC00:02x}"


def _first_surrogate(obj: object) -> str | None:
    """The first lone surrogate in any string (key or value) of a parsed JSON value, or None."""
    if isinstance(obj, str):
        m = _SURROGATE_RE.search(obj)
        return None if m is None else m.group()
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = _first_surrogate(key) or _first_surrogate(value)
        if found:
            return found
    return None


def _not_text(obj: object, encoding: str, raw_has_bad_bytes: bool) -> str | None:
    """Why a parsed record holds something that is not text (a bad byte, a lone surrogate), or None."""
    char = _first_surrogate(obj)
    if char is None:
        return None
    if raw_has_bad_bytes and _BAD_BYTE_RE.match(char):
        return _bad_byte(char, encoding)
    return f"a string holds the unpaired surrogate \\u{ord(char):04x}, which is not text"


def _is_json_array(path: str, encoding: str = "utf-8") -> bool:
    if not path.endswith(".json"):
        return False
    with _open_text(path, encoding) as f:
        while True:
            c = f.read(1)
            if not c:
                return False
            if not c.isspace():
                return c == "["


def _load_json_array(path: str, encoding: str) -> tuple[object, bool]:
    """The parsed document and whether its text held undecodable bytes."""
    with _open_text(path, encoding) as f:
        text = f.read()
    try:
        return json.loads(text), _BAD_BYTE_RE.search(text) is not None
    except json.JSONDecodeError as exc:
        lines = text.split("\n")  # JSONDecodeError counts lines by "\n" alone
        m = _BAD_BYTE_RE.search(lines[exc.lineno - 1]) if exc.lineno <= len(lines) else None
        what = (
            f"{_bad_byte(m.group(), encoding)} at column {m.start() + 1}" if m else f"invalid JSON: {exc.msg}"
        )
        raise InputError(f"{path}:{exc.lineno}: {what}") from None
    except (ValueError, RecursionError) as exc:  # a number too long for int(), nesting too deep
        raise InputError(f"{path}: invalid JSON: {exc}") from None


def _iter_raw(path: str, encoding: str) -> Iterator[CaptionRecord | InputError]:
    """The records of ``path`` in order, with their ids as read (repeats not renamed)."""
    if _is_json_array(path, encoding):
        items, has_bad_bytes = _load_json_array(path, encoding)
        for i, obj in enumerate(items if isinstance(items, list) else [items]):
            where = f"{path}:item {i}"
            bad = _not_text(obj, encoding, has_bad_bytes)
            if bad:
                yield InputError(f"{where}: {bad}")
                continue
            try:
                yield parse_record(obj, where)
            except InputError as exc:
                yield exc
        return
    with _open_text(path, encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            m = _BAD_BYTE_RE.search(line)
            if m:
                yield InputError(f"{where}: {_bad_byte(m.group(), encoding)} at column {m.start() + 1}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            except (ValueError, RecursionError) as exc:  # a number too long for int(), nesting too deep
                yield InputError(f"{where}: invalid JSON: {exc}")
                continue
            bad = _not_text(obj, encoding, False)
            if bad:
                yield InputError(f"{where}: {bad}")
                continue
            try:
                yield parse_record(obj, where)
            except InputError as exc:
                yield exc


def _unique_ids(ids: Iterable[str]) -> list[str]:
    """Ids made unique: a repeat of ``x`` becomes ``x#k``, ``k >= n`` for its ``n``-th occurrence, the
    smallest ``k`` whose name no id of the whole input has and no earlier repeat took."""
    ids = list(ids)
    taken = set(ids)
    count: dict[str, int] = {}
    next_k: dict[str, int] = {}
    out = []
    for rid in ids:
        n = count.get(rid, 0) + 1
        count[rid] = n
        if n == 1:
            out.append(rid)
            continue
        k = max(n, next_k.get(rid, 0))
        while f"{rid}#{k}" in taken:
            k += 1
        name = f"{rid}#{k}"
        taken.add(name)
        next_k[rid] = k + 1
        out.append(name)
    return out


def _fingerprint(video: str, caption: str) -> bytes:
    """A short digest of a record's video and caption (what a chain of it must start from)."""
    data = f"{video}\x00{caption}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).digest()


def input_index(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> dict[str, bytes]:
    """The good records of an input as ``{id: fingerprint}`` in input order, with the unique ids
    :func:`iter_records` gives them; the fingerprint digests the record's video and caption.

    :func:`make_chains_file` uses it to check that every chain of a resumed partial output belongs to
    a record of this input (:class:`ChainWriter`'s ``input_records``). One pass over the file.
    """
    path = os.fspath(path)
    check_encoding(encoding)
    check_input_file(path)
    recs = [(r.id, r.video, r.caption) for r in _iter_raw(path, encoding) if isinstance(r, CaptionRecord)]
    names = _unique_ids(rid for rid, _, _ in recs)
    return {name: _fingerprint(video, caption) for name, (_, video, caption) in zip(names, recs)}


def iter_records(
    path: str | os.PathLike[str], *, encoding: str = "utf-8", ids: Sequence[str] | None = None
) -> Iterator[CaptionRecord | InputError]:
    """Yield a :class:`CaptionRecord` per good record and an :class:`InputError` per bad one, in order.

    Blank lines are ignored. Ids are made unique: a repeat of id ``x`` gets the first of ``x#2``,
    ``x#3``... that no record of the whole input has as its id (so a later record whose real id is
    ``x#2`` keeps it, and the repeat becomes ``x#3``); this takes one extra pass over the file, to read
    its ids, unless ``ids`` (the keys of :func:`input_index` of the same file) are given. A line
    holding bytes that are not valid ``encoding`` text is a bad record (``file:line: not valid utf-8
    text: byte 0xff at column 38``), and so is one whose strings hold an unpaired ``\\uXXXX``
    surrogate; a ``.json`` array is one document, so bad bytes outside its strings, or invalid JSON,
    raise :class:`InputError` naming the line.
    """
    path = os.fspath(path)
    check_encoding(encoding)
    check_input_file(path)
    if ids is None:
        ids = _unique_ids(r.id for r in _iter_raw(path, encoding) if isinstance(r, CaptionRecord))
    n = 0
    for rec in _iter_raw(path, encoding):
        if isinstance(rec, CaptionRecord):
            if n >= len(ids):
                raise ValueError(f"{rec.where}: the input changed while it was read; run again")
            if ids[n] != rec.id:
                if not ids[n].startswith(rec.id + "#"):
                    raise ValueError(f"{rec.where}: the input changed while it was read; run again")
                rec.renamed_from = rec.id
                rec.id = ids[n]
            n += 1
        yield rec


def count_records(path: str | os.PathLike[str], *, encoding: str = "utf-8") -> int:
    """The number of records :func:`iter_records` will yield (non-blank lines, or array items)."""
    path = os.fspath(path)
    if _is_json_array(path, encoding):
        try:
            items, _ = _load_json_array(path, encoding)
        except InputError:
            return 0
        return len(items) if isinstance(items, list) else 1
    with _open_text(path, encoding) as f:
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
    """Read a chains JSONL file (raises ``ValueError`` naming ``file:line`` on a corrupt line).

    Lines end at ``\\n`` only (as the writer writes them), so the line numbers are those of ``wc -l``
    and of :class:`ChainWriter`'s messages.
    """
    path = os.fspath(path)
    fix = "the file is damaged: make it again with `rankloss chains make`, or repair or delete that line"
    with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            m = _BAD_BYTE_RE.search(line)
            if m:
                raise ValueError(
                    f"{path}:{lineno}: corrupt chains file: {_bad_byte(m.group(), 'utf-8')}; {fix}"
                )
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: invalid JSON in a chains file: {exc.msg}; {fix}"
                ) from None
            except (ValueError, RecursionError) as exc:  # a number too long for int(), nesting too deep
                raise ValueError(f"{path}:{lineno}: invalid JSON in a chains file: {exc}; {fix}") from None
            if not isinstance(rec, dict) or "chain" not in rec:
                raise ValueError(f"{path}:{lineno}: not a chain record (no 'chain' field); {fix}")
            yield rec


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies an input file: absolute path, size, modification time and the SHA-256 of its bytes
    (read in 1 MiB blocks)."""
    path = os.fspath(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {
        "path": os.path.abspath(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest.hexdigest(),
    }


def writer_paths(out_path: str | os.PathLike[str]) -> dict[str, str]:
    """Every path a :class:`ChainWriter` for ``out_path`` writes, replaces or deletes, by role."""
    out = os.fspath(out_path)
    partial = out + ".partial"
    return {
        "output": out,
        "partial output": partial,
        "resume options file": partial + ".options.json",
        "temporary options file": partial + ".options.json.tmp",
    }


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_same_file(
    path: str | os.PathLike[str], others: Mapping[str, str], what: str = "input", advice: str | None = None
) -> None:
    """``ValueError`` naming both when ``path`` is one of ``others`` (role -> path): the same real path,
    or (where both exist) the same file by :func:`os.path.samefile`, so symlinks and hard links count.

    ``others`` are files a run writes, replaces or deletes (:func:`writer_paths`); ``advice`` says what
    to do (default: choose another output path, for an input among a writer's files).
    """
    path = os.fspath(path)
    for role, other in others.items():
        other = os.fspath(other)
        if _same_file(path, other):
            link = (
                "" if os.path.abspath(path) == os.path.abspath(other) else " (a link to it, or the same file)"
            )
            files = ", ".join(repr(p) for p in others.values())
            todo = advice or (
                f"choose an output path whose files ({files}) are all other files than the {what} "
                f"(or copy the {what} elsewhere first)"
            )
            raise ValueError(
                f"the {what} {path!r} is the {role} {other!r}{link}: this run would overwrite or delete "
                f"it; {todo}"
            )


class ChainWriter:
    """Writes chain records atomically and resumably.

    Lines go to ``<out>.partial`` (same directory), each one complete and flushed before the next
    record is made. :meth:`finish` syncs it and renames it to ``out`` with ``os.replace``, so ``out``
    either does not exist or is complete. A stopped run leaves the ``.partial`` file; a new writer with
    ``resume=True`` reads back the ids already written (cutting off a truncated last line, or a last
    line that is not a complete record) and :meth:`is_done` tells the caller which records to skip, so
    no chain is written twice. A damaged line with more lines after it, or an id that appears twice,
    raises ``ValueError`` naming ``file:line``.

    With ``options`` (the settings that decide what a chain looks like: engine, length, seed, ...) the
    writer keeps them beside the partial file in ``<out>.partial.options.json`` and resumes only a
    partial output made with the same ones: otherwise one file would mix two configurations. It
    raises ``ValueError`` naming every option that differs (or saying that a non-empty partial file
    has no record of its options) and how to start over.

    With ``input_path`` the same file also records the input's identity (:func:`file_identity`: path,
    size, modification time, SHA-256), and a partial output is resumed only from an input with the
    same bytes: the same file, or a copy or move of it (another path or modification time is fine), but
    not an edited file or another one (``ValueError`` naming the partial file, the input recorded and the
    one given). A partial file written before inputs were recorded (its options file has no ``input``)
    is resumed; ``input_records`` then still guards it. The input may not be any file the writer writes
    or deletes (:func:`writer_paths`; compared by real path and :func:`os.path.samefile`): ``ValueError``
    before anything is touched.

    With ``input_records`` (:func:`input_index` of the input: ``{id: fingerprint}``) every record read
    back must be one of the input's, with the same video and first caption; otherwise the partial file
    is damaged or came from another input, and the writer raises ``ValueError`` naming ``file:line``.

    Args:
        out_path: the final output file.
        resume: continue an existing ``.partial`` file (else it is discarded).
        overwrite: replace an existing ``out_path`` (else its existence is an error).
        on_resumed: called with every record read back from an earlier run (e.g. to count it).
        options: JSON-serialisable settings of the run, checked on resume (``None``: not checked).
        input_path: the run's input file, checked on resume (``None``: not checked).
        input_records: the input's records, ``{id: fingerprint}`` (``None``: not checked).
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        *,
        resume: bool = True,
        overwrite: bool = False,
        on_resumed: Callable[[dict[str, Any]], None] | None = None,
        options: dict[str, Any] | None = None,
        input_path: str | os.PathLike[str] | None = None,
        input_records: Mapping[str, bytes] | None = None,
    ) -> None:
        self.out_path = os.fspath(out_path)
        paths = writer_paths(self.out_path)
        self.partial_path = paths["partial output"]
        self.options_path = paths["resume options file"]
        if input_path is not None:
            check_not_same_file(input_path, paths)
        if os.path.isdir(self.out_path):
            raise IsADirectoryError(
                f"output {self.out_path!r} is a directory; give a file path, e.g. "
                f"{os.path.join(self.out_path, 'chains.jsonl')!r}"
            )
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
        self._input_records = input_records
        options = None if options is None else json.loads(json.dumps(options))  # as stored
        identity = None if input_path is None else file_identity(input_path)
        if os.path.exists(self.partial_path):
            if resume:
                if options is not None or identity is not None:
                    self._check_options(options, identity)
                self._read_back(on_resumed)
            else:
                os.remove(self.partial_path)
        if options is not None or identity is not None:
            self._save_options(options or {}, identity)
        elif os.path.exists(self.options_path):
            os.remove(self.options_path)
        self._f = open(self.partial_path, "a", encoding="utf-8")  # noqa: SIM115 - closed by finish/close
        self.written = 0

    def _check_options(self, options: dict[str, Any] | None, identity: dict[str, Any] | None) -> None:
        start_over = "pass --no-resume (resume=False) to discard it and start over"
        try:
            with open(self.options_path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bytes that are not UTF-8
            saved = None
        if not isinstance(saved, dict):
            if os.path.getsize(self.partial_path) == 0:
                return
            raise ValueError(
                f"{self.partial_path}: a partial output with no readable record of the options it was "
                f"made with ({self.options_path}), so resuming it could mix two configurations; "
                f"{start_over}"
            )
        recorded = saved.get("input")
        if identity is not None and "input" in saved:
            self._check_input(recorded, identity, start_over)
        differ = [
            f"{k} {saved.get(k)!r} there, {v!r} now" for k, v in (options or {}).items() if saved.get(k) != v
        ]
        if differ:
            raise ValueError(
                f"{self.partial_path} was made with other options than this run's ({'; '.join(differ)}); "
                f"run again with the same options to resume it, or {start_over}"
            )

    def _check_input(self, recorded: object, identity: dict[str, Any], start_over: str) -> None:
        if not (
            isinstance(recorded, dict)
            and isinstance(recorded.get("sha256"), str)
            and isinstance(recorded.get("size"), int)
        ):
            raise ValueError(
                f"{self.partial_path}: the record of the input it was made from in {self.options_path} is "
                f"damaged ({recorded!r}), so it cannot be checked against this run's input "
                f"{identity['path']!r}; {start_over}"
            )
        if recorded["sha256"] == identity["sha256"] and recorded["size"] == identity["size"]:
            return  # the same bytes: the same file, or a copy or move of it
        rpath = recorded.get("path")
        same_path = isinstance(rpath, str) and _same_file(rpath, identity["path"])
        how = (
            "the file has changed since that run (edited in place?)"
            if same_path
            else "this run's input is another file"
        )
        raise ValueError(
            f"{self.partial_path} was made from the input {rpath!r} ({recorded['size']} bytes, sha256 "
            f"{recorded['sha256'][:12]}...), but this run's input {identity['path']!r} "
            f"({identity['size']} bytes, sha256 {identity['sha256'][:12]}...) has other contents: {how}, "
            "and resuming would mix chains of two inputs in one file; run again with the same --in "
            f"(the same contents) to resume it, or {start_over}"
        )

    def _save_options(self, options: dict[str, Any], identity: dict[str, Any] | None) -> None:
        stored = dict(options)
        if identity is not None:
            stored["input"] = identity
        tmp = self.options_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
        os.replace(tmp, self.options_path)

    def _check_resumed(self, rec: dict[str, Any]) -> str | None:
        """Why a complete, parsed line of the partial file cannot be resumed, or None."""
        rid = str(rec["id"])
        if rid in self.done_ids:
            return f"the id {rid!r} appears a second time"
        if self._input_records is None:
            return None
        expected = self._input_records.get(rid)
        if expected is None:
            return f"the id {rid!r} is no record of this run's input (another input, or a damaged line)"
        chain, video = rec.get("chain"), rec.get("video")
        first = chain[0] if isinstance(chain, list) and chain else None
        if not (isinstance(video, str) and isinstance(first, str) and _fingerprint(video, first) == expected):
            return (
                f"the chain of id {rid!r} does not start from that input record's video and caption "
                "(another input, or a damaged line)"
            )
        return None

    def _read_back(self, on_resumed: Callable[[dict[str, Any]], None] | None) -> None:
        good_end = 0  # the end of the last good record line: what follows it is cut off
        pos = 0
        bad_line = 0
        fix = "delete the file (or pass resume=False / --no-resume) to start over"
        with open(self.partial_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if bad_line:  # a corrupt line followed by more lines: not a simple interruption
                    if line.strip():
                        raise ValueError(
                            f"{self.partial_path}:{bad_line}: corrupt line in the middle of a partial "
                            f"output; {fix}"
                        )
                    continue
                if not line.endswith(b"\n"):  # a truncated last line: the run stopped while writing it
                    break
                pos += len(line)
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except (ValueError, RecursionError):  # bad JSON, bytes that are not UTF-8
                        bad_line = lineno
                        continue
                    if not isinstance(rec, dict) or "id" not in rec:
                        bad_line = lineno
                        continue
                    why = self._check_resumed(rec)
                    if why is not None:
                        raise ValueError(f"{self.partial_path}:{lineno}: cannot resume: {why}; {fix}")
                    self.done_ids.add(str(rec["id"]))
                    self.resumed += 1
                    if on_resumed is not None:
                        on_resumed(rec)
                    good_end = pos
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
        if os.path.exists(self.options_path):
            os.remove(self.options_path)
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
