"""ChainCollator on the inputs a bad-input trial found wanting (issue 21): completions that truncation
(or the data, or the tokenizer) makes identical within a chain, chat templates that raise, errors that
name the record's id, and the tokenizer's memo bounded by bytes."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rankloss.chains import RulesEngine  # noqa: E402
from rankloss.integrations import ChainCollator  # noqa: E402
from rankloss.integrations.tokenization import ChainTokenizer  # noqa: E402
from rankloss.train.model import train_tokenizer  # noqa: E402

CAPTIONS = [
    "A man in a red jacket walks a brown dog along a wet street while cars pass slowly behind him.",
    "Two children kick a yellow ball across a green field as a woman watches from a bench.",
    "A chef slices onions on a wooden board, then pushes them into a hot pan with a knife.",
    "A cat jumps onto a table, knocks a cup over and runs out of the kitchen.",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS + ["Describe this video in detail."], 400)


def _chains(n: int = 4, length: int = 6) -> list[list[str]]:
    engine = RulesEngine()
    return [
        engine.make_chain(CAPTIONS[i % len(CAPTIONS)], length, seed=0, key=str(i)).captions for i in range(n)
    ]


def _rows(batch):
    """Each chain's completions as tuples of scored token ids."""
    out, start = [], 0
    for k in batch["chain_sizes"].tolist():
        rows = []
        for s in range(start, start + k):
            lab = batch["completion_labels"][s]
            rows.append(tuple(lab[lab != -100].tolist()))
        out.append(rows)
        start += k
    return out


def test_truncation_never_gives_identical_rows(tok):
    """A 6-caption rules chain cut to 12 tokens made rows (0,1), (2,3), (4,5) identical before."""
    records = [{"id": f"c{i}", "completions": c} for i, c in enumerate(_chains())]
    collate = ChainCollator(tok, max_completion_length=12)
    with pytest.warns(UserWarning, match=r"records\[0\] \(id 'c0'\).*dropped"):
        batch = collate(records)
    for rows in _rows(batch):
        assert len(set(rows)) == len(rows)
    dropped = batch["dropped_completions"]
    assert dropped.shape == batch["chain_sizes"].shape
    assert int(dropped.sum()) > 0
    assert (batch["chain_sizes"] + dropped).tolist() == [6] * len(records)
    # the warning is shown once per collator, not once per record or batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate(records)


