"""Video files: uniform sampling, resizing, the mp4 round trip, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from rankloss.synthetic import COLOURS, Scene, SceneObject, render
from rankloss.video import VideoLoadError, load_video, uniform_indices, video_info, write_video

av = pytest.importorskip("av")


def test_uniform_indices() -> None:
    assert uniform_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert uniform_indices(10, 1).tolist() == [5]
    assert uniform_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    idx = uniform_indices(1000, 7)
    assert idx.min() >= 0 and idx.max() < 1000 and np.all(np.diff(idx) > 0)
    with pytest.raises(ValueError, match="total"):
        uniform_indices(0, 3)


def _ramp(t: int, h: int = 32, w: int = 32) -> np.ndarray:
    """Frame i is uniformly gray at level 20 + 25 i: which frame was read is visible in its mean."""
    levels = 20 + 25 * np.arange(t)
    return np.broadcast_to(levels[:, None, None, None], (t, 3, h, w)).astype(np.uint8).copy()


def test_round_trip_samples_uniformly(tmp_path) -> None:
    path = write_video(tmp_path / "ramp.mp4", _ramp(8), fps=8)
    info = video_info(path)
    assert (info["frames"], info["height"], info["width"]) == (8, 32, 32)
    frames = load_video(path, 4)
    assert frames.shape == (4, 3, 32, 32) and frames.dtype == np.uint8 and frames.flags.c_contiguous
    means = frames.reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(means, [20 + 25 * i for i in (1, 3, 5, 7)], atol=4)
    every = load_video(path, 8)
    np.testing.assert_allclose(every.reshape(8, -1).mean(axis=1), 20 + 25 * np.arange(8), atol=4)
    more = load_video(path, 12)  # more frames than the clip has: some repeat
    assert more.shape[0] == 12


def test_round_trip_colours_and_resize(tmp_path) -> None:
    scene = Scene((SceneObject("red", "square", "large"), SceneObject("blue", "circle", "large")))
    frames = render(scene, 8, 32, 32)
    path = write_video(tmp_path / "shapes.mp4", frames)
    back = load_video(path, 8)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 8
    # the centres of the two shapes keep their colours (lossy codec: a loose tolerance)
    for colour, (y, x) in (("red", (11, 16)), ("blue", (21, 16))):
        assert np.abs(back[:, :, y, x].astype(int) - np.array(COLOURS[colour])).max() < 40
    small = load_video(path, 3, size=16)
    assert small.shape == (3, 3, 16, 16)
    rect = load_video(path, 2, size=(16, 24))
    assert rect.shape == (2, 3, 16, 24)
    assert np.abs(rect[0, :, 5, 12].astype(int) - np.array(COLOURS["red"])).max() < 50


def test_mpeg4_codec(tmp_path) -> None:
    path = write_video(tmp_path / "m.mp4", _ramp(4), codec="mpeg4")
    assert video_info(path)["codec"] == "mpeg4"
    np.testing.assert_allclose(
        load_video(path, 4).reshape(4, -1).mean(axis=1), 20 + 25 * np.arange(4), atol=6
    )


def test_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_video(missing, 4)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoLoadError, match="corrupt.mp4"):
        load_video(corrupt, 4)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoLoadError, match="empty.mp4"):
        load_video(empty, 4)
    # a valid media file without a video stream
    audio = tmp_path / "audio.wav"
    with av.open(str(audio), mode="w", format="wav") as c:
        stream = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    with pytest.raises(VideoLoadError, match=r"audio\.wav.*no video stream"):
        load_video(audio, 4)
    with pytest.raises(VideoLoadError, match="directory"):
        load_video(tmp_path, 4)


def test_argument_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_frames"):
        load_video(tmp_path / "x.mp4", 0)
    with pytest.raises(TypeError, match="size"):
        load_video(tmp_path / "x.mp4", 2, size=(1, 2, 3))
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 3, 31, 32), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 32, 32, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written was left behind
