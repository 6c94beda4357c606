"""Captions file in, chains file out: the function behind ``rankloss chains make``."""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from .core import Chain
from .formats import (
    ChainWriter,
    InputError,
    chain_record,
    check_encoding,
    check_input_file,
    check_not_same_file,
    count_records,
    input_index,
    iter_records,
    writer_paths,
)
from .llm import LLMEngine
from .progress import Progress
from .rules import RulesEngine, check_length
from .summary import ChainSummary

__all__ = ["ChainEngine", "make_engine", "make_chains_file", "run_options", "ENGINES"]

ENGINES = ("rules", "llm", "openai")


class ChainEngine(Protocol):
    """What :func:`make_chains_file` needs from an engine."""

    name: str

    def make_chain(self, caption: str, length: int, *, seed: int = 0, key: str | None = None) -> Chain: ...


def make_engine(
    engine: str = "rules",
    *,
    types: Sequence[str] | str | None = None,
    llm_model: str | None = None,
    **llm_options: Any,
) -> ChainEngine:
    """Build an engine by name: ``"rules"``, ``"llm"`` (which needs ``llm_model``, a local model directory)
    or ``"openai"`` (a served model: needs ``base_url`` and ``model``).

    ``llm_options`` go to :class:`~rankloss.chains.LLMEngine` (``max_retries``, ``max_new_tokens``,
    ``device``, ``dtype``, ``generate_fn``, ...) or to :class:`~rankloss.chains.served.ServedEngine`
    (``base_url``, ``model``, ``concurrency``, ``timeout``, ``request_retries``, ...).
    """
    if engine == "rules":
        if llm_model is not None or llm_options:
            raise ValueError("llm_model and LLM options apply to engine='llm' only, got engine='rules'")
        return RulesEngine(types)
    if engine == "llm":
        if llm_model is None and llm_options.get("generate_fn") is None:
            raise ValueError(
                "engine='llm' needs llm_model (a local transformers model directory, --llm-model PATH)"
            )
        return LLMEngine(llm_model, types=types, **llm_options)
    if engine == "openai":
        if llm_model is not None:
            raise ValueError("engine='openai' takes model (the served model's name), not llm_model")
        from .served import ServedEngine

        return ServedEngine(types=types, **llm_options)
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")


# Settings of an engine that change the chains it makes (beyond its name and types).
# ``openai``: the served model's name and its generation settings (not the URL, the key, the concurrency,
# timeouts or request retries, which change how the answers arrive, not what they are).
_ENGINE_SETTINGS = ("model_path", "model", "max_retries", "max_new_tokens", "max_tokens", "temperature",
                    "top_p", "send_seed", "max_edit_chars", "max_edit_fraction")  # fmt: skip


def run_options(engine: ChainEngine, *, length: int, seed: int, min_length: int) -> dict[str, Any]:
    """What decides the chains of a run, as JSON values: a partial output is resumed only with the same."""
    options: dict[str, Any] = {
        "engine": getattr(engine, "name", type(engine).__name__),
        "length": length,
        "seed": seed,
        "min_length": min_length,
    }
    if getattr(engine, "types", None) is not None:
        options["types"] = list(engine.types)
    for name in _ENGINE_SETTINGS:
        value = getattr(engine, name, None)
        if value is not None:
            options[name] = value if isinstance(value, (bool, int, float)) else str(value)
    return options


