"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the vision tower runs inside ``model.model`` (Qwen3-VL's deepstack
features are added to the first decoder layers' hidden states at the visual tokens, inside the same
call), positions are 3-axis multimodal RoPE from the model's own ``get_rope_index``, and a completion
token ``t`` sits at the prompt's next position ``+ t`` on all three axes (what ``get_rope_index`` gives
text after the media). Images and videos arrive flattened: ``pixel_values [sum_i h_i w_i t_i, C p p]``
with one ``*_grid_thw`` row per image or video, in prompt order."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import Family, assign_items, register_family, repeat_per_prompt

# media key -> (its grid key, token id attribute of the config)
_FLAT = {
    "pixel_values": ("image_grid_thw", "image_token_id"),
    "pixel_values_videos": ("video_grid_thw", "video_token_id"),
}


class QwenVLFamily(Family):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    rope = "mrope"
    multimodal = True

    def _merge(self, model: nn.Module) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def _token_types(self, model: nn.Module, ids: Tensor) -> Tensor:
        """``mm_token_type_ids``: 0 text, 1 image token, 2 video token (transformers' convention)."""
        cfg = model.config
        types = torch.zeros_like(ids, dtype=torch.int32)
        types[ids == int(cfg.image_token_id)] = 1
        types[ids == int(cfg.video_token_id)] = 2
        return types

    def prompt_media(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        media = self.media(batch)
        if media and "mm_token_type_ids" not in media:
            media["mm_token_type_ids"] = self._token_types(model, batch["prompt_input_ids"])
        return media

    def prompt_positions(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
        media = self.prompt_media(model, batch)
        if "image_grid_thw" not in media and "video_grid_thw" not in media:
            pos, nxt = super().prompt_positions(model, batch)  # text only: what get_rope_index gives text
            return pos.expand(3, *pos.shape), nxt
        # The positions of the prompts with one text token appended: that token's position is where the
        # completions start (after a video the next text position need not be the largest position + 1:
        # Qwen2.5-VL spaces a video's temporal positions by its frame rate, past its height and width).
        text_id = self._text_token(model)
        ids1 = torch.cat([ids, ids.new_full((ids.shape[0], 1), text_id)], 1)
        mask1 = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        types = media["mm_token_type_ids"]
        media = {**media, "mm_token_type_ids": torch.cat([types, types.new_zeros((types.shape[0], 1))], 1)}
        base = self.prompt_module(model)
        rope_index = base.get_rope_index
        params = inspect.signature(rope_index).parameters
        kwargs = {"attention_mask": mask1}
        for key in ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
            if key in params and media.get(key) is not None:
                kwargs[key] = media[key]
        pos, _ = rope_index(ids1, **kwargs)
        nxt = pos[:, :, -1]
        if not bool((nxt == nxt[:1]).all()):
            raise ValueError("get_rope_index gave a text token different positions on its three axes")
        return pos[:, :, :-1], nxt[0]

    def _text_token(self, model: nn.Module) -> int:
        """A token id that is neither a media placeholder nor a vision start / end marker."""
        cfg = model.config
        special = {
            int(v)
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if (v := getattr(cfg, k, None)) is not None
        }
        return next(i for i in range(len(special) + 1) if i not in special)

    def select_media(self, model: nn.Module, batch: Mapping[str, Any], owner: Tensor) -> dict[str, Any]:
        media = self.prompt_media(model, batch)
        ids = batch["prompt_input_ids"]
        merge2 = self._merge(model) ** 2
        out: dict[str, Any] = {}
        for key, value in media.items():
            if key in _FLAT:
                grid_key, token_attr = _FLAT[key]
                grids = media[grid_key]
                placeholders = (ids == int(getattr(model.config, token_attr))).sum(-1).tolist()
                rows = assign_items(placeholders, (grids.prod(-1) // merge2).tolist(), key)
                patches = grids.prod(-1).tolist()
                chunks = list(torch.split(value, patches))
                pick = [i for s in owner.tolist() for i in range(len(chunks)) if rows[i] == s]
                out[key] = torch.cat([chunks[i] for i in pick]) if pick else value[:0]
                out[grid_key] = grids[pick]
                if key == "pixel_values_videos" and media.get("second_per_grid_ts") is not None:
                    out["second_per_grid_ts"] = media["second_per_grid_ts"][pick]
            elif key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
                continue
            else:
                out[key] = repeat_per_prompt(self, key, value, owner, int(ids.shape[0]))
        return out


FAMILY = register_family(QwenVLFamily())
