"""ShapesWorld: coloured circles, squares and triangles on a plain background.

The world is small enough to verify exactly from pixels (see ``verifier.py``) yet asks the
same compositional questions as GenEval: object presence, two objects, counting, colours,
relative position and colour attribution. Prompts use GenEval's own metadata schema, so the
same evaluator scores ShapesWorld images and real GenEval outputs.

Geometry conventions: images are ``(H, W, 3)`` uint8 with ``H = W = Scene.size`` (64);
coordinates are in pixels with the origin at the top-left corner, x to the right and y
downwards (as in GenEval); an object's bounding box is ``[cx - size/2, cx + size/2)`` in x
and likewise in y. Everything random takes a ``numpy.random.Generator`` or an int seed.

Splits. ``prompts("test")`` holds every prompt containing a held-out composition plus all
single_object and two_object prompts; ``prompts("train")`` holds everything that is not
held out. Held out (test only):

* colour-shape pairs ``HELD_OUT_COLOR_SHAPE`` (purple triangle, green square, orange
  circle) wherever that colour is attached to that shape, in ``colors`` and ``color_attr``;
* count-shape pairs ``HELD_OUT_COUNTS`` (three triangles, four squares);
* spatial configurations ``HELD_OUT_POSITIONS`` (triangle above square, circle left of
  triangle) in BOTH phrasings: "a square below a triangle" describes the same layout as
  "a triangle above a square", so it is held out too.

single_object (3 prompts) and two_object (6 prompts) are too small to hold anything out:
they appear in both splits, and the test split's value there comes from fresh seeds.
Note that held-out compositions are held out as *text*; a training prompt that leaves a
colour free may still render e.g. a purple triangle unless ``scene_for_prompt`` is given
``avoid_color_shape=HELD_OUT_COLOR_SHAPE``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (240, 240, 240)
# Saturated colours, pairwise >= 100 apart in RGB and >= 240 from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 20, 30),
    "orange": (255, 125, 0),
    "yellow": (235, 225, 0),
    "green": (20, 155, 50),
    "blue": (25, 75, 230),
    "purple": (140, 35, 165),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNTS = (1, 2, 3, 4)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

SHARED_TAGS = ("single_object", "two_object")  # in both splits: too few prompts to hold out
HELD_OUT_COLOR_SHAPE = (("purple", "triangle"), ("green", "square"), ("orange", "circle"))
HELD_OUT_COUNTS = ((3, "triangle"), (4, "square"))
# (subject, relation, reference): "a photo of a <subject> <relation> a <reference>".
HELD_OUT_POSITIONS = (("triangle", "above", "square"), ("circle", "left of", "triangle"))

MARGIN = 2  # min distance (px) between a bounding box and the image border
GAP = 3  # min distance (px) between two bounding boxes
SIZE_RANGE_FEW = (20.0, 26.0)  # bbox side for scenes of 1-2 objects
SIZE_RANGE_MANY = (16.0, 20.0)  # bbox side for scenes of 3-4 objects
SUPERSAMPLE = 4  # render at 4x and box-downsample: anti-aliased edges
# Positions and sizes live on a 1/SUPERSAMPLE px grid so the 4x raster is exact.
_QUANTUM = 1.0 / SUPERSAMPLE
# Position scenes keep the cross-axis offset below this fraction of the main-axis offset,
# which guarantees GenEval's relative_position returns exactly the stated relation.
_MAX_CROSS_RATIO = 0.25
_MAX_PLACEMENT_ATTEMPTS = 1000


@dataclass(frozen=True)
class ObjectSpec:
    """One object: ``shape`` in SHAPES, ``color`` in COLORS, centre and bbox side in px."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` with exclusive right/bottom edges, in px."""
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass
class Scene:
    """A list of non-overlapping objects on a ``size x size`` canvas."""

    objects: list[ObjectSpec] = field(default_factory=list)
    size: int = IMAGE_SIZE


