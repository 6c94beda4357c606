"""Caption chains: the rules engine, the protected-span bookkeeping, formats, the writer and resumption."""

from __future__ import annotations

import json
import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankloss.chains import (
    EDIT_TYPES,
    SHORT_NO_SPANS,
    ChainWriter,
    Edit,
    InputError,
    RulesEngine,
    TextState,
    caption_seed,
    iter_records,
    make_chain,
    make_chains_file,
    parse_record,
    read_chains,
    split_sentences,
    summarize_chains,
)
from rankloss.chains.rules import _with_article

# Realistic multi-sentence detailed captions (the style of public detailed video-caption sets).
CAPTIONS = [
    "A man in a red shirt walks two dogs along a wooden pier. He stops near the edge and throws a ball into "
    "the water. Then the dogs jump in after it, while a woman watches from the left.",
    "The video opens in a bright kitchen. A chef in a white apron slices a tomato on a cutting board, "
    "then he pours olive oil into a pan. Three eggs sit in a small bowl to the right of the stove. "
    "Finally, the chef stirs the pan before he adds the tomato.",
    "A young girl in a yellow jacket rides a bicycle down a quiet street. A black car is parked on the "
    "left side of the road behind a tall tree. She waves at a boy who is standing in front of a blue "
    "house. Later, the boy runs toward her and they laugh together.",
    "Two players in green uniforms kick a ball across a large field. The goalkeeper jumps to the right and "
    "catches it. After that, the crowd in the background claps, and a small dog runs onto the grass.",
]


def _check_chain(chain, length: int) -> None:
    caps = chain.captions
    assert len(caps) == len(chain.edits) + 1
    assert len(caps) == length or chain.short_reason
    assert len(set(caps)) == len(caps), "captions of a chain must be distinct"
    for k, e in enumerate(chain.edits, 1):
        assert e.step == k
        assert e.type in EDIT_TYPES
        prev = caps[k - 1]
        assert prev[e.position : e.position + len(e.before)] == e.before
        assert caps[k] == prev[: e.position] + e.after + prev[e.position + len(e.before) :]
        assert e.before != e.after
    # Cumulative: the output of every earlier (non-reordering) edit survives in every later caption.
    for k, e in enumerate(chain.edits, 1):
        if e.type != "order" and e.after.strip():
            for later in caps[k:]:
                assert e.after.strip() in later, (e, later)


# --------------------------------------------------------------------------------------------------------
# Rules engine


