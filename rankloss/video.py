"""Video files in and out with PyAV: uniform frame sampling to RGB ``uint8 [T, 3, H, W]``, and mp4 writing.

PyAV comes with the ``train`` extra (``pip install 'rankloss[train]'``); it is imported only when a
function here is called, so ``import rankloss.video`` works without it.

The arrays are NumPy ``uint8`` ``[T, 3, H, W]`` (channels first), which transformers' video processors
accept as they are; ``torch.from_numpy(frames)`` gives a tensor without a copy.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["VideoLoadError", "load_video", "write_video", "uniform_indices", "video_info"]

_TRAIN_HINT = "pip install 'rankloss[train]'"


class VideoLoadError(RuntimeError):
    """A video file exists but cannot be read: corrupt, not a video, no video stream or no frames."""


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"reading and writing video files needs PyAV: {_TRAIN_HINT}") from exc
    return av


def uniform_indices(total: int, num_frames: int) -> np.ndarray:
    """``num_frames`` frame indices spread uniformly over ``total`` frames: the centres of equal segments.

    ``index_i = floor((i + 0.5) * total / num_frames)``, ``i = 0..num_frames-1``; non-decreasing, in
    ``[0, total)``. With ``num_frames > total`` some frames repeat.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1 frame, got {total}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    idx = ((np.arange(num_frames) + 0.5) * total / num_frames).astype(np.int64)
    return np.clip(idx, 0, total - 1)


def _check_size(size: object) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        hw = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"size must be None, an int (square) or a (height, width) pair of ints, got {size!r}")
    if hw[0] < 1 or hw[1] < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    return hw


def _open(path: str, av: Any) -> Any:
    try:
        return av.open(path)
    except av.error.FFmpegError as exc:
        raise VideoLoadError(f"cannot read video {path!r}: {exc}") from exc


def _count_frames(path: str, av: Any) -> int:
    n = 0
    with _open(path, av) as container:
        try:
            for _ in container.decode(video=0):
                n += 1
        except av.error.FFmpegError as exc:
            if n == 0:
                raise VideoLoadError(f"cannot decode video {path!r}: {exc}") from exc
    return n


def _decode_at(path: str, av: Any, indices: np.ndarray, hw: tuple[int, int] | None) -> tuple[list, int]:
    """Decode the frames at ``indices`` (sorted); returns the frames found and how many frames were seen."""
    wanted = {}
    for j, i in enumerate(indices.tolist()):
        wanted.setdefault(i, []).append(j)
    last = int(indices[-1])
    out: list[np.ndarray | None] = [None] * len(indices)
    seen = 0
    with _open(path, av) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in wanted:
                    kw: dict[str, Any] = {"format": "rgb24"}
                    if hw is not None:
                        kw.update(height=hw[0], width=hw[1], interpolation="BILINEAR")
                    arr = frame.to_ndarray(**kw)
                    for j in wanted[i]:
                        out[j] = arr
                if i >= last:
                    break
        except av.error.FFmpegError as exc:
            if seen == 0:
                raise VideoLoadError(f"cannot decode video {path!r}: {exc}") from exc
    return out, seen


def load_video(
    path: str | os.PathLike[str], num_frames: int, size: int | tuple[int, int] | None = None
) -> np.ndarray:
    """Read ``num_frames`` frames sampled uniformly over the whole clip (:func:`uniform_indices`).

    Args:
        path: a video file PyAV/FFmpeg can read (mp4, webm, mkv, avi, ...).
        num_frames: ``T``, the number of frames to return.
        size: ``None`` (keep the frame size), an int (square ``size x size``) or ``(height, width)``;
            resized with bilinear interpolation.

    Returns:
        ``uint8 [T, 3, H, W]`` RGB frames.

    Raises:
        FileNotFoundError: no file at ``path``.
        VideoLoadError: the file cannot be opened or decoded, has no video stream, or has no frames
            (the message names the file).
    """
    av = _import_av()
    path = os.fspath(path)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    hw = _check_size(size)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    if os.path.isdir(path):
        raise VideoLoadError(f"cannot read video {path!r}: it is a directory")
    with _open(path, av) as container:
        if not container.streams.video:
            raise VideoLoadError(f"video file {path!r} has no video stream")
        total = int(container.streams.video[0].frames or 0)
    if total <= 0:  # the container does not say: count by decoding
        total = _count_frames(path, av)
    if total <= 0:
        raise VideoLoadError(f"video file {path!r} has no decodable frames")
    frames, seen = _decode_at(path, av, uniform_indices(total, num_frames), hw)
    if any(f is None for f in frames):  # the header over-counted: sample again over the frames that exist
        if seen == 0:
            raise VideoLoadError(f"video file {path!r} has no decodable frames")
        frames, seen = _decode_at(path, av, uniform_indices(seen, num_frames), hw)
        if any(f is None for f in frames):
            raise VideoLoadError(f"video file {path!r}: frames could not be decoded consistently")
    return np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2))


def video_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"frames", "fps", "height", "width", "duration", "codec"}`` of a video file's first video stream."""
    av = _import_av()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    with _open(path, av) as container:
        if not container.streams.video:
            raise VideoLoadError(f"video file {path!r} has no video stream")
        s = container.streams.video[0]
        duration = float(s.duration * s.time_base) if s.duration is not None and s.time_base else None
        return {
            "frames": int(s.frames or 0),
            "fps": float(s.average_rate) if s.average_rate else None,
            "height": s.codec_context.height,
            "width": s.codec_context.width,
            "duration": duration,
            "codec": s.codec_context.name,
        }


def write_video(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    *,
    fps: int = 8,
    codec: str | None = None,
    crf: int = 18,
) -> str:
    """Write ``uint8 [T, 3, H, W]`` RGB frames as an mp4 file, atomically.

    The file is written to a temporary name in the same directory and moved into place with
    ``os.replace``, so ``path`` is either absent or complete.

    Args:
        path: the output file (``.mp4``).
        frames: ``uint8 [T, 3, H, W]`` (channels first) with even ``H`` and ``W`` (yuv420p).
        fps: frames per second.
        codec: ``"libx264"`` (default when FFmpeg has it) or ``"mpeg4"`` (the fallback).
        crf: libx264 quality (lower is better; 18 is visually lossless for most content).

    Returns:
        the path written.
    """
    av = _import_av()
    path = os.fspath(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must have shape [T, 3, H, W], got {tuple(frames.shape)}")
    t, _, h, w = frames.shape
    if t < 1:
        raise ValueError("frames must hold at least one frame, got T = 0")
    if h % 2 or w % 2:
        raise ValueError(f"frame height and width must be even for yuv420p video, got H={h}, W={w}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an int >= 1, got {fps!r}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": str(int(crf)), "preset": "veryfast"}
            else:
                stream.bit_rate = max(200_000, 40 * h * w * fps)
            hwc = np.ascontiguousarray(frames.transpose(0, 2, 3, 1))
            for img in hwc:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
