"""The ShapesWorld-Video verifier as a reward ("shapes_video_verifier").

Ground truth for the toy video world (eval/shapes_video): objects are tracked from pixels and
their colour, shape, count, direction and speed class compared with the caption.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from eval.shapes import IMAGE_SIZE
from eval.shapes_video import VIDEO_TAGS, all_video_prompts, evaluate_clip
from rewards.base import VIDEO, Reward, RewardOutput, register_reward

__all__ = ["ShapesVideoReward", "lookup_video_metadata", "to_uint8_clips"]

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
        if prompts is None and metadata is None:
            raise ValueError(f"{self.name}: needs prompts (ShapesWorld-Video captions) or metadata=[dicts]")
        if tuple(samples.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE) and not self.resize:
            raise ValueError(f"{self.name}: the verifier needs {IMAGE_SIZE}x{IMAGE_SIZE} frames (or resize=True)")
        metas = [metadata[i] if metadata is not None else None for i in range(batch)]
        metas = [m if m is not None or prompts is None else lookup_video_metadata(prompts[i])
                 for i, m in enumerate(metas)]
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
