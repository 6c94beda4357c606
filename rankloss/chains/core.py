"""Chains, edits, the per-caption random stream and the protected-span bookkeeping of a chain in progress.

A chain ``[y_0, y_1, ..., y_{K-1}]`` (0-based here, ``y_1 > ... > y_K`` in DESIGN.md) starts from the
correct caption ``y_0``; ``y_k`` holds exactly ``k`` errors. Edit ``k`` (``step = k``) turns ``y_{k-1}``
into ``y_k``: it replaces the text ``before`` at character ``position`` of ``y_{k-1}`` by ``after``.

Cumulative by construction: every edit's output region becomes *protected* (:class:`TextState`), and no
later edit may overlap a protected region, so every earlier edit survives verbatim to the end of the
chain (an omission leaves a protected point where the text was dropped, so nothing can be re-inserted
there). A sentence swap (``order``) protects the *order* of the two sentences instead: later edits may
still change words inside them, but no later edit may move, drop or partly overlap them.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Edit", "Chain", "TextState", "caption_rng", "caption_seed", "split_sentences", "SHORT_NO_SPANS"]

#: The reason given when a caption runs out of places to edit before reaching the asked length.
SHORT_NO_SPANS = "no more editable spans"


@dataclass(frozen=True)
class Edit:
    """One recorded edit of a chain.

    Attributes:
        step: ``k`` in ``1..K-1``: the edit turns ``chain[k-1]`` into ``chain[k]`` (``chain[k]`` is the
            first caption that holds it; every later caption holds it too).
        type: one of :data:`~rankloss.chains.taxonomy.EDIT_TYPES`.
        before: the text replaced in ``chain[k-1]`` (``""`` for an insertion).
        after: the replacement in ``chain[k]`` (``""`` for an omission).
        position: character offset of ``before`` in ``chain[k-1]``.
        subtype: finer kind (``colour``, ``sentence``, ...; see the taxonomy table), may be ``""``.
        engine: the engine that made this edit (``rules``, ``llm`` or ``synthetic``).
    """

    step: int
    type: str
    before: str
    after: str
    position: int = -1
    subtype: str = ""
    engine: str = "rules"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Edit:
        return cls(
            step=int(d["step"]),
            type=str(d["type"]),
            before=str(d.get("before", "")),
            after=str(d.get("after", "")),
            position=int(d.get("position", -1)),
            subtype=str(d.get("subtype", "")),
            engine=str(d.get("engine", "rules")),
        )


@dataclass
class Chain:
    """A caption chain, best caption first, with its audit trail.

    Attributes:
        captions: ``K`` distinct captions; ``captions[k]`` holds exactly ``k`` errors.
        edits: ``K - 1`` edits, ``edits[k-1].step == k``.
        requested_length: the length that was asked for; ``len(captions)`` may be smaller.
        short_reason: why the chain is shorter than asked, ``None`` when it is not.
        fallbacks: steps where the ``llm`` engine's candidates all failed verification and the ``rules``
            engine made the edit instead.
        rejections: why ``llm`` candidates were rejected (reason -> count).
    """

    captions: list[str]
    edits: list[Edit]
    requested_length: int
    short_reason: str | None = None
    fallbacks: int = 0
    rejections: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


def caption_seed(seed: int, key: str) -> int:
    """A 64-bit seed derived from the run's ``seed`` and a stable ``key`` (a record id or the caption).

    Uses BLAKE2b, not ``hash()``, so it is the same in every process and every Python run: a chain does
    not depend on which worker made it or whether the run was resumed.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def caption_rng(seed: int, key: str) -> random.Random:
    """The per-caption random stream: ``random.Random(caption_seed(seed, key))``."""
    return random.Random(caption_seed(seed, key))


