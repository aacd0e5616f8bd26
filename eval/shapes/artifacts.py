"""Artefacts: seeded corruptions of clean images, and a clean/artefact dataset sampler.

The training and test data of the lightweight artefact reward (``rewards/artifact.py``,
"Understanding Reward Hacking in T2I RL": a frozen backbone + small head trained with BCE on
a curated artefact/clean set). Each corruption is a pure function
``f(image, rng, severity) -> image`` of a float ``(H, W, 3)`` image in [0, 1]:

- ``blotches``: 1-3 soft, irregular blobs of a random colour;
- ``grid``: a periodic checkerboard / grid-line / stripe texture added over the image or a
  large part of it: the high-frequency pattern Flow-GRPO policies learn when they hack a
  reward without a KL penalty;
- ``color_noise``: per-pixel chromatic Gaussian noise (white, or slightly correlated);
- ``smear``: a directional (motion) blur of a region around an object edge;
- ``ghosting``: duplicated edges, a shifted faint copy of the image blended over it.

``severity`` in [0, 1] goes from the mildest artefact still visible at 64 px (0) to a
blatant one (1); 0 is not "no artefact". Everything random comes from the ``rng`` argument
(a ``numpy.random.Generator`` or an int seed), so a corruption is reproducible.
Pure numpy (bottom of the import layering, like the rest of ``eval.shapes``).

    >>> from eval.shapes.artifacts import corrupt, render_clean, sample_artifact_dataset
    >>> bad = corrupt(image, "grid", rng=0, severity=0.5)        # same dtype as image
    >>> data = sample_artifact_dataset(256, rng=0, split="train")  # renders only
    >>> data.images.shape, data.labels.mean(), set(data.kinds)
    ((512, 64, 64, 3), 0.5, {'clean', 'blotches', 'grid', ...})
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from .world import TAGS, as_rng, prompts, render, scene_for_prompt

__all__ = [
    "KINDS",
    "CORRUPTIONS",
    "ArtifactDataset",
    "blotches",
    "grid",
    "color_noise",
    "smear",
    "ghosting",
    "corrupt",
    "render_clean",
    "sample_artifact_dataset",
]

CLEAN = "clean"
# A corruption that changes no pixel by more than this (smear / ghosting of an empty image)
# is re-drawn with another kind: an "artefact" label on an unchanged image is label noise.
MIN_CHANGE = 6 / 255


# ----------------------------------------------------------------------------- helpers


def _lerp(low: float, high: float, severity: float) -> float:
    return low + (high - low) * severity


def _check_severity(severity: float) -> float:
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    return severity


def _check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if image.dtype != np.float32 and image.dtype != np.float64:
        raise TypeError(f"corruptions work on float images in [0, 1], got {image.dtype} (use corrupt())")
    return image


def _grid_coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float32), xx.astype(np.float32)


def _soft_box(h: int, w: int, y0: float, x0: float, y1: float, x1: float, feather: float) -> np.ndarray:
    """(H, W) mask: 1 inside the box [y0, y1) x [x0, x1), falling linearly to 0 over `feather` px."""
    yy, xx = _grid_coords(h, w)
    dy = np.maximum(np.maximum(y0 - yy, yy - (y1 - 1)), 0)
    dx = np.maximum(np.maximum(x0 - xx, xx - (x1 - 1)), 0)
    return np.clip(1 - np.hypot(dy, dx) / max(feather, 1e-6), 0, 1).astype(np.float32)


def _random_box(h: int, w: int, rng: np.random.Generator, side: tuple[float, float],
                centre: tuple[float, float] | None = None) -> tuple[float, float, float, float]:
    """A box of random side in `side` (px), around `centre` (y, x) or anywhere, kept in the image."""
    sy, sx = rng.uniform(*side), rng.uniform(*side)
    cy, cx = centre if centre is not None else (rng.uniform(0, h), rng.uniform(0, w))
    y0 = float(np.clip(cy - sy / 2, 0, max(h - sy, 0)))
    x0 = float(np.clip(cx - sx / 2, 0, max(w - sx, 0)))
    return y0, x0, y0 + sy, x0 + sx


def _edge_point(image: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random pixel (y, x) among the image's strongest edges (anywhere if it has none)."""
    gray = image.mean(axis=2)
    gy, gx = np.gradient(gray)
    magnitude = np.hypot(gy, gx)
    candidates = np.flatnonzero(magnitude > max(0.5 * magnitude.max(), 0.02))
    if candidates.size == 0:
        return float(rng.uniform(0, image.shape[0])), float(rng.uniform(0, image.shape[1]))
    y, x = np.unravel_index(candidates[rng.integers(candidates.size)], gray.shape)
    return float(y), float(x)


