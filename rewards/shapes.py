"""ShapesWorld rewards: the exact GenEval-style verifier, and a deliberately hackable proxy.

- "shapes_geneval" (:class:`ShapesGenEvalReward`): ground truth for the toy world. Partial
  credit (Flow-GRPO's training reward) or strict 0/1 (GenEval's accuracy), per image.
- "shapes_quality" (:class:`ShapesQualityReward`): prompt-blind image quality, the share of
  pixels a ShapesWorld render could contain. The monitor that must not fall while the
  verifier is optimised (noise, colour drift and off-palette blotches lower it).
- "shapes_saturation" (:class:`SaturationReward`): mean HSV saturation. It correlates with
  "there are coloured shapes" on ShapesWorld's grey background, but a policy maximises it by
  painting everything in saturated colour whatever the prompt says: a known-hackable proxy
  for reward-hacking monitor demos (watch it rise while shapes_geneval falls).
"""

from __future__ import annotations

import functools
import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eval.shapes import IMAGE_SIZE, TAGS, all_prompts, detect, evaluate, palette_residual
from rewards.base import IMAGE, VIDEO, Reward, RewardOutput, frames_as_images, register_reward

__all__ = ["ShapesGenEvalReward", "ShapesQualityReward", "SaturationReward", "lookup_shapes_metadata", "resolve_shapes_metadata", "to_uint8_images"]

MAX_LISTED_MISSING = 5  # how many prompts without metadata extras lists (the count is exact)


def _normalise_prompt(prompt: str) -> str:
    # "A photo of a red circle." and "a photo of a red  circle" are the same prompt.
    return re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(".").strip()


@functools.lru_cache(maxsize=1)
def _metadata_by_prompt() -> dict[str, dict]:
    return {_normalise_prompt(meta["prompt"]): meta for meta in all_prompts()}


def lookup_shapes_metadata(prompt: str) -> dict | None:
    """GenEval metadata of a ShapesWorld prompt (case, spacing and a final '.' ignored), or None."""
    return _metadata_by_prompt().get(_normalise_prompt(prompt))


def resolve_shapes_metadata(name: str, batch: int, prompts, metadata) -> list[dict | None]:
    """GenEval metadata per sample: ``metadata[i]`` if given, else looked up from ``prompts[i]``
    (None when neither is known). Raises if both are missing (``name``: the reward, for the message)."""
    if prompts is None and metadata is None:
        raise ValueError(f"{name}: needs prompts (ShapesWorld captions) or metadata=[GenEval dicts]")
    metas = [metadata[i] if metadata is not None else None for i in range(batch)]
    return [m if m is not None or prompts is None else lookup_shapes_metadata(prompts[i]) for i, m in enumerate(metas)]


def to_uint8_images(samples: Tensor, size: int | None = None) -> np.ndarray:
    """[B, 3, H, W] floats in [0, 1] -> (B, H, W, 3) uint8 numpy (resized to ``size`` if given)."""
    images = samples.detach().float()
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


