"""The self-contradiction check (rankloss.chains.plausibility) and its use in the rules engine."""

from pathlib import Path

import pytest

from rankloss.chains import Edit, RulesEngine
from rankloss.chains.plausibility import KINDS, contradiction, count_contradictions

CAPTIONS = [c for c in (Path(__file__).parent / "data" / "video_captions.txt").read_text().splitlines() if c]

FLAGGED = [
    ("The man moves from the left to the right.", "The man moves from the right to the right.", "relation"),
    ("The man moves from the left side of the frame to the right.",
     "The man moves from the right side of the frame to the right.", "relation"),
    ("The dog moves left to the right.", "The dog moves left to the left.", "relation"),
    ("A black and white flag waves.", "A white and white flag waves.", "relation"),
    ("The cup to the left of the bowl.", "The cup to the left of the cup.", "relation"),
    ("A small blue cup rolls on the table.", "A small blue cup swims on the table.", "verb_subject"),
    ("The camera pans to the left.", "The camera walks to the left.", "verb_subject"),
    ("The man pours milk.", "The man pans milk.", "verb_subject"),
    ("Two dogs: a black one and a white one.", "Three dogs: a black one and a white one.", "count"),
    ("Two cups (red and blue) sit there.", "Three cups (red and blue) sit there.", "count"),
    ("A man walks in. He sits down.", "A woman walks in. He sits down.", "gender"),
    ("A small box.", "A small, large box.", "antonym"),
]  # fmt: skip

VALID = [
    ("A man in a red shirt walks two dogs.", "A man in a red shirt runs two dogs."),
    ("The man moves from the left to the right.", "The man moves from the right to the left."),
    ("A ball rolls across the floor.", "A ball slides across the floor."),
    ("Two dogs: a black one and a white one.", "Two dogs: a brown one and a white one."),
    ("A man walks in. He sits down.", "A boy walks in. He sits down."),
    ("A dog swims toward the shore.", "A dog runs toward the shore."),
    ("He looks left and right.", "He looks left and right twice."),
]


@pytest.mark.parametrize("before,after,kind", FLAGGED)
def test_flags_self_contradictions(before, after, kind):
    why = contradiction(before, after)
    assert why is not None and why.split(":")[0] == kind and kind in KINDS


@pytest.mark.parametrize("before,after", VALID)
def test_leaves_valid_edits_alone(before, after):
    assert contradiction(before, after) is None


def test_only_new_contradictions_count():
    odd = "The cup swims. From the left to the left."
    assert count_contradictions(odd)  # the caption already reads oddly ...
    assert contradiction(odd, odd.replace("cup", "bowl")) is None  # ... an unrelated edit is not refused


def test_edit_forms_agree():
    before, after = "The dog moves left to the right.", "The dog moves left to the left."
    pos = before.rindex("right")
    e = Edit(1, "spatial", "right", "left", pos, "relation")
    assert contradiction(before, after, e) == contradiction(before, after, e.to_dict()) is not None
    assert contradiction(before, after, (pos, "right", "left")) == contradiction(before, after)


def test_rules_chains_hold_no_self_contradiction():
    eng = RulesEngine()
    n = 0
    for seed in range(3):
        for i, c in enumerate(CAPTIONS):
            ch = eng.make_chain(c, 6, seed=seed, key=f"v{i}")
            for k, e in enumerate(ch.edits, start=1):
                n += 1
                assert (
                    contradiction(ch.captions[k - 1], ch.captions[k], e if e.type != "order" else None)
                    is None
                ), (
                    e,
                    ch.captions[k],
                )
    assert n > 2000


def test_rules_determinism_per_seed_and_key():
    eng = RulesEngine()
    a = [eng.make_chain(c, 6, seed=3, key=f"v{i}").captions for i, c in enumerate(CAPTIONS[:50])]
    b = [
        RulesEngine().make_chain(c, 6, seed=3, key=f"v{i}").captions
        for i, c in reversed(list(enumerate(CAPTIONS[:50])))
    ]
    assert a == b[::-1]


def test_fixture_is_realistic_size():
    assert len(CAPTIONS) == 200 and all(len(c.split(". ")) >= 3 for c in CAPTIONS)


def _reference_counts(text):
    """The plain (unoptimised) count: every token, every regex; count_contradictions must agree with it."""
    from rankloss.chains import plausibility as P

    out = {}
    lower = text.lower()
    words = P._TOKEN_RE.findall(lower)
    rel = verb = ant = 0
    for i, w in enumerate(words):
        if w in P._REL_SET:
            j = i + 1
            if j < len(words) and words[j] in P._LINKS:
                j += 1
                if j < len(words) and words[j] == "the":
                    j += 1
                if j < len(words) and words[j] == w:
                    rel += 1
            k = i + 1
            if k < len(words) and words[k] == ",":
                k += 1
            if k < len(words) and w in P.SIZE_ANTONYMS and words[k] in P.SIZE_ANTONYMS[w]:
                ant += 1
        elif "-" in w:
            parts = w.split("-")
            if (
                len(parts) == 3
                and parts[1] in ("and", "to")
                and parts[0] == parts[2]
                and parts[0] in P._REL_SET
            ):
                rel += 1
        if w in P.VERB_SUBJECTS and not P.verb_fits(w, P._token_subject(words, i)):
            verb += 1
    rel += len(P._RELATION_RES[0].findall(text)) + len(P._RELATION_RES[2].findall(text))
    n = sum(
        P._number(m.group(1)) != len(P._ENUM_SEP.findall(m.group(2))) + 1 for m in P._COUNT_RE.finditer(text)
    )
    n += sum(
        P._number(m.group(1)) != len(P._ENUM_SEP.findall(m.group(2))) + 1
        for m in P._COUNT_COLOUR_RE.finditer(text)
    )
    for kind, c in (("relation", rel), ("verb_subject", verb), ("count", n), ("antonym", ant)):
        if c:
            out[kind] = c
    gender = {m.group().lower() for m in P._GENDER_WORD_RE.finditer(text)}
    if not gender & P._PLURAL_PEOPLE:
        nouns = {"m" for w in gender if w in P._MALE} | {"f" for w in gender if w in P._FEMALE}
        prons = {"m" for w in gender if w in ("he", "him", "his", "himself")} | {
            "f" for w in gender if w in ("she", "her", "hers", "herself")
        }
        if len(nouns) == 1 and prons and not nouns & prons:
            out["gender"] = 1
    return out


def test_fast_counts_match_reference():
    eng = RulesEngine()
    texts = [b for b, _a, _k in FLAGGED] + [a for _b, a, _k in FLAGGED] + [t for pair in VALID for t in pair]
    texts += ["The cup swims. From the left to the left.", "A man walks in. He sits down. Ça va, he says."]
    for i, c in enumerate(CAPTIONS[:80]):
        texts += eng.make_chain(c, 6, seed=1, key=f"v{i}").captions
    sentences = [s + "." for t in texts for s in t.split(". ")]
    for t in texts + sentences:
        assert count_contradictions(t) == _reference_counts(t), t
