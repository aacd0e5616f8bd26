"""Exact ShapesWorld verifier: detection from pixels and GenEval-style scoring.

Two independent halves:

* ``detect(image) -> list[Detection]``: the ShapesWorld detector (colour segmentation,
  connected components, shape by best IoU against ideal masks fitted to the component's
  bounding box). Any other detector producing ``Detection``s (or GenEval-like boxes with a
  colour) can replace it.
* ``evaluate_detections(detections_by_class, meta)``: GenEval's decision rule on detections
  grouped by class, for any GenEval metadata line (unknown classes are simply never
  detected by the shape detector).

``strict`` is GenEval's binary correctness, faithful to ``evaluate`` in GenEval's
``evaluate_images.py``: an include clause needs >= ``count`` detections of its class, and
colour and position are checked on the ``count`` most confident ones only; an exclude clause
fails when there are >= ``count`` detections. (Flow-GRPO calls this "correct" and uses
"strict_correct" for its exact-count variant.)

``partial`` is Flow-GRPO's partial credit (the mean of per-clause terms):

* count term ``clip(1 - |count - found| / count, 0, 1)`` with ``found`` ALL detections of
  the class, so extra objects cost credit;
* colour term (if the clause has a colour) ``clip(1 - |count - n_colour| / count, 0, 1)``
  where ``n_colour`` counts the required colour among the ``count`` most confident
  detections (the ones GenEval's colour check looks at);
* position term (if the clause has a position) 1 if the clause passes GenEval's count,
  colour and relation checks, else 0.

Deviations from Flow-GRPO's code, all deliberate: the count term is clipped at 0 (the
original goes negative with many extras); the colour term is computed even when the count
is wrong (the original then gives 0), which makes the reward denser; the position term is
one value (the original appends both 0 and 1 when a relation fails). Exclude clauses add no
term. Hence ``partial == 1`` iff ``strict`` and no prompted class has extra detections;
``strict`` can be True with ``partial < 1`` when GenEval's ">= count" accepts extras, e.g.
two circles for "a photo of a circle" give strict True, partial 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .world import BACKGROUND, COLORS, PALETTE, TAGS, relative_position

MIN_AREA = 12  # components smaller than this (px) are noise or anti-aliasing debris
MIN_SCORE = 0.5  # components fitting no shape better than this IoU are not objects
MIN_ALPHA = 0.5  # a pixel is an object pixel if it is at least half-way to a palette colour
# Max RGB distance from the background-to-colour line; half the closest palette pair (~100).
MAX_RESIDUAL = 50.0


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, colour name (or None), box ``(x0, y0, x1, y1)``
    in px with exclusive right/bottom edges, pixel area and confidence ``score``."""

    shape: str
    color: str | None
    bbox: tuple[float, float, float, float]
    area: int
    score: float


# ----------------------------------------------------------------------------- pixels