def as_rng(seed_or_rng: int | Sequence[int] | np.random.Generator | None) -> np.random.Generator:
    """Return ``seed_or_rng`` if it is a Generator, else a new Generator seeded with it
    (an int or a sequence of ints such as ``(seed, prompt_index)``)."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


# ----------------------------------------------------------------------------- geometry


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """GenEval's relations of box A relative to box B (boxes ``(x0, y0, x1, y1)``, y down).

    The centre offset is shrunk by ``threshold * (dim_a + dim_b)`` per axis, so objects
    whose centres are close relative to their sizes are in no relation; the shrunk offset
    is divided by the length of the raw offset and a direction holds when its component
    exceeds 0.5 (so a diagonal offset can hold two relations).
    """
    a = np.asarray(box_a, dtype=np.float64)[:4].reshape(2, 2)
    b = np.asarray(box_b, dtype=np.float64)[:4].reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _boxes_separated(box_a: Sequence[float], box_b: Sequence[float], gap: float = GAP) -> bool:
    """True if the boxes are at least ``gap`` px apart along x or along y."""
    gap_x = max(box_b[0] - box_a[2], box_a[0] - box_b[2])
    gap_y = max(box_b[1] - box_a[3], box_a[1] - box_b[3])
    return max(gap_x, gap_y) >= gap


def _sample_on_grid(rng: np.random.Generator, low: float, high: float, step: float = _QUANTUM) -> float:
    """Uniform sample from the multiples of ``step`` inside ``[low, high]``."""
    lo, hi = int(np.ceil(low / step - 1e-9)), int(np.floor(high / step + 1e-9))
    if hi < lo:
        raise ValueError(f"empty range [{low}, {high}]")
    return int(rng.integers(lo, hi + 1)) * step


def _centre_range(size: float, canvas: int) -> tuple[float, float]:
    """Allowed centre coordinates keeping a bbox of side ``size`` MARGIN px inside."""
    return MARGIN + size / 2, canvas - MARGIN - size / 2


def _sample_sizes(n: int, rng: np.random.Generator) -> list[float]:
    low, high = SIZE_RANGE_FEW if n <= 2 else SIZE_RANGE_MANY
    # Sides on a 2 * _QUANTUM grid keep the box edges (centre +- side / 2) on the grid.
    return [_sample_on_grid(rng, low, high, 2 * _QUANTUM) for _ in range(n)]


def _scatter(sizes: Sequence[float], rng: np.random.Generator, canvas: int) -> list[tuple[float, float]]:
    """Random centres for boxes of the given sides, pairwise separated by GAP px.

    Sequential rejection sampling, restarted from scratch when an object does not fit.
    """
    for _ in range(_MAX_PLACEMENT_ATTEMPTS):
        centres: list[tuple[float, float]] = []
        boxes: list[tuple[float, float, float, float]] = []
        for size in sizes:
            low, high = _centre_range(size, canvas)
            for _ in range(30):
                cx, cy = _sample_on_grid(rng, low, high), _sample_on_grid(rng, low, high)
                box = (cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2)
                if all(_boxes_separated(box, other) for other in boxes):
                    centres.append((cx, cy))
                    boxes.append(box)
                    break
            else:
                break
        if len(centres) == len(sizes):
            return centres
    raise RuntimeError(f"could not place objects of sizes {list(sizes)} on a {canvas}px canvas")


def _place_in_relation(
    relation: str, size_ref: float, size_subj: float, rng: np.random.Generator, canvas: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres ``(reference, subject)`` with the subject clearly ``relation`` the reference.

    The main-axis distance d is at least the half sides plus GAP and the cross-axis offset
    at most ``_MAX_CROSS_RATIO * d``; then GenEval's relative_position(subject, reference)
    is exactly ``{relation}`` (main component >= 0.77, cross component <= 0.25).
    """
    half_sum = (size_ref + size_subj) / 2
    low_ref, high_ref = _centre_range(size_ref, canvas)
    low_subj, high_subj = _centre_range(size_subj, canvas)
    distance = _sample_on_grid(rng, half_sum + GAP, high_subj - low_ref)
    cross = _sample_on_grid(rng, -_MAX_CROSS_RATIO * distance, _MAX_CROSS_RATIO * distance)
    sign = 1.0 if relation in ("right of", "below") else -1.0
    main_offset = sign * distance
    # Reference coordinate ranges such that the subject (reference + offset) also fits.
    main = _sample_on_grid(rng, max(low_ref, low_subj - main_offset), min(high_ref, high_subj - main_offset))
    other = _sample_on_grid(rng, max(low_ref, low_subj - cross), min(high_ref, high_subj - cross))
    ref, subj = (main, other), (main + main_offset, other + cross)
    if relation in ("above", "below"):
        ref, subj = ref[::-1], subj[::-1]
    return ref, subj


