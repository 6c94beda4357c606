"""Synthetic videos: scenes, rendering, captions <-> facts, chains correct by construction, datasets."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rankloss.chains import read_chains
from rankloss.synthetic import (
    COLOURS,
    DEGRADATIONS,
    Event,
    Scene,
    SceneObject,
    SyntheticChainDataset,
    caption,
    caption_facts,
    fact_scores,
    make_scene_chain,
    make_synthetic_dataset,
    random_scene,
    render,
    scene_facts,
    synthetic_record,
)

SCENE = Scene(
    (
        SceneObject("red", "circle", "large"),
        SceneObject("blue", "square", "small", count=2),
        SceneObject("green", "triangle", "medium"),
    ),
    (Event(0, "left-to-right"), Event(2, "rotating"), Event(1, "falling")),
)


def test_caption_reads_as_expected() -> None:
    assert caption(SCENE) == (
        "The video shows a large red circle, two small blue squares and a medium green triangle on a "
        "black background. First, the red circle moves from left to right. Then, the green triangle "
        "rotates in place. Finally, the blue squares fall from the top to the bottom."
    )
    facts = scene_facts(SCENE)
    assert ("count", "blue", "square", 2) in facts and ("motion", "green", "triangle", "rotating") in facts
    assert ("order", "red", "circle", "left-to-right", "blue", "square", "falling") in facts
    assert len(facts) == 3 * 3 + 3 + 3


@settings(max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), max_objects=st.integers(1, 5))
def test_caption_parses_back_to_the_scene_facts(seed: int, max_objects: int) -> None:
    scene = random_scene(seed, min_objects=1, max_objects=max_objects)
    assert caption_facts(caption(scene)) == scene_facts(scene)
    assert fact_scores(caption(scene), scene).f1 == 1.0
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_fact_scores_of_free_text() -> None:
    text = "The video shows a large red circle and a big dog. The red circle moves from left to right. Lol."
    sc = fact_scores(text, SCENE)
    # object, size (count "a" = 1) and motion facts of the red circle: 4 true facts out of 4 parsed.
    assert (sc.true_positives, sc.false_positives) == (4, 0)
    assert sc.precision == 1.0 and sc.recall == pytest.approx(4 / 15)
    assert fact_scores("Nothing parseable here.", SCENE).f1 == 0.0


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(2, 9))
def test_scene_chain_correct_by_construction(seed: int, length: int) -> None:
    rng = random.Random(seed)
    scene = random_scene(rng, max_objects=3)
    ch = make_scene_chain(scene, length, rng)
    assert ch.scenes[0] == scene and len(ch.scenes) == len(ch.captions) == len(ch.edits) + 1
    assert len(ch.captions) == length or ch.short_reason
    assert len(set(ch.captions)) == len(ch.captions)
    truth = scene_facts(scene)
    prev = None
    for k, (sc, text) in enumerate(zip(ch.scenes, ch.captions)):
        facts = caption_facts(text)
        assert facts == scene_facts(sc)
        tp, fp = len(facts & truth), len(facts - truth)
        f1 = fact_scores(text, scene).f1
        if prev is not None:
            # exactly one more error: no true fact comes back, no false fact goes away, something changes,
            # so the F1 against the true scene strictly falls
            assert tp <= prev[0] and fp >= prev[1] and (tp, fp) != prev[:2]
            assert f1 < prev[2] or prev[2] == 0.0
        prev = (tp, fp, f1)
        if k:
            e = ch.edits[k - 1]
            assert e.step == k and e.engine == "synthetic" and (e.type, e.subtype) in DEGRADATIONS.values()


@pytest.mark.parametrize("kind", list(DEGRADATIONS))
def test_every_degradation_kind(kind: str) -> None:
    ch = make_scene_chain(SCENE, 3 if kind != "order" else 2, random.Random(0), kinds=[kind])
    assert len(ch.edits) == (2 if kind != "order" else 1), ch.short_reason
    assert all((e.type, e.subtype) == DEGRADATIONS[kind] for e in ch.edits)
    assert ch.edits[0].before != ch.edits[0].after


def test_degradations_never_revisit_a_change() -> None:
    scene = Scene((SceneObject("red", "square"),), (Event(0, "falling"),))
    ch = make_scene_chain(scene, 6, random.Random(0), kinds=["colour", "size"])
    # one object: one colour change and one size change, then nothing is left to change
    assert len(ch.captions) == 3 and ch.short_reason == "no more editable spans"
    ch = make_scene_chain(SCENE, 5, random.Random(0), kinds=["order"])
    assert len(ch.captions) == 2  # three events: one swap locks two of them, one event is left


def test_scene_validation() -> None:
    with pytest.raises(ValueError, match="unique"):
        Scene((SceneObject("red", "circle"), SceneObject("red", "circle", "large")))
    with pytest.raises(ValueError, match="rotating"):
        Scene((SceneObject("red", "circle"),), (Event(0, "rotating"),))
    with pytest.raises(ValueError, match="more than one event"):
        Scene((SceneObject("red", "square"),), (Event(0, "falling"), Event(0, "bouncing")))
    with pytest.raises(ValueError, match="colour must be one of"):
        SceneObject("mauve", "circle")
    with pytest.raises(ValueError, match="count must be"):
        SceneObject("red", "circle", count=9)
    with pytest.raises(ValueError, match="motion must be one of"):
        Event(0, "teleporting")
    with pytest.raises(ValueError, match="at least one object"):
        Scene(())


def _mask(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(np.abs(frame.astype(int) - np.array(COLOURS[colour])[:, None, None]) < 10, axis=0)


def test_render_draws_the_scene() -> None:
    frames = render(SCENE, 12, 48, 64)
    assert frames.shape == (12, 3, 48, 64) and frames.dtype == np.uint8
    # red circle: moves right in the first third; blue squares: fall in the last third
    xs = [np.nonzero(_mask(f, "red"))[1].mean() for f in frames]
    ys = [np.nonzero(_mask(f, "blue"))[0].mean() for f in frames]
    assert all(b > a for a, b in zip(xs[:4], xs[1:4])) and xs[5] == xs[11]
    assert all(b > a for a, b in zip(ys[8:], ys[9:])) and ys[0] == ys[7]
    # the green triangle turns during the middle third (its pixel mask changes, its area stays)
    g = [_mask(f, "green") for f in frames]
    assert not np.array_equal(g[4], g[6]) and abs(int(g[4].sum()) - int(g[6].sum())) < 0.2 * g[4].sum()
    # two blue squares: two connected blobs of the same size in the first frame
    cols = np.nonzero(_mask(frames[0], "blue").any(axis=0))[0]
    assert np.count_nonzero(np.diff(cols) > 1) == 1
    # the background is black
    assert frames[0, :, 0, 0].tolist() == [0, 0, 0]


def test_render_appear_disappear() -> None:
    scene = Scene(
        (SceneObject("yellow", "circle", "large"), SceneObject("cyan", "square", "large")),
        (Event(1, "disappearing"), Event(0, "appearing")),
    )
    frames = render(scene, 8, 32, 32)
    yellow = [int(_mask(f, "yellow").sum()) for f in frames]
    cyan = [int(_mask(f, "cyan").sum()) for f in frames]
    assert yellow[:4] == [0, 0, 0, 0] and 0 < yellow[4] < yellow[5] < yellow[7]
    assert cyan[0] > cyan[2] > 0 and cyan[4:] == [0, 0, 0, 0]


def test_dataset_deterministic_per_seed() -> None:
    a = make_synthetic_dataset(3, chain_length=5, seed=11, num_frames=8, size=32)
    b = make_synthetic_dataset(3, chain_length=5, seed=11, num_frames=8, size=32)
    c = make_synthetic_dataset(3, chain_length=5, seed=12, num_frames=8, size=32)
    assert [r.chain for r in a] == [r.chain for r in b] and [r.to_json() for r in a] == [
        r.to_json() for r in b
    ]
    assert all(np.array_equal(x.frames, y.frames) for x, y in zip(a, b))
    assert [r.chain for r in a] != [r.chain for r in c]
    assert a[0].frames.shape == (8, 3, 32, 32)
    ds = SyntheticChainDataset(3, seed=11, chain_length=5, num_frames=8, size=32)
    assert len(ds) == 3 and ds[-1].chain == a[2].chain and np.array_equal(ds[1].frames, a[1].frames)
    assert [r.id for r in ds] == [r.id for r in a]
    with pytest.raises(IndexError):
        ds[3]
    rec = synthetic_record(1, seed=11, chain_length=5, num_frames=8, size=32, render_frames=False)
    assert rec.frames is None and rec.chain == a[1].chain


def test_dataset_written_to_disk(tmp_path) -> None:
    pytest.importorskip("av")
    from rankloss.video import load_video

    recs = make_synthetic_dataset(
        2, chain_length=4, seed=0, out_dir=tmp_path, write_mp4=True, num_frames=8, size=32
    )
    chains = list(read_chains(tmp_path / "chains.jsonl"))
    assert chains == [r.to_json() for r in recs]
    assert set(chains[0]) == {"id", "video", "chain", "edits", "source"}
    assert chains[0]["source"]["scene"] == recs[0].scene.to_dict()
    caps = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in caps] == [r.chain[0] for r in recs]
    for r in recs:
        frames = load_video(tmp_path / r.video, 8)
        assert frames.shape == (8, 3, 32, 32)
        assert np.abs(frames.astype(int) - r.frames.astype(int)).mean() < 12  # lossy codec, tiny frames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["captions.jsonl", "chains.jsonl", "videos"]
    with pytest.raises(ValueError, match="needs out_dir"):
        make_synthetic_dataset(1, write_mp4=True)