@pytest.mark.parametrize("text", CAPTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rules_chain_is_strictly_ordered_and_cumulative(text: str, seed: int) -> None:
    chain = RulesEngine().make_chain(text, 6, seed=seed)
    assert len(chain.captions) == 6 and chain.short_reason is None
    assert chain.captions[0] == text
    _check_chain(chain, 6)
    # One new error per step: a chain of 6 with types spread (least used first) has 5 distinct types.
    assert len({e.type for e in chain.edits}) == 5


@pytest.mark.parametrize("etype", EDIT_TYPES)
def test_every_edit_type_on_realistic_captions(etype: str) -> None:
    engine = RulesEngine(types=[etype])
    edited = 0
    for i, text in enumerate(CAPTIONS):
        chain = engine.make_chain(text, 3, seed=i)
        _check_chain(chain, 3)
        assert all(e.type == etype for e in chain.edits)
        edited += bool(chain.edits)
    assert edited >= len(CAPTIONS) - 1  # (caption 3 holds no number)


@pytest.mark.parametrize(
    ("etype", "subtypes"),
    [
        ("order", {"sentence", "clause", "connective"}),
        ("omission", {"attribute", "clause", "sentence"}),
        ("insertion", {"sentence", "attribute"}),
        ("attribute", {"colour", "size", "material"}),
    ],
)
def test_every_subtype_is_reached(etype: str, subtypes: set[str]) -> None:
    engine = RulesEngine(types=[etype])
    seen = set()
    for seed in range(40):
        for text in CAPTIONS:
            seen.update(e.subtype for e in engine.make_chain(text, 2, seed=seed).edits)
    assert subtypes <= seen


def test_specific_edits_read_right() -> None:
    text = "The cat sits to the left of the dog."
    e = RulesEngine(types=["spatial"]).make_chain(text, 2).edits[0]
    assert (e.before, e.after) == ("left", "right")
    text = "A woman opens the door, then she walks into the room."
    clause_swaps = set()
    for seed in range(20):
        chain = RulesEngine(types=["order"]).make_chain(text, 2, seed=seed)
        if chain.edits[0].subtype == "clause":
            clause_swaps.add(chain.captions[1])
    assert clause_swaps == {"She walks into the room, then a woman opens the door."}
    chain = RulesEngine(types=["count"]).make_chain("Two boys and 3 girls play.", 3)
    nums = {e.before.lower() for e in chain.edits}
    assert nums == {"two", "3"}
    assert all(e.after not in ("one", "1", "0") for e in chain.edits)


def test_articles_agree() -> None:
    def swap(text: str, word: str, new: str) -> str:
        i = text.index(word)
        start, repl = _with_article(text, i, i + len(word), new)
        return text[:start] + repl + text[i + len(word) :]

    assert swap("He eats an apple.", "apple", "banana") == "He eats a banana."
    assert swap("He eats a pear.", "pear", "orange") == "He eats an orange."
    assert swap("He eats the pear.", "pear", "orange") == "He eats the orange."
    assert swap("An orange ball", "orange ", "") == "A ball"
    assert swap("A ball", "ball", "hour") == "An hour"


def test_rules_deterministic_per_seed_and_key() -> None:
    eng = RulesEngine()
    a = [eng.make_chain(t, 6, seed=7, key=f"id{i}").captions for i, t in enumerate(CAPTIONS)]
    # A fresh engine, another order: the same chains (the stream depends on (seed, key) only).
    eng2 = RulesEngine()
    b = {
        i: eng2.make_chain(t, 6, seed=7, key=f"id{i}").captions
        for i, t in reversed(list(enumerate(CAPTIONS)))
    }
    assert a == [b[i] for i in range(len(CAPTIONS))]
    c = [eng.make_chain(t, 6, seed=8, key=f"id{i}").captions for i, t in enumerate(CAPTIONS)]
    assert a != c
    assert caption_seed(0, "x") == caption_seed(0, "x") != caption_seed(1, "x")


def test_short_chain_says_why() -> None:
    chain = RulesEngine(types=["count"]).make_chain("A dog runs.", 4)
    assert chain.captions == ["A dog runs."] and chain.edits == []
    assert chain.short_reason == SHORT_NO_SPANS
    chain = RulesEngine(types=["spatial"]).make_chain("A cat on the left, a dog on the right.", 6)
    assert len(chain.captions) == 3 and chain.short_reason == SHORT_NO_SPANS
    _check_chain(chain, 6)


def test_rules_engine_input_errors() -> None:
    with pytest.raises(ValueError, match="length must be >= 2"):
        RulesEngine().make_chain("A dog.", 1)
    with pytest.raises(TypeError, match="length must be an int"):
        RulesEngine().make_chain("A dog.", 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="caption must be non-empty"):
        RulesEngine().make_chain("  ", 3)
    with pytest.raises(TypeError, match="caption must be a str"):
        RulesEngine().make_chain(None, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="types must only hold"):
        RulesEngine(types=["colour"])
    with pytest.raises(ValueError, match="at least one"):
        RulesEngine(types=[])
    assert RulesEngine(types="count, spatial").types == ("count", "spatial")
    assert (
        make_chain(CAPTIONS[0], 3, seed=1).captions
        == RulesEngine().make_chain(CAPTIONS[0], 3, seed=1).captions
    )


_WORDS = {
    "colour": ["red", "blue", "green", "black", "white"],
    "obj": ["dog", "car", "table", "ball", "cup", "man", "woman", "bird"],
    "verb": ["walks", "runs", "jumps", "holds", "sits", "eats", "watches", "rolls"],
    "rel": ["to the left of", "behind", "above", "in front of", "near", "under"],
    "num": ["two", "three", "4", "five"],
}


@st.composite
def _captions(draw: st.DrawFn) -> str:
    sents = []
    for _ in range(draw(st.integers(1, 5))):
        c, o, v, r, o2 = (draw(st.sampled_from(_WORDS[k])) for k in ("colour", "obj", "verb", "rel", "obj"))
        form = draw(st.integers(0, 3))
        if form == 0:
            sents.append(f"A {c} {o} {v} {r} the {o2}.")
        elif form == 1:
            sents.append(f"Then {draw(st.sampled_from(_WORDS['num']))} {o}s {v[:-1]} slowly.")
        elif form == 2:
            sents.append(f"The {o} {v} {r} a {c} {o2}, while the {o2} {v} away.")
        else:
            sents.append(f"After that, the {c} {o} {v} before it stops.")
    return " ".join(sents)


@settings(max_examples=200)
@given(text=_captions(), seed=st.integers(0, 2**31), length=st.integers(2, 9))
def test_rules_invariants_hypothesis(text: str, seed: int, length: int) -> None:
    chain = RulesEngine().make_chain(text, length, seed=seed)
    _check_chain(chain, length)


# --------------------------------------------------------------------------------------------------------
# TextState


def test_text_state_protects_edits_and_shifts_spans() -> None:
    s = TextState("aaa bbb ccc ddd")
    s.replace(4, 7, "BBBB")  # "aaa BBBB ccc ddd"
    assert s.text == "aaa BBBB ccc ddd"
    assert s.blocked(4, 8) and s.blocked(6, 10) and not s.blocked(9, 12) and not s.blocked(0, 3)
    s.replace(0, 3, "")  # omission at the start: protected point at 0
    assert s.text == " BBBB ccc ddd"
    assert s.blocked(0, 0) and s.blocked(0, 1)
    assert s.protected_texts() == ["BBBB"]
    assert s.text[1:5] == "BBBB" and s.blocked(1, 5)


def test_text_state_swap_moves_spans_and_locks_order() -> None:
    s = TextState("One red dog. Two cats sit. End here.")
    sents = split_sentences(s.text)
    assert [s.text[a:b] for a, b in sents] == ["One red dog.", "Two cats sit.", "End here."]
    s.replace(4, 7, "blue")  # "One blue dog. Two cats sit. End here."
    sents = split_sentences(s.text)
    (a1, b1), (a2, b2) = sents[0], sents[1]
    assert not s.swap_crosses(a1, b1, a2, b2)
    s.swap(a1, b1, a2, b2)
    assert s.text == "Two cats sit. One blue dog. End here."
    i = s.text.index("blue")
    assert s.blocked(i, i + 4) and not s.blocked(i + 5, i + 8)  # the edit moved with its sentence
    assert s.has_order_span(0, 3) and not s.has_order_span(s.text.index("End"), len(s.text))
    assert s.blocked(0, 20)  # across a swapped sentence's boundary
    assert not s.blocked(4, 8)  # inside a swapped sentence: allowed


# --------------------------------------------------------------------------------------------------------
# Formats


def _write_lines(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_input_formats(tmp_path) -> None:
    rows = [
        {"video": "a.mp4", "caption": CAPTIONS[0], "fps": 30},
        {
            "video_id": "b",
            "captions": [{"idx": "0", "content": "frame one"}, {"idx": "-1", "content": CAPTIONS[1]}],
        },
        {
            "video_path": "c.mp4",
            "captions": [{"idx": 0, "content": "short"}, {"idx": 1, "content": CAPTIONS[2]}],
        },
        {
            "id": 17,
            "video": "d.mp4",
            "data_source": "x",
            "conversations": [
                {"from": "human", "value": "<video>\nDescribe the video in detail."},
                {"from": "gpt", "value": CAPTIONS[3]},
            ],
        },
        {"video": "a.mp4", "caption": "A second caption of the same video."},
    ]
    path = _write_lines(tmp_path / "in.jsonl", rows)
    recs = list(iter_records(path))
    assert all(not isinstance(r, InputError) for r in recs)
    assert [r.caption for r in recs[:4]] == CAPTIONS
    assert [r.id for r in recs] == ["a.mp4", "b", "c.mp4", "17", "a.mp4#2"]
    assert [r.video for r in recs] == ["a.mp4", "b", "c.mp4", "d.mp4", "a.mp4"]
    assert recs[0].source == {"fps": 30}
    assert recs[1].source == {"caption_idx": "-1"}
    assert recs[2].source == {"caption_idx": 1}
    assert recs[3].source == {"data_source": "x", "prompt": "<video>\nDescribe the video in detail."}
    assert recs[3].where == f"{path}:4"
    # A .json file holding one array (LLaVA-Video ships these).
    arr = tmp_path / "in.json"
    arr.write_text(json.dumps(rows[:2]))
    assert [r.caption for r in iter_records(arr)] == CAPTIONS[:2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"video": "a.mp4"}, "no caption"),
        ({"video": "a.mp4", "caption": "   "}, "'caption' is empty"),
        ({"video": "a.mp4", "caption": 3}, "'caption' must be a string"),
        ({"caption": "A dog."}, "no video"),
        ({"video": "a", "captions": []}, "non-empty list"),
        ({"video": "a", "conversations": [{"from": "human", "value": "hi"}]}, "no gpt/assistant turn"),
        ({"video": "a", "caption": "x", "id": [1]}, "'id' must be"),
    ],
)
def test_bad_lines_are_reported_with_file_and_line(tmp_path, line, message) -> None:
    path = _write_lines(
        tmp_path / "in.jsonl", [{"video": "ok.mp4", "caption": "A dog runs to the left."}, "", line]
    )
    recs = list(iter_records(path))
    assert len(recs) == 2 and isinstance(recs[1], InputError)
    assert str(recs[1]).startswith(f"{path}:3: ") and message in str(recs[1])
    if isinstance(line, str):
        try:
            line = json.loads(line)
        except json.JSONDecodeError:
            return
    with pytest.raises(InputError, match=message):
        parse_record(line, "f:1")


