"""The model-agnostic chain forward: a Hugging Face model and a chain batch in, the final hidden states of
the scored completion tokens out; logits are never built. The loss, scores and metrics come from
:func:`rankloss.fused_linear_chain_loss` on those states and the model's LM head.

**The chain tree** (the default wherever it is exact): the batch is packed into one padding-free row,
each chain's prompt (with one copy of its media) followed by its ``K`` completions
(:mod:`rankloss.integrations.layout`), and the row runs through the family's prompt module in **one
ordinary forward**: the vision encoder once per image or video, its features merged into the
placeholder tokens (Qwen3-VL's deepstack features added inside the same call), the decoder once over
the row. Attention follows the tree rule through one function registered with transformers'
``AttentionInterface`` and set on the text model only (:mod:`rankloss.integrations.attention`:
flash-attn's varlen kernel, flex attention, or SDPA); the tree travels as a forward kwarg, so
gradient-checkpointed layers replay it in their recompute, and sliding-window layers apply their window
in position space. Loss and every gradient equal those of ``K`` independent full-sequence forwards
(tests/test_integrations*.py check this for every family in float64, checkpointing on and off).

**Full sequences** (``share_prefix=False``, the test oracle, and the fallback): each completion runs
behind its own copy of the prompt and media. The forward falls back, with one warning, for a model type
without a tested family (text-only decoders; an unknown multimodal model is an error naming its
``model_type``) or a model whose attention does not go through the interface.

**Generation** (:meth:`ChainForward.generate`, ``ChainRankModel(..., mode="generate")``): greedy decoding
that keeps a KV cache (decoding one token at a time needs one): the prompt once through the prompt
module, each new token through the text module at the positions the completions take, the LM head
(with its soft-cap); so each greedy token is the argmax of the model that scores and trains the
completions.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..fused_losses import _segment_scores, fused_linear_chain_loss, sequence_scores
from ..outputs import ChainLossOutput
from .attention import ATTENTION_PATHS, active_tree, install_tree_attention, resolve_attention
from .families import Family, LMHead, _unwrap, get_family, model_type_of, supported_model_types
from .layout import (
    ChainTree,
    build_chain_tree,
    check_chain_batch,
    check_chain_keys,
    check_prompt_batch,
    check_token_ids,
)

__all__ = [
    "ChainForward",
    "ChainRankModel",
    "ChainStates",
    "LMHead",
    "LossSpec",
    "Uncast",
    "chain_hidden_states",
    "keep_precision",
]

IGNORE_INDEX = -100
#: The integer keys of a chain batch, made ``torch.long`` by :meth:`ChainForward.prepare`.
_LONG_KEYS = (
    "prompt_input_ids",
    "prompt_attention_mask",
    "completion_input_ids",
    "completion_labels",
    "chain_sizes",
)
_WARNED: set[tuple[str, str]] = set()


def _warn_once(model_type: str, reason: str, message: str) -> None:
    if (model_type, reason) not in _WARNED:
        _WARNED.add((model_type, reason))
        warnings.warn(message, stacklevel=3)


#: Float keys of a chain batch whose precision the loss needs (a reference score of -300 in bfloat16 is
#: rounded to a multiple of 2: a reward error of 0.1 at beta 0.1 before the first step).
_EXACT_KEYS = ("ref_scores",)


class Uncast:
    """A tensor that mixed-precision input casting leaves alone.

    FSDP2's ``MixedPrecisionPolicy(cast_forward_inputs=True)`` (what accelerate builds from
    ``mixed_precision: bf16``) and FSDP1's root-input cast turn every floating tensor of a forward's
    inputs (through dicts, lists and dataclasses) into the compute dtype, ``ref_scores`` included. They
    leave other objects alone, so a tensor held here reaches :meth:`ChainForward.prepare`, which unwraps
    it, exactly. ``.to(...)`` moves it (accelerate's ``send_to_device`` calls it)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def to(self, *args: Any, **kwargs: Any) -> Uncast:
        return Uncast(self.tensor.to(*args, **kwargs))

    def __repr__(self) -> str:
        return f"Uncast({self.tensor!r})"


def keep_precision(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with its ``ref_scores`` held in :class:`Uncast`: what to pass to a ``ChainRankModel``
    wrapped by FSDP (or any wrapper that casts forward inputs) under mixed precision, so the reference
    scores keep their float32. ``ChainRankTrainer`` and the example trainer do it on every call."""
    out = dict(batch)
    for key in _EXACT_KEYS:
        value = out.get(key)
        if isinstance(value, Tensor):
            out[key] = Uncast(value)
    return out


def _has_media_config(model: nn.Module) -> bool:
    cfg = model.config
    return any(getattr(cfg, k, None) is not None for k in ("vision_config", "audio_config", "image_token_id"))


def _is_dtensor(t: Any) -> bool:
    if type(t).__name__ != "DTensor" and not isinstance(t, nn.Parameter):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


_SHARDED_FIX = (
    "keep lm_head in the root unit: with FSDP2 call fully_shard on the decoder layers and vision blocks and "
    "then on the ChainRankModel wrapper, never on lm_head (and do not expose get_output_embeddings on the "
    "wrapper, so that no auto-wrap policy puts the head in its own unit); with FSDP1 do not auto-wrap "
    "lm_head (wrap the decoder layer class only). Call the model through ChainRankModel.forward of the "
    "wrapped module"
)


def _check_head_tensor(name: str, t: Tensor, shape: tuple[int, ...] | None, model_type: str) -> None:
    """A clear error for a head tensor that is a ZeRO-3 partition or an FSDP shard instead of the whole
    tensor (an empty, flattened or freed tensor would otherwise fail deep inside the loss)."""
    what = f"model_type {model_type!r}: the LM head's {name}"
    if hasattr(t, "ds_id"):  # DeepSpeed ZeRO-3
        if t.numel() == 0 or (shape is not None and tuple(t.shape) != shape):
            raise RuntimeError(
                f"{what} is empty (shape {tuple(t.shape)}, full shape {tuple(getattr(t, 'ds_shape', ()))}): "
                "it is a DeepSpeed ZeRO-3 partition read outside a gathered forward (ZeRO-3 gathers a "
                "parameter only while the forward of a module that uses it runs). Compute the loss inside "
                "ChainRankModel.forward of the engine-wrapped module (engine(batch, mode=...) or the "
                "Trainer / accelerate model), which registers the head as its external parameter, not "
                "from ChainForward or the head outside that forward (or gather it with "
                "deepspeed.zero.GatheredParameters)"
            )
        return
    if _is_dtensor(t):
        raise RuntimeError(
            f"{what} is sharded (a torch DTensor of local shape {tuple(t.to_local().shape)}): FSDP2 put "
            f"lm_head in its own unit, which the chain loss never calls, so it stays sharded; {_SHARDED_FIX}"
        )
    if type(t) not in (Tensor, nn.Parameter) or t.device.type == "meta":
        return  # a quantized or otherwise packed weight has its own shape and storage
    if (
        t.numel() == 0
        or (shape is not None and tuple(t.shape) != shape)
        or (shape is None and name == "weight" and t.dim() != 2)
    ):
        raise RuntimeError(
            f"{what} is sharded (shape {tuple(t.shape)}, expected {shape or '2-D'}): a flattened FSDP1 shard "
            f"read outside its unit's forward; {_SHARDED_FIX}"
        )
    try:
        freed = t.untyped_storage().nbytes() == 0
    except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic storage
        freed = False
    if freed:
        raise RuntimeError(
            f"{what} is sharded (its storage is freed: FSDP1 resharded it after its own unit's forward); "
            f"{_SHARDED_FIX}"
        )


def _best_only(batch: Mapping[str, Any]) -> dict[str, Any]:
    """A prepared chain batch cut to each chain's first (best) completion: the prompts and media unchanged,
    ``chain_sizes`` all ones, no ``ref_scores`` or ``chain_tree`` (what the SFT mode runs)."""
    sizes = batch["chain_sizes"]
    first = torch.cumsum(sizes, 0) - sizes
    best = {k: v for k, v in batch.items() if k not in ("ref_scores", "chain_tree")}
    best["completion_input_ids"] = batch["completion_input_ids"][first]
    best["completion_labels"] = batch["completion_labels"][first]
    best["chain_sizes"] = torch.ones_like(sizes)
    return best


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

    def __post_init__(self) -> None:
        # The checks the loss makes at its first call, made here so that a bad option fails when the spec
        # (or a ChainRankConfig, which builds one) is made: before a model is loaded or a reference scored.
        from .. import _validation as V
        from ..losses import CHAIN_LOSSES, _check_only_for, _check_top_k
        from ..reference import losses as ref

        V.check_choice(self.loss, "loss", CHAIN_LOSSES)
        V.check_positive_float(self.beta, "beta")
        _check_only_for(self.loss, top_k=self.top_k, pairs=self.pairs, dpo_loss_type=self.dpo_loss_type)
        if self.pairs is not None:
            V.check_choice(self.pairs, "pairs", ref.PAIR_STRATEGIES)
        if self.dpo_loss_type is not None:
            V.check_choice(self.dpo_loss_type, "dpo_loss_type", ref.DPO_LOSS_TYPES)
        _check_top_k(self.top_k)
        V.check_finite_float(self.sft_weight, "sft_weight")
        for name in ("length_normalize", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        V.check_filter_eps(self.filter_eps)


@dataclass(frozen=True)
class ChainStates:
    """The final hidden states that score the completions, in the layout
    :func:`rankloss.fused_linear_chain_loss` takes: packed (``hidden [M, D]``, ``labels [M]``,
    ``cu_seqlens [S + 1]``) from the chain tree, padded (``[S, L, D]``, ``[S, L]``, ``None``) from full
    sequences."""

    hidden: Tensor
    labels: Tensor
    cu_seqlens: Tensor | None


class ChainForward:
    """The chain forward of one model (see the module docstring).

    Args:
        model: a Hugging Face ``*ForCausalLM`` or ``*ForConditionalGeneration`` (DDP / compile wrappers are
            looked through for the family; the calls go to the unwrapped modules, so run this inside the
            wrapped module's ``forward``: :class:`ChainRankModel` does).
        share_prefix: ``None`` (default) runs the chain tree (each prompt once) wherever it is exact;
            ``False`` always runs full sequences; ``True`` raises where the tree is impossible instead of
            falling back.
        family: a :class:`~rankloss.integrations.Family` to use instead of the registered one.
        attention: the chain tree's attention path: ``"auto"`` (flash-attn's varlen kernel on CUDA when
            it is installed and the model is 16-bit, flex attention on other CUDA runs, SDPA elsewhere),
            ``"flash"``, ``"flex"``, ``"sdpa"`` or ``"eager"``.

    The first chain-tree forward registers the tree attention and sets it on the model's text model
    (:func:`~rankloss.integrations.attention.install_tree_attention`); without a tree that attention is
    the model's own implementation, so every other use of the model is unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        share_prefix: bool | None = None,
        family: Family | None = None,
        attention: str = "auto",
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
                    "its prompt cannot be shared; leave share_prefix=None to run full sequences"
                )
            fam = _GenericTextFamily()
        self.family = fam
        if share_prefix not in (None, True, False):
            raise ValueError(f"share_prefix must be None, True or False, got {share_prefix!r}")
        if attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
        self.share_prefix = share_prefix
        self.attention = attention

    # -------------------------------------------------------------------------------------------------
    def head(self) -> LMHead:
        """The LM head (weight, bias, soft-cap) the scores are computed with.

        Read it *after* the backbone has run in the same forward (every call site here does): under
        DeepSpeed ZeRO-3 a tied head is the input embedding's weight, which the embedding's post-forward
        hook partitions again, and an untied head is gathered by reading it inside the engine's forward.
        A weight that arrives empty (a ZeRO-3 partition read outside a gathered forward) or as a shard
        (an FSDP2 ``DTensor``, a flattened or freed FSDP1 shard) is a ``RuntimeError`` saying which wrapping
        to use; the values are never read from a partition."""
        head = self.family.head(self.model)
        if not torch.compiler.is_compiling():
            self._check_head(head)
        return head

    def _head_module(self) -> nn.Module | None:
        try:
            return self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None

    def _head_params(self) -> list[Tensor]:
        """The head module's own parameters (weight, bias), read without triggering ZeRO-3's gather-on-read
        (``named_parameters`` goes through ``_parameters.items()``, not its ``__getitem__``)."""
        module = self._head_module()
        if module is None:
            return []
        return [p for _, p in module.named_parameters(recurse=False)]

    def _param_dtype(self) -> torch.dtype:
        """The head weight's dtype without reading the head (a partition keeps its dtype; under FSDP2 the
        root unit's parameters are already the unsharded compute-dtype tensors inside the forward)."""
        params = self._head_params()
        p = params[0] if params else next(self.model.parameters(), None)
        return torch.get_default_dtype() if p is None else p.dtype

    def zero3_head_params(self) -> list[Tensor]:
        """The head's parameters when they are DeepSpeed ZeRO-3 parameters (they carry ``ds_id``), else
        ``[]``: what :class:`ChainRankModel` registers as its external parameters."""
        return [p for p in self._head_params() if hasattr(p, "ds_id")]

    def is_sharded(self) -> bool:
        """Whether the model's forward gathers parameters module by module, so that another process may
        wait in this forward's collectives: DeepSpeed ZeRO-3 parameters (``ds_id``), FSDP2 ``DTensor``
        parameters, FSDP1 units (``FullyShardedDataParallel`` submodules, ``FlatParameter``). Then an empty
        batch runs a dummy forward (:meth:`_empty_hidden`). DDP, or FSDP with the root unit only, gathers
        nothing inside the forward: false."""
        for module in self.model.modules():
            if type(module).__name__ == "FullyShardedDataParallel":
                return True
            for p in module.parameters(recurse=False):
                if hasattr(p, "ds_id") or type(p).__name__ == "FlatParameter" or _is_dtensor(p):
                    return True
        return False

    def _check_head(self, head: LMHead) -> None:
        module = self._head_module()
        rows = getattr(module, "out_features", None) or getattr(module, "num_embeddings", None)
        cols = getattr(module, "in_features", None) or getattr(module, "embedding_dim", None)
        expected = (rows, cols) if isinstance(rows, int) and isinstance(cols, int) else None
        for name, t in (("weight", head.weight), ("bias", head.bias)):
            if t is None:
                continue
            want = expected if name == "weight" else (expected[:1] if expected else None)
            _check_head_tensor(name, t, want, self.model_type)

    def _cache_kw(self, module: nn.Module) -> str:
        params = inspect.signature(module.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def uses_tree(self) -> bool:
        """Whether the forward runs the chain tree (warns once when it falls back to full sequences;
        ``share_prefix=True`` raises instead). Installs the tree attention on first use."""
        if self.share_prefix is False:
            return False
        reason = None
        if not self.family.shares_prefix:
            reason = (
                "family",
                f"rankloss has no tested chain tree for model_type {self.model_type!r}: running each "
                "completion behind its own copy of the prompt (same numbers, more compute)",
            )
        elif not install_tree_attention(self.model, self.family.text_config(self.model)):
            reason = (
                "interface",
                f"model_type {self.model_type!r}: its text model's attention does not go through "
                "transformers' AttentionInterface, so the chain tree's attention cannot be set: running "
                "full sequences (same numbers, more compute)",
            )
        if reason is None:
            return True
        if self.share_prefix:
            raise ValueError("share_prefix=True: " + reason[1])
        _warn_once(self.model_type, reason[0], reason[1])
        return False

    def will_share(self, batch: Mapping[str, Any] | None = None) -> bool:
        """Whether the prompts of ``batch`` run once per chain: :meth:`uses_tree` (the batch does not
        change the answer any more: windows and gradient checkpointing share too)."""
        return self.uses_tree()

    def _prompt_pass(self, batch: Mapping[str, Any], positions: Tensor, padded: bool) -> tuple[Tensor, Any]:
        """The ``B`` prompts (with their media) through the prompt module once: ``(last_hidden_state
        [B, P, D], the KV cache)`` (generation)."""
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
    def tree(self, batch: Mapping[str, Any]) -> ChainTree:
        """The chain tree of a checked ``batch`` (the collator's ``batch["chain_tree"]`` when it is there,
        else :func:`~rankloss.integrations.layout.build_chain_tree`), bound to this model: the family's
        positions and this forward's attention path."""
        ids = batch["prompt_input_ids"]
        B, P = ids.shape
        S, L = batch["completion_input_ids"].shape
        tree = batch.get("chain_tree")
        if tree is None:
            tree = build_chain_tree(batch, ignore_index=IGNORE_INDEX)
        elif not isinstance(tree, ChainTree) or tree.batch_shape != (B, P, S, L):
            raise ValueError(
                "batch['chain_tree'] was not built from this batch (prompts [B, P] and completions [S, L] "
                f"= {(B, P, S, L)}, the tree's {getattr(tree, 'batch_shape', None)}): rebuild it with "
                "rankloss.integrations.layout.build_chain_tree or drop the key"
            )
        _, prompt_pos, comp_pos = self._positions(batch)
        path = resolve_attention(self.attention, ids.device, self._param_dtype())
        return tree.bind(prompt_pos, comp_pos, path)

    def _positions(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """``(owner [S], prompt positions, completion positions)``: each completion's prompt, and the
        family's positions of the padded prompts and of the completions (their prompt's next + t)."""
        ids = batch["prompt_input_ids"]
        sizes = batch["chain_sizes"].to(ids.device)
        owner = torch.repeat_interleave(torch.arange(ids.shape[0], device=ids.device), sizes)
        prompt_pos, next_pos = self.family.prompt_positions(self.model, batch)
        comp_pos = self.family.completion_positions(
            next_pos, owner, int(batch["completion_input_ids"].shape[1])
        )
        return owner, prompt_pos, comp_pos

    def _tree_states(self, batch: Mapping[str, Any]) -> tuple[ChainTree, Tensor]:
        fam, model = self.family, self.model
        tree = self.tree(batch)
        media = fam.prompt_media(model, batch)
        B, P = batch["prompt_input_ids"].shape
        for key in fam.token_keys:
            value = media.get(key)
            if isinstance(value, Tensor) and tuple(value.shape) == (B, P):
                media[key] = tree.relayout_prompt(value)
        with active_tree(tree):
            out = fam.prompt_module(model)(
                input_ids=tree.input_ids,
                attention_mask=None,
                position_ids=tree.position_ids,
                use_cache=False,
                chain_tree=tree,
                **media,
            )
        layers = getattr(fam.text_config(model), "num_hidden_layers", None)
        if not torch.compiler.is_compiling() and layers is not None and tree.calls != layers:
            raise RuntimeError(
                f"model_type {self.model_type!r}: the chain tree's attention ran in {tree.calls} of "
                f"{layers} layers, so the other layers attended across completions; pass "
                "share_prefix=False (full sequences) and report the model type"
            )
        hidden = out.last_hidden_state[0].index_select(0, tree.scored_index)
        return tree, hidden

    def _full_hidden_states(self, batch: Mapping[str, Any]) -> Tensor:
        """``[S, L, D]`` from ``S`` full ``[prompt, completion]`` rows (the media repeated per row)."""
        fam, model = self.family, self.model
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        comp = batch["completion_input_ids"]
        P = ids.shape[1]
        owner, prompt_pos, comp_pos = self._positions(batch)
        padded = bool((mask == 0).any())
        media = fam.select_media(model, batch, owner)
        full_ids = torch.cat([ids[owner], comp], 1)
        full_mask = torch.cat([mask[owner], torch.ones_like(comp, dtype=mask.dtype)], 1) if padded else None
        for key in fam.token_keys:
            types = media.get(key)
            if isinstance(types, Tensor) and types.dim() == 2:
                media[key] = torch.cat([types, torch.zeros_like(comp, dtype=types.dtype)], 1)
        h = fam.prompt_module(model)(
            input_ids=full_ids,
            attention_mask=full_mask,
            position_ids=fam.cat_positions(prompt_pos, owner, comp_pos),
            use_cache=False,
            **media,
        ).last_hidden_state
        return h[:, P - 1 : -1]

    def _vocab_sizes(self) -> tuple[int | None, int | None]:
        """``(input vocabulary, LM head rows)``: the input embedding's ``num_embeddings`` and the head's
        ``out_features`` (module attributes, right under sharding too); None where unknown."""
        sizes: list[int | None] = []
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                module = getattr(self.model, getter)()
            except (AttributeError, NotImplementedError):
                module = None
            n = getattr(module, "num_embeddings", None) or getattr(module, "out_features", None)
            sizes.append(int(n) if isinstance(n, int) else None)
        return sizes[0], sizes[1] or sizes[0]

    def _pad_id(self) -> int | None:
        for cfg in (self.model.config, self.family.text_config(self.model)):
            pad = getattr(cfg, "pad_token_id", None)
            if isinstance(pad, int) and not isinstance(pad, bool):
                return pad
        return None

    def prepare(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """``batch`` checked, as a new dict with its integer keys as ``torch.long`` and its :class:`Uncast`
        values unwrapped (a ``ref_scores`` cast to half precision on the way warns once).

        The layout (:func:`~rankloss.integrations.layout.check_chain_batch`, with the model's pad id) is
        checked where the batch is built: here unless the collator built (and checked) it, i.e. unless it
        carries a ``chain_tree``; the dtypes (free) always; the ids and labels against the model's
        vocabulary (:func:`~rankloss.integrations.layout.check_token_ids`: on CPU tensors always, on CUDA
        tensors with ``RANKLOSS_VALIDATE=1``) always, since the collator does not know the model."""
        if isinstance(batch, Mapping) and any(isinstance(v, Uncast) for v in batch.values()):
            batch = {k: v.tensor if isinstance(v, Uncast) else v for k, v in batch.items()}
        elif isinstance(batch, Mapping):
            ref = batch.get("ref_scores")
            if isinstance(ref, Tensor) and ref.dtype in (torch.bfloat16, torch.float16):
                _warn_once(
                    self.model_type,
                    "ref_scores_precision",
                    f"batch['ref_scores'] reached the chain forward as {ref.dtype} (a wrapper's "
                    "mixed-precision input cast, e.g. FSDP2's MixedPrecisionPolicy(cast_forward_inputs="
                    "True), accelerate's default): reference scores of a few hundred nats lose whole "
                    "units in bfloat16; call the model with rankloss.integrations.keep_precision(batch), "
                    "as ChainRankTrainer does",
                )
        if not isinstance(batch, Mapping) or batch.get("chain_tree") is None:
            check_chain_batch(batch, pad_id=self._pad_id(), ignore_index=IGNORE_INDEX)
        else:
            check_chain_keys(batch, ignore_index=IGNORE_INDEX)
        vocab, head_rows = self._vocab_sizes()
        if vocab is not None:
            check_token_ids(batch, vocab, label_vocab_size=head_rows, ignore_index=IGNORE_INDEX)
        out = dict(batch)
        for key in _LONG_KEYS:
            out[key] = batch[key].long()
        return out

    def _states(self, batch: dict[str, Any]) -> ChainStates:
        """:meth:`states` of a prepared batch."""
        if batch["prompt_input_ids"].shape[0] == 0:
            labels = batch["completion_labels"].new_zeros(0)
            return ChainStates(self._empty_hidden((0,)), labels, self._cu0(batch))
        if self.family.multimodal and not torch.compiler.is_compiling() and self.is_sharded():
            # what an empty batch on this process runs later (see _dummy_batch): each chain's prompt (with
            # its media) and first completion
            self._template = _best_only(batch)
        return self._forward_states(batch)

    def _forward_states(self, batch: dict[str, Any]) -> ChainStates:
        if self.uses_tree():
            tree, hidden = self._tree_states(batch)
            return ChainStates(hidden, tree.labels.long(), tree.cu_seqlens)
        return ChainStates(self._full_hidden_states(batch), batch["completion_labels"], None)

    @staticmethod
    def _cu0(batch: Mapping[str, Any]) -> Tensor:
        return torch.zeros(1, dtype=torch.int32, device=batch["prompt_input_ids"].device)

    def _empty_hidden(self, shape: tuple[int, ...]) -> Tensor:
        """Hidden states ``[*shape, D]`` of an empty batch (``B = 0``): zeros connected to every trainable
        parameter of the model, so that ``backward()`` gives each a zero gradient (a data-parallel step
        then does not wait for gradients that never come).

        Unsharded (one process, DDP: :meth:`is_sharded` false): no forward runs. Sharded (ZeRO-3, FSDP
        units below the root): the other processes' forwards gather parameters module by module, so this
        one runs the same modules too, a **dummy forward** (:meth:`_dummy_batch`) through the backbone
        and the LM head, whose result is multiplied by 0 (so the loss and every gradient are exactly
        zero)."""
        if self.is_sharded():
            hidden, zero = self._dummy_forward()
            return hidden.new_zeros((*shape, hidden.shape[-1])) + zero.to(hidden.dtype)
        head = self.head().weight
        zero = torch.zeros((), dtype=torch.float32, device=head.device)
        for p in self.model.parameters():
            if p.requires_grad:
                zero = zero + p.reshape(-1)[:0].sum().to(device=head.device, dtype=torch.float32)
        return torch.zeros((*shape, head.shape[-1]), dtype=head.dtype, device=head.device) + zero.to(
            head.dtype
        )

    def _dummy_batch(self) -> dict[str, Any]:
        """The prepared batch an empty batch runs on a sharded model: one token of prompt and one of
        completion for a text-only model; for a multimodal model the best-only copy (each chain's prompt,
        media and first completion) of the last non-empty batch this process ran, so that the vision tower
        runs too, as on the other processes."""
        template = getattr(self, "_template", None)
        if template is not None:
            return template
        if self.family.multimodal or _has_media_config(self.model):
            raise RuntimeError(
                f"model_type {self.model_type!r}: an empty batch (B = 0) on a sharded multimodal model "
                "before this process ran any non-empty batch: the other processes run the vision tower, "
                "whose parameters are gathered collectively, and this process has no media to run it on. "
                "Give every process at least one chain in its first micro-batch (shard the data evenly "
                "or drop the uneven last batch)"
            )
        p = next(self.model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        tok = self._pad_id() or 0
        one = torch.full((1, 1), tok, dtype=torch.long, device=device)
        return self.prepare(
            {
                "prompt_input_ids": one,
                "prompt_attention_mask": torch.ones_like(one),
                "completion_input_ids": one.clone(),
                "completion_labels": one.clone(),
                "chain_sizes": torch.ones(1, dtype=torch.long, device=device),
            }
        )

    def _dummy_forward(self) -> tuple[Tensor, Tensor]:
        """``(hidden states, a zero scalar)`` of :meth:`_dummy_batch`: the backbone, then the LM head on its
        states (token log-probs), times 0."""
        from ..logprobs import linear_token_logprobs

        st = self._forward_states(self._dummy_batch())
        head = self.head()  # after the backbone
        logps = linear_token_logprobs(
            st.hidden, head.weight, st.labels, bias=head.bias, softcap=head.softcap, ignore_index=IGNORE_INDEX
        )
        return st.hidden, logps.sum() * 0.0

    def states(self, batch: Mapping[str, Any]) -> ChainStates:
        """The scored final hidden states of ``batch`` and their labels (:class:`ChainStates`); an empty
        batch (``B = 0``) gives ``[0, D]`` states connected to the model's parameters (after a dummy
        forward when the model is sharded: :meth:`_empty_hidden`)."""
        return self._states(self.prepare(batch))

    def hidden_states(self, batch: Mapping[str, Any]) -> Tensor:
        """Final hidden states ``[S, L, D]``: ``[s, t]`` scores ``batch["completion_labels"][s, t]`` (zeros
        at positions the chain tree does not run: after a completion's last scored label)."""
        batch = self.prepare(batch)
        if batch["prompt_input_ids"].shape[0] == 0:
            return self._empty_hidden(tuple(batch["completion_input_ids"].shape))
        if self.uses_tree():
            tree, hidden = self._tree_states(batch)
            return tree.to_padded(hidden)
        return self._full_hidden_states(batch)

    @staticmethod
    def _check_rankable(batch: Mapping[str, Any], sizes: list[int]) -> None:
        """Every chain holds >= 2 completions (the chain losses rank them): else a ``ValueError`` naming
        the chain (its index, and its id where the batch carries ``chain_ids``) and what to do."""
        ids = batch.get("chain_ids")
        for b, k in enumerate(sizes):
            if k >= 2:
                continue
            named = ""
            if isinstance(ids, Sequence) and not isinstance(ids, str) and len(ids) == len(sizes):
                named = f" (batch['chain_ids'][{b}] = {ids[b]!r})"
            raise ValueError(
                f"batch['chain_sizes'][{b}] = {k}: chain {b}{named} has {k} completion(s), but a chain needs "
                ">= 2 distinct completions to be ranked; filter such records out of the training data, or "
                "score them with ChainRankModel(..., mode='score') / ChainForward.scores"
            )

    def loss(
        self,
        batch: Mapping[str, Any],
        spec: LossSpec = LossSpec(),
        *,
        impl: str | None = None,
        reduction: str = "mean",
    ) -> ChainLossOutput:
        """The chain loss of ``batch`` (its ``ref_scores`` when present, else reference-free).

        Every chain needs >= 2 completions (a ``ValueError`` names the first chain that has fewer, with its
        ``chain_ids`` entry). An empty batch (``B = 0``, e.g. an uneven last micro-batch) gives a zero loss
        connected to every trainable parameter (``backward()`` gives each a zero gradient), with empty
        per-chain metrics; it runs no forward unless the model is sharded (:meth:`_empty_hidden`)."""
        batch = self.prepare(batch)
        sizes = batch["chain_sizes"].tolist()
        self._check_rankable(batch, sizes)
        st = self._states(batch)
        head = self.head()
        ref = batch.get("ref_scores")
        if ref is not None and spec.length_normalize:
            n = (batch["completion_labels"] != IGNORE_INDEX).sum(-1)
            ref = ref / n.clamp(min=1).to(device=ref.device, dtype=ref.dtype)
        return fused_linear_chain_loss(
            st.hidden,
            head.weight,
            st.labels,
            sizes,
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
            cu_seqlens=st.cu_seqlens,
            reduction=reduction,
            impl=impl,
            deterministic=spec.deterministic,
            filter_eps=spec.filter_eps,
        )

    @torch.no_grad()
    def scores(self, batch: Mapping[str, Any], *, impl: str | None = None) -> tuple[Tensor, Tensor]:
        """``(scores [S], num_tokens [S])``: each completion's summed token log-prob (float32, no gradient)
        and its number of scored tokens; what a reference model's cache holds. Chains of one completion
        are scored too; an empty batch gives empty tensors."""
        batch = self.prepare(batch)
        st = self._states(batch)
        head = self.head()
        s = sequence_scores(
            st.hidden,
            head.weight,
            st.labels,
            bias=head.bias,
            softcap=head.softcap,
            cu_seqlens=st.cu_seqlens,
            impl=impl,
        )
        return s, (batch["completion_labels"] != IGNORE_INDEX).sum(-1)

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
        check_prompt_batch(batch)
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
        stops = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        last = hidden[:, -1]
        for t in range(max_new_tokens):
            # read after every text-module call: under ZeRO-3 a tied head is the embedding's weight, which
            # that call's embedding partitions again
            head = self.head()
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


def _zero3_pre_hook(module: ChainRankModel, args: Any) -> None:
    if not module._zero3_registered:
        module._register_zero3_head()


def chain_hidden_states(
    model: nn.Module, batch: Mapping[str, Any], *, share_prefix: bool | None = None
) -> Tensor:
    """Functional form of :meth:`ChainForward.hidden_states`: ``[S, L, D]`` aligned with the labels."""
    return ChainForward(model, share_prefix=share_prefix).hidden_states(batch)


class ChainRankModel(nn.Module):
    """A model wrapped so that ``forward(batch)`` returns the chain loss: what a ``Trainer`` or
    ``accelerate`` prepares (DDP sees one forward; under FSDP the LM head is read while the root unit's
    parameters are gathered, so keep it in the root unit, as transformers' auto-wrap policy does; under
    DeepSpeed ZeRO-3 the first forward registers the head's weight and bias as this module's external
    parameters, and every mode reads the head after the backbone has run). Compute the loss through this
    forward of the engine-wrapped module: a head read outside it is a ZeRO-3 partition or an FSDP shard,
    and :meth:`ChainForward.head` says so. An empty batch (``B = 0``) on a sharded model runs a dummy
    forward, so that the other processes' parameter gathers are matched (loss and gradients exactly 0).

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
        self._zero3_registered = False
        # registered before deepspeed.initialize adds its hooks, so it runs before ZeRO-3's pre-forward
        # fetch: from the first forward on, that fetch gathers the head with this module's parameters
        self.register_forward_pre_hook(_zero3_pre_hook)

    def _register_zero3_head(self) -> None:
        """Under DeepSpeed ZeRO-3 (the head's parameters carry ``ds_id``), registers the LM head's weight
        and bias as external parameters of this module, once: the loss uses them outside
        ``lm_head.forward``, so ZeRO-3 must gather them for this module's forward and backward (a tied head
        would otherwise be partitioned again by the embedding's post-forward hook). DeepSpeed is imported
        only when its parameters are there. A forward pre-hook added in ``__init__`` (so before ZeRO-3's
        own) registers them at the first forward; ``forward`` checks again in case it was called without
        hooks."""
        params = self.chain_forward.zero3_head_params()
        if not params:
            return
        import deepspeed

        for p in params:
            deepspeed.zero.register_external_parameter(self, p)
        self._zero3_registered = True

    @property
    def config(self) -> Any:
        return self.model.config

    def tie_weights(self, *args: Any, **kwargs: Any) -> Any:
        """Delegates to the model: accelerate's FSDP ``cpu_ram_efficient_loading`` reloads the weights on
        the meta device and re-ties them only through the prepared module's ``tie_weights``; without
        this a tied LM head would come back as a second, untied parameter."""
        tie = getattr(self.model, "tie_weights", None)
        return tie(*args, **kwargs) if tie is not None else None

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        """Delegates to the model (transformers' ``Trainer`` calls it for ``activation_checkpointing=True``);
        the chain tree runs under checkpointing as it does without (checkpointed layers replay its
        attention in their recompute)."""
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is None:  # transformers before 5.x
            kwargs.setdefault(
                "gradient_checkpointing_kwargs", kwargs.pop("activation_checkpointing_kwargs", None)
            )
            self.model.gradient_checkpointing_enable(**kwargs)
        else:
            enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable or self.model.gradient_checkpointing_disable)()

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None, **kwargs: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(
            activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
        )

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

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
        if not self._zero3_registered:
            self._register_zero3_head()
        if mode == "generate":
            if stop_ids is None or pad_id is None:
                default_stop, default_pad = self.generation_ids()
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
            best = _best_only(cf.prepare(batch))
            spec = spec or self.spec
            st = cf.states(best)
            head = cf.head()  # after the backbone (ZeRO-3 re-partitions a tied head after the embedding)
            logps = linear_token_logprobs(
                st.hidden,
                head.weight,
                st.labels,
                bias=head.bias,
                softcap=head.softcap,
                impl=self.impl,
                deterministic=spec.deterministic,
                filter_eps=spec.filter_eps,
            )
            sums, n = _segment_scores(logps, st.labels, IGNORE_INDEX, st.cu_seqlens)
            nll = -sums / n.clamp(min=1).to(sums.dtype)
            # an empty batch: a zero loss, still connected to the parameters (see ChainForward.states)
            loss = nll.mean() if nll.numel() else nll.sum()
            return {"loss": loss, "nll": nll.detach()}
        raise ValueError(f"mode must be 'rank', 'sft', 'score' or 'generate', got {mode!r}")

    def generation_ids(self, tokenizer: Any = None) -> tuple[list[int], int]:
        """The stop ids and pad id ``mode="generate"`` uses when none are passed.

        Stops: the model's EOS ids as ``model.generate`` finds them (its generation config's, else its
        config's, else its text config's), plus ``tokenizer.eos_token_id`` when a tokenizer is given (a
        checkpoint whose configs lack the chat template's end token still stops). Pad: the tokenizer's,
        else the first config's that has one, else 0.
        """
        model = self.chain_forward.model
        cfgs = [getattr(model, "generation_config", None), getattr(model, "config", None)]
        get_text = getattr(cfgs[1], "get_text_config", None)
        if callable(get_text):
            cfgs.append(get_text(decoder=True))

        def first(name: str) -> Any:
            return next((v for c in cfgs if (v := getattr(c, name, None)) is not None), None)

        eos = first("eos_token_id")
        stops = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            stops.append(int(tok_eos))
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = first("pad_token_id")
        return list(dict.fromkeys(stops)), 0 if pad is None else int(pad)
