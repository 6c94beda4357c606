"""Synthetic videos of moving shapes with exact scene descriptions and chains correct by construction.

A :class:`Scene` holds objects (colour, shape, size, count) and events (one motion of one object), in
a known order: event ``i`` of ``E`` happens in the time window ``[i/E, (i+1)/E)`` of the clip.
:func:`render` draws it (NumPy only) as ``uint8 [T, 3, H, W]``; :func:`caption` writes its templated
detailed caption; :func:`scene_facts` lists its atomic facts and :func:`caption_facts` parses a caption
back into facts, so :func:`fact_scores` gives the exact precision/recall/F1 of any caption against the
scene.

Chains degrade the *scene*, not the text: :func:`make_scene_chain` applies structured errors (colour,
shape, size, count, motion, order of events, a hallucinated object, a dropped object) cumulatively,
never touching what an earlier error changed, so ``chain[k]`` describes a scene with exactly ``k``
errors and the F1 of ``chain[k]`` against the true scene strictly decreases with ``k``.

:func:`make_synthetic_dataset` makes ``n`` videos with their chains (in memory, and optionally as mp4
files plus the same chains JSONL the ``rankloss chains make`` command writes). Everything is
deterministic per seed.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .chains.core import SHORT_NO_SPANS, Edit, caption_seed

__all__ = [
    "COLOURS",
    "SHAPES",
    "SIZES",
    "MOTIONS",
    "DEGRADATIONS",
    "SceneObject",
    "Event",
    "Scene",
    "SceneChain",
    "FactScores",
    "SyntheticRecord",
    "SyntheticChainDataset",
    "random_scene",
    "render",
    "caption",
    "scene_facts",
    "caption_facts",
    "fact_scores",
    "make_scene_chain",
    "PROBE_GROUPS",
    "FACT_GROUPS",
    "probe_chain",
    "probe_captions",
    "group_fact_scores",
    "synthetic_record",
    "make_synthetic_dataset",
]

#: Colour names and their RGB values (well separated, so they survive lossy video coding).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 210),
    "orange": (250, 140, 20),
    "cyan": (40, 215, 225),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Size names and the object radius as a fraction of ``min(H, W)``.
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.12, "large": 0.17}
MOTIONS: tuple[str, ...] = (
    "left-to-right",
    "right-to-left",
    "falling",
    "bouncing",
    "rotating",
    "appearing",
    "disappearing",
)
#: Scene degradations and the chain edit type (and subtype) each one is recorded as.
DEGRADATIONS: dict[str, tuple[str, str]] = {
    "colour": ("attribute", "colour"),
    "size": ("attribute", "size"),
    "shape": ("object", "shape"),
    "count": ("count", "number"),
    "motion": ("action", "motion"),
    "order": ("order", "event"),
    "insertion": ("insertion", "object"),
    "omission": ("omission", "object"),
}
BACKGROUND = "black"
_MOTION_PHRASES: dict[str, tuple[str, str]] = {
    "left-to-right": ("moves from left to right", "move from left to right"),
    "right-to-left": ("moves from right to left", "move from right to left"),
    "falling": ("falls from the top to the bottom", "fall from the top to the bottom"),
    "bouncing": ("bounces up and down", "bounce up and down"),
    "rotating": ("rotates in place", "rotate in place"),
    "appearing": ("appears", "appear"),
    "disappearing": ("disappears", "disappear"),
}
_COUNT_WORDS = ("one", "two", "three", "four")
MAX_COUNT = len(_COUNT_WORDS)


# ------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneObject:
    """A group of ``count`` identical shapes. ``colour`` + ``shape`` names it uniquely in its scene."""

    colour: str
    shape: str
    size: str = "medium"
    count: int = 1

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"colour must be one of {tuple(COLOURS)}, got {self.colour!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {tuple(SIZES)}, got {self.size!r}")
        if (
            isinstance(self.count, bool)
            or not isinstance(self.count, int)
            or not 1 <= self.count <= MAX_COUNT
        ):
            raise ValueError(f"count must be an int in [1, {MAX_COUNT}], got {self.count!r}")

    @property
    def name(self) -> str:
        """``"<colour> <shape>"``, the object's unique name in its scene."""
        return f"{self.colour} {self.shape}"

    def noun(self) -> str:
        return self.shape + ("s" if self.count > 1 else "")

    def describe(self) -> str:
        """``"a small red circle"`` / ``"two large blue squares"``."""
        head = "a" if self.count == 1 else _COUNT_WORDS[self.count - 1]
        return f"{head} {self.size} {self.colour} {self.noun()}"


