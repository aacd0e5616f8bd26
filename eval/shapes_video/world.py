"""ShapesWorld-Video: short clips of ShapesWorld objects moving in straight lines, with captions.

Clips are ``(T, H, W, 3)`` uint8 arrays, T = 8 frames of 64x64 by default; every frame is a
ShapesWorld scene rendered by ``eval.shapes.render`` (same palette, background, shapes and
anti-aliasing), so the image verifier's detector reads every frame.

Motion. Each object moves at constant velocity along one axis, ``left``/``right``/``up``/``down``
(y grows downwards), at a "slow" (1.5-2.25 px/frame) or "fast" (3.5-4.5 px/frame) speed; the
classes are separated by a gap so the verifier's threshold (2.9 px/frame) is never ambiguous on
ground truth. Positions stay on ShapesWorld's 1/4 px grid, inside the canvas in every frame, and
objects never come within GAP px of each other in any frame (they never touch or occlude).

Prompt categories (``VIDEO_TAGS``), metadata ``{"tag", "prompt", "objects": [clause, ...]}`` with
clauses ``{"shape", "color", "direction", "count", "speed"}`` (speed None = unconstrained):

* ``single``:   "a red circle moving right"
* ``speed``:    "a red circle moving right slowly" / "... quickly"
* ``opposite``: "a red circle moving left and a blue square moving right" (opposite directions)
* ``count``:    "two red circles moving up" (2 or 3 identical objects, same direction)

Splits. Held out as text (test split only): every prompt in which a held-out (colour, direction)
pair ``HELD_OUT_COLOR_DIRECTION`` occurs, e.g. nothing green ever moves left in training while
green objects move in the other directions and other colours move left. ``prompts("train")`` is
everything else. All colours are named in every prompt, so no training clip shows a held-out
pair. The held-out direction accuracy of a model is its compositional generalisation of motion.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from eval.shapes.world import (
    COLORS,
    GAP,
    IMAGE_SIZE,
    MARGIN,
    SHAPES,
    ObjectSpec,
    Scene,
    _boxes_separated,
    _sample_on_grid,
    as_rng,
    render,
)

NUM_FRAMES = 8
DIRECTIONS = ("left", "right", "up", "down")
UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}
SPEED_RANGES = {"slow": (1.5, 2.25), "fast": (3.5, 4.5)}  # px per frame
SPEED_THRESHOLD = 2.9  # px per frame between the classes (the verifier's decision boundary)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
VIDEO_TAGS = ("single", "speed", "opposite", "count")
HELD_OUT_COLOR_DIRECTION = (("green", "left"), ("red", "up"), ("blue", "down"), ("yellow", "right"))
SIZE_RANGE_FEW = (14.0, 18.0)  # bbox side for 1-2 objects
SIZE_RANGE_MANY = (14.0, 16.0)  # bbox side for 3 objects
_MAX_ATTEMPTS = 2000


@dataclass(frozen=True)
class MovingObject:
    """An object at (x0, y0) in frame 0 moving (vx, vy) px per frame; ``size`` is its bbox side."""

    shape: str
    color: str
    x0: float
    y0: float
    vx: float
    vy: float
    size: float

    def at(self, frame: int) -> ObjectSpec:
        return ObjectSpec(self.shape, self.color, self.x0 + self.vx * frame, self.y0 + self.vy * frame, self.size)


@dataclass
class Clip:
    """Moving objects on a ``size x size`` canvas for ``num_frames`` frames."""

    objects: list[MovingObject] = field(default_factory=list)
    num_frames: int = NUM_FRAMES
    size: int = IMAGE_SIZE

    def scene(self, frame: int) -> Scene:
        return Scene([obj.at(frame) for obj in self.objects], self.size)


def render_clip(clip: Clip) -> np.ndarray:
    """Renders every frame: ``(T, size, size, 3)`` uint8."""
    return np.stack([render(clip.scene(t)) for t in range(clip.num_frames)])


# ----------------------------------------------------------------------------- prompts


def _noun(color: str, shape: str, count: int = 1) -> str:
    if count == 1:
        return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"
    return f"{NUMBER_WORDS[count]} {color} {shape}s"


def _clause(color: str, shape: str, direction: str, count: int = 1, speed: str | None = None) -> dict:
    return {"shape": shape, "color": color, "direction": direction, "count": count, "speed": speed}


def _phrase(c: dict) -> str:
    text = f"{_noun(c['color'], c['shape'], c['count'])} moving {c['direction']}"
    return text + (f" {SPEED_WORDS[c['speed']]}" if c["speed"] else "")


def video_prompt(tag: str, clauses: Sequence[dict]) -> dict:
    """Metadata dict of a caption made of ``clauses`` (joined with "and")."""
    return {"tag": tag, "prompt": " and ".join(_phrase(c) for c in clauses), "objects": [dict(c) for c in clauses]}


def all_video_prompts() -> list[dict]:
    """Every ShapesWorld-Video prompt in a fixed order (grouped by tag as in VIDEO_TAGS)."""
    kinds = list(itertools.product(COLORS, SHAPES))
    single = [video_prompt("single", [_clause(c, s, d)]) for c, s in kinds for d in DIRECTIONS]
    speed = [video_prompt("speed", [_clause(c, s, d, speed=v)]) for c, s in kinds for d in DIRECTIONS
             for v in SPEED_WORDS]
    opposite = [video_prompt("opposite", [_clause(*a, d), _clause(*b, OPPOSITE[d])])
                for a, b in itertools.permutations(kinds, 2) if a[0] != b[0] for d in DIRECTIONS]
    count = [video_prompt("count", [_clause(c, s, d, count=n)]) for c, s in kinds for d in DIRECTIONS
             for n in (2, 3)]
    return single + speed + opposite + count


def is_held_out(meta: dict) -> bool:
    """True if any object of the prompt has a held-out (colour, direction) pair."""
    return any((c["color"], c["direction"]) in HELD_OUT_COLOR_DIRECTION for c in meta["objects"])


def video_prompts(split: str) -> list[dict]:
    """Prompts of ``split`` ("train" or "test"; see the module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [m for m in all_video_prompts() if is_held_out(m) == (split == "test")]


# ----------------------------------------------------------------------------- clips


def _sample_speed(speed: str | None, rng: np.random.Generator) -> float:
    low, high = SPEED_RANGES[speed or ("slow", "fast")[int(rng.integers(2))]]
    return _sample_on_grid(rng, low, high)


def _fits(obj: MovingObject, num_frames: int, canvas: int) -> bool:
    for t in (0, num_frames - 1):  # motion is linear: the end frames bound it
        x0, y0, x1, y1 = obj.at(t).bbox
        if min(x0, y0) < MARGIN or max(x1, y1) > canvas - MARGIN:
            return False
    return True


def _apart(a: MovingObject, b: MovingObject, num_frames: int) -> bool:
    return all(_boxes_separated(a.at(t).bbox, b.at(t).bbox, GAP) for t in range(num_frames))


def clip_for_prompt(meta: dict, rng: int | np.random.Generator | Sequence[int], num_frames: int = NUM_FRAMES,
                    size: int = IMAGE_SIZE) -> Clip:
    """A random clip that satisfies ``meta`` exactly (strict-correct for the verifier).

    Exactly ``count`` objects per clause and nothing else; each clause's objects share one speed
    (of its class when given). Rejection sampling of start positions, restarted when stuck.
    """
    rng = as_rng(rng)
    n_objects = sum(c["count"] for c in meta["objects"])
    low, high = SIZE_RANGE_FEW if n_objects <= 2 else SIZE_RANGE_MANY
    for _ in range(_MAX_ATTEMPTS):
        objects: list[MovingObject] = []
        for clause in meta["objects"]:
            speed = _sample_speed(clause.get("speed"), rng)
            ux, uy = UNIT[clause["direction"]]
            for _ in range(clause["count"]):
                side = _sample_on_grid(rng, low, high, 0.5)
                for _ in range(50):
                    span = (MARGIN + side / 2, size - MARGIN - side / 2)
                    obj = MovingObject(clause["shape"], clause["color"], _sample_on_grid(rng, *span),
                                       _sample_on_grid(rng, *span), ux * speed, uy * speed, side)
                    if _fits(obj, num_frames, size) and all(_apart(obj, o, num_frames) for o in objects):
                        objects.append(obj)
                        break
                else:
                    break
        if len(objects) == n_objects:
            return Clip(objects, num_frames, size)
    raise RuntimeError(f"could not place the objects of {meta['prompt']!r}")


def render_clips(metas: Sequence[dict], rng, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """One random ground-truth clip per prompt: ``(B, T, H, W, 3)`` uint8."""
    rng = as_rng(rng)
    return np.stack([render_clip(clip_for_prompt(m, rng, num_frames)) for m in metas])


def filmstrip(frames: np.ndarray, gap: int = 2, gap_value: int = 255) -> np.ndarray:
    """A clip ``(T, H, W, 3)`` as one image ``(H, T * W + (T - 1) * gap, 3)``, frames left to right."""
    t, h, w, c = frames.shape
    strip = np.full((h, t * w + (t - 1) * gap, c), gap_value, dtype=frames.dtype)
    for i, frame in enumerate(frames):
        strip[:, i * (w + gap): i * (w + gap) + w] = frame
    return strip
