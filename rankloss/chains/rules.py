"""The ``rules`` engine: cumulative caption degradation with lexicons and sentence/clause operations.

Every step picks an edit type (types used least so far in this chain first, ties broken by the
caption's random stream), finds the places in the current caption where that type applies and that no
earlier edit protects (:class:`~rankloss.chains.core.TextState`), picks one, and applies it. A step
whose type has no such place tries the next type; when no type has one, the chain ends early with
``short_reason = "no more editable spans"``. Articles are kept in agreement ("an apple" -> "a banana").

Cost: a handful of regular-expression scans of the caption per step; no model, no tokenizer.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

from .core import SHORT_NO_SPANS, Chain, Edit, TextState, caption_rng, split_sentences
from .plausibility import check_candidate, subject_category, verb_fits
from .taxonomy import (
    ACTION_INDEX,
    ACTION_RE,
    ACTIONS,
    ATTRIBUTE_RE,
    ATTRIBUTE_SUBTYPE,
    COUNT_RE,
    EVENT_RE,
    FREQUENCY_WORDS,
    INSERTION_SIZES,
    INSERTION_TEMPLATES,
    MATERIALS,
    NUMBER_VALUES,
    NUMBER_WORDS,
    OBJECT_INDEX,
    OBJECT_RE,
    OBJECTS,
    SIZE_ANTONYMS,
    SPATIAL_PAIRS,
    SPATIAL_RE,
    TEMPORAL_PAIRS,
    TEMPORAL_RE,
    check_types,
)

__all__ = ["RulesEngine", "check_length"]

# A candidate edit: ("replace", start, end, new, type, subtype) or ("swap", a1, b1, a2, b2, subtype).
_Candidate = tuple

#: Colours a colour edit may produce, and the colours too close to a source colour to count as an error.
_TARGET_COLOURS = (
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "gray",
    "brown",
)
_NEAR_COLOURS = {
    "gray": {"grey", "silver"},
    "grey": {"gray", "silver"},
    "silver": {"gray", "grey", "white"},
    "golden": {"yellow", "orange", "brown"},
    "beige": {"brown", "white"},
    "turquoise": {"blue", "green"},
    "cyan": {"blue", "green"},
    "violet": {"purple", "pink"},
    "purple": {"violet"},
    "magenta": {"pink", "purple"},
    "pink": {"magenta"},
    "navy": {"blue", "black"},
}
_GENDER = {"man": "m", "boy": "m", "woman": "f", "girl": "f"}
_PRONOUNS = {
    "m": re.compile(r"(?<![\w'-])(?:he|him|his|himself)(?![\w'-])", re.IGNORECASE),
    "f": re.compile(r"(?<![\w'-])(?:she|her|hers|herself)(?![\w'-])", re.IGNORECASE),
}
_MATERIAL_SYNONYMS = {"metal": {"metallic"}, "metallic": {"metal"}}
_INSERTION_CATEGORIES = ("animal", "vehicle", "furniture", "container", "device", "food", "clothing", "item")
_DETERMINER_BEFORE = re.compile(r"(?<![\w'-])(?:a|an|the|his|her|their|its|this|that|one)\s+$", re.IGNORECASE)
_ARTICLE_BEFORE = re.compile(r"(?<![\w'-])(an?)(\s+)$", re.IGNORECASE)
_PREDICATIVE_BEFORE = re.compile(r"(?<![\w'-])(?:is|are|was|were|be|been|looks|seems)\s+$", re.IGNORECASE)
_NEXT_WORD = re.compile(r"\s+([A-Za-z][\w'-]*)")
_FUNCTION_WORDS = frozenset(
    "and or but with in on at to of as than is are was were that which while from by for".split()
)
_CLAUSE_DROP_RE = re.compile(r",\s+(?:while|as|and|with)\s+[^,.;:!?]+(?=[.!?])", re.IGNORECASE)
_CLAUSE_SWAP_RE = re.compile(
    r"^(.+?)(,\s+and\s+then\s+|\s+and\s+then\s+|,\s+then\s+|;\s+then\s+|\s+before\s+)(.+?)$"
)
_SUBJECT_START = re.compile(
    r"^(?:he|she|they|it|we|i|you|the|a|an|his|her|their|its|this|that|these|those|someone|"
    r"two|three|four|several|some|another|one)\b",
    re.IGNORECASE,
)
_KEEP_CAPITAL = re.compile(r"^(?:I\b|[A-Z]{2,}|[A-Z][a-z]+[A-Z])")


#: Types whose finders do not all go through ``_first_valid`` (which runs the check itself).
_CHECK_AGAIN = frozenset({"order", "insertion", "omission"})


def _contradicts(text: str, cand: _Candidate) -> bool:
    """Whether applying ``cand`` makes ``text`` contradict itself (:mod:`~rankloss.chains.plausibility`)."""
    if cand[0] == "swap":
        _, a1, b1, a2, b2, _sub = cand
        new = text[a2:b2] + text[b1:a2] + text[a1:b1]
        return check_candidate(text, a1, b2, new) is not None
    _, start, end, new = cand[:4]
    return check_candidate(text, start, end, new) is not None


def check_length(length: object, name: str = "length") -> int:
    """A chain length: an int >= 2 (the correct caption plus at least one degraded one)."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"{name} must be an int >= 2 (captions per chain), got {length!r}")
    if length < 2:
        raise ValueError(
            f"{name} must be >= 2 (the correct caption plus at least one degraded one), got {length}"
        )
    return length


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _match_case(src: str, repl: str) -> str:
    if not repl:
        return repl
    if len(src) > 1 and src.isupper():
        return repl.upper()
    if src[:1].isupper():
        return repl[:1].upper() + repl[1:]
    return repl