# A sentence: from a non-space character up to and including its closing punctuation (and any closing
# quote/bracket), or to the end of the text. Abbreviations such as "e.g." split a sentence; a swap of
# two such fragments is still a reordering, only a less natural one.
_SENTENCE_RE = re.compile(r"[^\s.!?][^.!?]*(?:[.!?]+[\"')\]]*|$)")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, in order, without surrounding spaces."""
    out = []
    for m in _SENTENCE_RE.finditer(text):
        s, e = m.start(), m.end()
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
    return out


@dataclass
class _Span:
    start: int
    end: int
    # "edit": nothing may overlap it; "insert": an inserted sentence (as "edit", and never swapped);
    # "order": may be edited inside, never moved, dropped or crossed.
    kind: str


class TextState:
    """The current caption of a chain in progress plus its protected regions.

    ``edit`` spans: the output of an earlier edit; a new edit region ``[s, e)`` may not overlap one
    (for a zero-length span, the point left by an omission, the region may not contain or touch it).
    ``order`` spans: a sentence moved by a swap; a new edit must lie inside it or outside it, never
    across its boundary or around it.
    """

    __slots__ = ("text", "spans")

    def __init__(self, text: str) -> None:
        self.text = text
        self.spans: list[_Span] = []

    # ---------------------------------------------------------------------------------------------
    def blocked(self, start: int, end: int) -> bool:
        """Whether replacing ``text[start:end]`` would touch a protected region."""
        for sp in self.spans:
            a, b = sp.start, sp.end
            if sp.kind != "order":
                if a == b:
                    if start <= a <= end:
                        return True
                elif start < b and a < end:
                    return True
                elif start == end and a < start < b:
                    return True
            else:  # order: inside or disjoint only
                inside = a <= start and end <= b
                disjoint = end <= a or start >= b
                if not (inside or disjoint):
                    return True
        return False

    def has_order_span(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` overlaps a sentence that an earlier swap moved."""
        return any(sp.kind == "order" and start < sp.end and sp.start < end for sp in self.spans)

    def has_edit_span(self, start: int, end: int) -> bool:
        """Whether ``[start, end]`` overlaps or touches the output of an earlier edit."""
        return any(sp.kind != "order" and start <= sp.end and sp.start <= end for sp in self.spans)

    def has_insert_span(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` overlaps a sentence inserted by an earlier edit."""
        return any(sp.kind == "insert" and start < sp.end and sp.start < end for sp in self.spans)

    def protected_texts(self) -> list[str]:
        """The current text of every non-empty ``edit`` span (what an LLM must leave untouched)."""
        return [self.text[sp.start : sp.end] for sp in self.spans if sp.kind != "order" and sp.end > sp.start]

    # ---------------------------------------------------------------------------------------------
    def replace(self, start: int, end: int, new: str, kind: str = "edit") -> None:
        """Replace ``text[start:end]`` by ``new`` and protect the result (stripped of outer spaces).

        ``kind="insert"`` marks an inserted sentence, which a later sentence swap never moves.
        """
        delta = len(new) - (end - start)
        for sp in self.spans:
            if sp.start >= end and not (sp.start == sp.end == start == end):
                sp.start += delta
                sp.end += delta
            elif sp.kind == "order" and sp.start <= start and end <= sp.end:
                sp.end += delta
        self.text = self.text[:start] + new + self.text[end:]
        lo, hi = start, start + len(new)
        while lo < hi and self.text[lo].isspace():
            lo += 1
        while hi > lo and self.text[hi - 1].isspace():
            hi -= 1
        if lo == hi:
            lo = hi = start
        self.spans.append(_Span(lo, hi, kind))

    def swap_crosses(self, a1: int, b1: int, a2: int, b2: int) -> bool:
        """Whether a protected span crosses the boundary of one of the units ``[a1,b1)``, ``[a2,b2)``."""
        bounds = ((a1, b1), (b1, a2), (a2, b2))
        for sp in self.spans:
            if sp.end <= a1 or sp.start >= b2:
                continue
            if not any(lo <= sp.start and sp.end <= hi for lo, hi in bounds):
                return True
        return False

    def swap(self, a1: int, b1: int, a2: int, b2: int) -> None:
        """Swap the units ``[a1, b1)`` and ``[a2, b2)`` (``b1 <= a2``) and lock their new order.

        Protected spans inside the units move with them (check :meth:`swap_crosses` first).
        """
        t = self.text
        u1, mid, u2 = t[a1:b1], t[b1:a2], t[a2:b2]
        lm, l2 = len(mid), len(u2)
        for sp in self.spans:
            if sp.end <= a1 or sp.start >= b2:
                continue
            s, e = sp.start, sp.end
            if s < b1:  # inside u1 (swap_crosses rules out spans across a unit boundary)
                sp.start = s + l2 + lm
            elif s < a2 or (s == a2 and e == a2):  # inside the text between the units
                sp.start = s - b1 + a1 + l2
            else:  # inside u2
                sp.start = s - a2 + a1
            sp.end = sp.start + (e - s)
        self.text = t[:a1] + u2 + mid + u1 + t[b2:]
        self.spans.append(_Span(a1, a1 + l2, "order"))
        self.spans.append(_Span(a1 + l2 + lm, b2, "order"))
