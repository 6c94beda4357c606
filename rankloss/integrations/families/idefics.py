"""SmolVLM (and SmolVLM2) and Idefics3: a SigLIP-style vision encoder (``model.model.vision_model``) and a
pixel-shuffle connector inside ``model.model`` whose features replace the image placeholder tokens, then a
Llama-style decoder (``model.model.text_model``) with 1-D RoPE (positions count real tokens:
``cumsum(mask) - 1``).

Media arrive as ``pixel_values [R, N, C, H, W]`` with ``pixel_attention_mask [R, N, H, W]``. For images
``R`` is the number of prompts and a row holds its prompt's images: each image's tiles (the image
processor may split an image into square tiles plus a global view, each tile ``image_seq_len``
placeholder tokens), rows with fewer tiles padded with all-zero images. For SmolVLM2's videos ``R`` is
the number of videos and a row holds a video's frames (images to the model; the processor writes their
timestamps into the prompt), so a prompt may own several rows or none. The model drops all-zero images
and scatters the features of the rest, in order, into the placeholder tokens; so the rows are assigned to
prompts in order by their real images' token counts, which tells both layouts apart, and a
full-sequence row takes exactly its prompt's rows. Where no image is left (text-only prompts), the pixel
keys are dropped, as the processor gives none for text-only prompts (SmolVLM would otherwise encode one
empty image whose features match no placeholder)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import Family, assign_items, register_family, repeat_per_prompt

#: Media keys whose rows are images (tiles) or videos (frames), dim 1 the images of a row.
_PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")
#: Processor outputs the model does not take (Idefics3 / SmolVLM have no token types).
_DROPPED = ("mm_token_type_ids",)


def _real_images(pixel_values: Tensor) -> Tensor:
    """``[R]``: the images of each row that the model encodes (it drops all-zero images as padding)."""
    return (pixel_values != 0).flatten(2).any(-1).sum(-1)


def _image_seq_len(model: nn.Module) -> int:
    """Placeholder tokens per image (tile or frame): the vision encoder's patches after the pixel shuffle."""
    n = getattr(getattr(model, "model", None), "image_seq_len", None)
    if n is not None:
        return int(n)
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return int(side * side // cfg.scale_factor**2)


def _prompts_of_rows(model: nn.Module, ids: Tensor, pixel_values: Tensor) -> list[int | None]:
    """The prompt of each pixel row (``None`` for a row without real images), rows taken in order by the
    placeholder tokens their real images fill."""
    token_id = getattr(model.config, "image_token_id", None)
    if token_id is None:
        raise ValueError("the model's config has no image_token_id to find each image's prompt")
    tokens = (ids == int(token_id)).sum(-1).tolist()
    per = _image_seq_len(model)
    real = _real_images(pixel_values).tolist()
    rows = [r for r, n in enumerate(real) if n]
    prompts = assign_items(tokens, [real[r] * per for r in rows], "image")
    out: list[int | None] = [None] * len(real)
    for r, b in zip(rows, prompts):
        out[r] = b
    return out


class IdeficsFamily(Family):
    model_types = ("smolvlm", "idefics3")
    multimodal = True

    def prompt_media(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        media = {k: v for k, v in self.media(batch).items() if k not in _DROPPED}
        pixels = media.get("pixel_values")
        if isinstance(pixels, Tensor):
            if pixels.dim() != 5:
                raise ValueError(
                    f"{type(self).__name__}: pixel_values must be [rows, images, C, H, W] (the processor's "
                    f"output), got {list(pixels.shape)}"
                )
            if not bool(_real_images(pixels).any()):
                media = {k: v for k, v in media.items() if k not in _PIXEL_KEYS}
        return media

    def select_media(self, model: nn.Module, batch: Mapping[str, Any], owner: Tensor) -> dict[str, Any]:
        media = self.prompt_media(model, batch)
        ids = batch["prompt_input_ids"]
        B = int(ids.shape[0])
        out: dict[str, Any] = {}
        pick = None
        if isinstance(media.get("pixel_values"), Tensor):
            prompt_of = _prompts_of_rows(model, ids, media["pixel_values"])
            rows: dict[int, list[int]] = {}
            for r, b in enumerate(prompt_of):
                if b is not None:
                    rows.setdefault(b, []).append(r)
            pick = [r for s in owner.tolist() for r in rows.get(s, [])]
        for key, value in media.items():
            if key in _PIXEL_KEYS and isinstance(value, Tensor):
                if pick:  # no rows at all: no image to encode, so no pixel keys
                    out[key] = value[torch.tensor(pick, device=value.device)]
            else:
                out[key] = repeat_per_prompt(self, key, value, owner, B)
        return out


FAMILY = register_family(IdeficsFamily())
