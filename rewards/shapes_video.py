"""ShapesWorld-Video rewards: the verifier ("shapes_video_verifier") and a differentiable
surrogate of its motion checks ("shapes_video_motion").

Ground truth for the toy video world (eval/shapes_video): objects are tracked from pixels and
their colour, shape, count, direction and speed class compared with the caption. The motion
reward replaces tracking by soft colour masks and mass centroids so that its gradient reaches the
pixels: the differentiable reward that reward-gradient guidance (Euphonium) can follow.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eval.shapes import BACKGROUND, IMAGE_SIZE, PALETTE
from eval.shapes_video import VIDEO_TAGS, all_video_prompts, evaluate_clip
from eval.shapes_video.verify import AXIS_RATIO, MIN_SPEED
from eval.shapes_video.world import SPEED_THRESHOLD, UNIT
from rewards.base import VIDEO, Reward, RewardOutput, register_reward

__all__ = ["ShapesVideoMotionReward", "motion_scores", "ShapesVideoReward", "lookup_video_metadata", "to_uint8_clips"]

MODES = ("partial", "strict", "direction")


def _normalise_prompt(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(".").strip()


@functools.lru_cache(maxsize=1)
def _metadata_by_prompt() -> dict[str, dict]:
    return {_normalise_prompt(meta["prompt"]): meta for meta in all_video_prompts()}


def lookup_video_metadata(prompt: str) -> dict | None:
    """Metadata of a ShapesWorld-Video caption (case, spacing and a final '.' ignored), or None."""
    return _metadata_by_prompt().get(_normalise_prompt(prompt))


def to_uint8_clips(samples: Tensor, size: int | None = None) -> Tensor:
    """[B, 3, T, H, W] floats in [0, 1] -> [B, T, H, W, 3] uint8 (frames resized to `size` if given)."""
    videos = samples.detach().float()
    b, c, t, h, w = videos.shape
    frames = videos.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if size is not None and (h, w) != (size, size):
        frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    frames = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    return frames.reshape(b, t, c, *frames.shape[-2:]).permute(0, 1, 3, 4, 2).cpu()


def _metas(name: str, batch: int, prompts, metadata) -> list[dict | None]:
    if prompts is None and metadata is None:
        raise ValueError(f"{name}: needs prompts (ShapesWorld-Video captions) or metadata=[dicts]")
    metas = [metadata[i] if metadata is not None else None for i in range(batch)]
    return [m if m is not None or prompts is None else lookup_video_metadata(prompts[i]) for i, m in enumerate(metas)]



@register_reward("shapes_video_verifier")
class ShapesVideoReward(Reward):
    """ShapesWorld-Video verifier (`eval.shapes_video.evaluate_clip`) per video.

    Scale: `mode="partial"` (default) partial credit in [0, 1] (mean of colour / shape / direction
    / speed terms per object and a count term); "strict" 0/1 exact correctness; "direction" 0/1
    (every named object found, in its colour, moving the stated way). Not differentiable. Videos
    only ([B, 3, T, H, W]); frames that are not 64 px are resized when `resize`.

    Metadata per sample: `metadata=[dict | None, ...]` if given (the world's metadata schema), else
    looked up from the caption; a sample with neither scores NaN (counted in "missing_metadata").
    extras: "strict", "partial", "direction" [B] (NaN if missing), "per_tag_strict" and
    "per_tag_partial" ({tag: mean}), "reasons" (per sample, "" when strict, None when missing).
    """

    name = "shapes_video_verifier"
    raw_range = (0.0, 1.0)
    differentiable = False
    modalities = (VIDEO,)
    requires_prompts = False  # prompts or metadata= (checked in score)

    def __init__(self, mode: str = "partial", resize: bool = True):
        if mode not in MODES:
            raise ValueError(f"shapes_video_verifier mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.resize = resize

    def score(self, samples: Tensor, prompts: Sequence[str] | None, metadata=None, **kwargs) -> RewardOutput:
        batch = samples.shape[0]
        metas = _metas(self.name, batch, prompts, metadata)
        if tuple(samples.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE) and not self.resize:
            raise ValueError(f"{self.name}: the verifier needs {IMAGE_SIZE}x{IMAGE_SIZE} frames (or resize=True)")
        clips = to_uint8_clips(samples, IMAGE_SIZE if self.resize else None).numpy()
        values = {key: torch.full((batch,), math.nan) for key in MODES}
        reasons: list[str | None] = [None] * batch
        by_tag: dict[str, list[int]] = {}
        for i, meta in enumerate(metas):
            if meta is None:
                continue
            result = evaluate_clip(clips[i], meta)
            for key in MODES:
                values[key][i] = float(result[key])
            reasons[i] = result["reason"]
            by_tag.setdefault(meta.get("tag", "unknown"), []).append(i)
        order = [t for t in VIDEO_TAGS if t in by_tag] + sorted(t for t in by_tag if t not in VIDEO_TAGS)
        extras = {**values,
                  "per_tag_strict": {t: float(values["strict"][by_tag[t]].mean()) for t in order},
                  "per_tag_partial": {t: float(values["partial"][by_tag[t]].mean()) for t in order},
                  "reasons": reasons,
                  "missing_metadata": sum(m is None for m in metas)}
        return RewardOutput(values[self.mode].clone(), extras)



def colour_masses(videos: Tensor, temperature: float = 0.1) -> Tensor:
    """[B, 3, T, H, W] in [0, 1] -> [B, K, T, H, W] soft assignment of each pixel to the palette
    colours (K = len(PALETTE), in PALETTE's order; the background takes the rest): a softmax over
    -||p - colour||^2 / (2 temperature^2), colours in [0, 1] RGB units."""
    refs = torch.tensor([*PALETTE.values(), BACKGROUND], dtype=videos.dtype, device=videos.device) / 255.0  # [K+1, 3]
    dist = (videos.unsqueeze(1) - refs.view(1, -1, 3, 1, 1, 1)).square().sum(2)  # [B, K+1, T, H, W]
    return torch.softmax(-dist / (2 * temperature**2), dim=1)[:, :-1]


def mass_centroids(masks: Tensor, min_mass: float) -> tuple[Tensor, Tensor, Tensor]:
    """masks [..., T, H, W] -> (mass [..., T] px, centroid [..., T, 2] (x, y) px of pixel centres,
    frame weight [..., T] = mass / (mass + min_mass): frames where the colour is absent count little)."""
    h, w = masks.shape[-2:]
    ys = torch.arange(h, dtype=masks.dtype, device=masks.device) + 0.5
    xs = torch.arange(w, dtype=masks.dtype, device=masks.device) + 0.5
    mass = masks.sum((-2, -1))
    cx = (masks.sum(-2) * xs).sum(-1) / mass.clamp_min(1e-6)
    cy = (masks.sum(-1) * ys).sum(-1) / mass.clamp_min(1e-6)
    return mass, torch.stack([cx, cy], -1), mass / (mass + min_mass)


def weighted_slope(centres: Tensor, weights: Tensor) -> Tensor:
    """Weighted least-squares slope (px per frame) of centres [..., T, 2] against the frame index."""
    t = torch.arange(centres.shape[-2], dtype=centres.dtype, device=centres.device)
    wsum = weights.sum(-1, keepdim=True).clamp_min(1e-6)
    t_mean = (weights * t).sum(-1, keepdim=True) / wsum  # [..., 1]
    dt = t - t_mean  # [..., T]
    c_mean = (weights.unsqueeze(-1) * centres).sum(-2, keepdim=True) / wsum.unsqueeze(-1)
    cov = (weights * dt).unsqueeze(-1).mul(centres - c_mean).sum(-2)  # [..., 2]
    return cov / (weights * dt.square()).sum(-1, keepdim=True).clamp_min(1e-6)


def motion_scores(videos: Tensor, metas: Sequence[dict | None], temperature: float = 0.1, object_area: float = 80.0,
                  softness: float = 0.25) -> tuple[Tensor, Tensor, Tensor]:
    """(score, presence, direction) [B] of :class:`ShapesVideoMotionReward` for videos [B, 3, T, H, W]
    in [0, 1] (float64 stays float64) and their metadata (None: NaN)."""
    videos = videos.to(torch.promote_types(videos.dtype, torch.float32)).clamp(0, 1)
    mass, centres, weights = mass_centroids(colour_masses(videos, temperature), min_mass=object_area / 4)
    velocity = weighted_slope(centres, weights)  # [B, K, 2] px per frame
    colours, s, nan = list(PALETTE), softness, videos.new_tensor(math.nan)
    scores, presence, direction = [], [], []
    for i, meta in enumerate(metas):
        if meta is None:
            scores.append(nan), presence.append(nan), direction.append(nan)
            continue
        clauses = []  # (score, presence, direction) of each object clause
        for obj in meta["objects"]:
            k = colours.index(obj["color"])
            ux, uy = UNIT[obj["direction"]]
            v_par = velocity[i, k, 0] * ux + velocity[i, k, 1] * uy
            v_perp = (velocity[i, k, 0] * uy - velocity[i, k, 1] * ux).abs()
            present = (mass[i, k].mean() / (obj["count"] * object_area)).clamp(max=1.0)
            moving = torch.sigmoid((v_par - MIN_SPEED) / s) * torch.sigmoid((v_par - AXIS_RATIO * v_perp) / s)
            terms = [present, moving]
            if obj.get("speed"):
                sign = 1.0 if obj["speed"] == "fast" else -1.0
                terms.append(torch.sigmoid(sign * (v_par - SPEED_THRESHOLD) / s))
            clauses.append(torch.stack([torch.stack(terms).mean(), present, moving]))
        score, present, moving = torch.stack(clauses).mean(0)
        scores.append(score), presence.append(present), direction.append(moving)
    return torch.stack(scores), torch.stack(presence), torch.stack(direction)


@register_reward("shapes_video_motion")
class ShapesVideoMotionReward(Reward):
    """Differentiable surrogate of the ShapesWorld-Video verifier's colour, count, direction and
    speed checks (not shape), per video.

    Each object clause of the caption (colour c, direction d, count n, optional speed) is judged on
    the soft mask of colour c (:func:`colour_masses`): presence = min(1, mean mass / (n x
    ``object_area``)); direction = sigmoid((v_par - MIN_SPEED) / s) x sigmoid((v_par - AXIS_RATIO
    |v_perp|) / s) with (v_par, v_perp) the least-squares velocity of the mask's centroid along and
    across d (px per frame, frames weighted by their mass); speed = sigmoid(+-(v_par -
    SPEED_THRESHOLD) / s) for "quickly" / "slowly". A clause scores the mean of its terms, a video
    the mean over clauses: in [0, 1], smooth, and its gradient reaches every pixel. The thresholds
    are the verifier's (eval/shapes_video); ``softness`` s is in px per frame. Shapes are not
    checked, and n objects of one colour are judged by their joint centroid. Metadata as for
    "shapes_video_verifier"; a video without scores NaN (counted in "missing_metadata").
    extras: "presence", "direction" [B] (means over clauses).
    """

    name = "shapes_video_motion"
    raw_range = (0.0, 1.0)
    differentiable = True
    modalities = (VIDEO,)
    requires_prompts = False

    def __init__(self, temperature: float = 0.1, object_area: float = 80.0, softness: float = 0.25):
        if temperature <= 0 or object_area <= 0 or softness <= 0:
            raise ValueError("shapes_video_motion: temperature, object_area and softness must be > 0")
        self.temperature, self.object_area, self.softness = temperature, object_area, softness

    def score(self, samples: Tensor, prompts: Sequence[str] | None, metadata=None, **kwargs) -> RewardOutput:
        metas = _metas(self.name, samples.shape[0], prompts, metadata)
        scores, presence, direction = motion_scores(samples, metas, self.temperature, self.object_area, self.softness)
        extras = {"presence": presence.detach(), "direction": direction.detach(),
                  "missing_metadata": sum(m is None for m in metas)}
        return RewardOutput(scores, extras)
