"""LLaVA-OneVision and LLaVA-NeXT-Video: a vision tower and projector inside ``model.model`` whose
features replace the ``<image>`` / ``<video>`` placeholder tokens, then a standard decoder with 1-D RoPE
(positions count real tokens: ``cumsum(mask) - 1``). Media arrive per image or video, in prompt order
(``pixel_values_videos [num_videos, T, C, H, W]``, ``pixel_values [num_images, patches, C, H, W]`` with
``image_sizes [num_images, 2]``, LLaVA-OneVision's ``batch_num_images`` counting the images of each group
the processor was given). Full-sequence rows take the images and videos of their prompt, found from the
prompts' placeholder tokens: one video or image (group) per prompt that has any, or videos that all take
the same number of tokens (what stacking them into one tensor implies)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import Family, register_family, repeat_per_prompt


def _token_id(config: Any, kind: str) -> int | None:
    for name in (f"{kind}_token_index", f"{kind}_token_id"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def _rows_of_items(ids: Tensor, token_id: int | None, n_items: int, what: str) -> list[int]:
    """The prompt row of each of ``n_items`` images / videos (in prompt order) from the placeholders."""
    if token_id is None:
        raise ValueError(f"the model's config has no {what} token id to find each {what}'s prompt")
    counts = (ids == token_id).sum(-1)
    rows = torch.nonzero(counts > 0).flatten()
    if n_items == rows.numel():  # one per prompt that has any: exact whatever each one's token count
        return rows.tolist()
    total = int(counts.sum())
    per = total // n_items if n_items else 0
    if per and per * n_items == total and bool((counts % per == 0).all()):
        return torch.repeat_interleave(torch.arange(ids.shape[0]), counts // per).tolist()
    raise ValueError(
        f"full-sequence rows need each {what}'s prompt: {n_items} {what}s for placeholder counts "
        f"{counts.tolist()} per prompt (several {what}s of different sizes in one prompt cannot be "
        "told apart)"
    )


class LlavaFamily(Family):
    model_types = ("llava_onevision", "llava_next_video", "llava_next", "llava")
    multimodal = True

    def select_media(self, model: nn.Module, batch: Mapping[str, Any], owner: Tensor) -> dict[str, Any]:
        media = self.prompt_media(model, batch)
        ids = batch["prompt_input_ids"]
        B = int(ids.shape[0])
        cfg = model.config
        rows: dict[str, list[int]] = {}
        if isinstance(media.get("pixel_values_videos"), Tensor):
            n = int(media["pixel_values_videos"].shape[0])
            rows["video"] = _rows_of_items(ids, _token_id(cfg, "video"), n, "video")
        groups = None
        if isinstance(media.get("pixel_values"), Tensor):
            n = int(media["pixel_values"].shape[0])
            if isinstance(media.get("batch_num_images"), Tensor):
                # LLaVA-OneVision: images come in groups (a group of several is not tiled): a group per prompt
                sizes = media["batch_num_images"].tolist()
                if sum(sizes) != n:
                    raise ValueError(f"batch_num_images sums to {sum(sizes)}, but there are {n} images")
                kept = [g for g, k in enumerate(sizes) if k > 0]
                group_rows = _rows_of_items(ids, _token_id(cfg, "image"), len(kept), "image group")
                row_of_group = dict(zip(kept, group_rows))
                rows["image"] = [row_of_group[g] for g, k in enumerate(sizes) for _ in range(k)]
                groups = (sizes, row_of_group)
            else:
                rows["image"] = _rows_of_items(ids, _token_id(cfg, "image"), n, "image")
        picks = {
            kind: [i for s in owner.tolist() for i, r in enumerate(rs) if r == s] for kind, rs in rows.items()
        }
        item_keys = {
            "pixel_values_videos": "video",
            "image_sizes_videos": "video",
            "pixel_values": "image",
            "image_sizes": "image",
        }
        out: dict[str, Any] = {}
        for key, value in media.items():
            if key in item_keys and isinstance(value, Tensor) and item_keys[key] in picks:
                out[key] = value[picks[item_keys[key]]]
            elif key == "batch_num_images" and groups is not None:
                sizes, row_of_group = groups
                g_pick = [g for s in owner.tolist() for g, r in row_of_group.items() if r == s]
                out[key] = value.new_tensor([sizes[g] for g in g_pick])
            else:
                out[key] = repeat_per_prompt(self, key, value, owner, B)
        return out


FAMILY = register_family(LlavaFamily())
