"""The llm engine: verification, the accept path (injected generator), retries, and the fallback to rules
with a tiny random-weight causal LM built and saved in the test."""

from __future__ import annotations

import json
import re

import pytest

from rankloss.chains import (
    EDIT_TYPES,
    LLMEngine,
    TextState,
    build_prompt,
    clean_output,
    make_chains_file,
    read_chains,
)

CAPTION = "A man in a red shirt walks a brown dog. Then a green car stops near a white house. The dog barks."
_COLOURS = ("red", "brown", "green", "white", "yellow", "blue")


def _caption_in(prompt: str) -> str:
    return prompt.split("Caption: ", 1)[1].rsplit("\nRewritten caption:", 1)[0]


def _protected_in(prompt: str) -> list[str]:
    m = re.search(r"Do not change these parts: (.*)\.\n", prompt)
    return re.findall(r'"([^"]*)"', m.group(1)) if m else []


def colour_editor(prompt: str, *, seed: int, sample: bool) -> str:
    """A well-behaved 'model': changes the first colour word that no earlier edit produced."""
    text = _caption_in(prompt)
    protected = set(_protected_in(prompt))
    for m in re.finditer(r"\b(" + "|".join(_COLOURS) + r")\b", text):
        if m.group() not in protected:
            return f"Rewritten caption: {text[: m.start()]}purple{text[m.end() :]}\n\nThat is all."
    return text


def test_prompt_and_output_cleaning() -> None:
    p = build_prompt("A dog runs.", "count", ["blue"])
    assert "exactly one new factual error" in p and "number or count" in p
    assert 'Do not change these parts: "blue".' in p and p.endswith(
        "Caption: A dog runs.\nRewritten caption:"
    )
    assert clean_output('  "A cat runs."\n\nExplanation: ...') == "A cat runs."
    assert clean_output("Rewritten caption: A cat\nruns.") == "A cat runs."


def test_accepts_verified_llm_edits() -> None:
    engine = LLMEngine(generate_fn=colour_editor, types=["attribute"], max_retries=0)
    chain = engine.make_chain(CAPTION, 4, seed=0)
    assert chain.fallbacks == 0 and chain.rejections == {}
    assert [e.engine for e in chain.edits] == ["llm"] * 3
    assert [(e.before, e.after) for e in chain.edits] == [
        ("red", "purple"),
        ("brown", "purple"),
        ("green", "purple"),
    ]
    assert chain.captions[-1] == CAPTION.replace("red", "purple").replace("brown", "purple").replace(
        "green", "purple"
    )
    assert engine.llm_edits == 3 and engine.fallbacks == 0
    for k, e in enumerate(chain.edits, 1):
        prev = chain.captions[k - 1]
        assert chain.captions[k] == prev[: e.position] + e.after + prev[e.position + len(e.before) :]


def _state_after_one_edit() -> TextState:
    s = TextState(CAPTION)
    i = CAPTION.index("red")
    s.replace(i, i + 3, "blue")
    return s


@pytest.mark.parametrize(
    ("etype", "answer", "verdict"),
    [
        ("attribute", "", "empty output"),
        ("attribute", None, "unchanged"),
        ("attribute", CAPTION.replace("red", "pink"), "touches an earlier edit"),  # undoes/changes edit 1
        ("attribute", "Something else entirely, nothing like it." * 8, "edit too large"),
        ("omission", CAPTION.replace("The dog barks.", "The dog barks loudly."), "not an omission"),
        ("insertion", CAPTION.replace("brown ", ""), "not an insertion"),
        ("object", CAPTION.replace("A man", "a man"), "not a object edit"),
        ("object", CAPTION.replace("brown dog", "br\ufffdwn dog"), "garbled output"),
        ("object", CAPTION[:40] + " Nothing else happens in this clip at all.", "edit too large"),
        ("order", CAPTION.replace("brown", "gray"), "not a reordering of the sentences"),
    ],
)
def test_verification_rejects(etype: str, answer: str | None, verdict: str) -> None:
    state = _state_after_one_edit()
    engine = LLMEngine(generate_fn=colour_editor)
    assert (
        engine.verify(state, state.text if answer is None else answer.replace("red", "blue"), etype)
        == verdict
    )


