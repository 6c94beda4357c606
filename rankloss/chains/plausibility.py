"""Self-contradiction check: refuse an edit whose result gives itself away without the video.

A chain is only useful for training when telling ``y_k`` from ``y_{k-1}`` needs the video. An edit that
makes the caption contradict *itself* ("from the right to the right", "a small blue cup swims",
"three dogs: a black one and a white one") can be spotted from the text alone, so it teaches a model
nothing about the video. :func:`contradiction` compares the caption before and after one edit and
returns the reason when the edit *adds* a self-contradiction of one of the :data:`KINDS`:

================  ==================================================================================
kind              what it catches
================  ==================================================================================
``relation``      the same word on both sides of a relation or coordination: "from the right to the
                  right", "moves left to the left", "between the top and the top", "white and white",
                  "the cup to the left of the cup"
``verb_subject``  a verb that does not fit its subject's category: "a cup swims", "the camera walks",
                  "the man pans" (animate-only verbs with an object subject and vice versa)
``count``         a count that disagrees with an enumeration in the same sentence: "three dogs: a black
                  one and a white one", "two cups (red, blue and green)"
``gender``        a single person of one gender referred to only by pronouns of the other:
                  "A woman ... He stops ..." (after "man" -> "woman")
``antonym``       two contradicting size words in one noun phrase: "a small, large box"
================  ==================================================================================

Only contradictions the edit *adds* count (per kind, after vs before), so a caption that already reads
oddly, or a check that misreads it, never blocks an unrelated edit. The check only reads the sentences
the edit touches (the whole caption for ``gender``, and only when the edit touches a gendered word), so
it costs a few microseconds per candidate. Used by both engines: the ``rules`` engine refuses such a
candidate and tries another; the ``llm`` engine rejects such an answer in verification.

Speed: measure the check alone by recording every ``check_candidate`` call of the rules engine over
``tests/data/video_captions.txt`` (200 captions x length 6 x seeds 0-4, ~5,900 calls) and replaying them
(best of 7, ``time.process_time``); measure the engine with ``make_chain(c, 6, seed=r)`` over the same
captions, best of 5 passes (``benchmarks/chains_detectability.py`` reports it as ``captions_per_s``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .taxonomy import (
    ACTION_INDEX,
    ACTIONS,
    COLOURS,
    NUMBER_VALUES,
    OBJECT_INDEX,
    SIZE_ANTONYMS,
    SPATIAL_PAIRS,
    TEMPORAL_PAIRS,
    _words_regex,
)

__all__ = [
    "KINDS",
    "contradiction",
    "contradictions",
    "count_contradictions",
    "subject_category",
    "verb_fits",
]

#: The kinds of self-contradiction the check looks for (the first word of every reason).
KINDS: tuple[str, ...] = ("relation", "verb_subject", "count", "gender", "antonym")

#: Object categories whose members are animate (the rest of ``OBJECTS`` is inanimate).
ANIMATE_CATEGORIES = frozenset({"person", "role", "animal"})

#: Subject words outside ``OBJECTS`` that name people (category ``person``).
_PERSON_WORDS = frozenset(
    "he she someone somebody people person child children kid kids baby crowd customers customer "
    "family man's woman's audience couple athlete athletes skier skiers".split()
)

#: Verbs (third-person form) and the subject categories they accept. A verb not listed fits any
#: subject. ``animate`` stands for ``person``/``role``/``animal``.
_ANIMATE = tuple(sorted(ANIMATE_CATEGORIES))
_VERB_SUBJECTS_3SG: Mapping[str, tuple[str, ...]] = {
    # motion: only living things walk, swim, dance ...; vehicles may drive/climb; rivers run
    "walks": _ANIMATE, "runs": (*_ANIMATE, "nature"), "jumps": _ANIMATE, "crawls": _ANIMATE,
    "climbs": (*_ANIMATE, "vehicle"), "swims": _ANIMATE, "dances": _ANIMATE, "skates": _ANIMATE,
    "rides": _ANIMATE, "drives": (*_ANIMATE, "vehicle"),
    # manipulation that needs hands (or a mouth/paws)
    "throws": _ANIMATE, "catches": _ANIMATE, "grabs": _ANIMATE, "kicks": _ANIMATE, "pours": _ANIMATE,
    "stirs": _ANIMATE, "washes": _ANIMATE,
    # posture only a body takes
    "kneels": _ANIMATE, "squats": _ANIMATE,
    # communication, consumption, perception: living things (music/television "plays")
    **{v[0]: _ANIMATE for v in ACTIONS["communication"]},
    **{v[0]: _ANIMATE for v in ACTIONS["consumption"]},
    **{v[0]: _ANIMATE for v in ACTIONS["perception"] if v[0] != "plays"},
    # a camera pans and zooms; a person does not ("tilts" fits both: "he tilts his head")
    "pans": ("device", "vehicle", "item", "furniture", "container", "food", "clothing", "nature", "shape"),
    "zooms": ("device", "vehicle", "item", "furniture", "container", "food", "clothing", "nature", "shape"),
}  # fmt: skip

#: verb form (any of the three) -> accepted subject categories
VERB_SUBJECTS: dict[str, frozenset[str]] = {}
for _cat, _verbs in ACTIONS.items():
    for _forms in _verbs:
        if _forms[0] in _VERB_SUBJECTS_3SG:
            for _w in _forms:
                if ACTION_INDEX.get(_w, (None, None, None))[:2] == ACTION_INDEX[_forms[0]][:2]:
                    VERB_SUBJECTS[_w] = frozenset(_VERB_SUBJECTS_3SG[_forms[0]])


def verb_fits(verb: str, category: str | None) -> bool:
    """Whether ``verb`` (a form from ``ACTIONS``) fits a subject of ``category``."""
    if category is None:
        return True
    ok = VERB_SUBJECTS.get(verb.lower())
    return ok is None or category in ok


# ------------------------------------------------------------------------------------------------------
# Subjects

_CLAUSE_BREAK = re.compile(
    r"[,.;:!?()\"]|(?<![\w'-])(?:and|but|or|while|as|then|who|which|that|when|where|because|so|after|"
    r"before|until|whereas|if)(?![\w'-])",
    re.IGNORECASE,
)
_SUBJECT_RE = _words_regex(list(OBJECT_INDEX) + list(_PERSON_WORDS))
_AUX_BEFORE = re.compile(
    r"(?<![\w'-])(?:is|are|was|were|be|been|keeps|keep|starts|start|begins|begin|continues|continue|stops|"
    r"seen|'s)\s+(?:[a-z]+ly\s+)?$",
    re.IGNORECASE,
)
_NOUN_JUST_BEFORE = re.compile(r"([A-Za-z]+)\s+(?:[a-z]+ly\s+)?$")


def _category(word: str) -> str | None:
    w = word.lower()
    if w in _PERSON_WORDS:
        return "person"
    got = OBJECT_INDEX.get(" ".join(w.split()))
    return got[0] if got else None


def subject_category(text: str, verb_start: int, verb: str | None = None) -> str | None:
    """The category of the subject of the verb at ``text[verb_start:]``, ``None`` when unsure.

    Finite forms (and ``-ing`` forms after "is", "starts", ...) take the first known noun or person word of
    their clause; a bare ``-ing`` form takes the noun right before it ("a dog swimming").
    """
    if verb is None:
        m = re.match(r"[\w'-]+", text[verb_start:])
        verb = m.group() if m else ""
    lo = max(0, verb_start - 120)
    head = text[lo:verb_start]
    if verb.lower().endswith("ing") and _AUX_BEFORE.search(head) is None:
        m = _NOUN_JUST_BEFORE.search(head)
        return _category(m.group(1)) if m else None
    cut = 0
    for m in _CLAUSE_BREAK.finditer(head):
        cut = m.end()
    m = _SUBJECT_RE.search(head, cut)
    if m is None:
        return None
    return _category(m.group())


# ------------------------------------------------------------------------------------------------------
# Patterns

_REL_WORDS = sorted(
    {w for w in SPATIAL_PAIRS if " " not in w and "-" not in w}
    | set(COLOURS)
    | set(SIZE_ANTONYMS)
    | {w for w in TEMPORAL_PAIRS if " " not in w}
)
_REL_ALT = "|".join(re.escape(w) for w in sorted(_REL_WORDS, key=len, reverse=True))
_OBJ_ALT = "|".join(re.escape(w) for w in sorted(OBJECT_INDEX, key=len, reverse=True))
_RELATION_RES = (
    # from the left (side of the frame) to the left; from left to left
    re.compile(
        rf"(?<![\w'-])from\s+(?:the\s+)?({_REL_ALT})(?:\s+(?:side|edge|corner|end|part|half))?"
        rf"(?:\s+of\s+(?:the\s+)?[\w-]+)?\s+(?:to|toward|towards|into|onto)\s+(?:the\s+)?\1(?![\w'-])",
        re.IGNORECASE,
    ),
    # left to the left, white and white, between the top and the top, left-to-left
    re.compile(rf"(?<![\w'-])({_REL_ALT})(?:\s+(?:and|or|to)\s+(?:the\s+)?|-(?:and|to)-)\1(?![\w'-])", re.I),
    # the cup to the left of the cup
    re.compile(
        rf"(?<![\w'-])the\s+({_OBJ_ALT})\s+(?:is\s+|are\s+)?(?:to\s+the\s+(?:left|right)\s+of|next\s+to|"
        rf"behind|in\s+front\s+of|above|below|under|underneath|beside|near|on\s+top\s+of|inside)\s+"
        rf"the\s+\1(?![\w'-])",
        re.IGNORECASE,
    ),
)
_NUM_ALT = "|".join(sorted(NUMBER_VALUES, key=len, reverse=True)) + r"|[2-9]|1[0-2]"
_ITEM = r"(?:a|an|one|another|the)\s+[\w-]+(?:\s+[\w-]+){0,3}?"
_COUNT_RE = re.compile(
    rf"(?<![\w'.-])({_NUM_ALT})\s+(?:[\w-]+\s+){{0,2}}?(?:[a-z]+s|men|women|children|people)"
    rf"\s*(?::|,|\(|--|—|;|\s+including|\s+namely)\s*"
    rf"({_ITEM}(?:\s*,\s*{_ITEM})*\s*,?\s+and\s+{_ITEM})(?![\w'-])",
    re.IGNORECASE,
)
_COL_ALT = "|".join(COLOURS)
_COUNT_COLOUR_RE = re.compile(
    rf"(?<![\w'.-])({_NUM_ALT})\s+(?:[\w-]+\s+){{0,2}}?[a-z]+s\s*\(\s*((?:{_COL_ALT})(?:\s*,\s*(?:{_COL_ALT}))*"
    rf"\s*,?\s*and\s+(?:{_COL_ALT}))\s*\)",
    re.IGNORECASE,
)
_ENUM_SEP = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+", re.IGNORECASE)
_ANTONYM_RES = re.compile(
    "|".join(
        rf"(?<![\w'-]){re.escape(a)}\s*,?\s+{re.escape(b)}(?![\w'-])"
        for a, bs in SIZE_ANTONYMS.items()
        for b in bs
    ),
    re.IGNORECASE,
)
_MALE = frozenset({"man", "boy", "father", "husband", "gentleman", "king", "son", "brother", "grandfather"})
_FEMALE = frozenset({"woman", "girl", "mother", "wife", "lady", "queen", "daughter", "sister", "grandmother"})
_GENDER_WORD_RE = re.compile(
    r"(?<![\w'-])(man|boy|father|husband|gentleman|king|son|brother|grandfather|woman|girl|mother|wife|"
    r"lady|queen|daughter|sister|grandmother|men|women|boys|girls|people|he|him|his|himself|she|her|hers|"
    r"herself)(?![\w'-])",
    re.IGNORECASE,
)
_PLURAL_PEOPLE = frozenset({"men", "women", "boys", "girls", "people"})
_ACTION_RE = _words_regex(VERB_SUBJECTS)


_TOKEN_RE = re.compile(r"[A-Za-z][A-Za-z'-]*|[,;:.!?()]")
_REL_SET = frozenset(_REL_WORDS)
_LINKS = frozenset({"and", "or", "to"})


_OBJ_FIRST = frozenset(_TOKEN_RE.findall(" ".join(OBJECT_INDEX)))  # token that starts an object noun
_NUMBER_WORDS = frozenset(NUMBER_VALUES)
_DIGIT_RE = re.compile(r"[0-9]")
_LOOP_WORDS = _REL_SET | frozenset(VERB_SUBJECTS)


def count_contradictions(text: str, *, gender: bool = True) -> dict[str, int]:
    """How many self-contradictions of each kind ``text`` holds (kinds with none are left out).

    Speed (the rules engine calls this for every candidate edit): one tokenisation, then set intersections
    decide which token positions and which regexes can match at all, so most texts cost one ``findall``
    plus a few set operations. Every shortcut is a necessary condition of the slow path it skips, derived
    from the regexes' word boundaries on ASCII text (non-ASCII text always takes the regexes), so the
    counts are exactly those of the plain token loop + regexes (``tests/test_chains_plausibility.py``
    checks this against a reference implementation).
    """
    out: dict[str, int] = {}
    lower = text.lower()
    words = _TOKEN_RE.findall(lower)
    wset = set(words)
    n_tok = len(words)
    rel = verb = ant = 0
    dup_rel = False  # a relation word occurs twice (needed by every relation pattern)
    for w in wset & _LOOP_WORDS:
        n_w = words.count(w)
        i = -1
        if w in _REL_SET:
            if n_w > 1:
                dup_rel = True
            antonyms = SIZE_ANTONYMS.get(w)
            if antonyms is not None and wset.isdisjoint(antonyms):
                antonyms = None
            if n_w > 1 or antonyms is not None:
                for _ in range(n_w):
                    i = words.index(w, i + 1)
                    j = i + 1
                    if j < n_tok and words[j] in _LINKS:
                        j += 1
                        if j < n_tok and words[j] == "the":
                            j += 1
                        if j < n_tok and words[j] == w:
                            rel += 1
                    if antonyms is not None:
                        k = i + 1
                        if k < n_tok and words[k] == ",":
                            k += 1
                        if k < n_tok and words[k] in antonyms:
                            ant += 1
                i = -1
        if w in VERB_SUBJECTS:
            for _ in range(n_w):
                i = words.index(w, i + 1)
                if not verb_fits(w, _token_subject(words, i)):
                    verb += 1
    if "-and-" in lower or "-to-" in lower:
        for w in words:
            if "-" in w and w not in _REL_SET:
                parts = w.split("-")
                if (
                    len(parts) == 3
                    and parts[1] in ("and", "to")
                    and parts[0] == parts[2]
                    and parts[0] in _REL_SET
                ):
                    rel += 1
    ascii_text = text.isascii()
    if "from" in lower and (dup_rel or not ascii_text):
        rel += len(_RELATION_RES[0].findall(text))
    if lower.count("the ") > 1 and (not ascii_text or _repeated_after_the(words)):
        rel += len(_RELATION_RES[2].findall(text))
    if rel:
        out["relation"] = rel
    if verb:
        out["verb_subject"] = verb
    n = 0
    if " and " in lower and (
        not ascii_text or not wset.isdisjoint(_NUMBER_WORDS) or _DIGIT_RE.search(text) is not None
    ):
        for m in _COUNT_RE.finditer(text):
            items = len(_ENUM_SEP.findall(m.group(2))) + 1
            if _number(m.group(1)) != items:
                n += 1
        if "(" in text:
            for m in _COUNT_COLOUR_RE.finditer(text):
                if _number(m.group(1)) != len(_ENUM_SEP.findall(m.group(2))) + 1:
                    n += 1
    if n:
        out["count"] = n
    if ant:
        out["antonym"] = ant
    if gender and _gender_mismatch(text):
        out["gender"] = 1
    return out


def _repeated_after_the(words: list[str]) -> bool:
    """Whether two "the" tokens are followed by the same object-starting token ("the cup ... the cup")."""
    n_the = words.count("the")
    if n_the < 2:
        return False
    seen: set[str] = set()
    i = -1
    last = len(words) - 1
    for _ in range(n_the):
        i = words.index("the", i + 1)
        if i < last:
            nxt = words[i + 1]
            if nxt in seen:
                return True
            if nxt in _OBJ_FIRST:
                seen.add(nxt)
    return False


_BREAK_WORDS = frozenset(
    ", . ; : ! ? ( ) and but or while as then who which that when where because so after before until "
    "whereas if".split()
)
_AUX_WORDS = frozenset(
    "is are was were be been keeps keep starts start begins begin continues continue stops seen".split()
)


def _token_subject(words: list[str], i: int) -> str | None:
    """:func:`subject_category` on a lower-cased token list (the verb is ``words[i]``)."""
    j = i - 1
    if j >= 0 and words[j].endswith("ly"):
        j -= 1
    if words[i].endswith("ing") and not (j >= 0 and words[j] in _AUX_WORDS):
        return _category(words[j]) if j >= 0 else None
    k = i - 1
    while k >= 0 and words[k] not in _BREAK_WORDS and i - k < 25:
        k -= 1
    for t in range(k + 1, i):
        cat = _category(words[t])
        if cat is not None:
            return cat
    return None


def _number(word: str) -> int:
    w = word.lower()
    return int(w) if w.isdigit() else NUMBER_VALUES[w]


_WORD_RUN_RE = re.compile(r"[\w'-]+")
_GENDER_WORDS = frozenset(
    "man boy father husband gentleman king son brother grandfather woman girl mother wife lady queen "
    "daughter sister grandmother men women boys girls people he him his himself she her hers herself".split()
)
_MALE_PRONOUNS = frozenset({"he", "him", "his", "himself"})


def _gender_mismatch(text: str) -> bool:
    if text.isascii():
        # same words as ``_GENDER_WORD_RE`` finds: its matches are exactly the maximal [\w'-] runs that
        # are gender words (ignoring case), and only which words occur matters
        found = _GENDER_WORDS.intersection(_WORD_RUN_RE.findall(text.lower()))
    else:
        found = {m.group().lower() for m in _GENDER_WORD_RE.finditer(text)}
    if not found or not found.isdisjoint(_PLURAL_PEOPLE):
        return False  # no gendered word, or a group of people: pronouns may refer to anyone in it
    nouns: set[str] = set()
    pronouns: set[str] = set()
    for w in found:
        if w in _MALE:
            nouns.add("m")
        elif w in _FEMALE:
            nouns.add("f")
        elif w in _MALE_PRONOUNS:
            pronouns.add("m")
        else:
            pronouns.add("f")
    return len(nouns) == 1 and bool(pronouns) and not (nouns & pronouns)


_GENDER_CACHE: tuple[str, bool] = ("", False)


def _gender_mismatch_cached(text: str) -> bool:
    """:func:`_gender_mismatch` remembering the last text (a step's ``before``, shared by its candidates)."""
    global _GENDER_CACHE
    last = _GENDER_CACHE
    if last[0] is text or last[0] == text:
        return last[1]
    got = _gender_mismatch(text)
    _GENDER_CACHE = (text, got)
    return got


def contradictions(text: str) -> list[str]:
    """The kinds of self-contradiction ``text`` holds, each repeated as many times as it occurs."""
    return [k for k, n in count_contradictions(text).items() for _ in range(n)]


_SENT_END = re.compile(r"[.!?]")


def _window(text: str, start: int, end: int) -> tuple[int, int]:
    """The sentences of ``text`` overlapping ``[start, end)``."""
    lo = max(text.rfind(".", 0, start), text.rfind("!", 0, start), text.rfind("?", 0, start)) + 1
    m = _SENT_END.search(text, end)
    return lo, (m.end() if m else len(text))


def _gendered(s: str) -> bool:
    return _GENDER_WORD_RE.search(s) is not None


def contradiction(before: str, after: str, edit: Any = None) -> str | None:
    """The reason ``after`` (``before`` with one edit applied) contradicts itself where ``before`` did not.

    Args:
        before: the caption before the edit.
        after: the caption after it.
        edit: the edit, when known: an :class:`~rankloss.chains.core.Edit`, its ``to_dict()`` or a
            ``(position, before_text, after_text)`` tuple. It limits the check to the sentences the edit
            touches (faster); without it the whole captions are compared.

    Returns:
        ``None`` when the edit adds no self-contradiction, else a short reason whose first word is one of
        :data:`KINDS` (e.g. ``"relation: the same word on both sides"``).
    """
    if edit is None:
        return _new_kind(before, after, before, after)
    if isinstance(edit, tuple):
        pos, old, new = edit
    elif isinstance(edit, Mapping):
        pos, old, new = edit.get("position", -1), edit.get("before", ""), edit.get("after", "")
    else:
        pos, old, new = edit.position, edit.before, edit.after
    pos = int(pos)
    if pos < 0 or before[pos : pos + len(old)] != old or after[pos : pos + len(new)] != new:
        return _new_kind(before, after, before, after)
    return _span_kind(before, after, pos, pos + len(old), pos + len(new), old, new)


def _span_kind(before: str, after: str, pos: int, end_b: int, end_a: int, old: str, new: str) -> str | None:
    # the sentences touching the edit (``_window`` on both texts; the starts agree up to ``pos``, and
    # the earlier of the two is taken as before)
    lo = max(before.rfind(".", 0, pos), before.rfind("!", 0, pos), before.rfind("?", 0, pos)) + 1
    lo2 = max(after.rfind(".", 0, pos), after.rfind("!", 0, pos), after.rfind("?", 0, pos)) + 1
    if lo2 < lo:
        lo = lo2
    m = _SENT_END.search(before, end_b)
    hi = m.end() if m else len(before)
    m = _SENT_END.search(after, end_a)
    hi2 = m.end() if m else len(after)
    gated = _gendered(old) or _gendered(new)
    return _new_kind(before[lo:hi], after[lo:hi2], before if gated else None, after if gated else None)


def _new_kind(b_txt: str, a_txt: str, b_full: str | None, a_full: str | None) -> str | None:
    ca = count_contradictions(a_txt, gender=False)
    if ca:
        cb = count_contradictions(b_txt, gender=False)
        for kind in KINDS:
            if ca.get(kind, 0) > cb.get(kind, 0):
                return REASONS[kind]
    if (
        b_full is not None
        and a_full is not None
        and _gender_mismatch(a_full)
        and not _gender_mismatch_cached(b_full)
    ):
        return REASONS["gender"]
    return None


#: The reason :func:`contradiction` gives for each kind.
REASONS: Mapping[str, str] = {
    "relation": "relation: the same word on both sides",
    "verb_subject": "verb_subject: the verb does not fit its subject",
    "count": "count: the number disagrees with the enumeration",
    "gender": "gender: pronouns disagree with the only person",
    "antonym": "antonym: contradicting size words together",
}


def check_candidate(text: str, start: int, end: int, new: str) -> str | None:
    """:func:`contradiction` for replacing ``text[start:end]`` by ``new`` (what the rules engine calls)."""
    return _span_kind(
        text, text[:start] + new + text[end:], start, end, start + len(new), text[start:end], new
    )