# ----------------------------------------------------------------------------- rendering


def _draw_object(draw: ImageDraw.ImageDraw, obj: ObjectSpec, scale: int) -> None:
    x0, y0, x1, y1 = (int(round(v * scale)) for v in obj.bbox)
    fill = PALETTE[obj.color]
    # PIL boxes are inclusive, ours exclusive: the last covered pixel is x1 - 1.
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    """Rasterise ``scene`` to a ``(size, size, 3)`` uint8 array with anti-aliased edges."""
    big = Image.new("RGB", (scene.size * SUPERSAMPLE,) * 2, background)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        _draw_object(draw, obj, SUPERSAMPLE)
    return np.asarray(big.resize((scene.size, scene.size), Image.Resampling.BOX))


# ----------------------------------------------------------------------------- prompts


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(shape: str, color: str | None = None) -> str:
    return _article(f"{color} {shape}" if color else shape)


def single_object_prompt(shape: str) -> dict:
    """GenEval single_object metadata: "a photo of a circle"."""
    return {
        "tag": "single_object",
        "include": [{"class": shape, "count": 1}],
        "prompt": f"a photo of {_noun(shape)}",
    }


def two_object_prompt(first: str, second: str) -> dict:
    """GenEval two_object metadata: "a photo of a circle and a square"."""
    return {
        "tag": "two_object",
        "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
        "prompt": f"a photo of {_noun(first)} and {_noun(second)}",
    }


def counting_prompt(shape: str, count: int) -> dict:
    """GenEval counting metadata: "a photo of three triangles" (n=1: "one circle")."""
    noun = shape if count == 1 else shape + "s"
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": count}],
        "exclude": [{"class": shape, "count": count + 1}],
        "prompt": f"a photo of {NUMBER_WORDS[count]} {noun}",
    }


def colors_prompt(color: str, shape: str) -> dict:
    """GenEval colors metadata: "a photo of a red circle"."""
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": f"a photo of {_noun(shape, color)}",
    }


def position_prompt(subject: str, relation: str, reference: str) -> dict:
    """GenEval position metadata: "a photo of a <subject> <relation> a <reference>"."""
    return {
        "tag": "position",
        "include": [
            {"class": reference, "count": 1},
            {"class": subject, "count": 1, "position": [relation, 0]},
        ],
        "prompt": f"a photo of {_noun(subject)} {relation} {_noun(reference)}",
    }


def color_attr_prompt(color_a: str, shape_a: str, color_b: str, shape_b: str) -> dict:
    """GenEval color_attr metadata: "a photo of a red circle and a blue square"."""
    return {
        "tag": "color_attr",
        "include": [
            {"class": shape_a, "count": 1, "color": color_a},
            {"class": shape_b, "count": 1, "color": color_b},
        ],
        "prompt": f"a photo of {_noun(shape_a, color_a)} and {_noun(shape_b, color_b)}",
    }


def caption(meta: dict) -> str:
    """The text prompt of a metadata dict."""
    return meta["prompt"]