def test_without_truncation_the_chains_are_whole(tok):
    records = [{"completions": c} for c in _chains()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = ChainCollator(tok)(records)
    assert batch["chain_sizes"].tolist() == [6] * 4
    assert batch["dropped_completions"].tolist() == [0] * 4


def test_dropped_completion_takes_its_ref_score_along(tok):
    rec = {
        "id": "dup",
        "completions": ["a cat jumps.", "a dog runs.", "a cat jumps.", "a man walks."],
        "ref_scores": [-1.0, -2.0, -3.0, -4.0],
    }
    with pytest.warns(UserWarning, match="the same text"):
        batch = ChainCollator(tok)([rec])
    assert batch["chain_sizes"].tolist() == [3]
    assert batch["dropped_completions"].tolist() == [1]
    assert batch["ref_scores"].tolist() == [-1.0, -2.0, -4.0]
    expected = [tuple(tok.encode(c, add_special_tokens=False) + [tok.eos_token_id]) for c in
                ("a cat jumps.", "a dog runs.", "a man walks.")]  # fmt: skip
    assert _rows(batch)[0] == expected


def test_texts_the_tokenizer_maps_to_the_same_tokens(tok):
    # characters the tokenizer never saw all become <|unk|>
    rec = {"id": 7, "completions": ["東京", "大阪"]}
    assert tok("東京")["input_ids"] == tok("大阪")["input_ids"]
    collate = ChainCollator(tok)
    with pytest.warns(UserWarning, match="tokenizer maps their texts to the same tokens"):
        batch = collate([rec])
    assert batch["chain_sizes"].tolist() == [1]
    assert collate.check_record(rec) == (1, [(1, 0)])


def test_duplicates_error_names_record_and_completions(tok):
    records = [{"id": "ok", "completions": ["a cat.", "a dog."]},
               {"id": "bad", "completions": _chains(1)[0]}]  # fmt: skip
    collate = ChainCollator(tok, max_completion_length=12, duplicates="error")
    match = (r"records\[1\] \(id 'bad'\): completions \d+ and \d+ are token-identical "
             r"after truncation to max_completion_length=12.*duplicates='drop'")  # fmt: skip
    with pytest.raises(ValueError, match=match):
        collate(records)


def test_duplicates_keep_scores_every_completion(tok):
    rec = {"completions": ["a cat.", "a cat.", "a dog."], "ref_scores": [1.0, 2.0, 3.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = ChainCollator(tok, duplicates="keep")([rec])
    assert batch["chain_sizes"].tolist() == [3]
    assert batch["dropped_completions"].tolist() == [0]
    assert batch["ref_scores"].tolist() == [1.0, 2.0, 3.0]


def test_duplicates_option_is_checked(tok):
    with pytest.raises(
        ValueError, match=r"duplicates must be one of \('drop', 'error', 'keep'\), got 'skip'"
    ):
        ChainCollator(tok, duplicates="skip")


def test_check_record_does_not_load_media(tok):
    """check_record is the cheap pass a trainer runs over a whole dataset: no media file is opened."""
    from rankloss.train.model import build_tiny_processor

    processor = build_tiny_processor(tok, 56)
    rec = {"id": "v", "videos": ["/no/such/video.mp4"], "completions": ["a cat.", "a cat.", "a dog."]}
    collate = ChainCollator(processor, num_frames=4)
    assert collate.check_record(rec, 5) == (2, [(1, 0)])
    with pytest.raises(FileNotFoundError):
        collate([rec])
    with pytest.raises(ValueError, match=r"records\[5\]\['completions'\] is an empty list"):
        collate.check_record({"completions": []}, 5)


def test_errors_name_the_record_id(tok):
    records = [{"id": "fine", "completions": ["a cat."]}, {"id": "x-17", "completions": ["a dog.", ""]}]
    with pytest.raises(
        ValueError, match=r"records\[1\]\['completions'\]\[1\] is an empty string.*\(id 'x-17'\)"
    ):
        ChainCollator(tok)(records)


def test_a_chat_template_that_raises_is_named(tok):
    t = train_tokenizer(CAPTIONS, 400)
    # Gemma's and Mistral's templates raise on roles they do not know
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rec = {
        "id": "sys",
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "describe"}],
        "completions": [
            [{"role": "assistant", "content": "a cat."}],
            [{"role": "assistant", "content": "a dog."}],
        ],
    }
    match = (r"records\[0\]\['prompt'\]: the chat template .* refused the messages "
             r"\(roles \['system', 'user'\]\).*user/assistant.*\(id 'sys'\)")  # fmt: skip
    with pytest.raises(ValueError, match=match) as info:
        ChainCollator(t)([rec])
    assert info.value.__cause__ is not None


def test_memo_is_bounded_by_bytes(tok):
    text = ChainTokenizer(tok, memo_bytes=20_000)
    captions = [f"{c} number {i}" for i in range(200) for c in CAPTIONS[:1]]
    first = [text.token_ids(c, add_eos=True) for c in captions]
    assert 0 < len(text._token_cache) < len(captions)
    assert text._token_bytes <= 20_000
    # what is cached and what is not give the same ids, as fresh lists the caller may change
    again = [text.token_ids(c, add_eos=True) for c in captions]
    assert again == first
    again[0].append(-1)
    assert text.token_ids(captions[0], add_eos=True) == first[0]
    # a 120-token completion costs well under the 5.5 kB a list of Python ints did
    long = " ".join(CAPTIONS * 2)
    before = text._token_bytes
    big = ChainTokenizer(tok)
    big.token_ids(long, add_eos=True)
    n = len(big._token_cache[(long, True)])
    assert n > 60
    assert big._token_bytes < 4 * n + len(long) + 400
    assert text._token_bytes == before
    with pytest.raises(ValueError, match="memo_bytes must be an int >= 0"):
        ChainTokenizer(tok, memo_bytes=-1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    cut=st.one_of(st.none(), st.integers(1, 40)),
    mode=st.sampled_from(["drop", "keep"]),
)
def test_random_truncation_keeps_chains_sound(tok, data, cut, mode):
    """Chains through the collator under random truncation: no two kept rows of a chain are identical
    (drop), the kept rows are the chain's in order, and every completion is kept or counted."""
    engine = RulesEngine()
    B = data.draw(st.integers(1, 3))
    records = []
    for b in range(B):
        base = data.draw(st.sampled_from(CAPTIONS))
        length = data.draw(st.integers(2, 6))
        caps = engine.make_chain(base, length, seed=data.draw(st.integers(0, 50)), key=str(b)).captions
        if data.draw(st.booleans()):  # a duplicate given by the data
            caps = caps + [caps[data.draw(st.integers(0, len(caps) - 1))]]
        refs = [float(-k) for k in range(len(caps))]
        records.append({"id": f"r{b}", "completions": caps, "ref_scores": refs})
    collate = ChainCollator(tok, max_completion_length=cut, duplicates=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = collate(records)
    rows = _rows(batch)
    start = 0
    for rec, kept, dropped in zip(records, rows, batch["dropped_completions"].tolist()):
        full = [
            tuple((tok.encode(c, add_special_tokens=False) + [tok.eos_token_id])[:cut])
            for c in rec["completions"]
        ]
        assert len(kept) + dropped == len(full)
        if mode == "drop":
            assert len(set(kept)) == len(kept)
            expected = list(dict.fromkeys(full))
            assert set(full) == set(kept)
        else:
            assert dropped == 0
            expected = full
        assert kept == expected
        refs = batch["ref_scores"][start : start + len(kept)].tolist()
        assert refs == [rec["ref_scores"][full.index(r)] if mode == "drop" else rec["ref_scores"][i]
                        for i, r in enumerate(kept)]  # fmt: skip
        assert collate.check_record(rec)[0] == len(kept)
        start += len(kept)
    assert torch.equal(batch["completion_input_ids"][batch["completion_labels"] != -100],
                       batch["completion_labels"][batch["completion_labels"] != -100])  # fmt: skip


def test_chains_file_with_one_distinct_caption_is_skipped_and_counted():
    pytest.importorskip("datasets")
    from rankloss.integrations import load_chain_dataset

    records = [{"id": "a", "chain": ["one", "one", "one"]}, {"id": "b", "chain": ["one", "two", "two"]}]
    with pytest.warns(UserWarning, match=r"skipped 1 chain\(s\) with fewer than 2 distinct captions"):
        ds = load_chain_dataset(records)
    assert ds["id"] == ["b"]
