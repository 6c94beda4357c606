"""The closing summary of a chains run (also computed for any existing chains file)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .taxonomy import EDIT_TYPES

__all__ = ["ChainSummary", "summarize_chains"]

_MAX_MESSAGES = 20


@dataclass
class ChainSummary:
    """Counts over one run (resumed chains included).

    Attributes:
        records_read: input records seen (good and bad).
        chains_written: chains in the output, those of an earlier, resumed run included.
        chains_resumed: of those, chains already written by an earlier run.
        records_done_before: input records read by this run whose chain an earlier run had written
            (not made again). Every record read is counted once: ``records_read == chains_written -
            chains_resumed + records_done_before + lines_skipped + chains_dropped``.
        lines_skipped: bad input records (each reported as ``file:line: reason`` in ``skipped``).
        chains_dropped: chains shorter than ``min_length``, not written (by reason in ``short``).
        edit_types: histogram of edit types over the written chains.
        lengths: histogram of chain lengths.
        short: chains shorter than asked, by reason.
        llm_fallbacks: steps where the ``llm`` engine fell back to ``rules``.
        llm_edits: edits made by the LLM.
        llm_rejections: why LLM answers were rejected (this run only); a request to a served model
            (``openai`` engine) that failed after its retries counts as ``request failed: <reason>``.
        llm_fallback_reasons: ``openai`` engine: why each fallback step fell back (the last attempt's
            rejection: a failed request or a rejected answer; this run only).
        requests, request_retries, request_failures: ``openai`` engine: HTTP requests sent, requests
            sent again by reason (429, 5xx, timeout, connection error, malformed answer), and requests
            that failed after their retries by reason (this run only).
        ids_renamed: records whose id repeated an earlier one's and got a ``#2``, ``#3``... suffix
            (examples in ``renamed``, as ``"old -> new"``).
        complete: whether the whole input was processed and the output file is final.
        from_file: a summary of an existing chains file (:func:`summarize_chains`), not of a run: it has
            no input, so its chains are counted as read from ``output``: ``format`` prints
            ``chains read: N`` and no input-records line, and ``to_dict`` gives ``chains_read`` (and
            ``chains_written``, the same number, kept for old readers) without the input's counts.
    """

    requested_length: int = 0
    records_read: int = 0
    chains_written: int = 0
    chains_resumed: int = 0
    records_done_before: int = 0
    lines_skipped: int = 0
    chains_dropped: int = 0
    skipped: list[str] = field(default_factory=list)
    edit_types: Counter[str] = field(default_factory=Counter)
    lengths: Counter[int] = field(default_factory=Counter)
    short: Counter[str] = field(default_factory=Counter)
    llm_fallbacks: int = 0
    llm_edits: int = 0
    llm_rejections: Counter[str] = field(default_factory=Counter)
    llm_fallback_reasons: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    request_retries: Counter[str] = field(default_factory=Counter)
    request_failures: Counter[str] = field(default_factory=Counter)
    ids_renamed: int = 0
    renamed: list[str] = field(default_factory=list)
    complete: bool = False
    output: str | None = None
    from_file: bool = False

    def add_chain(self, record: dict[str, Any], *, resumed: bool = False) -> None:
        """Count one written chain record."""
        self.chains_written += 1
        self.chains_resumed += int(resumed)
        self.lengths[len(record.get("chain", ()))] += 1
        for e in record.get("edits", ()):
            self.edit_types[str(e.get("type"))] += 1
            if e.get("engine") == "llm":
                self.llm_edits += 1
        if record.get("short_reason"):
            self.short[str(record["short_reason"])] += 1
        self.llm_fallbacks += int(record.get("llm_fallbacks", 0))

    def add_skipped(self, message: str) -> None:
        self.lines_skipped += 1
        if len(self.skipped) < _MAX_MESSAGES:
            self.skipped.append(message)

    def add_renamed(self, old_id: str, new_id: str) -> None:
        """Count one record whose repeated id became ``new_id``."""
        self.ids_renamed += 1
        if len(self.renamed) < _MAX_MESSAGES:
            self.renamed.append(f"{old_id} -> {new_id}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requested_length": self.requested_length,
            "records_read": self.records_read,
            "chains_written": self.chains_written,
            "chains_resumed": self.chains_resumed,
            "records_done_before": self.records_done_before,
            "lines_skipped": self.lines_skipped,
            "skipped_examples": list(self.skipped),
            "ids_renamed": self.ids_renamed,
            "renamed_examples": list(self.renamed),
            "chains_dropped": self.chains_dropped,
            "edit_types": dict(self.edit_types),
            "lengths": {str(k): v for k, v in sorted(self.lengths.items())},
            "short": dict(self.short),
            "llm_edits": self.llm_edits,
            "llm_fallbacks": self.llm_fallbacks,
            "llm_rejections": dict(self.llm_rejections),
            "llm_fallback_reasons": dict(self.llm_fallback_reasons),
            "requests": self.requests,
            "request_retries": dict(self.request_retries),
            "request_failures": dict(self.request_failures),
            "complete": self.complete,
            "output": self.output,
        }
        if self.from_file:  # no input: chains read; the input's counts (all 0) are left out
            for key in ("records_read", "records_done_before", "lines_skipped", "skipped_examples",
                        "ids_renamed", "renamed_examples", "chains_dropped"):  # fmt: skip
                del out[key]
            out = {"chains_read": self.chains_written, "from_file": True, **out}
        return out

    def format(self) -> str:
        """A human-readable multi-line summary."""
        lines = []
        if self.from_file:
            state = "complete" if self.complete else "INCOMPLETE (a .partial file of an unfinished run)"
            lines.append(f"chains read: {self.chains_written}, {state}")
            if self.output:
                lines.append(f"file: {self.output}")
        else:
            state = (
                "complete" if self.complete else "INCOMPLETE (run again with the same arguments to resume)"
            )
            lines.append(
                f"chains: {self.chains_written} written ({self.chains_resumed} from an earlier run), {state}"
            )
            if self.output:
                lines.append(f"output: {self.output}")
            done = f", {self.records_done_before} done by an earlier run" if self.records_done_before else ""
            lines.append(f"input records: {self.records_read} read, {self.lines_skipped} skipped{done}")
        for msg in self.skipped:
            lines.append(f"  skipped {msg}")
        if self.lines_skipped > len(self.skipped):
            lines.append(f"  ... and {self.lines_skipped - len(self.skipped)} more")
        if self.ids_renamed:
            shown = ", ".join(self.renamed[:3]) + (", ..." if self.ids_renamed > 3 else "")
            lines.append(
                f"repeated ids: {self.ids_renamed} record(s) took an id already used and got a #n "
                f"suffix ({shown})"
            )
        total = sum(self.edit_types.values())
        if total:
            lines.append(f"edits: {total}")
            order = [t for t in EDIT_TYPES if t in self.edit_types] + sorted(
                set(self.edit_types) - set(EDIT_TYPES)
            )
            width = max(len(t) for t in order)
            for t in order:
                n = self.edit_types[t]
                bar = "#" * max(1, round(30 * n / max(self.edit_types.values())))
                lines.append(f"  {t:<{width}} {n:>8} {100 * n / total:5.1f}% {bar}")
        if self.lengths:
            lines.append("chain lengths: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.lengths.items())))
        n_short = sum(self.short.values())
        if self.requested_length:
            lines.append(f"chains shorter than asked ({self.requested_length}): {n_short}")
        for reason, n in self.short.most_common():
            lines.append(f"  {n} x {reason}")
        if self.chains_dropped:
            lines.append(f"chains dropped (too short to write): {self.chains_dropped}")
        if self.llm_edits or self.llm_fallbacks or self.llm_rejections:
            lines.append(f"llm: {self.llm_edits} edits by the model, {self.llm_fallbacks} fallbacks to rules")
            for reason, n in self.llm_rejections.most_common():
                lines.append(f"  rejected {n} x {reason}")
            for reason, n in self.llm_fallback_reasons.most_common():
                lines.append(f"  fell back {n} x after: {reason}")
        if self.requests:
            lines.append(
                f"server: {self.requests} requests, {sum(self.request_retries.values())} retried, "
                f"{sum(self.request_failures.values())} failed after their retries"
            )
            for reason, n in self.request_retries.most_common():
                lines.append(f"  retried {n} x {reason}")
            for reason, n in self.request_failures.most_common():
                lines.append(f"  failed {n} x {reason}")
        return "\n".join(lines)


def summarize_chains(path: str | os.PathLike[str]) -> ChainSummary:
    """The summary of an existing chains JSONL file (finished or ``.partial``)."""
    from .formats import read_chains

    summary = ChainSummary(
        complete=not os.fspath(path).endswith(".partial"), output=os.fspath(path), from_file=True
    )
    for rec in read_chains(path):
        summary.add_chain(rec)
        summary.requested_length = max(summary.requested_length, int(rec.get("requested_length", 0)))
    if summary.lengths:
        summary.requested_length = max(summary.requested_length, max(summary.lengths))
    return summary