def to_rgb_array(image) -> np.ndarray:
    """Image as ``(H, W, 3)`` float32 in [0, 255].

    Accepts PIL images, uint8 arrays and float arrays in [0, 1], channel-last ``(H, W, 3)``
    or channel-first ``(3, H, W)``.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32)
    return np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0


def _segment_projection(offsets: np.ndarray, directions: np.ndarray, lengths_sq: np.ndarray):
    """Nearest background-to-colour segment of each offset (pixel - background): ``(best, alpha,
    distance_sq)``, each ``(N,)``: segment index, position along it in [0, 1], squared distance."""
    norms_sq = (offsets**2).sum(1)  # (N,)
    dots = offsets @ directions.T  # (N, K)
    alpha = np.clip(dots / lengths_sq, 0.0, 1.0)  # (N, K)
    distance_sq = norms_sq[:, None] - 2 * alpha * dots + alpha**2 * lengths_sq  # (N, K)
    best = distance_sq.argmin(1)
    rows = np.arange(best.size)
    return best, alpha[rows, best], distance_sq[rows, best]


def _palette_segments(background: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bg = np.asarray(background, dtype=np.float32)
    directions = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32) - bg  # (K, 3)
    return bg, directions, (directions**2).sum(1)


def classify_pixels(image, background: Sequence[int] = BACKGROUND) -> np.ndarray:
    """Palette index per pixel (0..5, COLORS order) or -1 for background/unknown: ``(H, W)``.

    Each pixel is projected on the segment from the background to every palette colour:
    an anti-aliased or blurred edge pixel (a mix of colour and background) lies on its
    colour's segment, so a red edge never reads as orange or pink. The pixel takes the
    colour of the nearest segment if it is at least MIN_ALPHA of the way along it and at
    most MAX_RESIDUAL away from it.
    """
    rgb = to_rgb_array(image)
    bg, directions, lengths_sq = _palette_segments(background)
    offsets = rgb.reshape(-1, 3) - bg  # (N, 3)
    # alpha >= MIN_ALPHA needs |offset| >= MIN_ALPHA |direction|: skip plain background.
    candidates = np.flatnonzero((offsets**2).sum(1) >= (MIN_ALPHA**2) * lengths_sq.min())
    best, alpha, distance_sq = _segment_projection(offsets[candidates], directions, lengths_sq)
    is_object = (alpha >= MIN_ALPHA) & (distance_sq <= MAX_RESIDUAL**2)
    labels = np.full(rgb.shape[:2], -1, dtype=np.int64)
    labels.reshape(-1)[candidates[is_object]] = best[is_object]
    return labels


def palette_residual(image, background: Sequence[int] = BACKGROUND) -> np.ndarray:
    """RGB distance of every pixel to the nearest background-to-palette-colour segment, ``(H, W)``.

    A ShapesWorld render (flat colours, anti-aliased edges) is ~0 everywhere; noise, colour
    drift, blotches and off-palette artefacts raise it. An image-quality measure that knows
    nothing about the prompt.
    """
    rgb = to_rgb_array(image)
    bg, directions, lengths_sq = _palette_segments(background)
    _, _, distance_sq = _segment_projection(rgb.reshape(-1, 3) - bg, directions, lengths_sq)
    return np.sqrt(np.maximum(distance_sq, 0.0)).reshape(rgb.shape[:2])


# ----------------------------------------------------------------------------- components


def _row_runs(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Horizontal runs of equal non-negative label: arrays ``(row, start, end, label)``,
    end exclusive, in row-major order."""
    padded = np.pad(labels, ((0, 0), (1, 1)), constant_values=-1)
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])  # run boundaries per row
    same_row = rows[:-1] == rows[1:]
    row, start, end = rows[:-1][same_row], cols[:-1][same_row], cols[1:][same_row]
    label = labels[row, start]
    keep = label >= 0
    return row[keep], start[keep], end[keep], label[keep]