def _vowel_sound(word: str) -> bool:
    w = word.lower()
    if not w:
        return False
    if w.startswith(("one", "uni", "use", "usu", "eu", "ewe")):
        return False
    if w.startswith(("hour", "honest", "honor", "honour", "heir")):
        return True
    if w[0].isdigit():
        return w.startswith("8") or w in ("11", "18")
    return w[0] in "aeiou"


def _with_article(text: str, start: int, end: int, new: str) -> tuple[int, str]:
    """Widen the replacement of ``text[start:end]`` by ``new`` to fix a preceding "a"/"an" if needed."""
    m = _ARTICLE_BEFORE.search(text, max(0, start - 8), start)
    if m is None:
        return start, new
    following = new.strip() or text[end:].lstrip()
    head = following.split(" ", 1)[0] if following else ""
    desired = "an" if _vowel_sound(head) else "a"
    if m.group(1).lower() == desired:
        return start, new
    return m.start(), _match_case(m.group(1), desired) + m.group(2) + new


def _decapitalise(s: str) -> str:
    if not s or _KEEP_CAPITAL.match(s):
        return s
    return s[0].lower() + s[1:]


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


class RulesEngine:
    """Cumulative caption degradation with lexicons, sentence/clause swaps and insertion templates.

    Args:
        types: the edit types to use (default: all of :data:`~rankloss.chains.taxonomy.EDIT_TYPES`);
            a comma-separated string is accepted too.

    Example::

        >>> from rankloss.chains import RulesEngine
        >>> text = "A man in a red shirt walks two dogs. Then he sits down."
        >>> chain = RulesEngine().make_chain(text, 4, seed=0)
        >>> len(chain.captions), len(chain.edits)
        (4, 3)
    """

    name = "rules"

    def __init__(self, types: Sequence[str] | str | None = None) -> None:
        self.types = check_types(types)
        self._finders: dict[str, Callable[[TextState, random.Random], _Candidate | None]] = {
            "object": self._find_object,
            "attribute": self._find_attribute,
            "count": self._find_count,
            "action": self._find_action,
            "spatial": self._find_spatial,
            "order": self._find_order,
            "insertion": self._find_insertion,
            "omission": self._find_omission,
        }

    def __repr__(self) -> str:
        return f"RulesEngine(types={list(self.types)!r})"

    # ------------------------------------------------------------------------------------------------
    def make_chain(self, caption: str, length: int, *, seed: int = 0, key: str | None = None) -> Chain:
        """Degrade ``caption`` ``length - 1`` times, cumulatively.

        Args:
            caption: the correct caption (non-empty text).
            length: ``K >= 2``, the number of captions wanted (the correct one included).
            seed: the run's seed.
            key: a stable id of the caption (e.g. the record id); the per-caption random stream is
                derived from ``(seed, key)`` (``key`` defaults to the caption itself), so the chain does
                not depend on the other captions, on resumption or on parallel workers.

        Returns:
            a :class:`~rankloss.chains.core.Chain` with ``K`` distinct captions (fewer, with a
            ``short_reason``, when the caption runs out of editable places).
        """
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        if not caption.strip():
            raise ValueError("caption must be non-empty text")
        length = check_length(length)
        rng = caption_rng(seed, caption if key is None else key)
        state = TextState(caption)
        captions = [caption]
        edits: list[Edit] = []
        used: Counter[str] = Counter()
        short_reason = None
        for step in range(1, length):
            edit = self.edit_step(state, rng, step, used=used)
            if edit is None:
                short_reason = SHORT_NO_SPANS
                break
            captions.append(state.text)
            edits.append(edit)
            used[edit.type] += 1
        return Chain(captions=captions, edits=edits, requested_length=length, short_reason=short_reason)

    def edit_step(
        self,
        state: TextState,
        rng: random.Random,
        step: int,
        *,
        used: Counter[str] | None = None,
        prefer: str | None = None,
        types: Sequence[str] | None = None,
    ) -> Edit | None:
        """Apply one more edit to ``state`` in place; ``None`` (state unchanged) when none is possible.

        ``prefer`` is tried first; then the types of ``types`` (default ``self.types``) used least so far.
        """
        used = used if used is not None else Counter()
        pool = list(self.types if types is None else types)
        if prefer is not None and prefer not in pool:
            pool.append(prefer)
        order = sorted(pool, key=lambda t: (t != prefer, used[t], rng.random()))
        for etype in order:
            cand = self._finders[etype](state, rng)
            if cand is not None and etype in _CHECK_AGAIN and _contradicts(state.text, cand):
                cand = None  # a sentence/clause operation that would make the caption contradict itself
            if cand is not None:
                return self.apply(state, cand, step)
        return None

    def candidate(self, state: TextState, rng: random.Random, etype: str) -> _Candidate | None:
        """One applicable edit of type ``etype`` for ``state``, or ``None``."""
        return self._finders[etype](state, rng)

    @staticmethod
    def apply(state: TextState, cand: _Candidate, step: int, engine: str = "rules") -> Edit:
        """Apply a candidate from :meth:`candidate` and return its record."""
        if cand[0] == "swap":
            _, a1, b1, a2, b2, subtype = cand
            before = state.text[a1:b2]
            state.swap(a1, b1, a2, b2)
            return Edit(step, "order", before, state.text[a1:b2], a1, subtype, engine)
        _, start, end, new, etype, subtype = cand
        before = state.text[start:end]
        state.replace(start, end, new, "insert" if (etype, subtype) == ("insertion", "sentence") else "edit")
        return Edit(step, etype, before, new, start, subtype, engine)

    # ------------------------------------------------------------------------------------------------
    # Candidate finders. Each returns one valid candidate chosen with ``rng``, or None.

    @staticmethod
    def _first_valid(
        state: TextState, rng: random.Random, matches: list[re.Match[str]], make: Callable
    ) -> _Candidate | None:
        if not matches:
            return None
        rng.shuffle(matches)
        for m in matches:
            cand = make(m)
            if cand is None:
                continue
            _, start, end, new = cand[:4]
            if new == state.text[start:end] or state.blocked(start, end):
                continue
            if check_candidate(state.text, start, end, new) is not None:
                continue  # the edit would make the caption contradict itself: try another place
            return cand
        return None

    def _lexical(
        self, state: TextState, rng: random.Random, regex: re.Pattern[str], pick: Callable, etype: str
    ):
        text = state.text

        def make(m: re.Match[str]) -> _Candidate | None:
            got = pick(m.group(), text, m)
            if got is None:
                return None
            repl, subtype = got
            repl = _match_case(m.group(), repl)
            start, new = _with_article(text, m.start(), m.end(), repl)
            return ("replace", start, m.end(), new, etype, subtype)

        return self._first_valid(state, rng, list(regex.finditer(text)), make)

    def _find_object(self, state: TextState, rng: random.Random) -> _Candidate | None:
        def pick(word: str, text: str, m: re.Match[str]):
            cat, i, num = OBJECT_INDEX[_norm(word)]
            lower = text.lower()
            options = [p[num] for j, p in enumerate(OBJECTS[cat]) if j != i]
            gender = _GENDER.get(OBJECTS[cat][i][0])
            if gender is not None and _PRONOUNS[gender].search(text) is not None:
                # keep the gender that the caption's pronouns refer to ("man" -> "boy", not "woman")
                options = [o for o in options if _GENDER.get(OBJECTS[cat][OBJECT_INDEX[o][1]][0]) == gender]
                if not options:
                    return None
            fresh = [o for o in options if o not in lower]
            return rng.choice(fresh or options), cat

        return self._lexical(state, rng, OBJECT_RE, pick, "object")

    def _find_attribute(self, state: TextState, rng: random.Random) -> _Candidate | None:
        def pick(word: str, text: str, m: re.Match[str]):
            key = _norm(word)
            sub = ATTRIBUTE_SUBTYPE[key]
            if sub == "colour":
                near = _NEAR_COLOURS.get(key, set())
                # not a colour next to it ("black and white" -> "white and white")
                around = text[max(0, m.start() - 20) : m.end() + 20].lower()
                options = [c for c in _TARGET_COLOURS if c != key and c not in near and c not in around]
                if not options:
                    return None
            elif sub == "size":
                options = list(SIZE_ANTONYMS[key])
            else:
                syn = _MATERIAL_SYNONYMS.get(key, set())
                options = [c for c in MATERIALS if c != key and c not in syn]
            return rng.choice(options), sub

        return self._lexical(state, rng, ATTRIBUTE_RE, pick, "attribute")

    def _find_count(self, state: TextState, rng: random.Random) -> _Candidate | None:
        def pick(word: str, text: str, m: re.Match[str]):
            key = _norm(word)
            if key in FREQUENCY_WORDS:
                return rng.choice(FREQUENCY_WORDS[key]), "frequency"
            if key.isdigit():
                n = int(key)
                options = [str(v) for v in (n - 1, n + 1, n + 2) if v >= 2 and v != n]
                return rng.choice(options), "number"
            n = NUMBER_VALUES[key]
            options = [NUMBER_WORDS[v - 2] for v in (n - 1, n + 1, n + 2) if 2 <= v <= 12 and v != n]
            return rng.choice(options), "number"

        return self._lexical(state, rng, COUNT_RE, pick, "count")

    def _find_action(self, state: TextState, rng: random.Random) -> _Candidate | None:
        def pick(word: str, text: str, m: re.Match[str]):
            cat, i, form = ACTION_INDEX[_norm(word)]
            options = [v[form] for j, v in enumerate(ACTIONS[cat]) if j != i and v[form] != word.lower()]
            subject = subject_category(text, m.start(), word)
            if subject is not None:  # a verb that fits the subject ("a cup rolls" -> "slides", not "swims")
                options = [o for o in options if verb_fits(o, subject)]
            return (rng.choice(options), cat) if options else None

        return self._lexical(state, rng, ACTION_RE, pick, "action")

    def _find_spatial(self, state: TextState, rng: random.Random) -> _Candidate | None:
        return self._lexical(
            state, rng, SPATIAL_RE, lambda w, t, m: (SPATIAL_PAIRS[_norm(w)], "relation"), "spatial"
        )

    # ------------------------------------------------------------------------------------------------
    def _find_order(self, state: TextState, rng: random.Random) -> _Candidate | None:
        kinds = ["sentence", "clause", "connective"]
        rng.shuffle(kinds)
        for kind in kinds:
            if kind == "sentence":
                cand = self._sentence_swap(state, rng)
            elif kind == "clause":
                cand = self._clause_swap(state, rng)
            else:
                cand = self._lexical(
                    state, rng, TEMPORAL_RE, lambda w, t, m: (TEMPORAL_PAIRS[_norm(w)], "connective"), "order"
                )
            if cand is not None:
                return cand
        return None

    @staticmethod
    def _sentence_swap(state: TextState, rng: random.Random) -> _Candidate | None:
        text = state.text
        sents = split_sentences(text)
        if len(sents) < 2:
            return None
        events = [i for i, (s, e) in enumerate(sents) if EVENT_RE.search(text, s, e) is not None]
        ok = [
            i for i in events if not state.has_order_span(*sents[i]) and not state.has_insert_span(*sents[i])
        ]
        pairs = [(i, j) for i, j in zip(ok, ok[1:]) if j == i + 1]
        if not pairs:
            pairs = [(i, j) for k, i in enumerate(ok) for j in ok[k + 1 :]]
        rng.shuffle(pairs)
        for i, j in pairs:
            (a1, b1), (a2, b2) = sents[i], sents[j]
            if _norm(text[a1:b1]) == _norm(text[a2:b2]) or state.swap_crosses(a1, b1, a2, b2):
                continue
            return ("swap", a1, b1, a2, b2, "sentence")
        return None

    @staticmethod
    def _clause_swap(state: TextState, rng: random.Random) -> _Candidate | None:
        text = state.text
        sents = split_sentences(text)
        order = list(range(len(sents)))
        rng.shuffle(order)
        for i in order:
            s, e = sents[i]
            body_end = e
            while body_end > s and text[body_end - 1] in ".!?\"')]":
                body_end -= 1
            m = _CLAUSE_SWAP_RE.match(text[s:body_end])
            if m is None:
                continue
            x, conn, y = m.group(1), m.group(2), m.group(3)
            if not _SUBJECT_START.match(y) or "," in y or _norm(x) == _norm(y):
                continue
            new = _capitalise(y) + conn + _decapitalise(x)
            if x[:1].islower():  # the sentence did not start at x (e.g. a fragment): keep case as it was
                new = _decapitalise(y) + conn + x
            if new == text[s:body_end] or state.blocked(s, body_end) or state.has_edit_span(s, body_end):
                continue
            return ("replace", s, body_end, new, "order", "clause")
        return None

    # ------------------------------------------------------------------------------------------------
    def _find_insertion(self, state: TextState, rng: random.Random) -> _Candidate | None:
        kinds = ["sentence", "attribute"]
        rng.shuffle(kinds)
        for kind in kinds:
            cand = (
                self._insert_sentence(state, rng)
                if kind == "sentence"
                else self._insert_attribute(state, rng)
            )
            if cand is not None:
                return cand
        return None

    @staticmethod
    def _absent_object(text: str, rng: random.Random) -> str:
        lower = text.lower()
        for _ in range(8):
            cat = _INSERTION_CATEGORIES[rng.randrange(len(_INSERTION_CATEGORIES))]
            noun = OBJECTS[cat][rng.randrange(len(OBJECTS[cat]))][0]
            if noun not in lower:
                return noun
        return noun

    def _insert_sentence(self, state: TextState, rng: random.Random) -> _Candidate | None:
        text = state.text
        sents = split_sentences(text)
        if not sents:
            return None
        points = [e for _, e in sents]
        rng.shuffle(points)
        for p in points:
            if state.blocked(p, p):
                continue
            template = INSERTION_TEMPLATES[rng.randrange(len(INSERTION_TEMPLATES))]
            words = {
                "colour": rng.choice(_TARGET_COLOURS),
                "size": rng.choice(INSERTION_SIZES),
                "object": self._absent_object(text, rng),
                "side": rng.choice(("left", "right")),
            }
            body = template.format(a="{a}", **words)
            head = body.split(" ", 2)[1]
            sentence = body.replace("{a}", "An" if _vowel_sound(head) else "A", 1)
            lead = " " if text[p - 1] in ".!?\"')]" else ". "
            return ("replace", p, p, lead + sentence, "insertion", "sentence")
        return None

    @staticmethod
    def _insert_attribute(state: TextState, rng: random.Random) -> _Candidate | None:
        text = state.text
        matches = list(OBJECT_RE.finditer(text))
        rng.shuffle(matches)
        for m in matches:
            if OBJECT_INDEX[_norm(m.group())][0] not in _INSERTION_CATEGORIES:
                continue
            if _DETERMINER_BEFORE.search(text, max(0, m.start() - 8), m.start()) is None:
                continue
            colour = rng.choice(_TARGET_COLOURS)
            start, new = _with_article(text, m.start(), m.start(), colour + " ")
            if state.blocked(start, m.start()):
                continue
            return ("replace", start, m.start(), new, "insertion", "attribute")
        return None

    # ------------------------------------------------------------------------------------------------
    def _find_omission(self, state: TextState, rng: random.Random) -> _Candidate | None:
        kinds = ["attribute", "clause", "sentence"]
        rng.shuffle(kinds)
        for kind in kinds:
            if kind == "attribute":
                cand = self._drop_attribute(state, rng)
            elif kind == "clause":
                cand = self._first_valid(
                    state,
                    rng,
                    list(_CLAUSE_DROP_RE.finditer(state.text)),
                    lambda m: ("replace", m.start(), m.end(), "", "omission", "clause"),
                )
            else:
                cand = self._drop_sentence(state, rng)
            if cand is not None:
                return cand
        return None

    def _drop_attribute(self, state: TextState, rng: random.Random) -> _Candidate | None:
        text = state.text

        def make(m: re.Match[str]) -> _Candidate | None:
            nxt = _NEXT_WORD.match(text, m.end())
            if nxt is None or nxt.group(1).lower() in _FUNCTION_WORDS:
                return None
            if _PREDICATIVE_BEFORE.search(text, max(0, m.start() - 10), m.start()) is not None:
                return None
            end = nxt.start(1)
            start, new = _with_article(text, m.start(), end, "")
            if start == m.start() and m.group()[:1].isupper():  # sentence-initial: capitalise the next word
                return ("replace", start, nxt.end(1), _capitalise(nxt.group(1)), "omission", "attribute")
            return ("replace", start, end, new, "omission", "attribute")

        return self._first_valid(state, rng, list(ATTRIBUTE_RE.finditer(text)), make)

    @staticmethod
    def _drop_sentence(state: TextState, rng: random.Random) -> _Candidate | None:
        text = state.text
        sents = split_sentences(text)
        if len(sents) < 3:
            return None
        order = list(range(1, len(sents)))
        rng.shuffle(order)
        for i in order:
            start, end = sents[i - 1][1], sents[i][1]
            if not state.blocked(start, end):
                return ("replace", start, end, "", "omission", "sentence")
        return None
