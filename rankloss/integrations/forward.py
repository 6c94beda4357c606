"""The model-agnostic chain forward: a Hugging Face model and a chain batch in, the final hidden states of
the scored completion tokens out (``[S, L, D]``, aligned with ``completion_labels``); logits are never
built. The loss, scores and metrics come from :func:`rankloss.fused_linear_chain_loss` on those states
and the model's LM head.

**Shared prefix** (the default where exact): the prompt runs once per chain through the family's prompt
module (the vision encoder once per image or video, its features merged into the placeholder tokens,
Qwen3-VL's deepstack features added inside the same call) with a KV cache; the cache's rows are repeated
for the ``K`` completions of each chain (``DynamicCache.batch_select_indices``), and the completions run
through the decoder against it. Gradients of every completion flow back through the cache into the
prompt and the vision encoder, so loss and gradients equal those of ``K`` independent full-sequence
forwards (tests/test_integrations.py checks this for every family in float64).

**Full sequences** (``share_prefix=False``, and the fallback): each completion runs behind its own copy
of the prompt and media. The forward falls back, with one warning, when sharing would not be exact or
possible: a sliding-window layer whose window the prompt exceeds, gradient checkpointing (transformers
drops the cache of checkpointed layers), or a model type without a tested family (text-only decoders;
an unknown multimodal model is an error naming its ``model_type``).

**Generation** (:meth:`ChainForward.generate`, ``ChainRankModel(..., mode="generate")``): greedy decoding
with the same pieces: the prompt once through the prompt module with a KV cache, each new token through
the text module at the positions the completions take, the LM head (with its soft-cap); so each greedy
token is the argmax of the very forward that scores and trains the completions.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..fused_losses import fused_linear_chain_loss, sequence_scores
from ..outputs import ChainLossOutput
from .families import Family, LMHead, _unwrap, get_family, model_type_of, supported_model_types

__all__ = ["ChainForward", "ChainRankModel", "LMHead", "LossSpec", "chain_hidden_states"]

IGNORE_INDEX = -100
_WARNED: set[tuple[str, str]] = set()


def _warn_once(model_type: str, reason: str, message: str) -> None:
    if (model_type, reason) not in _WARNED:
        _WARNED.add((model_type, reason))
        warnings.warn(message, stacklevel=3)


def _has_media_config(model: nn.Module) -> bool:
    cfg = model.config
    return any(getattr(cfg, k, None) is not None for k in ("vision_config", "audio_config", "image_token_id"))


def _checkpointing(model: nn.Module) -> bool:
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or attr in vars(model):
            return bool(getattr(model, attr))
    return False


class _GenericTextFamily(Family):
    """An untested text-only decoder: 1-D RoPE, full sequences only."""

    shares_prefix = False


@dataclass(frozen=True)
class LossSpec:
    """Options of the chain loss (see :func:`rankloss.fused_linear_chain_loss`), and two of how its
    log-probs are computed with ``impl="triton"`` (ignored by the other paths): ``deterministic`` (the
    backward without atomics) and ``filter_eps`` (gradient filtering: ``"auto"``, ``None`` for off, or a
    threshold). The SFT mode of :class:`ChainRankModel` uses those two as well."""

    loss: str = "plackett_luce"
    beta: float = 0.1
    pairs: str | None = None
    dpo_loss_type: str | None = None
    top_k: int | None = None
    sft_weight: float = 0.0
    length_normalize: bool = False
    deterministic: bool = False
    filter_eps: float | str | None = "auto"


def _check_prompt(batch: Mapping[str, Any]) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict (a chain batch), got {type(batch).__name__}")
    for key in ("prompt_input_ids", "prompt_attention_mask"):
        if not isinstance(batch.get(key), Tensor):
            raise ValueError(
                f"batch[{key!r}] is missing or not a tensor (see rankloss.integrations for the chain batch)"
            )
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"batch['prompt_attention_mask'] must be [B, P] = {list(ids.shape)}, got {list(mask.shape)}"
        )
    if ids.shape[0] and bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "batch['prompt_attention_mask']: prompts must be left-padded (a row ends with padding)"
        )


def _check_batch(batch: Mapping[str, Any]) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch must be a dict (a chain batch), got {type(batch).__name__}")
    for key in (
        "prompt_input_ids",
        "prompt_attention_mask",
        "completion_input_ids",
        "completion_labels",
        "chain_sizes",
    ):
        if not isinstance(batch.get(key), Tensor):
            raise ValueError(
                f"batch[{key!r}] is missing or not a tensor (see rankloss.integrations for the chain batch)"
            )
    B, P = batch["prompt_input_ids"].shape
    S, L = batch["completion_input_ids"].shape
    if tuple(batch["prompt_attention_mask"].shape) != (B, P):
        raise ValueError(
            f"batch['prompt_attention_mask'] must be [B, P] = {[B, P]}, "
            f"got {list(batch['prompt_attention_mask'].shape)}"
        )
    if tuple(batch["completion_labels"].shape) != (S, L):
        raise ValueError(
            f"batch['completion_labels'] must be [S, L] = {[S, L]}, "
            f"got {list(batch['completion_labels'].shape)}"
        )
    sizes = batch["chain_sizes"]
    if sizes.dim() != 1 or sizes.numel() != B:
        raise ValueError(f"batch['chain_sizes'] must be [B] = [{B}], got {list(sizes.shape)}")
    if int(sizes.sum()) != S:
        raise ValueError(
            f"batch['chain_sizes'] sums to {int(sizes.sum())}, but there are S = {S} completions"
        )
    if B and bool((batch["prompt_attention_mask"][:, -1] == 0).any()):
        raise ValueError(
            "batch['prompt_attention_mask']: prompts must be left-padded (a row ends with padding)"
        )


class ChainForward:
    """The chain forward of one model (see the module docstring).

    Args:
        model: a Hugging Face ``*ForCausalLM`` or ``*ForConditionalGeneration`` (DDP / compile wrappers are
            looked through for the family; the calls go to the unwrapped modules, so run this inside the
            wrapped module's ``forward``: :class:`ChainRankModel` does).
        share_prefix: ``None`` (default) shares the prompt wherever that is exact; ``False`` always runs
            full sequences; ``True`` raises where sharing is impossible instead of falling back.
        family: a :class:`~rankloss.integrations.Family` to use instead of the registered one.
    """

    def __init__(
        self, model: nn.Module, *, share_prefix: bool | None = None, family: Family | None = None
    ) -> None:
        self.model = _unwrap(model)
        self.model_type = model_type_of(self.model)
        fam = family or get_family(self.model_type)
        if fam is None:
            if _has_media_config(self.model):
                raise ValueError(
                    f"model_type {self.model_type!r} is a multimodal model without a rankloss family; "
                    f"supported: {', '.join(supported_model_types())} (add one with "
                    "rankloss.integrations.register_family)"
                )
            if share_prefix:
                raise ValueError(
                    f"share_prefix=True: model_type {self.model_type!r} has no tested rankloss family, so "
                    "its "
                    "prompt cannot be shared; leave share_prefix=None to run full sequences"
                )
            fam = _GenericTextFamily()
        self.family = fam
        if share_prefix not in (None, True, False):
            raise ValueError(f"share_prefix must be None, True or False, got {share_prefix!r}")
        self.share_prefix = share_prefix

    # -------------------------------------------------------------------------------------------------
    def head(self) -> LMHead:
        """The LM head (weight, bias, soft-cap) the scores are computed with."""
        return self.family.head(self.model)

    def _cache_kw(self, module: nn.Module) -> str:
        params = inspect.signature(module.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def will_share(self, batch: Mapping[str, Any]) -> bool:
        """Whether :meth:`hidden_states` shares the prompt for ``batch`` (warns once when it cannot)."""
        if self.share_prefix is False:
            return False
        reason = None
        if not self.family.shares_prefix:
            reason = (
                "family",
                f"rankloss has no tested prefix sharing for model_type {self.model_type!r}: "
                "running each completion behind its own copy of the prompt (same numbers, more compute)",
            )
        elif _checkpointing(self.model) and self.model.training and torch.is_grad_enabled():
            reason = (
                "checkpointing",
                "gradient checkpointing drops the KV cache of checkpointed layers, so the "
                "prompt cannot be shared: running full sequences (same numbers, more compute)",
            )
        else:
            window = self.family.sliding_window(self.model)
            P = int(batch["prompt_input_ids"].shape[1])
            if window is not None and P >= window:
                reason = (
                    "window",
                    f"model_type {self.model_type!r} has sliding-window layers (window {window}) "
                    f"and the prompts are {P} tokens long: the cache keeps only the last {window - 1}, so "
                    "running full sequences (same numbers, more compute)",
                )
        if reason is None:
            return True
        if self.share_prefix:
            raise ValueError("share_prefix=True: " + reason[1])
        _warn_once(self.model_type, reason[0], reason[1])
        return False

    def _prompt_pass(self, batch: Mapping[str, Any], positions: Tensor, padded: bool) -> tuple[Tensor, Any]:
        """The ``B`` prompts (with their media) through the prompt module once: ``(last_hidden_state
        [B, P, D], the KV cache)``."""
        fam, model = self.family, self.model
        prompt_mod = fam.prompt_module(model)
        cache = self._new_cache()
        out = prompt_mod(
            input_ids=batch["prompt_input_ids"],
            attention_mask=batch["prompt_attention_mask"] if padded else None,
            position_ids=positions,
            use_cache=True,
            **{self._cache_kw(prompt_mod): cache},
            **fam.prompt_media(model, batch),
        )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None) or cache
        return out.last_hidden_state, cache

    # -------------------------------------------------------------------------------------------------
    def hidden_states(self, batch: Mapping[str, Any]) -> Tensor:
        """Final hidden states ``[S, L, D]``: ``[s, t]`` scores ``batch["completion_labels"][s, t]``."""
        _check_batch(batch)
        fam, model = self.family, self.model
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        comp, sizes = batch["completion_input_ids"], batch["chain_sizes"]
        B, P = ids.shape
        S, L = comp.shape
        owner = torch.repeat_interleave(torch.arange(B, device=ids.device), sizes.to(ids.device))
        prompt_pos, next_pos = fam.prompt_positions(model, batch)
        comp_pos = fam.completion_positions(next_pos, owner, L)
        padded = bool((mask == 0).any())
        prompt_mod = fam.prompt_module(model)
        if self.will_share(batch):
            text_mod = fam.text_module(model)
            prompt_hidden, cache = self._prompt_pass(batch, prompt_pos, padded)
            cache.batch_select_indices(owner)
            full_mask = None
            if padded:
                full_mask = torch.cat([mask[owner], torch.ones_like(comp, dtype=mask.dtype)], 1)
            h = text_mod(
                input_ids=comp,
                attention_mask=full_mask,
                position_ids=comp_pos,
                use_cache=True,
                **{self._cache_kw(text_mod): cache},
            ).last_hidden_state
            return torch.cat([prompt_hidden[owner, -1:], h[:, :-1]], 1)
        media = fam.select_media(model, batch, owner)
        full_ids = torch.cat([ids[owner], comp], 1)
        full_mask = torch.cat([mask[owner], torch.ones_like(comp, dtype=mask.dtype)], 1) if padded else None
        if "mm_token_type_ids" in media:
            types = media["mm_token_type_ids"]
            media["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(comp, dtype=types.dtype)], 1)
        h = prompt_mod(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=fam.cat_positions(prompt_pos, owner, comp_pos),
            use_cache=False,
            **media,
        ).last_hidden_state
        return h[:, P - 1 : -1]

    def loss(
        self,
        batch: Mapping[str, Any],
        spec: LossSpec = LossSpec(),
        *,
        impl: str | None = None,
        reduction: str = "mean",
    ) -> ChainLossOutput:
        """The chain loss of ``batch`` (its ``ref_scores`` when present, else reference-free)."""
        hidden = self.hidden_states(batch)
        head = self.head()
        labels = batch["completion_labels"]
        ref = batch.get("ref_scores")
        if ref is not None and spec.length_normalize:
            ref = ref / (labels != IGNORE_INDEX).sum(-1).clamp(min=1).to(ref.dtype)
        return fused_linear_chain_loss(
            hidden,
            head.weight,
            labels,
            batch["chain_sizes"].tolist(),
            ref,
            loss=spec.loss,
            beta=spec.beta,
            pairs=spec.pairs,
            dpo_loss_type=spec.dpo_loss_type,
            top_k=spec.top_k,
            sft_weight=spec.sft_weight,
            length_normalize=spec.length_normalize,
            bias=head.bias,
            softcap=head.softcap,
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
            impl=impl,
            deterministic=spec.deterministic,
            filter_eps=spec.filter_eps,
        )

    @torch.no_grad()
    def scores(self, batch: Mapping[str, Any], *, impl: str | None = None) -> tuple[Tensor, Tensor]:
        """``(scores [S], num_tokens [S])``: each completion's summed token log-prob (float32, no gradient)
        and its number of scored tokens; what a reference model's cache holds."""
        hidden = self.hidden_states(batch)
        head = self.head()
        labels = batch["completion_labels"]
        s = sequence_scores(hidden, head.weight, labels, bias=head.bias, softcap=head.softcap, impl=impl)
        return s, (labels != IGNORE_INDEX).sum(-1)

    @torch.no_grad()
    def generate(
        self,
        batch: Mapping[str, Any],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
        stop_when_done: bool = True,
    ) -> Tensor:
        """Greedy continuations of the ``B`` prompts: ``[B, max_new_tokens]`` token ids, ``pad_id`` after
        a row's first stop token (which is kept).

        The prompt (with its media) runs once through the family's prompt module with a KV cache; each
        new token then runs through the text module against the cache, at the positions completions take
        (:meth:`Family.completion_positions`: the prompt's next position ``+ t``), and the next token is
        the argmax of the LM head's logits (soft-capped where the model caps them). Only the prompt keys
        (and media) of ``batch`` are read. ``stop_when_done=False`` runs all ``max_new_tokens`` steps even
        once every row has stopped (what sharded models need: every process runs the same forwards).
        """
        _check_prompt(batch)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        fam, model = self.family, self.model
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        B, device = int(ids.shape[0]), ids.device
        rows = torch.arange(B, device=device)
        prompt_pos, next_pos = fam.prompt_positions(model, batch)
        padded = bool((mask == 0).any())
        hidden, cache = self._prompt_pass(batch, prompt_pos, padded)
        text_mod = fam.text_module(model)
        head = self.head()
        stops = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        last = hidden[:, -1]
        for t in range(max_new_tokens):
            logits = nn.functional.linear(last.to(head.weight.dtype), head.weight, head.bias)
            if head.softcap is not None:
                logits = head.softcap * torch.tanh(logits / head.softcap)
            nxt = logits.float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            done = done | torch.isin(nxt, stops)
            if t + 1 == max_new_tokens or (stop_when_done and bool(done.all())):
                break
            if padded:
                mask = torch.cat([mask, mask.new_ones((B, 1))], 1)
            last = text_mod(
                input_ids=nxt[:, None],
                attention_mask=mask if padded else None,
                position_ids=fam.completion_positions(next_pos + t, rows, 1),
                use_cache=True,
                **{self._cache_kw(text_mod): cache},
            ).last_hidden_state[:, -1]
        return out


def chain_hidden_states(
    model: nn.Module, batch: Mapping[str, Any], *, share_prefix: bool | None = None
) -> Tensor:
    """Functional form of :meth:`ChainForward.hidden_states`: ``[S, L, D]`` aligned with the labels."""
    return ChainForward(model, share_prefix=share_prefix).hidden_states(batch)


class ChainRankModel(nn.Module):
    """A model wrapped so that ``forward(batch)`` returns the chain loss: what a ``Trainer`` or
    ``accelerate`` prepares (DDP sees one forward; under FSDP the LM head is read while the root unit's
    parameters are gathered, so keep it in the root unit, as transformers' auto-wrap policy does).

    ``forward(batch, mode="rank")`` returns a dict: ``"loss"`` and ``"chain"`` (the
    :class:`~rankloss.ChainLossOutput`) for ``mode="rank"``; ``"loss"`` (per-token NLL of each chain's
    first completion, averaged over chains) for ``mode="sft"``; ``"scores"`` and ``"num_tokens"`` for
    ``mode="score"`` (no gradient); ``"tokens"`` ``[B, max_new_tokens]`` for ``mode="generate"`` (greedy,
    no gradient: :meth:`ChainForward.generate` with ``max_new_tokens``, ``stop_ids``, ``pad_id`` and
    ``stop_when_done``; ``stop_ids`` defaults to the model's EOS token ids and ``pad_id`` to its pad token
    id, else 0).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: LossSpec = LossSpec(),
        *,
        share_prefix: bool | None = None,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.impl = impl
        self.chain_forward = ChainForward(model, share_prefix=share_prefix)
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    @property
    def config(self) -> Any:
        return self.model.config

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Delegates to the model (transformers' ``Trainer`` calls it); the chain forward then runs full
        sequences, since checkpointed layers drop the KV cache."""
        self.model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    def forward(
        self,
        batch: Mapping[str, Any],
        mode: str = "rank",
        spec: LossSpec | None = None,
        reduction: str = "mean",
        *,
        max_new_tokens: int = 64,
        stop_ids: Sequence[int] | None = None,
        pad_id: int | None = None,
        stop_when_done: bool = True,
    ) -> dict[str, Any]:
        cf = self.chain_forward
        if mode == "generate":
            if stop_ids is None or pad_id is None:
                default_stop, default_pad = self._generation_ids()
                stop_ids = default_stop if stop_ids is None else stop_ids
                pad_id = default_pad if pad_id is None else pad_id
            tokens = cf.generate(batch, max_new_tokens, stop_ids, pad_id, stop_when_done=stop_when_done)
            return {"tokens": tokens}
        if mode == "rank":
            out = cf.loss(batch, spec or self.spec, impl=self.impl, reduction=reduction)
            return {"loss": out.loss, "chain": out}
        if mode == "score":
            scores, num = cf.scores(batch, impl=self.impl)
            return {"scores": scores, "num_tokens": num}
        if mode == "sft":
            from ..logprobs import linear_token_logprobs

            # only each chain's first (best) completion goes through the model
            sizes = batch["chain_sizes"]
            first = torch.cumsum(sizes, 0) - sizes
            best = {k: v for k, v in batch.items() if k != "ref_scores"}
            best["completion_input_ids"] = batch["completion_input_ids"][first]
            best["completion_labels"] = y = batch["completion_labels"][first]
            best["chain_sizes"] = torch.ones_like(sizes)
            head = cf.head()
            spec = spec or self.spec
            logps = linear_token_logprobs(
                cf.hidden_states(best),
                head.weight,
                y,
                bias=head.bias,
                softcap=head.softcap,
                impl=self.impl,
                deterministic=spec.deterministic,
                filter_eps=spec.filter_eps,
            )
            n = (y != IGNORE_INDEX).sum(-1).clamp(min=1)
            nll = -logps.sum(-1) / n.to(logps.dtype)
            return {"loss": nll.mean(), "nll": nll.detach()}
        raise ValueError(f"mode must be 'rank', 'sft', 'score' or 'generate', got {mode!r}")

    def _generation_ids(self) -> tuple[list[int], int]:
        """The model's EOS token ids (its generation config's, else its config's) and pad token id (0 when
        it has none)."""
        model = self.chain_forward.model
        cfgs = [getattr(model, "generation_config", None), model.config]
        text = model.config.get_text_config(decoder=True)
        cfgs.append(text)

        def first(name: str) -> Any:
            return next((v for c in cfgs if (v := getattr(c, name, None)) is not None), None)

        eos = first("eos_token_id")
        stops = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = first("pad_token_id")
        return stops, 0 if pad is None else int(pad)
