"""The edit taxonomy and the English lexicons the ``rules`` engine edits with.

Every edit of a caption chain has one of the :data:`EDIT_TYPES` and, where useful, a ``subtype``:

==============  =========================================================  ==========================
type            what changes                                               subtypes
==============  =========================================================  ==========================
``object``      an object/entity noun becomes another of the same kind     category (``animal``, ...)
``attribute``   a colour, size or material word becomes another one        ``colour|size|material``
``count``       a number (digit or word) becomes another number            ``number|frequency``
``action``      a verb becomes another verb of the same kind and form      category (``motion``, ...)
``spatial``     a spatial relation flips (left/right, above/below, ...)    ``relation``
``order``       two event sentences/clauses swap, or before/after flips    ``sentence|clause|connective``
``insertion``   a plausible detail that is not there is added              ``sentence|attribute``
``omission``    a detail is dropped                                        ``attribute|clause|sentence``
==============  =========================================================  ==========================

The lexicons are plain data (lower case). Entries may hold spaces or hyphens ("in front of",
"left-to-right"); the engine matches longest entries first on word boundaries, case-insensitively,
and copies the case of the word it replaces.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "EDIT_TYPES",
    "EDIT_TYPE_DESCRIPTIONS",
    "COLOURS",
    "SIZE_ANTONYMS",
    "MATERIALS",
    "NUMBER_WORDS",
    "FREQUENCY_WORDS",
    "OBJECTS",
    "ACTIONS",
    "SPATIAL_PAIRS",
    "TEMPORAL_PAIRS",
    "TEMPORAL_MARKERS",
    "INSERTION_TEMPLATES",
    "check_types",
]

#: The edit types, in the order the docs list them.
EDIT_TYPES: tuple[str, ...] = (
    "object",
    "attribute",
    "count",
    "action",
    "spatial",
    "order",
    "insertion",
    "omission",
)

#: One-line descriptions (also used to prompt the ``llm`` engine).
EDIT_TYPE_DESCRIPTIONS: Mapping[str, str] = {
    "object": "replace one object, person or animal with a different one (e.g. 'dog' -> 'cat')",
    "attribute": "change one attribute such as a colour, size or material (e.g. 'red' -> 'blue')",
    "count": "change one number or count (e.g. 'two people' -> 'three people')",
    "action": "replace one action or verb with a different action (e.g. 'walks' -> 'runs')",
    "spatial": "flip one spatial relation or direction (e.g. 'left' -> 'right', 'above' -> 'below')",
    "order": "swap the order of two events by swapping two sentences that describe them",
    "insertion": "add one plausible detail (an object or attribute) that the caption does not mention",
    "omission": "remove one detail (an attribute, a clause or a sentence) from the caption",
}

COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "gray", "grey",
    "brown", "cyan", "magenta", "silver", "golden", "beige", "turquoise", "violet", "navy",
)  # fmt: skip

#: Size words and the words that contradict them (a size edit picks one of these).
SIZE_ANTONYMS: Mapping[str, tuple[str, ...]] = {
    "small": ("large", "big", "huge"),
    "large": ("small", "tiny"),
    "big": ("small", "tiny"),
    "tiny": ("huge", "large"),
    "huge": ("tiny", "small"),
    "giant": ("tiny", "small"),
    "medium": ("large", "small"),
    "medium-sized": ("large", "small"),
    "tall": ("short",),
    "long": ("short",),
    "thin": ("thick",),
    "thick": ("thin",),
    "wide": ("narrow",),
    "narrow": ("wide",),
}

MATERIALS: tuple[str, ...] = (
    "wooden", "metal", "metallic", "plastic", "leather", "ceramic", "cardboard", "woolen", "concrete",
    "rubber", "velvet", "denim",
)  # fmt: skip

NUMBER_WORDS: tuple[str, ...] = (
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)  # fmt: skip

#: Frequency words and their replacements.
FREQUENCY_WORDS: Mapping[str, tuple[str, ...]] = {
    "once": ("twice", "three times"),
    "twice": ("once", "three times"),
    "three times": ("once", "twice"),
}

#: Object nouns by category: (singular, plural). An object edit stays inside a category.
OBJECTS: Mapping[str, tuple[tuple[str, str], ...]] = {
    "person": (("man", "men"), ("woman", "women"), ("boy", "boys"), ("girl", "girls")),
    "role": (
        ("chef", "chefs"), ("player", "players"), ("worker", "workers"), ("soldier", "soldiers"),
        ("doctor", "doctors"), ("teacher", "teachers"), ("student", "students"), ("farmer", "farmers"),
        ("police officer", "police officers"), ("musician", "musicians"), ("dancer", "dancers"),
    ),
    "animal": (
        ("dog", "dogs"), ("cat", "cats"), ("horse", "horses"), ("bird", "birds"), ("cow", "cows"),
        ("duck", "ducks"), ("rabbit", "rabbits"), ("monkey", "monkeys"), ("elephant", "elephants"),
        ("lion", "lions"), ("bear", "bears"), ("goat", "goats"), ("chicken", "chickens"), ("pig", "pigs"),
    ),
    "vehicle": (
        ("car", "cars"), ("truck", "trucks"), ("bus", "buses"), ("bicycle", "bicycles"),
        ("motorcycle", "motorcycles"), ("boat", "boats"), ("train", "trains"), ("airplane", "airplanes"),
        ("helicopter", "helicopters"), ("van", "vans"), ("tractor", "tractors"),
    ),
    "furniture": (
        ("table", "tables"), ("chair", "chairs"), ("sofa", "sofas"), ("bed", "beds"),
        ("desk", "desks"), ("bench", "benches"), ("shelf", "shelves"), ("lamp", "lamps"),
        ("cabinet", "cabinets"), ("stool", "stools"),
    ),
    "container": (
        ("cup", "cups"), ("bottle", "bottles"), ("bowl", "bowls"), ("plate", "plates"),
        ("box", "boxes"), ("bag", "bags"), ("basket", "baskets"), ("bucket", "buckets"), ("jar", "jars"),
        ("pot", "pots"), ("pan", "pans"),
    ),
    "device": (
        ("phone", "phones"), ("laptop", "laptops"), ("camera", "cameras"), ("television", "televisions"),
        ("computer", "computers"), ("keyboard", "keyboards"), ("microphone", "microphones"),
        ("guitar", "guitars"), ("piano", "pianos"), ("remote", "remotes"),
    ),
    "food": (
        ("apple", "apples"), ("banana", "bananas"), ("sandwich", "sandwiches"), ("pizza", "pizzas"),
        ("cake", "cakes"), ("carrot", "carrots"), ("tomato", "tomatoes"), ("egg", "eggs"),
        ("cookie", "cookies"), ("lemon", "lemons"), ("potato", "potatoes"),
    ),
    "clothing": (
        ("shirt", "shirts"), ("jacket", "jackets"), ("hat", "hats"), ("dress", "dresses"),
        ("coat", "coats"), ("scarf", "scarves"), ("sweater", "sweaters"), ("cap", "caps"),
        ("helmet", "helmets"), ("apron", "aprons"),
    ),
    "nature": (
        ("tree", "trees"), ("flower", "flowers"), ("rock", "rocks"), ("bush", "bushes"),
        ("mountain", "mountains"), ("river", "rivers"), ("lake", "lakes"), ("hill", "hills"),
    ),
    "item": (
        ("ball", "balls"), ("book", "books"), ("pen", "pens"), ("knife", "knives"), ("fork", "forks"),
        ("spoon", "spoons"), ("umbrella", "umbrellas"), ("towel", "towels"), ("toy", "toys"),
        ("racket", "rackets"), ("stick", "sticks"), ("rope", "ropes"), ("kite", "kites"),
        ("candle", "candles"), ("clock", "clocks"),
    ),
    "shape": (
        ("circle", "circles"), ("square", "squares"), ("triangle", "triangles"), ("star", "stars"),
        ("rectangle", "rectangles"), ("cube", "cubes"), ("sphere", "spheres"), ("disk", "disks"),
    ),
}  # fmt: skip

#: Verbs by category: (third person singular, -ing form, past). A base form is not listed on purpose:
#: many base forms are also nouns or adjectives ("a walk", "close to"), which the forms here avoid.
ACTIONS: Mapping[str, tuple[tuple[str, str, str], ...]] = {
    "motion": (
        ("walks", "walking", "walked"), ("runs", "running", "ran"), ("jumps", "jumping", "jumped"),
        ("crawls", "crawling", "crawled"), ("climbs", "climbing", "climbed"), ("swims", "swimming", "swam"),
        ("dances", "dancing", "danced"), ("rolls", "rolling", "rolled"), ("slides", "sliding", "slid"),
        ("spins", "spinning", "spun"), ("falls", "falling", "fell"), ("flies", "flying", "flew"),
        ("bounces", "bouncing", "bounced"), ("rotates", "rotating", "rotated"), ("moves", "moving", "moved"),
        ("skates", "skating", "skated"), ("rides", "riding", "rode"), ("drives", "driving", "drove"),
    ),
    "manipulation": (
        ("holds", "holding", "held"), ("throws", "throwing", "threw"), ("catches", "catching", "caught"),
        ("drops", "dropping", "dropped"), ("pushes", "pushing", "pushed"), ("pulls", "pulling", "pulled"),
        ("opens", "opening", "opened"), ("closes", "closing", "closed"), ("lifts", "lifting", "lifted"),
        ("carries", "carrying", "carried"), ("cuts", "cutting", "cut"), ("kicks", "kicking", "kicked"),
        ("grabs", "grabbing", "grabbed"), ("touches", "touching", "touched"), ("shakes", "shaking", "shook"),
        ("pours", "pouring", "poured"), ("stirs", "stirring", "stirred"), ("washes", "washing", "washed"),
    ),
    "posture": (
        ("sits", "sitting", "sat"), ("stands", "standing", "stood"), ("kneels", "kneeling", "knelt"),
        ("lies", "lying", "lay"), ("leans", "leaning", "leaned"), ("squats", "squatting", "squatted"),
    ),
    "communication": (
        ("talks", "talking", "talked"), ("laughs", "laughing", "laughed"), ("smiles", "smiling", "smiled"),
        ("shouts", "shouting", "shouted"), ("sings", "singing", "sang"), ("nods", "nodding", "nodded"),
        ("yells", "yelling", "yelled"), ("points", "pointing", "pointed"), ("cries", "crying", "cried"),
        ("whispers", "whispering", "whispered"), ("claps", "clapping", "clapped"),
    ),
    "consumption": (
        ("eats", "eating", "ate"), ("sips", "sipping", "sipped"), ("bites", "biting", "bitten"),
        ("chews", "chewing", "chewed"), ("tastes", "tasting", "tasted"),
    ),
    "perception": (
        ("stares", "staring", "stared"), ("watches", "watching", "watched"), ("reads", "reading", "read"),
        ("writes", "writing", "wrote"), ("knits", "knitting", "knitted"), ("plays", "playing", "played"),
        ("paints", "painting", "painted"), ("draws", "drawing", "drew"),
    ),
    "camera": (
        ("pans", "panning", "panned"), ("zooms", "zooming", "zoomed"), ("tilts", "tilting", "tilted"),
    ),
    "appearance": (
        ("appears", "appearing", "appeared"), ("disappears", "disappearing", "disappeared"),
        ("enters", "entering", "entered"), ("exits", "exiting", "exited"),
        ("arrives", "arriving", "arrived"), ("departs", "departing", "departed"),
    ),
}  # fmt: skip

#: Spatial relations and the relations that contradict them (both directions are listed).
SPATIAL_PAIRS: Mapping[str, str] = {
    "left": "right",
    "right": "left",
    "leftmost": "rightmost",
    "rightmost": "leftmost",
    "left to right": "right to left",
    "right to left": "left to right",
    "left-to-right": "right-to-left",
    "right-to-left": "left-to-right",
    "the left to the right": "the right to the left",
    "the right to the left": "the left to the right",
    "left to the right": "right to the left",
    "right to the left": "left to the right",
    "top to bottom": "bottom to top",
    "bottom to top": "top to bottom",
    "the top to the bottom": "the bottom to the top",
    "the bottom to the top": "the top to the bottom",
    "above": "below",
    "below": "above",
    "in front of": "behind",
    "behind": "in front of",
    "on top of": "underneath",
    "underneath": "on top of",
    "beneath": "above",
    "under": "above",
    "inside": "outside",
    "outside": "inside",
    "into": "out of",
    "out of": "into",
    "toward": "away from",
    "towards": "away from",
    "away from": "toward",
    "near": "far from",
    "far from": "near",
    "top": "bottom",
    "bottom": "top",
    "upper": "lower",
    "lower": "upper",
    "foreground": "background",
    "background": "foreground",
    "upward": "downward",
    "downward": "upward",
    "upwards": "downwards",
    "downwards": "upwards",
    "clockwise": "counterclockwise",
    "counterclockwise": "clockwise",
    "north": "south",
    "south": "north",
    "east": "west",
    "west": "east",
}

#: Temporal connectives whose flip reverses the order of two events (``order``/``connective``).
TEMPORAL_PAIRS: Mapping[str, str] = {
    "before": "after",
    "after": "before",
    "earlier": "later",
    "later": "earlier",
    "beginning": "end",
    "afterwards": "beforehand",
}

#: Words that mark a sentence as describing an event (with the verbs of :data:`ACTIONS`).
TEMPORAL_MARKERS: tuple[str, ...] = (
    "then", "next", "finally", "first", "afterwards", "later", "after", "before", "while", "meanwhile",
    "eventually", "suddenly", "begins", "starts", "continues", "ends",
)  # fmt: skip

#: Sentence templates for hallucinated insertions. ``{a}`` is the article ("A"/"An") agreeing with the
#: next word, ``{colour}`` a colour, ``{size}`` a size word, ``{object}`` a singular object noun not
#: already mentioned in the caption, ``{side}`` "left" or "right".
INSERTION_TEMPLATES: tuple[str, ...] = (
    "{a} {colour} {object} is visible in the background.",
    "{a} {size} {object} can be seen on the {side}.",
    "{a} {colour} {object} briefly appears in the corner of the frame.",
    "{a} {object} lies on the ground nearby.",
    "{a} {size} {colour} {object} stays in view throughout the clip.",
)

# --------------------------------------------------------------------------------------------------------
# Derived tables (built once at import).

INSERTION_SIZES: tuple[str, ...] = ("small", "large", "tiny", "big")


def _trie_pattern(words: Iterable[str]) -> str:
    """The alternation of ``words`` (lower-cased; a space matches any run of white space) as a trie.

    It matches exactly what ``word_1|word_2|...`` sorted longest first matches, at the same places, but
    the regex engine follows one branch per character instead of trying every word in turn: 2-10x faster
    on the lexicons here (the rules engine spends most of its time in these searches). At a node where a
    word ends and longer ones go on, the longer branch is optional and greedy, so the longest word that
    fits is tried first, as in the longest-first alternation; siblings start with different characters,
    so at most one of them can match.
    """
    end = ""
    root: dict[str, Any] = {}
    for w in {w.lower() for w in words}:
        node = root
        for ch in w:
            node = node.setdefault(r"\s+" if ch == " " else re.escape(ch), {})
        node[end] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [k + emit(v) for k, v in sorted(node.items()) if k != end]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if end in node else body

    return emit(root)


def _words_regex(words: Iterable[str]) -> re.Pattern[str]:
    """One case-insensitive alternation over ``words``, longest first, on word boundaries (built as a
    trie: :func:`_trie_pattern`).

    Hyphens and apostrophes glued to a word are treated as part of it (``(?<![\\w'-])``), so "left" does
    not match inside "left-handed" and "red" not inside "red-eyed".
    """
    return re.compile(rf"(?<![\w'-])(?:{_trie_pattern(words)})(?![\w'-])", re.IGNORECASE)


#: object noun (lower) -> (category, index in the category, 0 singular / 1 plural)
OBJECT_INDEX: dict[str, tuple[str, int, int]] = {}
for _cat, _pairs in OBJECTS.items():
    for _i, (_sg, _pl) in enumerate(_pairs):
        OBJECT_INDEX.setdefault(_sg, (_cat, _i, 0))
        OBJECT_INDEX.setdefault(_pl, (_cat, _i, 1))

#: verb form (lower) -> (category, index in the category, form 0/1/2)
ACTION_INDEX: dict[str, tuple[str, int, int]] = {}
for _cat, _verbs in ACTIONS.items():
    for _i, _forms in enumerate(_verbs):
        for _f, _w in enumerate(_forms):
            # An ambiguous past form ("read", "cut") keeps its first meaning.
            ACTION_INDEX.setdefault(_w, (_cat, _i, _f))

ATTRIBUTE_SUBTYPE: dict[str, str] = {}
for _w in COLOURS:
    ATTRIBUTE_SUBTYPE[_w] = "colour"
for _w in SIZE_ANTONYMS:
    ATTRIBUTE_SUBTYPE[_w] = "size"
for _w in MATERIALS:
    ATTRIBUTE_SUBTYPE[_w] = "material"

NUMBER_VALUES: dict[str, int] = {w: i + 2 for i, w in enumerate(NUMBER_WORDS)}

OBJECT_RE = _words_regex(OBJECT_INDEX)
ACTION_RE = _words_regex(ACTION_INDEX)
ATTRIBUTE_RE = _words_regex(ATTRIBUTE_SUBTYPE)
# Numbers: a number word, a frequency word, or a small integer that is not part of a decimal, a time or
# a longer number ("3.5", "10:30", "2024" are left alone).
COUNT_RE = re.compile(
    _words_regex(list(NUMBER_WORDS) + list(FREQUENCY_WORDS)).pattern
    + r"|(?<![\w.:,])(?:[2-9]|1[0-9])(?![\w.:,]\d|\w)",
    re.IGNORECASE,
)
SPATIAL_RE = _words_regex(SPATIAL_PAIRS)
TEMPORAL_RE = _words_regex(TEMPORAL_PAIRS)
EVENT_RE = _words_regex(list(ACTION_INDEX) + list(TEMPORAL_MARKERS))


def check_types(types: object, name: str = "types") -> tuple[str, ...]:
    """Validate a selection of edit types: ``None`` (all of :data:`EDIT_TYPES`) or a non-empty sequence."""
    if types is None:
        return EDIT_TYPES
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    if not isinstance(types, Sequence) or isinstance(types, (bytes, bytearray)):
        raise TypeError(f"{name} must be None or a sequence of edit types from {EDIT_TYPES}, got {types!r}")
    out: list[str] = []
    for t in types:
        if t not in EDIT_TYPES:
            raise ValueError(f"{name} must only hold edit types from {EDIT_TYPES}, got {t!r}")
        if t not in out:
            out.append(t)
    if not out:
        raise ValueError(f"{name} must hold at least one edit type from {EDIT_TYPES}, got an empty selection")
    return tuple(out)