def make_chains_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    length: int = 6,
    seed: int = 0,
    engine: str | ChainEngine = "rules",
    types: Sequence[str] | str | None = None,
    llm_model: str | None = None,
    strict: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    min_length: int = 2,
    max_chains: int | None = None,
    progress: bool = False,
    on_chain: Callable[[dict[str, Any]], None] | None = None,
    encoding: str = "utf-8",
    **llm_options: Any,
) -> ChainSummary:
    """Turn a captions JSONL file into a chains JSONL file (formats: :mod:`rankloss.chains.formats`).

    Args:
        in_path: input captions (JSONL, or a ``.json`` array).
        out_path: output chains JSONL. Written to ``<out_path>.partial`` and renamed when the whole
            input is done; a run that stops early resumes from the ``.partial`` file next time.
        length: captions per chain ``K >= 2``.
        seed: the run's seed; each chain depends only on ``(seed, record id)``.
        engine: ``"rules"``, ``"llm"`` or an engine object (anything with ``make_chain``).
        types: edit types to use (default all).
        llm_model: the local model directory of the ``llm`` engine.
        strict: raise :class:`~rankloss.chains.formats.InputError` on the first bad input record
            instead of skipping and counting it.
        resume: continue an existing ``.partial`` output (``False``: start over). Only a partial output
            made with the same engine, length, seed, types, min_length and (``llm``) model and
            generation settings is resumed; other options raise ``ValueError`` naming the ones that
            differ. It must also have been made from the same input: the options file records the
            input's path, size, modification time and SHA-256, and an input with other bytes (an
            edited file, another shard) raises ``ValueError`` naming the partial file and both
            inputs; the same bytes under another path or modification time (a copy) resume. A partial
            output whose options file predates the input record is resumed when every chain in it
            belongs to a record of this input (same id, video and first caption), as is checked on
            every resume; a chain that does not, a repeated id or a damaged line with more lines after
            it raises ``ValueError`` naming ``file:line`` (a damaged or truncated *last* line is made
            again).
        overwrite: replace a finished ``out_path``.
        min_length: chains shorter than this are not written (counted as dropped).
        max_chains: stop after writing this many *new* chains (the output stays ``.partial``; the next
            run resumes). ``None``: no limit.
        progress: show a progress bar on stderr.
        on_chain: called with every record written (after it is flushed).
        encoding: the input's text encoding (default UTF-8, a byte-order mark skipped); a line with
            bytes that are not valid in it is a bad line.
        llm_options: passed to :class:`~rankloss.chains.LLMEngine`.

    Every input record is accounted for in the summary: ``records_read == (chains_written -
    chains_resumed) + records_done_before + lines_skipped + chains_dropped``, where
    ``records_done_before`` counts the records whose chain an earlier run wrote; a complete run has
    ``records_done_before == chains_resumed``. Records with a repeated id are written under a new,
    unique id (``ids_renamed``; :func:`~rankloss.chains.formats.iter_records`).

    The input may not be the output, nor any file the run writes or deletes (``<out>.partial``,
    ``<out>.partial.options.json``), also through a symlink or hard link: ``ValueError`` naming both,
    before anything is touched.

    Returns:
        the :class:`~rankloss.chains.ChainSummary` (``complete`` tells whether ``out_path`` is final).
    """
    length = check_length(length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if isinstance(min_length, bool) or not isinstance(min_length, int) or not 1 <= min_length <= length:
        raise ValueError(f"min_length must be an int in [1, length={length}], got {min_length!r}")
    if max_chains is not None and (
        isinstance(max_chains, bool) or not isinstance(max_chains, int) or max_chains < 0
    ):
        raise ValueError(f"max_chains must be None or an int >= 0, got {max_chains!r}")
    check_encoding(encoding)
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    check_input_file(in_path)
    if os.path.abspath(in_path) == os.path.abspath(out_path):
        raise ValueError(f"the output path must differ from the input path, got {out_path!r} for both")
    check_not_same_file(in_path, writer_paths(out_path))
    index = input_index(in_path, encoding=encoding)  # the unique ids, and what each chain starts from
    if isinstance(engine, str):
        engine = make_engine(engine, types=types, llm_model=llm_model, **llm_options)
    elif types is not None or llm_model is not None or llm_options:
        raise ValueError(
            "types, llm_model and LLM options apply when engine is given by name, not as an object"
        )
    if not hasattr(engine, "make_chain"):
        raise TypeError(
            f"engine must be 'rules', 'llm' or an object with make_chain(), got {type(engine).__name__}"
        )

    summary = ChainSummary(requested_length=length)
    rejections_before = dict(getattr(engine, "rejections", {}))
    stats_before = _served_stats(engine)
    writer = ChainWriter(
        out_path,
        resume=resume,
        overwrite=overwrite,
        on_resumed=lambda r: summary.add_chain(r, resumed=True),
        options=run_options(engine, length=length, seed=seed, min_length=min_length),
        input_path=in_path,
        input_records=index,
    )
    bar = Progress(
        count_records(in_path, encoding=encoding) if progress else None, "chains", enabled=progress
    )
    workers = getattr(engine, "concurrency", 1)
    workers = workers if isinstance(workers, int) and not isinstance(workers, bool) and workers > 1 else 1
    # Concurrent engines: chains of up to ``workers`` records are made at once, and at most
    # ``2 * workers`` records wait here, consumed (counted, written) strictly in input order.
    pool = ThreadPoolExecutor(workers, thread_name_prefix="chains") if workers > 1 else None
    window = 2 * workers
    pending: deque[tuple[Any, Future[Chain] | None, bool]] = deque()
    new = new_edits = 0
    stopped = False
    last_postfix = 0.0

    def consume(item: Any, future: Future[Chain] | None, done: bool) -> bool:
        """Count and write one record in input order; ``False`` when ``max_chains`` stops the run."""
        nonlocal new, new_edits, last_postfix
        if max_chains is not None and new >= max_chains:
            return False
        summary.records_read += 1
        bar.update()
        if isinstance(item, InputError):
            if strict:
                raise item
            summary.add_skipped(str(item))
            return True
        if item.renamed_from is not None:
            summary.add_renamed(item.renamed_from, item.id)
        if done:
            summary.records_done_before += 1
            return True
        if future is None:
            chain = engine.make_chain(item.caption, length, seed=seed, key=item.id)
        else:
            chain = future.result()
        if len(chain.captions) < min_length:
            summary.chains_dropped += 1
            summary.short[chain.short_reason or "too short"] += 1
            return True
        record = chain_record(item, chain)
        writer.write(record)
        summary.add_chain(record)
        new += 1
        new_edits += len(chain.edits)
        if on_chain is not None:
            on_chain(record)
        now = time.monotonic()
        if new % 256 == 0 or (pool is not None and now - last_postfix >= 0.5):
            last_postfix = now
            bar.set_postfix(_postfix(summary, new_edits, engine, stats_before, bar.elapsed()))
        return True

    try:
        for item in iter_records(in_path, encoding=encoding, ids=list(index)):
            future, done = None, not isinstance(item, InputError) and writer.is_done(item.id)
            if pool is not None and not isinstance(item, InputError) and not done:
                future = pool.submit(engine.make_chain, item.caption, length, seed=seed, key=item.id)
            pending.append((item, future, done))
            while len(pending) > (window if pool is not None else 0):
                if not consume(*pending.popleft()):
                    stopped = True
                    break
            if stopped:
                break
        while pending and not stopped:
            if not consume(*pending.popleft()):
                stopped = True
        if not stopped:
            summary.output = writer.finish()
            summary.complete = True
        else:
            summary.output = writer.partial_path
    finally:
        if pool is not None:
            if hasattr(engine, "cancel") and (pending or not summary.complete):
                engine.cancel()  # stopping early: the requests still queued fail at once
            pool.shutdown(wait=True, cancel_futures=True)
        if hasattr(engine, "close"):
            engine.close()
        writer.close()
        bar.close()
        after = getattr(engine, "rejections", {})
        for k, v in after.items():
            if v - rejections_before.get(k, 0):
                summary.llm_rejections[k] = v - rejections_before.get(k, 0)
        stats_after = _served_stats(engine)
        if stats_after is not None and stats_before is not None:
            summary.requests = stats_after[0] - stats_before[0]
            for dst, i in ((summary.request_retries, 1), (summary.request_failures, 2),
                           (summary.llm_fallback_reasons, 3)):  # fmt: skip
                for k, v in stats_after[i].items():
                    if v - stats_before[i].get(k, 0):
                        dst[k] = v - stats_before[i].get(k, 0)
    return summary


def _served_stats(engine: Any) -> tuple[int, Counter[str], Counter[str], Counter[str]] | None:
    if not hasattr(engine, "request_failures"):
        return None
    return (
        int(engine.requests),
        Counter(engine.request_retries_by_reason),
        Counter(engine.request_failures),
        Counter(engine.fallback_reasons),
    )


def _postfix(summary: ChainSummary, new_edits: int, engine: Any, before: Any, elapsed: float) -> str:
    """The progress bar's counters (its own rate is records/s)."""
    text = f"edits/s={new_edits / max(elapsed, 1e-9):.1f} fallbacks={summary.llm_fallbacks}"
    if before is not None:
        text += f" retries={sum(engine.request_retries_by_reason.values()) - sum(before[1].values())}"
    return text + f" skipped={summary.lines_skipped}"