def test_make_chains_file_skips_and_counts_bad_lines(tmp_path) -> None:
    rows = [{"video": f"v{i}.mp4", "caption": c} for i, c in enumerate(CAPTIONS)]
    path = _write_lines(tmp_path / "in.jsonl", rows[:2] + ["{bad", {"video": "x"}] + rows[2:])
    out = tmp_path / "out.jsonl"
    s = make_chains_file(path, out, length=5, seed=0)
    assert s.complete and s.chains_written == 4 and s.lines_skipped == 2 and s.records_read == 6
    assert s.skipped[0].startswith(f"{path}:3:") and s.skipped[1].startswith(f"{path}:4:")
    assert sum(s.edit_types.values()) == 16 and s.lengths == {5: 4}
    text = s.format()
    assert "4 written" in text and "2 skipped" in text and "attribute" in text
    recs = list(read_chains(out))
    assert [r["video"] for r in recs] == [f"v{i}.mp4" for i in range(4)]
    for r, caption in zip(recs, CAPTIONS):
        assert r["chain"][0] == caption and len(r["chain"]) == 5 and len(r["edits"]) == 4
        assert set(r["edits"][0]) == {"step", "type", "subtype", "before", "after", "position", "engine"}
    with pytest.raises(InputError, match=r"in\.jsonl:3: invalid JSON"):
        make_chains_file(path, tmp_path / "strict.jsonl", length=5, strict=True)
    assert not (tmp_path / "strict.jsonl").exists()
    assert summarize_chains(out).edit_types == s.edit_types


