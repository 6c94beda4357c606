"""rankloss inside other trainers: any supported Hugging Face causal LM or VLM, the prompt (and its
images or video) encoded once per chain, and a ``transformers.Trainer`` that needs no glue.

The parts, one module each:

* :mod:`~rankloss.integrations.families` (one module per model family, ``families/*.py``): how a
  family's model is called: which module runs the prompt with its media, which runs the text, what
  positions the captions take (1-D RoPE or Qwen's multimodal RoPE), the LM head and its soft-cap.
* :mod:`~rankloss.integrations.layout`: the chain tree, a chain batch packed into one padding-free row
  (each prompt and its media once, its ``K`` completions behind it), the tree rule of who attends to
  whom, positions and the scored states.
* :mod:`~rankloss.integrations.attention`: the tree attention, one function registered with
  transformers' ``AttentionInterface`` and set on the text model only (flash-attn's varlen kernel,
  flex attention or SDPA).
* :mod:`~rankloss.integrations.forward`: :class:`ChainForward`, the model-agnostic chain forward: the
  chain tree through the model in one ordinary forward (the vision encoder once per video, the prompt
  once per chain, gradient checkpointing or not), and the final hidden states of the scored completion
  tokens only (logits are never built); the chain loss, scores and metrics on top of them.
* :mod:`~rankloss.integrations.collator`: chain records in TRL's shape (``prompt`` or conversational
  ``messages``, ``images`` / ``videos``, ``completions`` ranked best first) to a chain batch.
* :mod:`~rankloss.integrations.trainer`: :class:`ChainRankConfig` and :class:`ChainRankTrainer`.
* :mod:`~rankloss.integrations.generation`: greedy captions of eval records with their references
  (:func:`generate_captions`) and :class:`GenerationEvalCallback`, which writes and scores them at every
  ``evaluate()``.
* :mod:`~rankloss.integrations.judge`: the scorers of generated captions: :class:`EventJudge` (event-level
  precision / recall / F1 in the AutoDQ style through an OpenAI-compatible endpoint) and
  :class:`LexicalScorer` (the weaker content-word fallback).

**The chain batch** (a flat ``dict``, what the collator returns and the chain forward reads):

=========================  ==========  ==========================================================
key                        shape       meaning
=========================  ==========  ==========================================================
``prompt_input_ids``       ``[B, P]``  each chain's prompt (media placeholders expanded by the
                                       processor), **left**-padded with the pad id
``prompt_attention_mask``  ``[B, P]``  1 at real prompt tokens
``completion_input_ids``   ``[S, L]``  the ``S = sum_b K_b`` completions, chain after chain, best
                                       first within a chain, each ending with the end token,
                                       **right**-padded
``completion_labels``      ``[S, L]``  ``completion_input_ids`` with ``-100`` at padding (and at any
                                       token that is not scored); aligned: the hidden state at
                                       ``[s, t]`` scores ``completion_labels[s, t]``
``chain_sizes``            ``[B]``     ``K_b``, completions of chain ``b`` (``>= 1``)
``dropped_completions``    ``[B]``     optional: completions of chain ``b`` the collator dropped as
                                       token-identical to a better-ranked one (not read by the model)
``completion_index``       ``[S]``     optional: each completion's index in its record (not read
                                       by the model)
``chain_edit_types``       list of B   optional: per chain, per completion, the type of the edit
                                       that made it (``None``: first or unknown; not a tensor)
``ref_scores``             ``[S]``     optional: the reference model's summed log-probs
``chain_ids``              list of B   optional: the records' ids (not a tensor)
``chain_tree``                         optional: the batch as one packed row, each prompt once
                                       (:class:`~rankloss.integrations.layout.ChainTree`; the
                                       collator adds it, the chain forward builds it otherwise)
media keys                             the processor's other outputs for the prompts, unchanged:
                                       ``pixel_values``, ``pixel_values_videos``,
                                       ``image_grid_thw``, ``video_grid_thw``,
                                       ``second_per_grid_ts``, ``mm_token_type_ids`` (``[B, P]``,
                                       padded like the prompt), ``image_sizes``, ...
=========================  ==========  ==========================================================
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "ChainForward": "forward",
    "ChainRankModel": "forward",
    "LMHead": "forward",
    "LossSpec": "forward",
    "chain_hidden_states": "forward",
    "keep_precision": "forward",
    "Uncast": "forward",
    "ChainStates": "forward",
    "ChainTree": "layout",
    "build_chain_tree": "layout",
    "Family": "families",
    "get_family": "families",
    "register_family": "families",
    "supported_model_types": "families",
    "ChainCollator": "collator",
    "load_chain_dataset": "collator",
    "ChainRankConfig": "trainer",
    "ChainRankTrainer": "trainer",
    "leave_process_group": "trainer",
    "GenerationEvalCallback": "generation",
    "add_generation_eval": "generation",
    "generate_captions": "generation",
    "EventJudge": "judge",
    "LexicalScorer": "judge",
    "GenerationScores": "judge",
    "JudgeError": "judge",
}

#: Keys of a chain batch that are not media (every other tensor key goes to the model with the prompt).
CHAIN_KEYS = (
    "prompt_input_ids",
    "prompt_attention_mask",
    "completion_input_ids",
    "completion_labels",
    "chain_sizes",
    "dropped_completions",
    "completion_index",
    "chain_edit_types",
    "ref_scores",
    "chain_ids",
    "chain_tree",
)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