@dataclass(frozen=True)
class Event:
    """Object ``obj`` (an index into :attr:`Scene.objects`) performs ``motion``."""

    obj: int
    motion: str

    def __post_init__(self) -> None:
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {MOTIONS}, got {self.motion!r}")


@dataclass(frozen=True)
class Scene:
    """Objects and their events in order. Event ``i`` of ``E`` happens in ``[i/E, (i+1)/E)`` of the clip.

    Invariants (checked): names (colour + shape) unique, at most one event per object, no ``rotating``
    circle (a turning circle looks still).
    """

    objects: tuple[SceneObject, ...]
    events: tuple[Event, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "events", tuple(self.events))
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        names = [o.name for o in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"object names (colour + shape) must be unique in a scene, got {names}")
        seen = set()
        for e in self.events:
            if not 0 <= e.obj < len(self.objects):
                raise ValueError(f"event object index {e.obj} out of range for {len(self.objects)} objects")
            if e.obj in seen:
                raise ValueError(f"object {e.obj} ({names[e.obj]}) has more than one event")
            seen.add(e.obj)
            if e.motion == "rotating" and self.objects[e.obj].shape == "circle":
                raise ValueError(f"a circle cannot have a 'rotating' event ({names[e.obj]})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": [
                {"colour": o.colour, "shape": o.shape, "size": o.size, "count": o.count} for o in self.objects
            ],
            "events": [{"obj": e.obj, "motion": e.motion} for e in self.events],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            tuple(SceneObject(**o) for o in d["objects"]),
            tuple(Event(int(e["obj"]), str(e["motion"])) for e in d.get("events", ())),
        )


def _motions_for(shape: str) -> tuple[str, ...]:
    return tuple(m for m in MOTIONS if not (m == "rotating" and shape == "circle"))


def random_scene(
    rng: random.Random | int, *, min_objects: int = 2, max_objects: int = 3, max_events: int | None = None
) -> Scene:
    """A random scene: ``min_objects..max_objects`` objects with unique names, 1 to ``max_events`` events."""
    if isinstance(rng, int):
        rng = random.Random(rng)
    if not 1 <= min_objects <= max_objects <= len(COLOURS) * len(SHAPES):
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(COLOURS) * len(SHAPES)}")
    n = rng.randint(min_objects, max_objects)
    names = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    objects = tuple(
        SceneObject(c, s, rng.choice(tuple(SIZES)), 1 if rng.random() < 0.7 else rng.randint(2, 3))
        for c, s in names
    )
    max_e = n if max_events is None else max(1, min(max_events, n))
    who = rng.sample(range(n), rng.randint(1, max_e))
    events = tuple(Event(i, rng.choice(_motions_for(objects[i].shape))) for i in who)
    return Scene(objects, events)


# ------------------------------------------------------------------------------------------------------
# Rendering


def _state(scene: Scene, i: int, tau: float) -> tuple[float, float, float, float, bool]:
    """Object ``i`` at clip time ``tau`` in [0, 1): (x, y, angle, scale, visible), x/y as fractions."""
    n = len(scene.objects)
    x, y, angle, scale, visible = 0.5, (i + 1) / (n + 1), 0.0, 1.0, True
    events = scene.events
    for k, ev in enumerate(events):
        if ev.obj != i:
            continue
        lo, hi = k / len(events), (k + 1) / len(events)
        u = min(max((tau - lo) / (hi - lo), 0.0), 1.0)
        m = ev.motion
        if m == "left-to-right":
            x = 0.15 + 0.7 * u
        elif m == "right-to-left":
            x = 0.85 - 0.7 * u
        elif m == "falling":
            y = 0.15 + 0.7 * u
        elif m == "bouncing":
            y = y - 0.22 * abs(math.sin(2.0 * math.pi * u)) if lo <= tau < hi else y
        elif m == "rotating":
            angle = 0.5 * math.pi * u  # a quarter turn: visible for squares and triangles alike
        elif m == "appearing":
            visible = tau >= lo
            scale = u
        elif m == "disappearing":
            visible = tau < hi
            scale = 1.0 - u
    return x, y, angle, scale, visible


