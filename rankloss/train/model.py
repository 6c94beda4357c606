"""The model: a tiny Qwen2.5-VL built from a config (with a tokenizer trained locally), or a local checkpoint
of any video-language model family rankloss supports (:func:`rankloss.integrations.supported_model_types`
with a vision config: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video, ...).

The training losses, scores and greedy generation all come from
:class:`~rankloss.integrations.ChainRankModel` (``forward(batch, mode="sft" | "rank" | "score" |
"generate")``), the same chain forward ``ChainRankTrainer`` uses: the wrapper is what ``accelerate``
prepares, so DDP sees one forward, and under FSDP the LM head is read while the root unit's parameters
are gathered (keep it in the root unit: the transformer-layer auto-wrap policy, which the wrapper's
``_no_split_modules`` feeds, does). The video is read once per chain: the vision tower runs once per
video, the prompt once per chain with the chain's captions packed behind it in one row (the chain tree,
:mod:`rankloss.integrations.layout`), with or without gradient checkpointing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

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
    "vision_model_types",
    "checkpoint_model_type",
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


def vision_model_types() -> list[str]:
    """The ``model_type`` values ``--model`` accepts: every family rankloss supports that takes media."""
    from ..integrations import get_family, supported_model_types

    return [t for t in supported_model_types() if getattr(get_family(t), "multimodal", False)]


def checkpoint_model_type(path: str) -> str:
    """The ``model_type`` of the checkpoint folder ``path``, checked to be a supported video-language model
    (``ValueError`` naming it otherwise)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"--model {path!r} has no config.json: not a transformers checkpoint folder")
    with open(cfg_path, encoding="utf-8") as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    supported = vision_model_types()
    if model_type not in supported:
        from ..integrations import supported_model_types

        if model_type in supported_model_types() or "vision_config" not in raw:
            what = "a text-only model"
        else:
            what = "a multimodal model without a rankloss family"
        raise ValueError(
            f"--model {path!r} has model_type {model_type!r}, {what}; the trainer fine-tunes video-language "
            f"models: model_type one of {', '.join(supported)}"
        )
    return str(model_type)


def load_pretrained(path: str, *, dtype: str = "float32", attn_implementation: str = "sdpa") -> Any:
    """A local checkpoint (``save_pretrained`` folder; nothing is downloaded) of a supported video-language
    model family (:func:`vision_model_types`), loaded with ``AutoModelForImageTextToText``."""
    transformers = _require_transformers()
    checkpoint_model_type(path)
    return transformers.AutoModelForImageTextToText.from_pretrained(
        path, dtype=_DTYPES[dtype], attn_implementation=attn_implementation, local_files_only=True
    )


def load_processor(path: str) -> Any:
    """``AutoProcessor.from_pretrained(path)`` (local files only), checked to have a tokenizer and a video
    processor; a tokenizer without a pad token pads with its end token."""
    transformers = _require_transformers()
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = getattr(processor, "tokenizer", None)
    if getattr(processor, "video_processor", None) is None or tokenizer is None:
        raise ValueError(
            f"the processor in {path!r} ({type(processor).__name__}) has no video processor or tokenizer: "
            "need a video-language model's processor"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def set_vision_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (``False``) or unfreeze the vision encoder(s): the family's
    :meth:`~rankloss.integrations.Family.vision_modules` (the projector into the LLM stays trainable)."""
    from ..integrations import get_family

    family = get_family(model)
    modules = family.vision_modules(model) if family is not None else []
    if not modules:
        raise ValueError(
            f"model_type {getattr(model.config, 'model_type', None)!r} has no vision encoder to "
            f"{'unfreeze' if trainable else 'freeze'}"
        )
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(trainable)
