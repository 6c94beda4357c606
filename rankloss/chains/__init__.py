"""Caption chains: cumulative degradation of detailed captions, one recorded factual error per step.

A chain ``[y_0, ..., y_{K-1}]`` starts from the correct caption; ``y_k`` holds exactly ``k`` errors,
each recorded as an :class:`Edit` (type, before, after, step) so it can be audited. Two engines:

* :class:`RulesEngine` (``"rules"``): lexicons, sentence/clause swaps and insertion templates;
  deterministic per seed, no model, thousands of captions per second on one core.
* :class:`LLMEngine` (``"llm"``): a local transformers causal LM adds each error; every answer is
  verified, retried a bounded number of times, and the step falls back to ``rules`` when it fails.
* :class:`ServedEngine` (``"openai"``): the same, from a model served over the OpenAI-compatible
  chat-completions API (vLLM, SGLang, TGI, llama.cpp, Ollama), several records concurrently.

Both kinds refuse an edit that makes the caption contradict itself (:func:`contradiction`: such an error
can be spotted without the video).

:func:`make_chains_file` turns a captions JSONL file into a chains JSONL file (atomic, resumable); the
``rankloss chains make`` command wraps it. Formats: :mod:`rankloss.chains.formats`. The taxonomy and
lexicons: :mod:`rankloss.chains.taxonomy`. User documentation: ``docs/chains.md``.
"""

from typing import Any

from .core import SHORT_NO_SPANS, Chain, Edit, TextState, caption_rng, caption_seed, split_sentences
from .formats import (
    CaptionRecord,
    ChainWriter,
    InputError,
    chain_record,
    iter_records,
    parse_record,
    read_chains,
)
from .llm import LLMEngine, build_prompt, clean_output
from .pipeline import ENGINES, make_chains_file, make_engine
from .plausibility import contradiction
from .rules import RulesEngine
from .served import ServedEngine
from .summary import ChainSummary, summarize_chains
from .taxonomy import EDIT_TYPE_DESCRIPTIONS, EDIT_TYPES

__all__ = [
    "EDIT_TYPES",
    "EDIT_TYPE_DESCRIPTIONS",
    "ENGINES",
    "SHORT_NO_SPANS",
    "CaptionRecord",
    "Chain",
    "ChainSummary",
    "ChainWriter",
    "Edit",
    "InputError",
    "LLMEngine",
    "RulesEngine",
    "ServedEngine",
    "TextState",
    "build_prompt",
    "caption_rng",
    "caption_seed",
    "chain_record",
    "clean_output",
    "contradiction",
    "iter_records",
    "make_chain",
    "make_chains_file",
    "make_engine",
    "parse_record",
    "read_chains",
    "split_sentences",
    "summarize_chains",
]


def make_chain(
    caption: str,
    length: int = 6,
    *,
    seed: int = 0,
    key: str | None = None,
    engine: str = "rules",
    **options: Any,
) -> Chain:
    """One chain from one caption: ``make_engine(engine, **options).make_chain(caption, length, ...)``."""
    return make_engine(engine, **options).make_chain(caption, length, seed=seed, key=key)
