"""A chain record's media: images and videos checked and loaded as a processor takes them.

* :func:`load_image`: a ``PIL.Image``, a ``uint8 [H, W, C]`` array or an image file, as an RGB image;
* :func:`load_video`: a video file (``num_frames`` decoded uniformly, :func:`rankloss.video.load_video`)
  or a ``uint8`` frame array ``[T, H, W, C]`` / ``[T, C, H, W]``, as ``uint8 [T, 3, H, W]`` frames, with
  their frames per second (a file's: ``num_frames`` over its duration, :func:`sampled_fps`);
* :func:`takes_video_metadata`: whether a processor's video processor reads ``video_metadata`` (Qwen's
  temporal positions need the frame rate).

Errors name the record and the item (``records[2]['videos'][0]: ...``).
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .records import describe

__all__ = ["load_image", "load_video", "sampled_fps", "takes_video_metadata"]


def sampled_fps(path: str, num_frames: int) -> float:
    """Frames per second of ``num_frames`` frames sampled uniformly over the video file (2.0 when its
    duration is unknown)."""
    from ..video import video_info

    info = video_info(path)
    duration = info.get("duration")
    if not duration and info.get("frames") and info.get("fps"):
        duration = info["frames"] / info["fps"]
    return num_frames / duration if duration else 2.0


def _typed_keys(typed_dict: object) -> set[str]:
    if typed_dict is None:
        return set()
    try:
        return set(typing.get_type_hints(typed_dict))
    except Exception:  # unresolvable forward references: the raw annotations still name the keys
        return set(getattr(typed_dict, "__annotations__", {}))


def _parameters(fn: object) -> set[str]:
    if not callable(fn):
        return set()
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def takes_video_metadata(processor: Any) -> bool:
    """Whether ``processor``'s video processor takes ``video_metadata`` (its typed kwargs or its
    signature say so)."""
    vp = getattr(processor, "video_processor", None)
    return vp is not None and (
        "video_metadata" in _typed_keys(getattr(vp, "valid_kwargs", None))
        or any("video_metadata" in _parameters(fn) for fn in (getattr(vp, "preprocess", None), vp))
    )


def load_image(image: Any, where: str) -> Any:
    """``image`` (a ``PIL.Image``, a ``uint8 [H, W, C]`` array with C = 1, 3 or 4, or a file path) as a
    ``PIL.Image``; ``where`` names it in errors."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: image file not found: {path!r}")
        with Image.open(path) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(
                f"{where} must be a uint8 [H, W, C] array (C = 1, 3 or 4), got {image.dtype} "
                f"{list(image.shape)}"
            )
        return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    raise TypeError(
        f"{where} must be a PIL image, a uint8 [H, W, C] array or a file path, got {describe(image)}"
    )


def load_video(
    video: Any,
    where: str,
    *,
    num_frames: int | None,
    fps: float | None,
    file_fps: Callable[[str, int], float] | None = None,
) -> tuple[np.ndarray, float]:
    """``uint8 [T, 3, H, W]`` frames of ``video`` and their frames per second.

    A file path decodes ``num_frames`` frames (an error naming ``num_frames`` when it is ``None``); its
    rate is ``fps`` when given, else ``file_fps(path, num_frames)`` when given (the collator's memoised
    :func:`sampled_fps`, for processors that read the rate), else 2.0. A frame array
    (``[T, H, W, 3]`` or ``[T, 3, H, W]``, numpy or torch) is used as it is, at ``fps`` (default 2.0).
    ``where`` names the video in errors."""
    if isinstance(video, (str, os.PathLike)):
        from ..video import VideoLoadError
        from ..video import load_video as decode

        path = os.fspath(video)
        if num_frames is None:
            raise ValueError(
                f"{where} is a file path ({path!r}) but num_frames is None: set "
                "ChainCollator(num_frames=...) to say how many frames to decode per video"
            )
        try:
            frames = decode(path, num_frames)
            rate = fps
            if rate is None and file_fps is not None:
                rate = file_fps(path, num_frames)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{where}: {exc}") from exc
        except VideoLoadError as exc:
            raise VideoLoadError(f"{where}: {exc}") from exc
        return frames, float(rate if rate is not None else 2.0)
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if not isinstance(video, np.ndarray):
        raise TypeError(
            f"{where} must be a video file path or a uint8 frame array [T, H, W, C] / [T, C, H, W], "
            f"got {describe(video)}"
        )
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[0] < 1:
        raise ValueError(
            f"{where} must be a uint8 frame array [T, H, W, C] or [T, C, H, W] with T >= 1, got "
            f"{video.dtype} {list(video.shape)}"
        )
    if video.shape[1] == 3:
        frames = video
    elif video.shape[-1] == 3:
        frames = video.transpose(0, 3, 1, 2)
    else:
        raise ValueError(
            f"{where}: cannot tell the channel axis of frames {list(video.shape)}: need 3 (RGB) "
            "channels, [T, H, W, 3] or [T, 3, H, W]"
        )
    return np.ascontiguousarray(frames), float(fps if fps is not None else 2.0)