def all_prompts() -> list[dict]:
    """Every ShapesWorld prompt, in a fixed order (grouped by tag as in TAGS)."""
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    return (
        [single_object_prompt(s) for s in SHAPES]
        + [two_object_prompt(a, b) for a, b in shape_pairs]
        + [counting_prompt(s, n) for s in SHAPES for n in COUNTS]
        + [colors_prompt(c, s) for c in COLORS for s in SHAPES]
        + [position_prompt(b, rel, a) for a, b in shape_pairs for rel in RELATIONS]
        + [
            color_attr_prompt(ca, a, cb, b)
            for a, b in shape_pairs
            for ca, cb in itertools.permutations(COLORS, 2)
        ]
    )


def _position_triple(meta: dict) -> tuple[str, str, str]:
    reference, subject = meta["include"][0]["class"], meta["include"][1]["class"]
    return subject, meta["include"][1]["position"][0], reference


def is_held_out(meta: dict) -> bool:
    """True if the prompt contains a held-out composition (see the module docstring)."""
    tag = meta["tag"]
    if tag in ("colors", "color_attr"):
        return any((c.get("color"), c["class"]) in HELD_OUT_COLOR_SHAPE for c in meta["include"])
    if tag == "counting":
        clause = meta["include"][0]
        return (clause["count"], clause["class"]) in HELD_OUT_COUNTS
    if tag == "position":
        subject, relation, reference = _position_triple(meta)
        inverse = (reference, INVERSE_RELATION[relation], subject)
        return (subject, relation, reference) in HELD_OUT_POSITIONS or inverse in HELD_OUT_POSITIONS
    return False


def prompts(split: str) -> list[dict]:
    """Prompts of ``split`` ("train" or "test"); see the module docstring."""
    if split == "train":
        return [m for m in all_prompts() if not is_held_out(m)]
    if split == "test":
        return [m for m in all_prompts() if is_held_out(m) or m["tag"] in SHARED_TAGS]
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


# ----------------------------------------------------------------------------- scenes


def _pick_color(shape: str, rng: np.random.Generator, avoid: frozenset[tuple[str, str]]) -> str:
    allowed = [c for c in COLORS if (c, shape) not in avoid]
    return allowed[int(rng.integers(len(allowed)))]


def scene_for_prompt(
    meta: dict,
    rng: int | np.random.Generator | Sequence[int],
    size: int = IMAGE_SIZE,
    avoid_color_shape: Iterable[tuple[str, str]] = (),
) -> Scene:
    """A random scene that satisfies ``meta`` exactly (strict-correct for the verifier).

    Exactly ``count`` objects per include clause and nothing else; colours not fixed by
    the prompt are random (never one of ``avoid_color_shape``'s (colour, shape) pairs);
    with a position clause, the two objects are placed so that GenEval's relation holds
    with a clear margin. Supports every prompt of ``all_prompts()`` (include clauses with
    shape classes, a position clause only in two-clause, count-1 prompts).
    """
    rng = as_rng(rng)
    avoid = frozenset(avoid_color_shape)
    clauses = meta["include"]
    unknown = [c["class"] for c in clauses if c["class"] not in SHAPES]
    if unknown:
        raise ValueError(f"ShapesWorld has no class {unknown}")
    kinds = [(c["class"], c.get("color")) for c in clauses for _ in range(c["count"])]
    sizes = _sample_sizes(len(kinds), rng)
    if any("position" in c for c in clauses):
        if len(kinds) != 2 or "position" not in clauses[-1] or clauses[-1]["position"][1] != 0:
            raise ValueError("position prompts need two count-1 clauses, the second relative to the first")
        relation = clauses[1]["position"][0]
        centres = list(_place_in_relation(relation, sizes[0], sizes[1], rng, size))
    else:
        centres = _scatter(sizes, rng, size)
    objects = [
        ObjectSpec(shape, color or _pick_color(shape, rng, avoid), cx, cy, side)
        for (shape, color), (cx, cy), side in zip(kinds, centres, sizes)
    ]
    return Scene(objects, size)