def _run_map(shape: tuple[int, int], row: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``(H, W)`` map of the run index covering each pixel (-1 outside every run)."""
    lengths = end - start
    run = np.repeat(np.arange(len(row)), lengths)  # (P,) run of each covered pixel
    first_pixel = np.cumsum(lengths) - lengths  # (R,) offset of each run in ``run``
    cols = start[run] + np.arange(run.size) - first_pixel[run]
    run_map = np.full(shape, -1, dtype=np.int64)
    run_map[row[run], cols] = run
    return run_map


def _touching_runs(run_map: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Unique ``(E, 2)`` pairs of same-label runs touching across consecutive rows
    (8-connectivity: straight down or diagonal)."""
    upper, lower = run_map[:-1], run_map[1:]
    pairs = [
        (upper, lower),
        (upper[:, :-1], lower[:, 1:]),  # down-right
        (upper[:, 1:], lower[:, :-1]),  # down-left
    ]
    n = len(label)
    codes = []  # edge (a, b) encoded as a * n + b, so np.unique works on integers
    for a, b in pairs:
        a, b = a.ravel(), b.ravel()
        keep = (a >= 0) & (b >= 0)
        a, b = a[keep], b[keep]
        keep = label[a] == label[b]
        codes.append(a[keep] * n + b[keep])
    codes = np.unique(np.concatenate(codes))
    return np.stack([codes // n, codes % n], axis=1)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union_roots(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find over ``n`` nodes: ``(n,)`` smallest node index of each node's component."""
    parent = list(range(n))
    for i, j in edges.tolist():
        root_i, root_j = _find(parent, i), _find(parent, j)
        if root_i != root_j:
            parent[max(root_i, root_j)] = min(root_i, root_j)
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def connected_components(
    labels: np.ndarray, min_area: int = 1
) -> list[tuple[int, np.ndarray, tuple[int, int, int, int]]]:
    """8-connected components of equal label in an ``(H, W)`` int map (-1 = background).

    Run-length union-find in O(pixels), no scipy. Returns ``[(label, mask, (x0, y0, x1,
    y1))]`` for components of at least ``min_area`` pixels, with ``mask`` the component's
    ``(y1 - y0, x1 - x0)`` boolean crop and an exclusive box.
    """
    row, start, end, label = _row_runs(labels)
    if len(row) == 0:
        return []
    run_map = _run_map(labels.shape, row, start, end)
    roots = _union_roots(len(row), _touching_runs(run_map, label))
    root_ids, component = np.unique(roots, return_inverse=True)  # (C,), (R,)
    n = len(root_ids)
    area = np.bincount(component, weights=end - start, minlength=n)
    x0, y0 = np.full(n, labels.shape[1]), np.full(n, labels.shape[0])
    x1, y1 = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    np.minimum.at(x0, component, start)
    np.minimum.at(y0, component, row)
    np.maximum.at(x1, component, end)
    np.maximum.at(y1, component, row + 1)
    component_map = np.where(run_map >= 0, component[run_map], -1)
    components = []
    for c in np.flatnonzero(area >= min_area).tolist():
        box = (int(x0[c]), int(y0[c]), int(x1[c]), int(y1[c]))
        mask = component_map[box[1] : box[3], box[0] : box[2]] == c
        components.append((int(label[root_ids[c]]), mask, box))
    return components


# ----------------------------------------------------------------------------- shapes


_MASK_SUBSAMPLES = 8  # per pixel side, to estimate ideal-shape pixel coverage


@functools.lru_cache(maxsize=4096)
def ideal_masks(height: int, width: int) -> dict[str, np.ndarray]:
    """Ideal ``(height, width)`` boolean masks of each shape filling the box.

    A pixel is in the mask when the shape covers at least MIN_ALPHA of it, which is how
    ``classify_pixels`` thresholds anti-aliased renders (a pixel-centre test would cut the
    flat sides of a circle short and cost ~0.08 IoU).
    """
    n = _MASK_SUBSAMPLES
    y = (np.arange(height * n) + 0.5)[:, None] / (height * n)  # (H n, 1) in (0, 1)
    x = (np.arange(width * n) + 0.5)[None, :] / (width * n)  # (1, W n)
    inside = {
        "circle": (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1.0,
        "square": np.ones((height * n, width * n), dtype=bool),
        # Upward isosceles: apex at the top centre, base along the bottom edge.
        "triangle": np.abs(2 * x - 1) <= y,
    }
    masks = {}
    for shape, fine in inside.items():
        coverage = fine.reshape(height, n, width, n).mean(axis=(1, 3))
        masks[shape] = coverage >= MIN_ALPHA
        masks[shape].flags.writeable = False
    return masks


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape of a component crop ``(h, w)`` and its IoU with the ideal mask."""
    area = mask.sum()
    best_shape, best_iou = "", -1.0
    for shape, ideal in ideal_masks(*mask.shape).items():
        intersection = np.logical_and(mask, ideal).sum()
        iou = intersection / (area + ideal.sum() - intersection)
        if iou > best_iou:
            best_shape, best_iou = shape, float(iou)
    return best_shape, best_iou


def detect(image, background: Sequence[int] = BACKGROUND) -> list[Detection]:
    """Detect ShapesWorld objects in one image (see ``to_rgb_array`` for accepted formats).

    Returns detections sorted by decreasing score (GenEval's confidence order).
    """
    detections = []
    for color_index, mask, box in connected_components(classify_pixels(image, background), MIN_AREA):
        area = int(mask.sum())
        shape, score = classify_shape(mask)
        if score >= MIN_SCORE:
            detections.append(Detection(shape, COLORS[color_index], tuple(map(float, box)), area, score))
    return sorted(detections, key=lambda d: (-d.score, -d.area))


def group_by_class(detections: Iterable[Detection]) -> dict[str, list[Detection]]:
    """``{class: [Detection, ...]}`` with each list sorted by decreasing score."""
    groups: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        groups.setdefault(det.shape, []).append(det)
    return groups


# ----------------------------------------------------------------------------- scoring


def _count_term(expected: int, found: int) -> float:
    return float(np.clip(1 - abs(expected - found) / expected, 0.0, 1.0))


def _relation_failure(objects: Sequence[Detection], targets: Sequence[Detection], relation: str) -> str:
    """'' if every object is ``relation`` every target (GenEval), else the reason."""
    for obj in objects:
        for target in targets:
            found = relative_position(obj.bbox, target.bbox)
            if relation not in found:
                return f"found {' and '.join(sorted(found)) or 'no relation'} target"
    return ""


def evaluate_detections(detections_by_class: Mapping[str, Sequence[Detection]], meta: dict) -> dict:
    """Score detections against one GenEval metadata dict.

    ``detections_by_class`` maps class name -> detections in decreasing confidence.
    Returns ``{"strict": bool, "partial": float in [0, 1], "reason": str}`` (see the module
    docstring for the exact semantics).
    """
    strict, reasons, terms, matched_groups = True, [], [], []
    for clause in meta.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(detections_by_class.get(name, []))
        top = found[:count]  # GenEval checks colour and position on these only
        terms.append(_count_term(count, len(found)))
        matched = len(top) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if "color" in clause:
            n_color = sum(det.color == clause["color"] for det in top)
            terms.append(_count_term(count, n_color))
            if matched and n_color < count:
                matched = False
                color = clause["color"]
                reasons.append(f"expected {color} {name}>={count}, found {n_color} {color}")
        if "position" in clause:
            relation, target_index = clause["position"]
            if matched:
                targets = matched_groups[target_index]
                failure = "no target" if targets is None else _relation_failure(top, targets, relation)
                if failure:
                    matched = False
                    reasons.append(f"expected {name} {relation} target, {failure}")
            terms.append(float(matched))
        strict &= matched
        matched_groups.append(top if matched else None)
    for clause in meta.get("exclude", []):
        n_found = len(detections_by_class.get(clause["class"], []))
        if n_found >= clause["count"]:
            strict = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n_found}")
    partial = float(np.mean(terms)) if terms else 0.0
    return {"strict": bool(strict), "partial": partial, "reason": "; ".join(reasons)}


Detector = Callable[[object], Sequence[Detection]]


def evaluate(image_or_detections, meta: dict, detector: Detector = detect) -> dict:
    """``evaluate_detections`` on an image (run through ``detector``), a list of
    ``Detection``s, or a ``{class: [Detection, ...]}`` dict."""
    if isinstance(image_or_detections, Mapping):
        return evaluate_detections(image_or_detections, meta)
    if isinstance(image_or_detections, (list, tuple)) and all(
        isinstance(d, Detection) for d in image_or_detections
    ):
        return evaluate_detections(group_by_class(image_or_detections), meta)
    return evaluate_detections(group_by_class(detector(image_or_detections)), meta)


def evaluate_batch(images: Iterable, metas: Sequence[dict], detector: Detector = detect) -> list[dict]:
    """``evaluate`` per image; ``images`` is an iterable of images (or a ``(B, ...)`` array)."""
    results = [evaluate(image, meta, detector) for image, meta in zip(images, metas)]
    if len(results) != len(metas):
        raise ValueError(f"{len(results)} images for {len(metas)} metadata dicts")
    return results


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def aggregate(results: Sequence[dict], metas: Sequence[dict]) -> dict:
    """GenEval summary of per-image results.

    Returns ``{"per_tag": {tag: {"strict", "partial", "n"}}, "overall", "overall_partial",
    "overall_images", "overall_images_partial", "n"}`` where ``overall`` is the mean over
    the tags present of the strict accuracy (GenEval's score) and ``overall_images`` the
    mean over all images.
    """
    by_tag: dict[str, list[dict]] = {}
    for result, meta in zip(results, metas):
        by_tag.setdefault(meta["tag"], []).append(result)
    order = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
    per_tag = {
        tag: {
            "strict": float(np.mean([r["strict"] for r in by_tag[tag]])),
            "partial": float(np.mean([r["partial"] for r in by_tag[tag]])),
            "n": len(by_tag[tag]),
        }
        for tag in order
    }
    return {
        "per_tag": per_tag,
        "overall": _mean([v["strict"] for v in per_tag.values()]),
        "overall_partial": _mean([v["partial"] for v in per_tag.values()]),
        "overall_images": _mean([r["strict"] for r in results]),
        "overall_images_partial": _mean([r["partial"] for r in results]),
        "n": len(results),
    }


if __name__ == "__main__":
    import time

    from .world import all_prompts, render, scene_for_prompt

    images = [render(scene_for_prompt(meta, seed)) for seed, meta in enumerate(all_prompts())]
    detect(images[0])  # warm the mask cache
    start = time.perf_counter()
    for image in images:
        detect(image)
    elapsed = (time.perf_counter() - start) / len(images)
    print(f"detect: {elapsed * 1e3:.2f} ms per 64x64 image over {len(images)} images")
