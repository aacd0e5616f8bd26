"""ShapesWorld-Video verifier: objects tracked from pixels, scored against the caption.

1. Per frame, ``eval.shapes.detect`` (palette segmentation, connected components, best-IoU shape).
2. Tracking: detections are linked frame to frame within a colour, nearest to the track's predicted
   position (constant velocity), at most ``MAX_STEP`` px per frame away, gaps of up to
   ``MAX_GAP`` frames bridged. A track's shape is the majority vote of its detections; its
   velocity the least-squares slope of its bbox centres over frame indices.
3. Motion: direction is the dominant axis of the velocity when the speed is at least
   ``MIN_SPEED`` px/frame and the dominant component at least ``AXIS_RATIO`` times the other
   ("static" / "diagonal" otherwise); speed class "slow" below ``SPEED_THRESHOLD``, else "fast".
4. Scoring. Tracks seen in at least half the frames are objects. Expected objects (clauses times
   their count) are assigned to objects by the best total identity match (colour first, then shape,
   then direction). Partial credit is the mean of per-object terms (colour, shape, direction, and
   speed when the caption names one; 0 for an unassigned object) and a count term
   ``clip(1 - |expected - found| / expected, 0, 1)``. ``strict`` needs every expected object
   assigned with the right colour, shape, direction and speed class, seen in at least
   ``STRICT_PRESENCE`` of the frames, and no extra object. ``direction`` (the motion-only score)
   needs every expected object assigned to an object of the right colour moving the right way.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from eval.shapes import detect
from eval.shapes.verifier import Detection

from .world import SPEED_THRESHOLD, VIDEO_TAGS

MAX_STEP = 8.0  # px a tracked object may move per frame (fast objects move <= 4.5)
MAX_GAP = 2  # frames a track may miss and still be continued
MIN_SPEED = 0.75  # px/frame below which an object is static
AXIS_RATIO = 2.0  # the dominant velocity component must be this many times the other
OBJECT_PRESENCE = 0.5  # a track seen in at least this share of frames is an object
STRICT_PRESENCE = 0.75  # strict correctness needs each expected object in this share of frames
MAX_CANDIDATES = 8  # assignment considers the longest this-many objects


@dataclass
class Track:
    """One tracked object: colour, per-frame detections (frame index -> Detection)."""

    color: str
    detections: dict[int, Detection]

    @property
    def frames(self) -> list[int]:
        return sorted(self.detections)

    def centre(self, frame: int) -> tuple[float, float]:
        x0, y0, x1, y1 = self.detections[frame].bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def shape(self) -> str:
        return Counter(d.shape for d in self.detections.values()).most_common(1)[0][0]

    @property
    def velocity(self) -> tuple[float, float]:
        """Least-squares (vx, vy) in px per frame (0, 0 with one detection)."""
        frames = np.array(self.frames, dtype=np.float64)
        if len(frames) < 2:
            return 0.0, 0.0
        centres = np.array([self.centre(int(t)) for t in frames])  # (n, 2)
        slope = np.polyfit(frames, centres, 1)[0]
        return float(slope[0]), float(slope[1])

    def predict(self, frame: int) -> tuple[float, float]:
        last = self.frames[-1]
        (x, y), (vx, vy) = self.centre(last), (self.velocity if len(self.detections) > 1 else (0.0, 0.0))
        return x + vx * (frame - last), y + vy * (frame - last)

    @property
    def direction(self) -> str:
        return motion_direction(*self.velocity)

    @property
    def speed_class(self) -> str:
        return "slow" if float(np.hypot(*self.velocity)) < SPEED_THRESHOLD else "fast"


def motion_direction(vx: float, vy: float) -> str:
    """"left" / "right" / "up" / "down" (y down), "static" or "diagonal" for a velocity."""
    if np.hypot(vx, vy) < MIN_SPEED:
        return "static"
    if abs(vx) >= AXIS_RATIO * abs(vy):
        return "right" if vx > 0 else "left"
    if abs(vy) >= AXIS_RATIO * abs(vx):
        return "down" if vy > 0 else "up"
    return "diagonal"


def track_objects(frames: Sequence, detector=detect) -> list[Track]:
    """Tracks of a clip (``(T, H, W, 3)`` frames in any format ``detect`` accepts), longest first."""
    tracks: list[Track] = []
    for t, frame in enumerate(frames):
        detections = list(detector(frame))
        pairs = []  # (distance, track index, detection index)
        for i, track in enumerate(tracks):
            gap = t - track.frames[-1]
            if gap > MAX_GAP + 1:
                continue
            px, py = track.predict(t)
            for j, det in enumerate(detections):
                if det.color != track.color:
                    continue
                x0, y0, x1, y1 = det.bbox
                distance = float(np.hypot((x0 + x1) / 2 - px, (y0 + y1) / 2 - py))
                if distance <= MAX_STEP * gap:
                    pairs.append((distance, i, j))
        used_tracks, used_dets = set(), set()
        for _, i, j in sorted(pairs):
            if i not in used_tracks and j not in used_dets:
                tracks[i].detections[t] = detections[j]
                used_tracks.add(i)
                used_dets.add(j)
        tracks += [Track(det.color, {t: det}) for j, det in enumerate(detections) if j not in used_dets]
    return sorted(tracks, key=lambda tr: -len(tr.detections))


def _expected_objects(meta: dict) -> list[dict]:
    return [clause for clause in meta["objects"] for _ in range(clause["count"])]


def _identity(track: Track, clause: dict) -> float:
    return (4.0 * (track.color == clause["color"]) + 2.0 * (track.shape == clause["shape"])
            + 1.0 * (track.direction == clause["direction"]))


def _assign(objects: list[Track], expected: list[dict]) -> list[Track | None]:
    """Best total identity assignment of expected objects to tracked objects (None if too few)."""
    candidates = objects[:MAX_CANDIDATES]
    n = min(len(expected), len(candidates))
    best, best_score = [None] * len(expected), -1.0
    for chosen in itertools.permutations(range(len(candidates)), n):
        for slots in itertools.combinations(range(len(expected)), n):
            score = sum(_identity(candidates[c], expected[s]) for c, s in zip(chosen, slots))
            if score > best_score:
                best_score, best = score, [None] * len(expected)
                for c, s in zip(chosen, slots):
                    best[s] = candidates[c]
    return best


def evaluate_tracks(tracks: Sequence[Track], meta: dict, num_frames: int) -> dict:
    """Scores tracks against one ShapesWorld-Video metadata dict (see the module docstring).

    Returns {"strict": bool, "partial": float, "direction": bool, "count": int (objects found),
    "reason": str ("" when strict)}.
    """
    objects = [tr for tr in tracks if len(tr.detections) >= OBJECT_PRESENCE * num_frames]
    expected = _expected_objects(meta)
    assigned = _assign(objects, expected)
    terms, reasons, strict, direction_ok = [], [], True, True
    for clause, track in zip(expected, assigned):
        name = f"{clause['color']} {clause['shape']}"
        if track is None:
            terms += [0.0] * (3 + (clause.get("speed") is not None))
            reasons.append(f"no object for {name}")
            strict = direction_ok = False
            continue
        checks = {"colour": track.color == clause["color"], "shape": track.shape == clause["shape"],
                  "direction": track.direction == clause["direction"]}
        if clause.get("speed") is not None:
            checks["speed"] = track.speed_class == clause["speed"]
        terms += [float(ok) for ok in checks.values()]
        wrong = [k for k, ok in checks.items() if not ok]
        if wrong:
            found = {"colour": track.color, "shape": track.shape, "direction": track.direction,
                     "speed": track.speed_class}
            reasons.append(f"{name}: " + ", ".join(f"{k} {found[k]}" for k in wrong))
        if len(track.detections) < STRICT_PRESENCE * num_frames:
            reasons.append(f"{name}: seen in {len(track.detections)}/{num_frames} frames")
            wrong.append("presence")
        strict &= not wrong
        direction_ok &= checks["colour"] and checks["direction"]
    n_expected, n_found = len(expected), len(objects)
    terms.append(float(np.clip(1 - abs(n_expected - n_found) / n_expected, 0.0, 1.0)))
    if n_found != n_expected:
        strict = False
        reasons.append(f"expected {n_expected} objects, found {n_found}")
    return {"strict": bool(strict), "partial": float(np.mean(terms)), "direction": bool(direction_ok),
            "count": n_found, "reason": "; ".join(reasons)}


def evaluate_clip(frames, meta: dict, detector=detect) -> dict:
    """``evaluate_tracks`` on a clip: ``(T, H, W, 3)`` uint8 / float in [0, 1], or ``(T, 3, H, W)``."""
    return evaluate_tracks(track_objects(frames, detector), meta, len(frames))


def aggregate_video(results: Sequence[dict], metas: Sequence[dict]) -> dict:
    """Per-tag and overall means of strict, partial and direction: {"per_tag": {tag: {...}},
    "strict", "partial", "direction", "n"} (overall = mean over clips)."""
    keys = ("strict", "partial", "direction")
    by_tag: dict[str, list[dict]] = {}
    for result, meta in zip(results, metas):
        by_tag.setdefault(meta["tag"], []).append(result)
    order = [t for t in VIDEO_TAGS if t in by_tag] + sorted(t for t in by_tag if t not in VIDEO_TAGS)
    summary = {k: float(np.mean([r[k] for r in results])) if results else float("nan") for k in keys}
    return {"per_tag": {tag: {**{k: float(np.mean([r[k] for r in by_tag[tag]])) for k in keys},
                              "n": len(by_tag[tag])} for tag in order},
            **summary, "n": len(results)}