def _draw(img: np.ndarray, shape: str, cx: float, cy: float, r: float, angle: float, rgb: np.ndarray) -> None:
    h, w = img.shape[1:]
    if r < 0.5:
        return
    y0, y1 = max(int(cy - r - 1), 0), min(int(cy + r + 2), h)
    x0, x1 = max(int(cx - r - 1), 0), min(int(cx + r + 2), w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy = xx + 0.5 - cx, yy + 0.5 - cy
    if shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    else:
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy  # rotate the pixel into the shape's frame
        if shape == "square":
            half = r * 0.85
            mask = (np.abs(u) <= half) & (np.abs(v) <= half)
        else:  # triangle pointing up in its own frame: three half-planes
            mask = (v <= 0.5 * r) & (math.sqrt(3) * u - v <= r) & (-math.sqrt(3) * u - v <= r)
    region = img[:, y0:y1, x0:x1]
    region[:, mask] = rgb[:, None]


def render(scene: Scene, num_frames: int = 16, height: int = 64, width: int = 64) -> np.ndarray:
    """Draw ``scene`` as ``uint8 [T, 3, H, W]`` RGB frames on a black background (NumPy only).

    Frame ``t`` shows clip time ``tau = (t + 0.5) / T``. Object ``i`` of ``n`` rests at ``x = 0.5`` on
    the lane ``y = (i + 1) / (n + 1)``; its ``count`` copies stand side by side; its event moves it in
    its window (left/right: x from 0.15 to 0.85; falling: y from 0.15 to 0.85; bouncing: up and down
    twice; rotating: a quarter turn; appearing/disappearing: grows from / shrinks to
    nothing, invisible before / after).
    """
    for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    frames = np.zeros((num_frames, 3, height, width), dtype=np.uint8)
    unit = min(height, width)
    rgbs = [np.array(COLOURS[o.colour], dtype=np.uint8) for o in scene.objects]
    for t in range(num_frames):
        tau = (t + 0.5) / num_frames
        for i, obj in enumerate(scene.objects):
            x, y, angle, scale, visible = _state(scene, i, tau)
            if not visible:
                continue
            r = SIZES[obj.size] * unit * scale
            spacing = 2.3 * SIZES[obj.size] * unit
            for j in range(obj.count):
                cx = x * width + (j - (obj.count - 1) / 2) * spacing
                _draw(frames[t], obj.shape, cx, y * height, r, angle, rgbs[i])
    return frames


# ------------------------------------------------------------------------------------------------------
# Captions and facts


def caption(scene: Scene) -> str:
    """The templated detailed caption of ``scene``; :func:`caption_facts` parses it back exactly.

    Example: "The video shows a small red circle and two large blue squares on a black background.
    First, the red circle moves from left to right. Finally, the blue squares fall from the top to the
    bottom."
    """
    items = [o.describe() for o in scene.objects]
    listing = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    sentences = [f"The video shows {listing} on a {BACKGROUND} background."]
    n = len(scene.events)
    for k, ev in enumerate(scene.events):
        obj = scene.objects[ev.obj]
        phrase = _MOTION_PHRASES[ev.motion][obj.count > 1]
        prefix = "" if n == 1 else ("First, " if k == 0 else "Finally, " if k == n - 1 else "Then, ")
        body = f"the {obj.colour} {obj.noun()} {phrase}."
        sentences.append(prefix + body if prefix else body[0].upper() + body[1:])
    return " ".join(sentences)


Fact = tuple


def scene_facts(scene: Scene) -> set[Fact]:
    """The atomic facts of ``scene``.

    ``("object", colour, shape)``, ``("size", colour, shape, size)``, ``("count", colour, shape, n)``
    per object; ``("motion", colour, shape, motion)`` per event; and ``("order", c1, s1, m1, c2, s2, m2)``
    for every pair of events, the first before the second.
    """
    facts: set[Fact] = set()
    for o in scene.objects:
        facts.add(("object", o.colour, o.shape))
        facts.add(("size", o.colour, o.shape, o.size))
        facts.add(("count", o.colour, o.shape, o.count))
    evs = [(scene.objects[e.obj].colour, scene.objects[e.obj].shape, e.motion) for e in scene.events]
    for c, s, m in evs:
        facts.add(("motion", c, s, m))
    for a in range(len(evs)):
        for b in range(a + 1, len(evs)):
            facts.add(("order", *evs[a], *evs[b]))
    return facts


_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_Z = "|".join(SIZES)
_N = "a|an|one|" + "|".join(_COUNT_WORDS[1:])
_ITEM_RE = re.compile(rf"^(?:({_N})\s+)?(?:({_Z})\s+)?({_C})\s+({_S})s?$", re.IGNORECASE)
_LIST_RE = re.compile(r"\bshows\s+(.+?)(?:\s+on\s+an?\s+\w+\s+background)?$", re.IGNORECASE)
_PHRASE_TO_MOTION = {p.lower(): m for m, ps in _MOTION_PHRASES.items() for p in ps}
_EVENT_RE = re.compile(
    rf"^(?:(?:first|then|next|finally|after that|afterwards|later),?\s+)?the\s+({_C})\s+({_S})s?\s+"
    rf"({'|'.join(re.escape(p) for p in sorted(_PHRASE_TO_MOTION, key=len, reverse=True))})\b",
    re.IGNORECASE,
)


def caption_facts(text: str) -> set[Fact]:
    """Parse a caption into the facts of :func:`scene_facts` (sentences that do not parse add nothing).

    ``caption_facts(caption(scene)) == scene_facts(scene)`` for every scene. Free text from a model is
    read the same way: what follows the templates counts, anything else is ignored.
    """
    facts: set[Fact] = set()
    events: list[tuple[str, str, str]] = []
    for sent in re.split(r"(?<=[.!?])\s+", text.strip()):
        sent = sent.strip().rstrip(".!?").strip()
        if not sent:
            continue
        m = _LIST_RE.search(sent)
        if m is not None:
            for item in re.split(r",\s*(?:and\s+)?|\s+and\s+", m.group(1)):
                im = _ITEM_RE.match(item.strip())
                if im is None:
                    continue
                head, size, colour, shape = (g.lower() if g else g for g in im.groups())
                facts.add(("object", colour, shape))
                if size:
                    facts.add(("size", colour, shape, size))
                if head:
                    n = 1 if head in ("a", "an", "one") else _COUNT_WORDS.index(head) + 1
                    facts.add(("count", colour, shape, n))
            continue
        em = _EVENT_RE.match(sent)
        if em is not None:
            ev = (em.group(1).lower(), em.group(2).lower(), _PHRASE_TO_MOTION[em.group(3).lower()])
            facts.add(("motion", *ev))
            events.append(ev)
    for a in range(len(events)):
        for b in range(a + 1, len(events)):
            if events[a] != events[b]:
                facts.add(("order", *events[a], *events[b]))
    return facts


@dataclass(frozen=True)
class FactScores:
    """Precision, recall and F1 of a caption's facts against a scene's facts."""

    precision: float
    recall: float
    f1: float
    true_positives: int
    false_positives: int
    false_negatives: int


def fact_scores(text: str, scene: Scene) -> FactScores:
    """Score a caption against the true scene: ``P = |C ∩ S| / |C|``, ``R = |C ∩ S| / |S|``, F1.

    ``C = caption_facts(text)``, ``S = scene_facts(scene)``; an empty ``C`` has precision 0.
    """
    c, s = caption_facts(text), scene_facts(scene)
    tp = len(c & s)
    p = tp / len(c) if c else 0.0
    r = tp / len(s) if s else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return FactScores(p, r, f1, tp, len(c) - tp, len(s) - tp)


# ------------------------------------------------------------------------------------------------------
# Structured degradation


@dataclass
class SceneChain:
    """``scenes[k]`` is the (claimed) scene ``captions[k]`` describes; ``scenes[0]`` is the true one."""

    scenes: list[Scene]
    captions: list[str]
    edits: list[Edit]
    requested_length: int
    short_reason: str | None = None


class _Degrader:
    """Mutable copy of a scene with object ids, so edits can lock what they changed."""

    def __init__(self, scene: Scene) -> None:
        self.objects: dict[int, SceneObject] = dict(enumerate(scene.objects))
        self.order: list[int] = list(range(len(scene.objects)))  # object ids in listing order
        self.events: list[tuple[int, str]] = [(e.obj, e.motion) for e in scene.events]
        self.taken = {o.name for o in scene.objects}  # names used now or by the true scene
        self.locks: set[tuple[int, str]] = set()
        self.inserted: set[int] = set()
        self.next_id = len(scene.objects)

    def scene(self) -> Scene:
        pos = {oid: i for i, oid in enumerate(self.order)}
        return Scene(
            tuple(self.objects[oid] for oid in self.order),
            tuple(Event(pos[oid], m) for oid, m in self.events),
        )

    def snapshot(self) -> tuple:
        return (dict(self.objects), list(self.order), list(self.events), set(self.taken), set(self.locks),
                set(self.inserted), self.next_id)  # fmt: skip

    def restore(self, snap: tuple) -> None:
        (self.objects, self.order, self.events, self.taken, self.locks, self.inserted, self.next_id) = (
            dict(snap[0]), list(snap[1]), list(snap[2]), set(snap[3]), set(snap[4]), set(snap[5]), snap[6]
        )  # fmt: skip

    def motion_of(self, oid: int) -> str | None:
        return next((m for o, m in self.events if o == oid), None)

    def editable(self, oid: int, what: str) -> bool:
        return oid not in self.inserted and (oid, what) not in self.locks

    def sentence(self, oid: int, motion: str) -> str:
        o = self.objects[oid]
        return f"the {o.colour} {o.noun()} {_MOTION_PHRASES[motion][o.count > 1]}"

    # Each option returns a closure that applies the edit and returns (before, after).
    def options(self, kind: str) -> list:
        opts: list = []
        if kind in ("colour", "shape"):
            for oid in self.order:
                if not self.editable(oid, kind):
                    continue
                o = self.objects[oid]
                if kind == "colour":
                    values = [c for c in COLOURS if c != o.colour and f"{c} {o.shape}" not in self.taken]
                else:
                    values = [
                        s
                        for s in SHAPES
                        if s != o.shape
                        and f"{o.colour} {s}" not in self.taken
                        and not (s == "circle" and self.motion_of(oid) == "rotating")
                    ]
                opts += [(self._set, oid, kind, v) for v in values]
        elif kind == "size":
            for oid in self.order:
                if self.editable(oid, kind):
                    opts += [(self._set, oid, "size", v) for v in SIZES if v != self.objects[oid].size]
        elif kind == "count":
            for oid in self.order:
                c = self.objects[oid].count
                if self.editable(oid, kind):
                    opts += [(self._set, oid, "count", v) for v in (c - 1, c + 1) if 1 <= v <= MAX_COUNT]
        elif kind == "motion":
            for oid, m in self.events:
                if self.editable(oid, kind):
                    shape = self.objects[oid].shape
                    opts += [(self._motion, oid, v) for v in _motions_for(shape) if v != m]
        elif kind == "order":
            free = [k for k, (oid, _) in enumerate(self.events) if self.editable(oid, "order")]
            opts += [(self._swap, a, b) for i, a in enumerate(free) for b in free[i + 1 :]]
        elif kind == "insertion":
            names = [(c, s) for c in COLOURS for s in SHAPES if f"{c} {s}" not in self.taken]
            opts += [(self._insert, c, s) for c, s in names]
        elif kind == "omission":
            if len(self.order) >= 2:
                opts += [
                    (self._drop, oid)
                    for oid in self.order
                    if oid not in self.inserted and not any(k[0] == oid for k in self.locks)
                ]
        return opts

    def _set(self, rng: random.Random, oid: int, what: str, value: Any) -> tuple[str, str]:
        o = self.objects[oid]
        before = o.describe()
        self.objects[oid] = replace(o, **{what: value})
        self.taken.add(self.objects[oid].name)
        self.locks.add((oid, what))
        return before, self.objects[oid].describe()

    def _motion(self, rng: random.Random, oid: int, motion: str) -> tuple[str, str]:
        k = next(k for k, (o, _) in enumerate(self.events) if o == oid)
        before = self.sentence(oid, self.events[k][1])
        self.events[k] = (oid, motion)
        self.locks.add((oid, "motion"))
        return before, self.sentence(oid, motion)

    def _swap(self, rng: random.Random, a: int, b: int) -> tuple[str, str]:
        ea, eb = self.events[a], self.events[b]
        before = f"{self.sentence(*ea)}; then {self.sentence(*eb)}"
        self.events[a], self.events[b] = eb, ea
        self.locks.update({(ea[0], "order"), (eb[0], "order")})
        return before, f"{self.sentence(*eb)}; then {self.sentence(*ea)}"

    def _insert(self, rng: random.Random, colour: str, shape: str) -> tuple[str, str]:
        oid = self.next_id
        self.next_id += 1
        obj = SceneObject(colour, shape, rng.choice(tuple(SIZES)), 1)
        self.objects[oid] = obj
        self.order.insert(rng.randint(0, len(self.order)), oid)
        self.taken.add(obj.name)
        self.inserted.add(oid)
        after = obj.describe()
        if rng.random() < 0.5:
            motion = rng.choice(_motions_for(shape))
            self.events.insert(rng.randint(0, len(self.events)), (oid, motion))
            after += f" that {_MOTION_PHRASES[motion][0]}"
        return "", after

    def _drop(self, rng: random.Random, oid: int) -> tuple[str, str]:
        before = self.objects[oid].describe()
        motion = self.motion_of(oid)
        if motion is not None:
            before += f" that {_MOTION_PHRASES[motion][self.objects[oid].count > 1]}"
        self.order.remove(oid)
        self.events = [(o, m) for o, m in self.events if o != oid]
        del self.objects[oid]
        return before, ""


def make_scene_chain(
    scene: Scene, length: int, rng: random.Random | int, *, kinds: Sequence[str] | None = None
) -> SceneChain:
    """Degrade ``scene`` ``length - 1`` times, cumulatively; ``captions[k]`` has exactly ``k`` errors.

    Every step picks a degradation kind (of :data:`DEGRADATIONS`, least used so far first) and a
    target no earlier step touched: an object's changed attribute is never changed again, a swapped
    event is never swapped again, an inserted object is never edited, and only untouched objects are
    dropped. New names never reuse a name of the true scene, so an error never turns back into a fact.
    """
    if isinstance(rng, int):
        rng = random.Random(rng)
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    kinds = tuple(DEGRADATIONS) if kinds is None else tuple(kinds)
    for k in kinds:
        if k not in DEGRADATIONS:
            raise ValueError(f"kinds must only hold {tuple(DEGRADATIONS)}, got {k!r}")
    d = _Degrader(scene)
    truth = scene_facts(scene)
    scenes, captions, edits = [scene], [caption(scene)], []
    tp, fp = len(truth), 0
    used: Counter[str] = Counter()
    short = None
    for step in range(1, length):
        done = False
        for kind in sorted(kinds, key=lambda k: (used[k], rng.random())):
            opts = d.options(kind)
            rng.shuffle(opts)
            for fn, *args in opts:
                snap = d.snapshot()
                before, after = fn(rng, *args)
                new_scene = d.scene()
                facts = scene_facts(new_scene)
                new_tp, new_fp = len(facts & truth), len(facts - truth)
                # One more error: no true fact comes back, no false one goes away, and something changes.
                if new_tp > tp or new_fp < fp or (new_tp, new_fp) == (tp, fp):
                    d.restore(snap)
                    continue
                text = caption(new_scene)
                etype, subtype = DEGRADATIONS[kind]
                scenes.append(new_scene)
                captions.append(text)
                edits.append(Edit(step, etype, before, after, -1, subtype, "synthetic"))
                used[kind] += 1
                tp, fp = new_tp, new_fp
                done = True
                break
            if done:
                break
        if not done:
            short = SHORT_NO_SPANS
            break
    return SceneChain(scenes, captions, edits, length, short)


# ------------------------------------------------------------------------------------------------------
# Per-error-type probes

#: Degradation kinds by what it takes to see them: ``static`` errors are visible in any single frame
#: (an object's colour, size, shape, how many there are), ``dynamic`` ones need time (how an object
#: moves, which event comes first); ``insertion`` and ``omission`` change a caption's length (an object
#: more or less), so they are their own groups.
PROBE_GROUPS: dict[str, tuple[str, ...]] = {
    "static": ("colour", "size", "shape", "count"),
    "dynamic": ("motion", "order"),
    "insertion": ("insertion",),
    "omission": ("omission",),
}
#: Fact types of :func:`scene_facts` by the same split: what one frame shows, and what needs time.
FACT_GROUPS: dict[str, tuple[str, ...]] = {
    "static": ("object", "size", "count"),
    "dynamic": ("motion", "order"),
}


#: Kinds that swap one detail for another of the same form: their probes are length-matched when possible.
_SUBSTITUTIONS = ("colour", "size", "shape", "count", "motion", "order")


def probe_chain(
    scene: Scene,
    kind: str,
    *,
    seed: int,
    key: str,
    length: Callable[[str], int] | None = None,
    tries: int = 32,
) -> SceneChain | None:
    """The true caption of ``scene`` and one with exactly one error of kind ``kind`` (of
    :data:`DEGRADATIONS`): a :func:`make_scene_chain` of length 2 with ``kinds=[kind]``, or ``None`` when
    the scene has nothing that kind can change (``order`` with a single event).

    Deterministic: attempt ``i`` draws with ``Random(f"probe:{seed}:{key}:{kind}:{i}")`` (``key`` names
    the video), so every model of a run is probed with the same captions. With ``length`` (e.g. a token
    count) a substitution kind (all but insertion and omission) takes the first of ``tries`` attempts
    whose error caption is as long as the true one, else the first attempt."""
    if kind not in DEGRADATIONS:
        raise ValueError(f"kind must be one of {tuple(DEGRADATIONS)}, got {kind!r}")
    first = None
    for i in range(tries if length is not None and kind in _SUBSTITUTIONS else 1):
        ch = make_scene_chain(scene, 2, random.Random(f"probe:{seed}:{key}:{kind}:{i}"), kinds=[kind])
        if len(ch.captions) < 2:
            return None
        if first is None:
            first = ch
        if length is None or kind not in _SUBSTITUTIONS or length(ch.captions[1]) == length(ch.captions[0]):
            return ch
    return first


def probe_captions(
    scene: Scene, *, seed: int, key: str, length: Callable[[str], int] | None = None
) -> dict[str, str]:
    """``{kind: single-error caption}`` for every kind of :data:`DEGRADATIONS` the scene allows
    (:func:`probe_chain`)."""
    out = {}
    for kind in DEGRADATIONS:
        ch = probe_chain(scene, kind, seed=seed, key=key, length=length)
        if ch is not None:
            out[kind] = ch.captions[1]
    return out


def group_fact_scores(text: str, scene: Scene) -> dict[str, FactScores]:
    """:func:`fact_scores` restricted to each group of :data:`FACT_GROUPS` (both the caption's and the
    scene's facts); a group the scene has no fact of is left out."""
    c, s = caption_facts(text), scene_facts(scene)
    out = {}
    for group, types in FACT_GROUPS.items():
        cg = {f for f in c if f[0] in types}
        sg = {f for f in s if f[0] in types}
        if not sg:
            continue
        tp = len(cg & sg)
        p = tp / len(cg) if cg else 0.0
        r = tp / len(sg)
        f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
        out[group] = FactScores(p, r, f1, tp, len(cg) - tp, len(sg) - tp)
    return out


# ------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class SyntheticRecord:
    """One synthetic video with its chain.

    Attributes:
        id: ``"synth-<seed>-<index>"``.
        scene: the true scene (``scenes[0]``).
        chain: captions, best first; ``chain[k]`` describes ``scenes[k]`` (``k`` errors).
        edits: the recorded edits (``engine="synthetic"``).
        scenes: the scene each caption describes.
        frames: ``uint8 [T, 3, H, W]`` or ``None`` when frames were not kept.
        video: the mp4 path (relative to the dataset folder) when written, else ``None``.
    """

    id: str
    scene: Scene
    chain: list[str]
    edits: list[Edit]
    scenes: list[Scene] = field(default_factory=list)
    frames: np.ndarray | None = None
    video: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The chains-JSONL record (the format ``rankloss chains make`` writes)."""
        return {
            "id": self.id,
            "video": self.video if self.video is not None else self.id,
            "chain": list(self.chain),
            "edits": [e.to_dict() for e in self.edits],
            "source": {
                "synthetic": True,
                "scene": self.scene.to_dict(),
                "scenes": [s.to_dict() for s in self.scenes],
            },
        }


def _check_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (
        isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be a positive int or a (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


def synthetic_record(
    index: int,
    *,
    seed: int = 0,
    chain_length: int = 6,
    num_frames: int = 16,
    size: int | tuple[int, int] = 64,
    max_objects: int = 3,
    render_frames: bool = True,
) -> SyntheticRecord:
    """Record ``index`` of the synthetic dataset of ``seed`` (depends only on ``(seed, index)``)."""
    rid = f"synth-{seed}-{index:06d}"
    rng = random.Random(caption_seed(seed, rid))
    scene = random_scene(rng, max_objects=max_objects)
    sc = make_scene_chain(scene, chain_length, rng)
    h, w = _check_hw(size)
    frames = render(scene, num_frames, h, w) if render_frames else None
    return SyntheticRecord(rid, scene, sc.captions, sc.edits, sc.scenes, frames)


class SyntheticChainDataset(Sequence):
    """``n`` synthetic records made on demand: ``ds[i] == synthetic_record(i, seed=seed, ...)``.

    A plain sequence (``len``, indexing, iteration), so it works as a ``torch.utils.data.Dataset``.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        chain_length: int = 6,
        num_frames: int = 16,
        size: int | tuple[int, int] = 64,
        max_objects: int = 3,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        self.n, self.seed, self.chain_length = n, seed, chain_length
        self.num_frames, self.size, self.max_objects = num_frames, _check_hw(size), max_objects

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> SyntheticRecord:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("SyntheticChainDataset does not support slicing; index with ints")
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} records")
        return synthetic_record(
            index,
            seed=self.seed,
            chain_length=self.chain_length,
            num_frames=self.num_frames,
            size=self.size,
            max_objects=self.max_objects,
        )

    def __iter__(self) -> Iterator[SyntheticRecord]:
        for i in range(self.n):
            yield self[i]


