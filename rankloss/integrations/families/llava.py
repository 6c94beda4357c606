"""LLaVA-OneVision and LLaVA-NeXT-Video: a vision tower and projector inside ``model.model`` whose
features replace the ``<image>`` / ``<video>`` placeholder tokens, then a standard decoder with 1-D RoPE
(positions count real tokens: ``cumsum(mask) - 1``). Media arrive per prompt (``pixel_values_videos
[B, T, C, H, W]``, ``pixel_values [B, patches, C, H, W]`` with ``image_sizes [B, 2]``), so full-sequence
rows take them by index; that needs one image or video per prompt."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from . import Family, register_family


class LlavaFamily(Family):
    model_types = ("llava_onevision", "llava_next_video", "llava_next", "llava")
    multimodal = True

    def select_media(self, model: nn.Module, batch: Mapping[str, Any], owner: Tensor) -> dict[str, Any]:
        media = self.prompt_media(model, batch)
        B = int(batch["prompt_input_ids"].shape[0])
        out: dict[str, Any] = {}
        for key, value in media.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == B:
                out[key] = value[owner]
            elif isinstance(value, Tensor) and key == "batch_num_images":
                out[key] = value[owner]
            elif isinstance(value, Tensor):
                raise ValueError(
                    f"{type(self).__name__}: full-sequence rows need one image or video per prompt; "
                    f"{key!r} has {value.shape[0]} rows for {B} prompts"
                )
            else:
                out[key] = value
        return out


FAMILY = register_family(LlavaFamily())