def test_verification_accepts_each_shape() -> None:
    state = _state_after_one_edit()
    engine = LLMEngine(generate_fn=colour_editor)
    text = state.text
    cand = engine.verify(state, text.replace("brown dog", "black cat"), "object")
    assert cand[:2] == ("replace", text.index("brown")) and cand[3] == "black cat"
    assert engine.verify(state, text.replace(" green", ""), "omission")[3] == ""
    ins = engine.verify(state, text.replace("The dog barks.", "The dog barks. A bird sings."), "insertion")
    assert ins[3].strip() == "A bird sings." and ins[5] == "sentence"
    sents = [
        "A man in a blue shirt walks a brown dog.",
        "Then a green car stops near a white house.",
        "The dog barks.",
    ]
    swapped = " ".join([sents[0], sents[2], sents[1]])
    cand = engine.verify(state, swapped, "order")
    assert cand[0] == "swap"
    edit = engine._rules.apply(state, cand, 2, engine="llm")
    assert state.text == swapped and edit.type == "order"
    # The swapped sentences cannot be swapped back.
    assert engine.verify(state, " ".join(sents), "order") == "moves an earlier swap"


def test_retries_then_falls_back_to_rules() -> None:
    calls = []

    def stubborn(prompt: str, *, seed: int, sample: bool) -> str:
        calls.append((seed, sample))
        return _caption_in(prompt)  # never changes anything

    engine = LLMEngine(generate_fn=stubborn, max_retries=2)
    chain = engine.make_chain(CAPTION, 4, seed=1)
    assert len(chain.captions) == 4 and chain.fallbacks == 3
    assert chain.rejections == {"unchanged": 9}
    assert all(e.engine == "rules" for e in chain.edits)
    assert [s for _, s in calls] == [False, True, True] * 3  # greedy first, then sampling
    assert len({seed for seed, _ in calls}) == 9
    # Deterministic: the same calls again.
    calls2 = list(calls)
    calls.clear()
    assert (
        LLMEngine(generate_fn=stubborn, max_retries=2).make_chain(CAPTION, 4, seed=1).captions
        == chain.captions
    )
    assert calls == calls2


def test_llm_engine_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of model_path"):
        LLMEngine()
    with pytest.raises(ValueError, match="max_retries"):
        LLMEngine(generate_fn=colour_editor, max_retries=-1)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LLMEngine(str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="callable"):
        LLMEngine(generate_fn="nope")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# A tiny random-weight model, saved and loaded like a real local checkpoint.


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("tiny_llm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [CAPTION]
    corpus += [build_prompt(CAPTION, t) for t in EDIT_TYPES]
    tok.train_from_iterator(corpus * 4, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf_tok.save_pretrained(path)
    cfg = transformers.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_tiny_random_model_falls_back_and_is_counted(tiny_model_dir: str, tmp_path) -> None:
    engine = LLMEngine(tiny_model_dir, max_new_tokens=12, max_retries=1, device="cpu")
    chain = engine.make_chain(CAPTION, 3, seed=0)
    # Random weights never produce a caption that passes verification: every step fell back.
    assert len(chain.captions) == 3 and chain.fallbacks == 2 and sum(chain.rejections.values()) == 4
    assert all(e.engine == "rules" for e in chain.edits)
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"video": f"v{i}.mp4", "caption": CAPTION}) for i in range(2)) + "\n")
    s = make_chains_file(
        inp,
        tmp_path / "out.jsonl",
        length=3,
        engine="llm",
        llm_model=tiny_model_dir,
        max_new_tokens=8,
        max_retries=0,
    )
    assert s.complete and s.chains_written == 2 and s.llm_fallbacks == 4 and s.llm_edits == 0
    assert sum(s.llm_rejections.values()) == 4
    assert "4 fallbacks to rules" in s.format()
    assert [r["llm_fallbacks"] for r in read_chains(tmp_path / "out.jsonl")] == [2, 2]


@pytest.mark.parametrize(
    ("etype", "old", "new", "kind"),
    [
        ("action", "walks a brown dog", "swims a brown dog", None),  # a man may swim: accepted
        ("object", "a white house", "a white swimming pool", None),
        ("action", "The dog barks.", "The dog barks. A small blue cup swims.", "verb_subject"),
        ("attribute", "a green car", "a white and white car", "relation"),
    ],
)
def test_verification_rejects_self_contradictions(etype: str, old: str, new: str, kind: str | None) -> None:
    """An LLM edit that makes the caption contradict itself (spotted without the video) is rejected with
    the contradiction's kind as its reason, so it is retried and counted (issue 22)."""
    state = _state_after_one_edit()
    engine = LLMEngine(generate_fn=colour_editor)
    if etype == "action" and kind is not None:
        etype = "insertion"
    verdict = engine.verify(state, state.text.replace(old, new), etype)
    if kind is None:
        assert isinstance(verdict, tuple), verdict
    else:
        assert isinstance(verdict, str) and verdict.startswith(kind), verdict