def _umask_permissions(path: str) -> None:
    """Give a ``mkstemp`` file (mode 0600) the permissions a plain ``open`` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_jsonl_atomic(path: str, records: Sequence[dict[str, Any]]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _umask_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def make_synthetic_dataset(
    n_videos: int,
    chain_length: int = 6,
    seed: int = 0,
    out_dir: str | os.PathLike[str] | None = None,
    write_mp4: bool = False,
    num_frames: int = 16,
    size: int | tuple[int, int] = 64,
    *,
    fps: int = 8,
    max_objects: int = 3,
    keep_frames: bool = True,
) -> list[SyntheticRecord]:
    """Make ``n_videos`` synthetic videos with chains; optionally write them to ``out_dir``.

    With ``out_dir``: ``chains.jsonl`` (the ``rankloss chains make`` output format, plus each scene in
    ``source``), ``captions.jsonl`` (the input format: ``{"id", "video", "caption", "scene"}``, e.g. to
    try the text engines on synthetic captions) and, with ``write_mp4``, ``videos/<id>.mp4``. Video
    paths in the JSONL files are relative to ``out_dir``. Every file is written atomically.

    Args:
        n_videos: how many videos.
        chain_length: captions per chain ``K``.
        seed: everything depends only on the seed (and each record only on ``(seed, index)``).
        out_dir: folder to write to (created if needed), or ``None`` for in-memory records only.
        write_mp4: write mp4 files (needs PyAV, the ``train`` extra).
        num_frames: frames per video ``T``.
        size: frame size, an int (square) or ``(height, width)``; even for mp4.
        fps: frames per second of the mp4 files.
        max_objects: at most this many object groups per scene.
        keep_frames: keep ``frames`` in the returned records (``False`` saves memory).

    Returns:
        the records, index order.
    """
    if isinstance(n_videos, bool) or not isinstance(n_videos, int) or n_videos < 0:
        raise ValueError(f"n_videos must be an int >= 0, got {n_videos!r}")
    if write_mp4 and out_dir is None:
        raise ValueError("write_mp4=True needs out_dir (the folder to write the mp4 files to)")
    h, w = _check_hw(size)
    out = os.fspath(out_dir) if out_dir is not None else None
    if out is not None:
        os.makedirs(os.path.join(out, "videos") if write_mp4 else out, exist_ok=True)
    if write_mp4:
        from .video import write_video

    records = []
    for i in range(n_videos):
        rec = synthetic_record(
            i,
            seed=seed,
            chain_length=chain_length,
            num_frames=num_frames,
            size=(h, w),
            max_objects=max_objects,
            render_frames=keep_frames or write_mp4,
        )
        if write_mp4:
            rel = os.path.join("videos", f"{rec.id}.mp4")
            write_video(os.path.join(out, rel), rec.frames, fps=fps)
            rec.video = rel
        if not keep_frames:
            rec.frames = None
        records.append(rec)
    if out is not None:
        _write_jsonl_atomic(os.path.join(out, "chains.jsonl"), [r.to_json() for r in records])
        _write_jsonl_atomic(
            os.path.join(out, "captions.jsonl"),
            [
                {"id": r.id, "video": r.video if r.video is not None else r.id, "caption": r.chain[0],
                 "scene": r.scene.to_dict()}
                for r in records
            ],
        )  # fmt: skip
    return records
