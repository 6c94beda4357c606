"""Model families: how :class:`~rankloss.integrations.ChainForward` calls a Hugging Face model.

A :class:`Family` answers five questions about a model, and nothing else is model-specific in rankloss:

1. which module runs the prompt with its media (:meth:`Family.prompt_module`: the VLM's base model, which
   runs the vision encoder and merges its output into the placeholder tokens; for a text-only LM the
   decoder itself) and which runs text alone (:meth:`Family.text_module`, the decoder);
2. what positions prompt and completion tokens take (:meth:`Family.prompt_positions`,
   :meth:`Family.completion_positions`): ``cumsum(mask) - 1`` for 1-D RoPE, the model's own
   ``get_rope_index`` for Qwen's multimodal RoPE, where completion token ``t`` sits at the prompt's next
   position ``+ t`` on every axis;
3. the LM head (:meth:`Family.head`: weight, bias, final-logit soft-cap);
4. how the media of a batch are repeated for full-sequence rows (:meth:`Family.select_media`), and which
   media keys hold one value per prompt token (:attr:`Family.token_keys`, laid out with the prompt in
   the chain tree);
5. whether the chain tree (each prompt once) is tested for it (:attr:`Family.shares_prefix`).

One module per family: :mod:`.causal_lm` (text-only decoders), :mod:`.qwen_vl` (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL), :mod:`.llava` (LLaVA-OneVision, LLaVA-NeXT-Video), :mod:`.idefics` (SmolVLM, Idefics3).
:func:`register_family` adds a family. Attention is not a family's business: the chain tree's attention
goes through transformers' ``AttentionInterface`` (:mod:`rankloss.integrations.attention`), so sliding
windows and soft-caps come from the model's own layers.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Family",
    "LMHead",
    "assign_items",
    "get_family",
    "model_type_of",
    "register_family",
    "repeat_per_prompt",
    "supported_model_types",
]


@dataclass(frozen=True)
class LMHead:
    """The output layer: ``logits = softcap * tanh((h W^T + b) / softcap)`` (no cap when ``None``)."""

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / torch.compile / accelerate wrappers and PEFT's ``PeftModel`` (whose adapter
    layers live inside the base model, so calling the base model's modules runs them)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and callable(getattr(type(model), "get_base_model", None)):
            inner = model.get_base_model()
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner


def model_type_of(model: nn.Module) -> str:
    config = getattr(_unwrap(model), "config", None)
    if config is None:
        raise TypeError(
            f"model must be a Hugging Face PreTrainedModel with a .config, got {type(model).__name__}"
        )
    return str(getattr(config, "model_type", None))


class Family:
    """Defaults for a text-only decoder with 1-D RoPE (Llama and its descendants)."""

    #: ``config.model_type`` values this family handles.
    model_types: tuple[str, ...] = ()
    #: ``"1d"`` or ``"mrope"`` (Qwen's 3-axis multimodal RoPE).
    rope: str = "1d"
    #: Whether the prompt may carry media (then the prompt runs through :meth:`prompt_module`).
    multimodal: bool = False
    #: Whether the chain tree (each prompt once, :mod:`~rankloss.integrations.layout`) is tested for this
    #: family; otherwise every completion runs behind its own copy of the prompt.
    shares_prefix: bool = True
    #: Media keys that hold one value per prompt token (``[B, P]``, padded like the prompt): the chain
    #: forward lays them out with the prompt tokens (0 at completion tokens).
    token_keys: tuple[str, ...] = ("mm_token_type_ids", "token_type_ids")

    # ---- modules ---------------------------------------------------------------------------------------
    def text_module(self, model: nn.Module) -> nn.Module:
        """The decoder: token ids (or embeddings), positions, mask and cache in, ``last_hidden_state`` out."""
        return model.get_decoder()

    def prompt_module(self, model: nn.Module) -> nn.Module:
        """The module the prompt runs through with its media (``model.model`` for a VLM)."""
        return model.model if self.multimodal else self.text_module(model)

    def text_config(self, model: nn.Module) -> Any:
        return model.config.get_text_config(decoder=True)

    def vision_modules(self, model: nn.Module) -> list[nn.Module]:
        """The vision encoder(s) (not the projector that maps their features into the LLM): what
        ``freeze_vision`` freezes and ``vision_lr`` applies to. Empty for a text-only model."""
        base = getattr(model, "model", model)
        return [getattr(base, n) for n in ("visual", "vision_tower", "vision_model") if hasattr(base, n)]

    def head(self, model: nn.Module) -> LMHead:
        out = model.get_output_embeddings()
        if out is None or not isinstance(getattr(out, "weight", None), Tensor):
            raise TypeError(f"{type(model).__name__} has no output embeddings (LM head) to score with")
        cap = getattr(self.text_config(model), "final_logit_softcapping", None)
        return LMHead(out.weight, getattr(out, "bias", None), float(cap) if cap else None)

    # ---- positions ---------------------------------------------------------------------------------------
    def prompt_positions(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """``(positions, next_positions [B])`` of the left-padded prompts: ``[B, P]`` for 1-D RoPE."""
        mask = batch["prompt_attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, mask.long().sum(-1)

    def completion_positions(self, next_positions: Tensor, owner: Tensor, length: int) -> Tensor:
        """Positions ``[S, L]`` (``[3, S, L]`` for mRoPE) of the completions: the next prompt position + t."""
        pos = next_positions[owner][:, None] + torch.arange(length, device=next_positions.device)[None, :]
        return pos.expand(3, *pos.shape) if self.rope == "mrope" else pos

    def cat_positions(self, prompt: Tensor, owner: Tensor, completion: Tensor) -> Tensor:
        """Positions of full ``[prompt, completion]`` rows."""
        if self.rope == "mrope":
            return torch.cat([prompt[:, owner], completion], 2)
        return torch.cat([prompt[owner], completion], 1)

    # ---- media -------------------------------------------------------------------------------------------
    def media(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The batch's media keys (every key outside the chain contract), passed to the prompt module."""
        from .. import CHAIN_KEYS

        out = {k: v for k, v in batch.items() if k not in CHAIN_KEYS and v is not None}
        if out and not self.multimodal:
            raise ValueError(
                f"the batch has media keys {sorted(out)} but the model family {type(self).__name__} is "
                "text-only"
            )
        return out

    def prompt_media(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Media keyword arguments of the prompt module for the ``B`` prompts."""
        return self.media(batch)

    def select_media(self, model: nn.Module, batch: Mapping[str, Any], owner: Tensor) -> dict[str, Any]:
        """Media keyword arguments for ``S`` full-sequence rows, row ``s`` being prompt ``owner[s]``
        (the media repeated; the completions are text)."""
        media = self.prompt_media(model, batch)
        if media:
            raise NotImplementedError(f"{type(self).__name__} cannot repeat media for full sequences")
        return media


def assign_items(placeholders: list[int], item_tokens: list[int], what: str) -> list[int]:
    """The prompt of each media item, items in prompt order: the model fills each prompt's placeholder
    tokens (``placeholders[b]`` of them) with the items' features in order, ``item_tokens[i]`` tokens
    for item ``i``; raises ``ValueError`` (naming ``what``) when they do not fit exactly."""
    need = list(placeholders)
    out: list[int] = []
    b = 0
    for i, n in enumerate(item_tokens):
        while b < len(need) and need[b] == 0:
            b += 1
        if b == len(need) or n > need[b]:
            raise ValueError(
                f"full-sequence rows need each {what}'s prompt: {what} {i} takes {n} placeholder tokens, "
                f"but the prompts have {placeholders} {what} placeholder tokens"
            )
        need[b] -= n
        out.append(b)
    if any(need):
        raise ValueError(
            f"the prompts have {placeholders} {what} placeholder tokens, but the {what}s take {item_tokens}"
        )
    return out


def repeat_per_prompt(family: Family, key: str, value: Any, owner: Tensor, num_prompts: int) -> Any:
    """A media value for full-sequence rows: a tensor with one row per prompt is indexed by ``owner``;
    non-tensors pass unchanged; any other tensor is an error naming ``key``."""
    if not isinstance(value, Tensor):
        return value
    if value.dim() > 0 and value.shape[0] == num_prompts:
        return value[owner.to(value.device)]
    rows = value.shape[0] if value.dim() else 0
    raise ValueError(
        f"{type(family).__name__} cannot repeat the media key {key!r} ({rows} rows for {num_prompts} "
        "prompts) for full sequences"
    )


_REGISTRY: dict[str, Family] = {}
_MODULES = ("causal_lm", "qwen_vl", "llava", "idefics")
_LOADED = False


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Register ``family`` for each of its ``model_types`` (``replace=True`` to override a built-in)."""
    for model_type in family.model_types:
        if model_type in _REGISTRY and not replace:
            raise ValueError(
                f"model_type {model_type!r} already has the family {type(_REGISTRY[model_type]).__name__}; "
                "pass replace=True to override it"
            )
        _REGISTRY[model_type] = family
    return family


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for name in _MODULES:
            importlib.import_module(f"{__name__}.{name}")


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` with a registered family."""
    _load()
    return sorted(_REGISTRY)


def get_family(model: nn.Module | str) -> Family | None:
    """The family of ``model`` (a model or its ``model_type``), ``None`` when none is registered."""
    _load()
    model_type = model if isinstance(model, str) else model_type_of(model)
    return _REGISTRY.get(model_type)