@register_reward("shapes_geneval")
class ShapesGenEvalReward(Reward):
    """The ShapesWorld verifier (``eval.shapes.detect`` + ``evaluate``) as a reward.

    Scale: ``mode="partial"`` (default) gives Flow-GRPO's partial credit in [0, 1] (mean of
    per-clause count / colour / position terms); ``mode="strict"`` gives GenEval's binary
    correctness, 0 or 1. Not differentiable. Images only ([B, 3, H, W]); images that are not
    ``IMAGE_SIZE`` (64) px are resized to it when ``resize`` (the detector's area thresholds
    are in 64 px units), else rejected.

    Metadata per sample: ``metadata=[GenEval dict | None, ...]`` if given, else looked up
    from the prompt text among ``eval.shapes.all_prompts()``. A sample with neither scores
    NaN; extras count them ("missing_metadata") and list the first few prompts
    ("missing_prompts").

    extras: "strict" [B] (0/1, NaN if missing), "partial" [B], "per_tag_strict" and
    "per_tag_partial" ({tag: mean over the batch's scored samples}), "reasons" (the
    verifier's failure reason per sample, "" when correct, None when missing).
    """

    name = "shapes_geneval"
    raw_range = (0.0, 1.0)
    differentiable = False
    modalities = (IMAGE,)
    requires_prompts = False  # prompts or metadata= (checked in score)

    def __init__(self, mode: str = "partial", resize: bool = True, detector=None):
        if mode not in ("partial", "strict"):
            raise ValueError(f"shapes_geneval mode must be 'partial' or 'strict', got {mode!r}")
        self.mode = mode
        self.resize = resize
        self.detector = detector or detect

    def score(self, samples: Tensor, prompts: Sequence[str] | None, metadata=None, **kwargs) -> RewardOutput:
        batch = samples.shape[0]
        metas = resolve_shapes_metadata(self.name, batch, prompts, metadata)
        size = tuple(samples.shape[-2:])
        if size != (IMAGE_SIZE, IMAGE_SIZE) and not self.resize:
            raise ValueError(f"{self.name}: the verifier needs {IMAGE_SIZE}x{IMAGE_SIZE} images, got "
                             f"{size[1]}x{size[0]} (or pass resize=True)")
        images = to_uint8_images(samples, IMAGE_SIZE if self.resize else None)  # (B, H, W, 3)

        strict = torch.full((batch,), math.nan)
        partial = torch.full((batch,), math.nan)
        reasons: list[str | None] = [None] * batch
        by_tag: dict[str, list[int]] = {}
        for i, meta in enumerate(metas):
            if meta is None:
                continue
            result = evaluate(images[i], meta, self.detector)
            strict[i], partial[i], reasons[i] = float(result["strict"]), result["partial"], result["reason"]
            by_tag.setdefault(meta.get("tag", "unknown"), []).append(i)

        missing = [i for i, meta in enumerate(metas) if meta is None]
        order = [t for t in TAGS if t in by_tag] + sorted(t for t in by_tag if t not in TAGS)
        extras = {
            "strict": strict,
            "partial": partial,
            "per_tag_strict": {t: float(strict[by_tag[t]].mean()) for t in order},
            "per_tag_partial": {t: float(partial[by_tag[t]].mean()) for t in order},
            "reasons": reasons,
            "missing_metadata": len(missing),
            "missing_prompts": [prompts[i] if prompts is not None else None for i in missing[:MAX_LISTED_MISSING]],
        }
        scores = partial if self.mode == "partial" else strict
        return RewardOutput(scores.clone(), extras)


@register_reward("shapes_quality")
class ShapesQualityReward(Reward):
    """Share of pixels within ``tolerance`` (RGB units, 0-255) of a colour a ShapesWorld render
    can hold: the background, a palette colour, or an anti-aliased mix of the two
    (``eval.shapes.palette_residual``).

    Raw range [0, 1]; clean renders score 1.0. Prompt-blind and not differentiable; images, or
    videos (ShapesWorld-Video frames are ShapesWorld images: the mean over frames). extras:
    "mean_residual" [B] (mean RGB distance, lower is better).
    """

    name = "shapes_quality"
    raw_range = (0.0, 1.0)
    differentiable = False
    modalities = (IMAGE, VIDEO)
    requires_prompts = False

    def __init__(self, tolerance: float = 24.0):
        if tolerance <= 0:
            raise ValueError(f"shapes_quality tolerance must be > 0, got {tolerance}")
        self.tolerance = tolerance

    def score(self, samples: Tensor, prompts=None, **kwargs) -> RewardOutput:
        images, frames = frames_as_images(samples)  # [B*T, 3, H, W]
        residuals = [palette_residual(image) for image in to_uint8_images(images)]
        clean = torch.tensor([float((r <= self.tolerance).mean()) for r in residuals]).view(-1, frames).mean(1)
        mean_residual = torch.tensor([float(r.mean()) for r in residuals]).view(-1, frames).mean(1)
        return RewardOutput(clean, {"mean_residual": mean_residual})


@register_reward("shapes_saturation")
class SaturationReward(Reward):
    """Mean HSV saturation S = (max - min) / max over RGB (0 for black pixels), per sample.

    Raw range [0, 1]; differentiable (gradients reach the pixels through the per-pixel
    max/min channels); images or videos; prompts unused. A HACKABLE PROXY by design: it
    rewards colour, not correctness (see the module docstring).
    """

    name = "shapes_saturation"
    raw_range = (0.0, 1.0)
    differentiable = True
    modalities = (IMAGE, VIDEO)
    requires_prompts = False

    def score(self, samples: Tensor, prompts=None, **kwargs) -> Tensor:
        high = samples.amax(dim=1)  # [B, (T,) H, W]
        low = samples.amin(dim=1)
        saturation = torch.where(high > 1e-6, (high - low) / high.clamp_min(1e-6), torch.zeros_like(high))
        return saturation.flatten(1).mean(1)  # [B]
