"""The prompt/completion boundary: rankloss's convention (``separate``), TRL's (``joint``), and the
warning, counted, when a tokenizer merges the end of the prompt with the start of a completion."""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from rankloss.integrations import tokenization  # noqa: E402
from rankloss.integrations.tokenization import ChainTokenizer  # noqa: E402

CORPUS = ["clip:the dog runs", "clip:the cat sits", "clip: the dog", "clip:the red ball"] * 20


def merging_tokenizer(bos: bool = True):
    """A BPE whose words start at spaces (``Metaspace``, no dummy prefix), so merges cross a
    prompt/completion boundary with no space at it: ``"clip:"`` + ``"the ..."`` gives ``"clip:the"``-style
    tokens, while ``"clip:"`` + ``" the ..."`` does not merge."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # words start at spaces
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    )
    if bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def trl_dpo_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """An exact emulation of TRL 1.x ``DPOTrainer._prepare_dataset`` for a string (non-conversational)
    example: the EOS text is appended to the completion unless it ends with it, then ``prompt_ids =
    tok(text=prompt)``, ``prompt_chosen_ids = tok(text=prompt + chosen)`` (special tokens added),
    ``chosen_ids = prompt_chosen_ids[len(prompt_ids):]``."""
    if not completion.endswith(tokenizer.eos_token):
        completion = completion + tokenizer.eos_token
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    full = tokenizer(text=prompt + completion)["input_ids"]
    return list(prompt_ids), list(full[len(prompt_ids) :])


@pytest.fixture(autouse=True)
def _fresh_warning_flag(monkeypatch):
    monkeypatch.setattr(tokenization, "_warned_boundary", False)


def completion(tok: ChainTokenizer, text: str, prompt_text: str = "clip:") -> tuple[str, list[int]]:
    prompt, msgs = tok.prompt(0, {"prompt": prompt_text}, 0, 0, False, "")
    return prompt, tok.completion_ids("records[0]['completions'][0]", text, prompt, msgs)


def test_tokenizer_really_merges_across_the_boundary():
    hf = merging_tokenizer()
    sep = (
        hf("clip:", add_special_tokens=False)["input_ids"]
        + hf("the dog", add_special_tokens=False)["input_ids"]
    )
    assert hf("clip:the dog", add_special_tokens=False)["input_ids"] != sep


def test_separate_is_the_completion_tokenised_alone_and_warns_once_counted():
    hf = merging_tokenizer()
    tok = ChainTokenizer(hf)
    assert tok.boundary == "separate"
    with pytest.warns(UserWarning, match=r"records\[0\]\['completions'\]\[0\].*boundary='joint'"):
        prompt, ids = completion(tok, "the dog runs")
    assert prompt == "<s>clip:"
    assert ids == hf("the dog runs", add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process: no second warning
        completion(tok, "the cat sits")
        completion(tok, "the dog runs")  # memoised, still counted
        other = ChainTokenizer(hf)
        completion(other, "the red ball")
    assert tok.boundary_merges == 3
    assert other.boundary_merges == 1


def test_joint_gives_trl_dpo_token_ids():
    hf = merging_tokenizer()
    tok = ChainTokenizer(hf, boundary="joint")
    with pytest.warns(UserWarning, match="not a prefix"):  # where TRL warns too
        completion(tok, "the dog runs")
    for text in ["the dog runs", "the cat sits", " the dog", "the red ball"]:
        prompt, ids = completion(tok, text)
        trl_prompt, trl_completion = trl_dpo_ids(hf, "clip:", text)
        assert hf(prompt, add_special_tokens=False)["input_ids"] == trl_prompt  # the collator's prompt ids
        assert ids == trl_completion, text
    assert tok.boundary_merges >= 1


def test_joint_and_separate_differ_only_where_the_tokenizer_merges():
    hf = merging_tokenizer()
    sep, joint = ChainTokenizer(hf), ChainTokenizer(hf, boundary="joint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = completion(sep, "the dog runs")[1], completion(joint, "the dog runs")[1]
        apart = completion(sep, " the dog"), completion(joint, " the dog")
    assert merged[0] != merged[1]  # ':the' (or 'p:the') is one token in the joint text
    assert apart[0][1] == apart[1][1]
    assert sep.merges_at_boundary("clip:", "the dog") and not sep.merges_at_boundary("clip:", " the dog")
    assert sep.merges_at_boundary("clip: ", "the dog")  # a trailing space merges with the next word


def test_documented_ids_for_a_separator_tokenizer():
    """A completion that starts with a space: both conventions give the same ids (the completion's tokens
    alone, then EOS, which are TRL's), and nothing is warned or counted."""
    hf = merging_tokenizer(bos=False)
    for boundary in ("separate", "joint"):
        tok = ChainTokenizer(hf, boundary=boundary)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            prompt, ids = completion(tok, " the dog")
        assert ids == hf(" the dog", add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
        assert ids == trl_dpo_ids(hf, "clip:", " the dog")[1]
        assert tok.boundary_merges == 0


def test_boundary_option_is_checked():
    with pytest.raises(ValueError, match="boundary must be one of"):
        ChainTokenizer(merging_tokenizer(), boundary="trl")


def test_documented_token_ids_of_both_conventions():
    """The README's example: prompt ``"clip:"``, completion ``"the dog runs"``. rankloss scores
    ``the ▁dog ▁runs </s>`` after the prompt ``<s> clip:``; TRL tokenises ``<s> clip:the ▁dog ▁runs </s>``,
    keeps the prompt's own ``<s> clip:`` and scores what follows its length: ``▁dog ▁runs </s>``, so the
    word "the" is neither scored nor seen by the model."""
    hf = merging_tokenizer()
    names = hf.convert_ids_to_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompt, separate = completion(ChainTokenizer(hf), "the dog runs")
        _, joint = completion(ChainTokenizer(hf, boundary="joint"), "the dog runs")
    assert names(hf(prompt, add_special_tokens=False)["input_ids"]) == ["<s>", "clip:"]
    assert names(separate) == ["the", "\u2581dog", "\u2581runs", "</s>"]
    assert names(joint) == ["\u2581dog", "\u2581runs", "</s>"]
    assert joint == trl_dpo_ids(hf, "clip:", "the dog runs")[1]


def test_collator_and_config_take_the_convention():
    """ChainCollator(boundary=...) and ChainRankConfig(boundary=...) reach the tokenizer; the batch's
    completion rows are TRL's completion ids with boundary='joint'."""
    from rankloss.integrations import ChainCollator, ChainRankConfig

    tok = merging_tokenizer()
    rec = {"prompt": "clip:", "completions": ["the dog runs", "the cat runs"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint = ChainCollator(tok, boundary="joint")([rec])
    assert joint["completion_labels"][0][joint["completion_labels"][0] != -100].tolist() == (
        trl_dpo_ids(tok, "clip:", "the dog runs")[1]
    )
    with pytest.raises(ValueError, match="boundary must be 'separate' or 'joint', got 'trl'"):
        ChainRankConfig(output_dir="/tmp/rankloss-boundary-test", use_cpu=True, boundary="trl")
