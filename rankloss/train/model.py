"""The Qwen2.5-VL model: a tiny one built from a config (with a tokenizer trained locally) or a real local
checkpoint, and :class:`VideoChainModel`, the wrapper whose ``forward`` computes the training losses.

Everything that touches parameters happens inside ``VideoChainModel.forward`` (the SFT loss, the chain
loss through :func:`rankloss.fused_linear_chain_loss` on the final hidden states and ``lm_head.weight``,
the scores, greedy generation), so the wrapper is what ``accelerate`` prepares: DDP sees one forward,
and under FSDP ``lm_head.weight`` is read while the root unit's parameters are gathered (keep ``lm_head``
in the root unit: the transformer-layer auto-wrap policy, which the wrapper's ``_no_split_modules``
feeds, does).

**The video is read once per chain.** The vision tower runs once per video; its output fills the video
tokens of the prefix, the LLM runs over the prefix once (``B`` rows, with a KV cache), the cache is
repeated for the ``K`` captions of each chain, and the captions run against it. Gradients from every
caption flow back through the cache into the prefix and the vision tower. Models with sliding-window
layers (whose cache drops old positions) fall back to full sequences, which give the same numbers.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..fused_losses import fused_linear_chain_loss
from ..logprobs import linear_token_logprobs
from .data import IGNORE_INDEX, ChainBatch

__all__ = [
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "build_tiny_processor",
    "tiny_config",
    "build_tiny_model",
    "load_pretrained",
    "load_processor",
    "pick_attn_implementation",
    "set_vision_trainable",
    "VideoChainModel",
    "LossSpec",
]

#: Special tokens of the locally trained tokenizer (Qwen's names, so the processor finds them).
SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|pad|>",
    "unk_token": "<|unk|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
    "video_token": "<|video_pad|>",
    "image_token": "<|image_pad|>",
}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the train extra is installed in the dev env
        raise ImportError("the example trainer needs the train extra: pip install 'rankloss[train]'") from exc
    return transformers


def train_tokenizer(captions: Sequence[str], vocab_size: int = 1000) -> Any:
    """A byte-pair-encoding tokenizer trained on ``captions`` with the ``tokenizers`` library (nothing is
    downloaded), wrapped as a ``PreTrainedTokenizerFast`` with Qwen's special token names.

    Words are split on spaces and punctuation (``Metaspace`` + ``Punctuation``) so decoding gives back
    the exact text; with a small closed vocabulary (the synthetic captions) every word ends up one token.
    """
    transformers = _require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=1, show_progress=False
    )
    tok.train_from_iterator(list(captions), trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS["eos_token"],
        pad_token=SPECIAL_TOKENS["pad_token"],
        unk_token=SPECIAL_TOKENS["unk_token"],
        extra_special_tokens={
            k: v for k, v in SPECIAL_TOKENS.items() if k.startswith(("vision", "video", "image"))
        },
    )


def build_tiny_processor(tokenizer: Any, frame_size: int) -> Any:
    """A ``Qwen2_5_VLProcessor`` around ``tokenizer`` whose video processor keeps ``frame_size`` square
    frames at their size (no resizing: ``min_pixels = max_pixels = frame_size**2``)."""
    transformers = _require_transformers()
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = frame_size * frame_size
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    video = Qwen2VLVideoProcessor(size=size, do_sample_frames=False, cap_pixels_per_frame=False)
    image = Qwen2VLImageProcessor(size=size)
    return transformers.Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video)


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(
    tokenizer: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
) -> Any:
    """A small ``Qwen2_5_VLConfig`` (defaults: ~0.6M parameters) for ``tokenizer``'s vocabulary.

    Text: ``hidden_size`` wide, ``num_layers`` layers, heads of 32, two key/value heads per four query
    heads, multimodal RoPE (``rope_parameters["mrope_section"]`` splits each head's frequencies between
    the temporal, height and width axes). Vision: ``vision_depth`` blocks of ``vision_hidden_size``,
    14-pixel patches, two frames per temporal patch, 2 x 2 patches merged into one LLM token, the last
    block with full attention, ``tokens_per_second = 2``.
    """
    transformers = _require_transformers()
    heads = max(1, hidden_size // 32)
    head_dim = hidden_size // heads
    vision_heads = max(1, vision_hidden_size // 16)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in SPECIAL_TOKENS.items()}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 4096,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(head_dim),
        },
        "bos_token_id": None,
        "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["pad_token"],
        "tie_word_embeddings": False,
    }
    vision = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "intermediate_size": 2 * vision_hidden_size,
        "num_heads": vision_heads,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [vision_depth - 1],
        "tokens_per_second": 2,
    }
    return transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        video_token_id=ids["video_token"],
        image_token_id=ids["image_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        tie_word_embeddings=False,
    )


def pick_attn_implementation(requested: str, device: torch.device) -> str:
    """``requested`` unless ``"auto"``: then ``flash_attention_2`` on CUDA when ``flash_attn`` imports, else
    ``sdpa``. Asking for ``flash_attention_2`` without CUDA or without the package raises ``ValueError``."""
    flash = False
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            flash = True
        except ImportError:
            flash = False
    if requested == "auto":
        return "flash_attention_2" if flash else "sdpa"
    if requested == "flash_attention_2" and not flash:
        raise ValueError(
            "--attn-implementation flash_attention_2 needs a CUDA device and the flash-attn package "
            "(pip install 'rankloss[flash]')"
        )
    return requested


def build_tiny_model(config: Any, *, seed: int, attn_implementation: str = "sdpa") -> Any:
    """``Qwen2_5_VLForConditionalGeneration(config)`` with weights drawn under ``torch.manual_seed(seed)``."""
    transformers = _require_transformers()
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pretrained(path: str, *, dtype: str = "float32", attn_implementation: str = "sdpa") -> Any:
    """A local Qwen2.5-VL checkpoint (``save_pretrained`` folder; nothing is downloaded)."""
    transformers = _require_transformers()
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--model {path!r} has no config.json: not a transformers checkpoint folder")
    with open(cfg_path, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(
            f"--model {path!r} is a {model_type!r} checkpoint; the trainer supports Qwen2.5-VL "
            "(model_type 'qwen2_5_vl')"
        )
    return transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=_DTYPES[dtype], attn_implementation=attn_implementation, local_files_only=True
    )


def load_processor(path: str) -> Any:
    """``AutoProcessor.from_pretrained(path)`` (local files only), checked to have a video processor."""
    transformers = _require_transformers()
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    if getattr(processor, "video_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise ValueError(
            f"the processor in {path!r} has no video processor or tokenizer: need a Qwen2.5-VL processor"
        )
    return processor


def set_vision_trainable(model: Any, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze the vision tower ``model.model.visual``."""
    for p in model.model.visual.parameters():
        p.requires_grad_(trainable)


