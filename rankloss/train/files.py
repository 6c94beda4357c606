"""The run folder's files: written so that a crash leaves either the old file or the new one, and read back
so that damage is found, named by file, and repaired where the file can be made again.

Every file the example trainer reads back is written to a temporary name in the same folder, flushed and
``fsync``'d, renamed into place, and the folder is ``fsync``'d (:func:`atomic_write`,
:func:`torch_save_atomic`, :func:`write_json_atomic`, :func:`fsync_tree`). Large files carry a checksum
(their size and CRC-32, computed from the bytes on disk after writing: :func:`folder_manifest`,
:func:`file_digest`), so a truncated copy, a zero-length file or bytes overwritten in the middle are told
apart from the file that was written, not only files that no longer parse.

Small JSON records carry their own CRC-32 (:func:`seal`), so a value overwritten in place is found too.

What a reader does with a damaged file depends on what it is: a derived cache is made again after a
:class:`DamagedFileWarning` naming it; a damaged checkpoint is set aside and the previous intact one used;
a damaged line of a log is skipped with a warning naming ``file:line``; a file that cannot be made again
raises :class:`DamagedFileError`, naming it and saying what to do.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Callable, Collection, Mapping
from typing import IO, Any

__all__ = [
    "DamagedFileWarning",
    "DamagedFileError",
    "atomic_write",
    "write_json_atomic",
    "torch_save_atomic",
    "read_json",
    "file_digest",
    "fsync_dir",
    "fsync_tree",
    "folder_manifest",
    "manifest_problem",
    "describe_error",
    "SEAL",
    "seal",
    "unseal",
]

_CHUNK = 16 << 20


class DamagedFileWarning(UserWarning):
    """A file of the run folder was damaged (truncated, empty, overwritten) and was made again, skipped or
    set aside; the message names the file and says what happened to it."""


class DamagedFileError(ValueError):
    """A file of the run folder is damaged and cannot be made again: the message names it and says what to
    do. ``path`` is the file, ``problem`` what is wrong with it."""

    def __init__(self, path: str, problem: str, advice: str = "") -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path} {problem}" + (f"; {advice}" if advice else ""))


def describe_error(exc: BaseException) -> str:
    """``TypeName: message`` on one line, cut to 200 characters (for messages about a damaged file)."""
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------------
# Writing


def fsync_dir(path: str) -> None:
    """``fsync`` a folder (its entries: a rename into it is durable afterwards); a no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[IO[bytes]], None] | bytes) -> None:
    """Write ``path`` atomically and durably: ``write(f)`` (or the bytes) into a unique temporary file in
    the same folder, ``fsync``, rename over ``path``, ``fsync`` the folder. A crash leaves the old file
    (or none) and at most a stray ``.<name>.*.tmp``; concurrent writers of the same content are safe."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(write, (bytes, bytearray)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def write_json_atomic(path: str, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as JSON (sorted keys, a final newline) in ``path``, with :func:`atomic_write`."""
    text = json.dumps(obj, indent=indent, sort_keys=True) + "\n"
    atomic_write(path, text.encode("utf-8"))


def torch_save_atomic(obj: Any, path: str) -> tuple[int, str]:
    """``torch.save(obj)`` into ``path`` with :func:`atomic_write`; returns the file's :func:`file_digest`
    (of the bytes written, read back from disk)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
    return file_digest(path)


def file_digest(path: str) -> tuple[int, str]:
    """``(size in bytes, CRC-32 as 8 hex digits)`` of the file's bytes (about 4 GB/s)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, f"{crc & 0xFFFFFFFF:08x}"


def _walk(folder: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(os.path.relpath(full, folder).replace(os.sep, "/"))
    return out


def fsync_tree(folder: str) -> None:
    """``fsync`` every file and folder under ``folder`` (before renaming it into place)."""
    for rel in _walk(folder):
        _fsync_file(os.path.join(folder, rel))
    for root, _, _ in os.walk(folder):
        fsync_dir(root)


def folder_manifest(folder: str, exclude: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """``{relative path: [size, crc32]}`` of every file under ``folder`` (but ``exclude``), each file
    ``fsync``'d first: what :func:`manifest_problem` checks the folder against later."""
    out: dict[str, list[Any]] = {}
    for rel in _walk(folder):
        if rel in exclude:
            continue
        full = os.path.join(folder, rel)
        _fsync_file(full)
        size, crc = file_digest(full)
        out[rel] = [size, crc]
    for root, _, _ in os.walk(folder):
        fsync_dir(root)
    return out


def manifest_problem(folder: str, manifest: Any) -> str | None:
    """What differs between ``folder`` and its ``manifest`` (:func:`folder_manifest`): a file missing,
    of another size, or with other bytes; ``None`` when every listed file is as written."""
    if not isinstance(manifest, Mapping) or not manifest:
        return "has no valid list of its files"
    for rel, entry in sorted(manifest.items()):
        if (
            not isinstance(rel, str)
            or not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], int)
            or not isinstance(entry[1], str)
            or rel.startswith("/")
            or ".." in rel.split("/")
        ):
            return "has no valid list of its files"
        full = os.path.join(folder, *rel.split("/"))
        if not os.path.isfile(full):
            return f"is missing {rel}"
        size = os.path.getsize(full)
        if size != entry[0]:
            return f"has {rel} of {size} bytes, written with {entry[0]}"
        if file_digest(full)[1] != entry[1]:
            return f"has {rel} with other bytes than were written (checksum mismatch)"
    return None


#: The key of a JSON record's own checksum (:func:`seal`).
SEAL = "record_crc32"


def _record_crc(obj: Mapping[str, Any]) -> str:
    text = json.dumps({k: v for k, v in obj.items() if k != SEAL}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode('utf-8')) & 0xFFFFFFFF:08x}"


def seal(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` plus :data:`SEAL`: the CRC-32 of its canonical JSON, so that :func:`unseal` tells a value
    changed on disk (a digit overwritten) from the record as written."""
    return {**obj, SEAL: _record_crc(obj)}


def unseal(obj: Any, legacy_keys: Collection[str] = ()) -> tuple[dict[str, Any] | None, str | None]:
    """``(record without its seal, None)`` when ``obj`` is a JSON object whose :data:`SEAL` matches, or
    that has none and only ``legacy_keys`` (a record written before records were sealed: a damaged key
    name, the seal's included, is not taken for one); ``(None, what is wrong)`` otherwise."""
    if not isinstance(obj, dict):
        return None, f"holds a JSON {type(obj).__name__}, not a record"
    if SEAL not in obj:
        extra = sorted(set(obj) - set(legacy_keys))
        if extra:
            return (
                None,
                f"has no {SEAL} and keys it was never written with ({', '.join(map(repr, extra[:3]))})",
            )
        return dict(obj), None
    if obj[SEAL] != _record_crc(obj):
        return None, "holds other values than were written (its record_crc32 does not match)"
    return {k: v for k, v in obj.items() if k != SEAL}, None


# ------------------------------------------------------------------------------------------------------
# Reading


def read_json(path: str) -> Any:
    """The JSON value in ``path``.

    Raises:
        DamagedFileError: the file cannot be read or is not JSON (empty, truncated, overwritten); the
            message names it. ``FileNotFoundError`` when it does not exist.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DamagedFileError(path, f"cannot be read ({describe_error(exc)})") from exc
    if not data.strip():
        raise DamagedFileError(path, "is empty" if not data else "holds only white space")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DamagedFileError(path, f"is not valid JSON ({describe_error(exc)})") from exc