def _shift(image: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """image translated by (dy, dx) px, bilinear, borders replicated."""
    h, w = image.shape[:2]
    yy, xx = _grid_coords(h, w)
    y = np.clip(yy - dy, 0, h - 1)
    x = np.clip(xx - dx, 0, w - 1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (y - y0)[..., None], (x - x0)[..., None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(image.dtype)


def _box_blur(field: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of an (H, W, ...) array, borders replicated."""
    if radius <= 0:
        return field
    size = 2 * radius + 1
    for axis in (0, 1):
        pad = [(0, 0)] * field.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(field, pad, mode="edge")
        cumulative = np.cumsum(padded, axis=axis, dtype=np.float64)
        cumulative = np.concatenate([np.zeros_like(np.take(cumulative, [0], axis=axis)), cumulative], axis=axis)
        n = field.shape[axis]
        field = (np.take(cumulative, np.arange(size, size + n), axis=axis)
                 - np.take(cumulative, np.arange(0, n), axis=axis)) / size
    return field.astype(np.float32)


def _blend(image: np.ndarray, other: np.ndarray, alpha: np.ndarray | float) -> np.ndarray:
    if isinstance(alpha, np.ndarray) and alpha.ndim == 2:
        alpha = alpha[..., None]
    return np.clip(image * (1 - alpha) + other * alpha, 0, 1).astype(image.dtype)


# ----------------------------------------------------------------------------- corruptions


def blotches(image: np.ndarray, rng, severity: float = 0.5) -> np.ndarray:
    """1-3 soft irregular blobs (radius 3-9 px, opacity 0.6-0.95), each of a random colour at
    least 0.5 (RGB distance, [0, 1] units) from the image colour it covers, so none is invisible.

    image: (H, W, 3) float in [0, 1]; returns a new array of the same shape and dtype.
    """
    image, severity, rng = _check_image(image), _check_severity(severity), as_rng(rng)
    h, w = image.shape[:2]
    yy, xx = _grid_coords(h, w)
    out = image.copy()
    for _ in range(1 + int(rng.integers(0, 1 + round(2 * severity)))):
        radius = rng.uniform(_lerp(3.0, 5.0, severity), _lerp(5.0, 9.0, severity))
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        aspect, angle = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / aspect
        # a wobbly outline: the radius varies with the polar angle
        theta = np.arctan2(v, u)
        wobble = 1 + 0.25 * np.sin(rng.integers(2, 5) * theta + rng.uniform(0, 2 * np.pi))
        distance = np.hypot(u, v) / (radius * wobble)
        mask = np.clip(3 * (1 - distance), 0, 1)
        covered = (out * mask[..., None]).sum((0, 1)) / max(float(mask.sum()), 1e-6)
        for _ in range(100):
            color = rng.uniform(0, 1, size=3).astype(np.float32)
            if np.linalg.norm(color - covered) >= 0.5:
                break
        out = _blend(out, np.broadcast_to(color, image.shape), mask * _lerp(0.6, 0.95, severity))
    return out


def grid(image: np.ndarray, rng, severity: float = 0.5) -> np.ndarray:
    """A periodic texture (checkerboard, grid lines or stripes; period 2-6 px) added with
    amplitude 0.04-0.2 in a random colour direction, over the whole image or a 24-56 px region.

    image: (H, W, 3) float in [0, 1]; returns a new array of the same shape and dtype.
    """
    image, severity, rng = _check_image(image), _check_severity(severity), as_rng(rng)
    h, w = image.shape[:2]
    yy, xx = _grid_coords(h, w)
    style = int(rng.integers(3))
    if style == 0:  # checkerboard with cells of 1-2 px
        cell = int(rng.integers(1, 3))
        pattern = ((yy // cell + xx // cell) % 2) * 2 - 1
    elif style == 1:  # grid lines every 3-6 px
        period = int(rng.integers(3, 7))
        pattern = np.where((yy % period == 0) | (xx % period == 0), 1.0, -0.3)
    else:  # stripes, horizontal / vertical / diagonal, period 2-4 px
        period = int(rng.integers(2, 5))
        direction = [yy, xx, yy + xx][int(rng.integers(3))]
        pattern = np.where(direction % period < period / 2, 1.0, -1.0)
    tint = rng.uniform(0.3, 1.0, size=3) * rng.choice([-1.0, 1.0])
    amplitude = _lerp(0.04, 0.2, severity)
    texture = (amplitude * pattern[..., None] * tint).astype(np.float32)
    if rng.random() < 0.5:
        mask = _soft_box(h, w, *_random_box(h, w, rng, (24, 56)), feather=3)[..., None]
        texture = texture * mask
    return np.clip(image + texture, 0, 1).astype(image.dtype)


def color_noise(image: np.ndarray, rng, severity: float = 0.5) -> np.ndarray:
    """Chromatic Gaussian noise, independent per pixel and channel, sigma 0.03-0.14 (half the
    time smoothed over 3x3 px and rescaled to the same sigma: blotchy sensor-like noise).

    image: (H, W, 3) float in [0, 1]; returns a new array of the same shape and dtype.
    """
    image, severity, rng = _check_image(image), _check_severity(severity), as_rng(rng)
    sigma = _lerp(0.03, 0.14, severity)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    if rng.random() < 0.5:
        noise = _box_blur(noise, 1)
        noise /= max(float(noise.std()), 1e-6)
    return np.clip(image + sigma * noise, 0, 1).astype(image.dtype)


def smear(image: np.ndarray, rng, severity: float = 0.5) -> np.ndarray:
    """Directional (motion) blur, length 4-14 px at a random angle, of a 16-36 px region
    centred on an object edge, feathered into the image.

    image: (H, W, 3) float in [0, 1]; returns a new array of the same shape and dtype.
    """
    image, severity, rng = _check_image(image), _check_severity(severity), as_rng(rng)
    h, w = image.shape[:2]
    length = _lerp(4.0, 14.0, severity)
    angle = rng.uniform(0, np.pi)
    offsets = np.linspace(-length / 2, length / 2, max(3, int(round(length)) + 1))
    blurred = np.mean([_shift(image, t * np.sin(angle), t * np.cos(angle)) for t in offsets], axis=0)
    box = _random_box(h, w, rng, (_lerp(16, 24, severity), _lerp(24, 36, severity)), _edge_point(image, rng))
    return _blend(image, blurred, _soft_box(h, w, *box, feather=4))


def ghosting(image: np.ndarray, rng, severity: float = 0.5) -> np.ndarray:
    """Duplicated edges: a copy shifted by 2-6 px in a random direction blended over the
    image with opacity 0.3-0.6 (the whole image, or a 28-48 px region around an edge).

    image: (H, W, 3) float in [0, 1]; returns a new array of the same shape and dtype.
    """
    image, severity, rng = _check_image(image), _check_severity(severity), as_rng(rng)
    h, w = image.shape[:2]
    distance = _lerp(2.0, 6.0, severity) * rng.uniform(0.8, 1.0)
    angle = rng.uniform(0, 2 * np.pi)
    ghost = _shift(image, distance * np.sin(angle), distance * np.cos(angle))
    alpha = _lerp(0.3, 0.6, severity)
    if rng.random() < 0.5:
        box = _random_box(h, w, rng, (28, 48), _edge_point(image, rng))
        alpha = alpha * _soft_box(h, w, *box, feather=4)
    return _blend(image, ghost, alpha)


CORRUPTIONS: dict[str, Callable[..., np.ndarray]] = {
    "blotches": blotches,
    "grid": grid,
    "color_noise": color_noise,
    "smear": smear,
    "ghosting": ghosting,
}
KINDS = tuple(CORRUPTIONS)


def corrupt(image: np.ndarray, kind: str, rng, severity: float = 0.5) -> np.ndarray:
    """Apply the corruption `kind` (one of KINDS) to one image.

    image: (H, W, 3) uint8 (0-255; the result is rounded back to uint8) or float in [0, 1].
    rng: numpy Generator or int seed. severity: 0 (mildest visible) to 1 (blatant).
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown artefact kind {kind!r}; kinds: {', '.join(KINDS)}")
    image = np.asarray(image)
    if image.dtype == np.uint8:
        out = CORRUPTIONS[kind](image.astype(np.float32) / 255, rng, severity)
        return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    return CORRUPTIONS[kind](image, rng, severity)


# ----------------------------------------------------------------------------- dataset


class ArtifactDataset(NamedTuple):
    """images (N, H, W, 3) uint8; labels (N,) float32, 1 = artefact; kinds: N names
    ("clean" or a KINDS entry); source: N names ("render" or "model") of the clean original."""

    images: np.ndarray
    labels: np.ndarray
    kinds: list[str]
    source: list[str]


def render_clean(n: int, rng, split: str = "train") -> np.ndarray:
    """n clean ShapesWorld renders of random `split` prompts (category-balanced): (n, 64, 64, 3) uint8."""
    rng = as_rng(rng)
    by_tag = {tag: [m for m in prompts(split) if m["tag"] == tag] for tag in TAGS}
    images = []
    for _ in range(n):
        metas = by_tag[TAGS[int(rng.integers(len(TAGS)))]]
        images.append(render(scene_for_prompt(metas[int(rng.integers(len(metas)))], rng)))
    return np.stack(images) if images else np.zeros((0, 64, 64, 3), np.uint8)


def sample_artifact_dataset(n_renders: int, rng, split: str = "train", model_samples: np.ndarray | None = None,
                            kinds: Sequence[str] = KINDS, severity: tuple[float, float] = (0.0, 1.0)
                            ) -> ArtifactDataset:
    """A balanced clean/artefact set: every clean image once as is (label 0) and once corrupted
    (label 1) with a random kind (kinds cycle in a shuffled order, so each is equally frequent)
    at a severity drawn uniformly from `severity`.

    Clean images are `n_renders` fresh renders of `split` prompts plus `model_samples`
    ((M, H, W, 3) uint8, e.g. base-model generations; optional). Returns 2 * (n_renders + M)
    images, clean ones first. Seeded by `rng` (Generator or int).
    """
    rng = as_rng(rng)
    unknown = [k for k in kinds if k not in CORRUPTIONS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    low, high = (_check_severity(s) for s in severity)
    clean = [render_clean(n_renders, rng, split)]
    source = ["render"] * n_renders
    if model_samples is not None and len(model_samples):
        model_samples = np.asarray(model_samples)
        if model_samples.dtype != np.uint8 or model_samples.shape[1:] != clean[0].shape[1:]:
            raise ValueError(f"model_samples must be uint8 {clean[0].shape[1:]} images, got "
                             f"{model_samples.dtype} {model_samples.shape[1:]}")
        clean.append(model_samples)
        source += ["model"] * len(model_samples)
    clean_images = np.concatenate(clean)
    n = len(clean_images)
    order = np.concatenate([rng.permutation(len(kinds)) for _ in range(n // len(kinds) + 1)])[:n]
    chosen = [kinds[i] for i in rng.permutation(order)]
    corrupted = []
    for i, image in enumerate(clean_images):
        kind = chosen[i]
        for attempt in range(len(KINDS) + 1):
            bad = corrupt(image, kind, rng, rng.uniform(low, high))
            if np.abs(bad.astype(np.int16) - image.astype(np.int16)).max() >= MIN_CHANGE * 255:
                break
            kind = kinds[(kinds.index(kind) + 1) % len(kinds)]  # nothing to smear / ghost: another kind
        chosen[i] = kind
        corrupted.append(bad)
    images = np.concatenate([clean_images, np.stack(corrupted)]) if n else clean_images
    labels = np.concatenate([np.zeros(n, np.float32), np.ones(n, np.float32)])
    return ArtifactDataset(images, labels, [CLEAN] * n + chosen, source + source)