def test_short_chains_are_summarised_and_dropped(tmp_path) -> None:
    rows = [{"video": "a", "caption": "A dog runs."}, {"video": "b", "caption": "Two cats and 3 dogs."}]
    path = _write_lines(tmp_path / "in.jsonl", rows)
    s = make_chains_file(path, tmp_path / "o.jsonl", length=4, types="count")
    assert s.chains_written == 1 and s.chains_dropped == 1
    assert s.short == {SHORT_NO_SPANS: 2}
    rec = next(read_chains(tmp_path / "o.jsonl"))
    assert rec["short_reason"] == SHORT_NO_SPANS and rec["requested_length"] == 4 and len(rec["chain"]) == 3
    assert "shorter than asked (4): 2" in s.format()


# --------------------------------------------------------------------------------------------------------
# Writer, atomicity and resumption


def _rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [{"video": f"clip{i}.mp4", "caption": rng.choice(CAPTIONS), "n": i} for i in range(n)]


def test_resume_after_an_interruption_never_duplicates(tmp_path) -> None:
    path = _write_lines(tmp_path / "in.jsonl", _rows(12))
    ref = tmp_path / "ref.jsonl"
    make_chains_file(path, ref, length=4, seed=3)
    out = tmp_path / "out.jsonl"

    class Stop(Exception):
        pass

    def crash_after_5(rec: dict) -> None:
        if rec["source"]["n"] == 4:
            raise Stop

    with pytest.raises(Stop):
        make_chains_file(path, out, length=4, seed=3, on_chain=crash_after_5)
    partial = tmp_path / "out.jsonl.partial"
    assert not out.exists() and partial.exists()
    # The process died while writing the next line: a truncated last line.
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"id": "clip5.mp4", "video": "clip5.mp4", "chain": ["A ma')
    s = make_chains_file(path, out, length=4, seed=3)
    assert s.complete and s.chains_resumed == 5 and s.chains_written == 12
    assert not partial.exists()
    got = out.read_text().splitlines()
    assert got == ref.read_text().splitlines()  # same chains, same order, no duplicates
    assert sum(s.edit_types.values()) == 12 * 3


def test_max_chains_stops_and_resumes(tmp_path) -> None:
    path = _write_lines(tmp_path / "in.jsonl", _rows(7))
    out = tmp_path / "out.jsonl"
    s1 = make_chains_file(path, out, length=3, max_chains=3)
    assert not s1.complete and s1.chains_written == 3 and not out.exists()
    assert "INCOMPLETE" in s1.format()
    s2 = make_chains_file(path, out, length=3, max_chains=3)
    assert not s2.complete and s2.chains_written == 6 and s2.chains_resumed == 3
    s3 = make_chains_file(path, out, length=3)
    assert s3.complete and s3.chains_written == 7
    ids = [r["id"] for r in read_chains(out)]
    assert ids == [f"clip{i}.mp4" for i in range(7)]


def test_writer_refuses_to_clobber_and_restarts_on_request(tmp_path) -> None:
    path = _write_lines(tmp_path / "in.jsonl", _rows(3))
    out = tmp_path / "out.jsonl"
    make_chains_file(path, out, length=3)
    with pytest.raises(FileExistsError, match="already exists"):
        make_chains_file(path, out, length=3)
    s = make_chains_file(path, out, length=4, overwrite=True)
    assert s.complete and all(len(r["chain"]) == 4 for r in read_chains(out))
    # resume=False discards a partial output.
    make_chains_file(path, tmp_path / "p.jsonl", length=3, max_chains=2)
    s = make_chains_file(path, tmp_path / "p.jsonl", length=3, resume=False)
    assert s.chains_resumed == 0 and s.chains_written == 3


def test_writer_rejects_corruption_in_the_middle(tmp_path) -> None:
    out = tmp_path / "o.jsonl"
    (tmp_path / "o.jsonl.partial").write_text('{"id": "a", "chain": []}\n{oops\n{"id": "b", "chain": []}\n')
    with pytest.raises(ValueError, match=r"o\.jsonl\.partial:2: corrupt line"):
        ChainWriter(out)
    w = ChainWriter(out, resume=False)
    w.write({"id": "z", "chain": ["x"]})
    assert w.finish() == str(out) and out.read_text() == '{"id": "z", "chain": ["x"]}\n'
    assert not os.path.exists(str(out) + ".partial")


def test_pipeline_argument_errors(tmp_path) -> None:
    path = _write_lines(tmp_path / "in.jsonl", _rows(1))
    with pytest.raises(FileNotFoundError, match="input file not found"):
        make_chains_file(tmp_path / "nope.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="must differ"):
        make_chains_file(path, path)
    with pytest.raises(ValueError, match="engine must be one of"):
        make_chains_file(path, tmp_path / "o.jsonl", engine="magic")
    with pytest.raises(ValueError, match="needs llm_model"):
        make_chains_file(path, tmp_path / "o.jsonl", engine="llm")
    with pytest.raises(ValueError, match="min_length"):
        make_chains_file(path, tmp_path / "o.jsonl", length=3, min_length=4)
    with pytest.raises(FileNotFoundError, match="output directory"):
        make_chains_file(path, tmp_path / "no" / "o.jsonl")


def test_edit_round_trips_through_dict() -> None:
    e = Edit(2, "count", "two", "three", 14, "number", "rules")
    assert Edit.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def _plain_alternation(words):
    """The lexicon regex as it was before the trie: every word in turn, longest first."""
    import re

    alts = sorted({w.lower() for w in words}, key=len, reverse=True)
    body = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in alts)
    return re.compile(rf"(?<![\w'-])(?:{body})(?![\w'-])", re.IGNORECASE)


def test_trie_regexes_match_the_plain_alternation():
    """The lexicon regexes are tries (2-10x faster); they match exactly where the plain longest-first
    alternation matches, on random texts built from the lexicons' words, their prefixes and glue."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from rankloss.chains import taxonomy as T

    tables = {"OBJECT_RE": T.OBJECT_INDEX, "ACTION_RE": T.ACTION_INDEX, "ATTRIBUTE_RE": T.ATTRIBUTE_SUBTYPE,
              "SPATIAL_RE": T.SPATIAL_PAIRS, "TEMPORAL_RE": T.TEMPORAL_PAIRS}  # fmt: skip
    plain = {name: _plain_alternation(words) for name, words in tables.items()}
    vocab = sorted({w for words in tables.values() for w in words})
    phrases = [w for w in vocab if " " in w or "-" in w]  # where a shorter word is a prefix of a longer one
    pieces = st.one_of(
        st.sampled_from(vocab),
        st.sampled_from(phrases),
        st.sampled_from(vocab).map(lambda w: w[: max(1, len(w) // 2)]),  # prefixes
        st.sampled_from(vocab).map(str.upper),
        st.sampled_from(vocab).map(lambda w: w.replace(" ", "  ")),
        st.sampled_from([" ", "  ", "-", "'", ",", ".", "s", "ing", "\n", "é"]),
    )

    @settings(max_examples=300, deadline=None)
    @given(st.lists(pieces, max_size=12))
    @example(["moves ", "left to right", "."])
    @example(["LEFT  TO  THE  RIGHT"])
    def check(parts):
        text = "".join(parts)
        for name, rx in plain.items():
            fast = getattr(T, name)
            assert [m.span() for m in fast.finditer(text)] == [m.span() for m in rx.finditer(text)], (
                name,
                text,
            )

    check()