# ------------------------------------------------------------------------------------------------------
# The wrapper


@dataclass(frozen=True)
class LossSpec:
    """Options of the ranking stage's :func:`rankloss.fused_linear_chain_loss` call."""

    loss: str = "plackett_luce"
    beta: float = 0.1
    pairs: str | None = None
    dpo_loss_type: str | None = None
    top_k: int | None = None
    sft_weight: float = 0.0
    length_normalize: bool = False


def _cache_kwarg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class VideoChainModel(nn.Module):
    """Qwen2.5-VL wrapped so that ``forward`` returns the training loss (or scores, or generations).

    ``forward(batch, mode=..., ...)`` with ``mode``:

    * ``"sft"``: ``loss = mean_b(-s_b / n_b)`` over the batch's captions (one per video: the best one):
      the per-token negative log-likelihood of each caption, averaged over videos (the SFT term of
      DESIGN.md §2, so process and micro-batch splits of equal size average exactly).
    * ``"rank"``: :func:`rankloss.fused_linear_chain_loss` on the final hidden states ``[S, L, D]`` and
      ``lm_head.weight`` with ``batch.ref_scores`` (``spec`` gives the loss, beta, pairs, SFT weight);
      returns the :class:`~rankloss.ChainLossOutput` under ``"chain"`` too.
    * ``"score"``: (no gradient) ``scores [S]`` (sums of token log-probs) and ``num_tokens [S]``.
    * ``"generate"``: (no gradient) greedy continuation of each prefix, ``tokens [B, max_new_tokens]``
      padded with ``pad_id`` after the end token.

    Returns a dict with ``"loss"`` (training modes) and the mode's outputs.
    """

    def __init__(self, model: nn.Module, *, share_prefix: bool = True, impl: str | None = None) -> None:
        super().__init__()
        self.model = model
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])
        text_cfg = model.config.get_text_config(decoder=True)
        layer_types = getattr(text_cfg, "layer_types", None) or []
        self.sliding = any(t != "full_attention" for t in layer_types) or bool(
            getattr(text_cfg, "use_sliding_window", False)
        )
        self.share_prefix = share_prefix and not self.sliding
        self.impl = impl
        self.video_token_id = int(model.config.video_token_id)
        self._cache_kw = _cache_kwarg(model.model.language_model)

    # -------------------------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    def _prefix_embeds(self, batch: ChainBatch) -> Tensor:
        """Token embeddings of the prefixes with the vision tower's output at the video tokens."""
        embeds = self.lm.embed_tokens(batch.prefix_ids)
        pixels = batch.pixel_values_videos.to(
            self.visual.dtype if hasattr(self.visual, "dtype") else embeds.dtype
        )
        out = self.visual(pixels, grid_thw=batch.video_grid_thw)
        video = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(video, (tuple, list)):
            video = torch.cat(list(video), 0)
        mask = (batch.prefix_ids == self.video_token_id).unsqueeze(-1)
        return embeds.masked_scatter(mask, video.to(embeds.dtype))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _lm(self, embeds: Tensor, positions: Tensor, mask: Tensor | None, cache: Any = None) -> Tensor:
        kw: dict[str, Any] = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": mask}
        if cache is not None:
            kw[self._cache_kw] = cache
            kw["use_cache"] = True
        else:
            kw["use_cache"] = False
        return self.lm(**kw).last_hidden_state

    def caption_hidden(self, batch: ChainBatch) -> Tensor:
        """Final hidden states ``[S, L, D]`` that score the caption tokens (``labels`` aligned with them)."""
        prefix = self._prefix_embeds(batch)
        captions = self.lm.embed_tokens(batch.caption_ids)
        owner = batch.caption_video
        full_mask = None
        if batch.prefix_mask is not None:
            ones = torch.ones_like(batch.caption_ids, dtype=batch.prefix_mask.dtype)
            full_mask = torch.cat([batch.prefix_mask[owner], ones], 1)
        if self.share_prefix:
            cache = self._new_cache()
            h_prefix = self._lm(prefix, batch.prefix_positions, batch.prefix_mask, cache)
            cache.batch_select_indices(owner)
            h_caps = self._lm(captions, batch.caption_positions, full_mask, cache)
            return torch.cat([h_prefix[owner, -1:], h_caps[:, :-1]], 1)
        P = prefix.shape[1]
        embeds = torch.cat([prefix[owner], captions], 1)
        positions = torch.cat([batch.prefix_positions[:, owner], batch.caption_positions], 2)
        h = self._lm(embeds, positions, full_mask)
        return h[:, P - 1 : -1]

    def _weight(self) -> Tensor:
        return self.model.lm_head.weight

    def _bias(self) -> Tensor | None:
        return getattr(self.model.lm_head, "bias", None)

    # -------------------------------------------------------------------------------------------------
    def forward(
        self,
        batch: ChainBatch,
        mode: str = "rank",
        spec: LossSpec | None = None,
        max_new_tokens: int = 64,
        stop_ids: Sequence[int] = (),
        pad_id: int = 0,
        stop_when_done: bool = True,
    ) -> dict[str, Any]:
        if mode == "generate":
            return {"tokens": self.generate(batch, max_new_tokens, stop_ids, pad_id, stop_when_done)}
        hidden = self.caption_hidden(batch)
        labels = batch.labels
        if mode == "rank":
            if spec is None:
                raise ValueError("mode='rank' needs spec=LossSpec(...)")
            ref = batch.ref_scores
            if ref is not None and spec.length_normalize:
                ref = ref / batch.ref_num_tokens.clamp(min=1).to(ref.dtype)
            out = fused_linear_chain_loss(
                hidden,
                self._weight(),
                labels,
                batch.chain_sizes,
                ref,
                loss=spec.loss,
                beta=spec.beta,
                pairs=spec.pairs,
                dpo_loss_type=spec.dpo_loss_type,
                top_k=spec.top_k,
                sft_weight=spec.sft_weight,
                length_normalize=spec.length_normalize,
                bias=self._bias(),
                ignore_index=IGNORE_INDEX,
                impl=self.impl,
            )
            return {"loss": out.loss, "chain": out}
        token_logps = linear_token_logprobs(
            hidden, self._weight(), labels, bias=self._bias(), ignore_index=IGNORE_INDEX, impl=self.impl
        )
        sums = token_logps.sum(-1)
        counts = (labels != IGNORE_INDEX).sum(-1)
        if mode == "sft":
            nll = -sums / counts.clamp(min=1).to(sums.dtype)
            return {"loss": nll.mean(), "nll": nll.detach()}
        if mode == "score":
            return {"scores": sums.detach(), "num_tokens": counts}
        raise ValueError(f"mode must be 'sft', 'rank', 'score' or 'generate', got {mode!r}")

    @torch.no_grad()
    def generate(
        self,
        batch: ChainBatch,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        stop_when_done: bool = True,
    ) -> Tensor:
        """Greedy decoding from each video's prefix with a KV cache: ``[B, max_new_tokens]`` token ids,
        ``pad_id`` after the first stop token (kept). Positions continue from ``batch.next_positions``."""
        B = batch.num_videos
        device = batch.prefix_ids.device
        cache = self._new_cache()
        h = self._lm(self._prefix_embeds(batch), batch.prefix_positions, batch.prefix_mask, cache)
        weight, bias = self._weight(), self._bias()
        stops = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        mask = batch.prefix_mask
        last = h[:, -1]
        for t in range(max_new_tokens):
            logits = nn.functional.linear(last.to(weight.dtype), weight, bias)
            nxt = logits.float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            done = done | torch.isin(nxt, stops)
            if t + 1 == max_new_tokens or (stop_when_done and bool(done.all())):
                break
            pos = (batch.next_positions + t).view(1, B, 1).expand(3, B, 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], 1)
            last = self._lm(self.lm.embed_tokens(nxt[:, None]), pos, mask, cache)[:, -1]
        return out
