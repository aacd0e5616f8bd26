"""A differentiable surrogate of the ShapesWorld image verifier ("shapes_soft_geneval").

The verifier (eval/shapes) segments an image into single-colour connected components, calls each
one the shape whose ideal mask, fitted to the component's box, it overlaps best (IoU), and scores
GenEval's count / colour / position clauses on those detections. Every step is a hard decision, so
its gradient is zero. This reward keeps the verifier's structure (the components and their boxes,
found on the detached image) and replaces each decision by a smooth function of the pixels:

* object mask of component c (colour k): the verifier's pixel test (alpha >= MIN_ALPHA along the
  background-to-k segment, within MAX_RESIDUAL of it) through sigmoids (:func:`soft_palette`),
  over c's box grown by ``pad`` px (pixels of other components excluded);
* shape: the soft IoU of that mask with each ideal mask of the box (the verifier's templates,
  ``eval.shapes.verifier.ideal_masks``); P(shape) = softmax(IoU / ``tau``) and confidence
  conf = sigmoid((max IoU - MIN_SCORE) / ``tau``), so a detection of class s weighs
  q_c(s) = conf x P(s);
* colour: the mean over c's pixels of a softmax over palette colours of -d^2 / (2 MAX_RESIDUAL^2),
  d the distance to each colour's segment (so a pure colour next to a close one, orange by red
  or purple by blue, scores ~0.9, and between far-apart colours the gradient all but vanishes);
* position: GenEval's relative_position on the mask's centroid (box sizes held fixed), each
  "> 0.5" threshold through a sigmoid.

The clause terms are the verifier's partial credit with counts replaced by sums of q: count
clip(1 - |n - sum_c q_c(s)| / n, 0, 1), colour likewise on the n most confident detections,
position the product of the subject's and target's q and the soft relations. The score is their
mean. A component's pixels get a gradient that makes it more of the asked shape and colour, or
moves it the asked way; an object that is missing altogether gets none (there is nothing to
reshape). The gradient is exact for the components found; they are re-found at every call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from eval.shapes import IMAGE_SIZE, SHAPES, classify_pixels, connected_components
from eval.shapes.verifier import MAX_RESIDUAL, MIN_ALPHA, MIN_AREA, MIN_SCORE, _palette_segments, ideal_masks
from eval.shapes.world import BACKGROUND, COLORS
from rewards.base import IMAGE, Reward, RewardOutput, register_reward
from rewards.shapes import resolve_shapes_metadata, to_uint8_images

__all__ = ["ShapesSoftGenEvalReward", "soft_components", "soft_geneval_score", "soft_geneval_scores", "soft_palette"]


def _relation_probs(centre_a: Tensor, centre_b: Tensor, dims: Tensor, softness: float, threshold: float = 0.1) -> dict:
    """Soft version of ``eval.shapes.relative_position`` for A relative to B: {relation: prob}.
    centres (x, y) px, dims = the two boxes' summed (w, h)."""
    offset = centre_a - centre_b
    revised = torch.relu(offset.abs() - threshold * dims) * torch.sign(offset)
    dx, dy = revised / offset.norm().clamp_min(1e-6)
    sig = lambda v: torch.sigmoid((v - 0.5) / softness)  # noqa: E731
    return {"left of": sig(-dx), "right of": sig(dx), "above": sig(-dy), "below": sig(dy)}


def soft_palette(images: Tensor, alpha_softness: float = 0.1, residual_softness: float = 10.0) -> tuple[Tensor, Tensor]:
    """Soft ``eval.shapes.classify_pixels`` of images [B, 3, H, W] in [0, 1]: (mask, share), each
    [B, K, H, W] (K palette colours). mask_k = sigmoid((alpha_k - MIN_ALPHA) / alpha_softness) x
    sigmoid((MAX_RESIDUAL - d_k) / residual_softness), with alpha_k the pixel's position along the
    background-to-colour-k segment and d_k its RGB distance from it (the verifier's thresholds);
    share = softmax_k(-d_k^2 / (2 MAX_RESIDUAL^2)), which colour a pixel is."""
    bg, directions, lengths_sq = (torch.as_tensor(a, dtype=images.dtype, device=images.device)
                                  for a in _palette_segments(BACKGROUND))
    offsets = images * 255.0 - bg.view(1, 3, 1, 1)  # [B, 3, H, W]
    alpha = torch.einsum("bchw,kc->bkhw", offsets, directions) / lengths_sq.view(1, -1, 1, 1)
    along = alpha.clamp(0, 1).unsqueeze(2) * directions.view(1, -1, 3, 1, 1)  # [B, K, 3, H, W]
    dist = (offsets.unsqueeze(1) - along).square().sum(2).add(1e-6).sqrt()
    mask = torch.sigmoid((alpha - MIN_ALPHA) / alpha_softness) * torch.sigmoid((MAX_RESIDUAL - dist) / residual_softness)
    share = torch.softmax(-dist.square() / (2 * MAX_RESIDUAL**2), dim=1)
    return mask, share


def soft_components(image: Tensor, mask: Tensor, share: Tensor, pad: int = 1, tau: float = 0.03) -> list[dict]:
    """Components of one image [3, H, W] (64 px) with soft shape / colour / centroid.

    ``mask``, ``share`` [K, H, W]: :func:`soft_palette` of the image. Returns one dict per
    verifier component (>= MIN_AREA px): "color" (index), "box" (x0, y0, x1, y1), "q" {shape:
    soft detection weight}, "colour_share" [K] (mean soft colour of its pixels), "centre" (x, y).
    """
    labels = classify_pixels(to_uint8_images(image[None].detach())[0])
    found = connected_components(labels, MIN_AREA)
    h, w = labels.shape
    owner = np.full((h, w), -1, dtype=np.int64)
    for idx, (_, pixels, (x0, y0, x1, y1)) in enumerate(found):
        owner[y0:y1, x0:x1][pixels] = idx
    comps = []
    for idx, (colour, pixels, (x0, y0, x1, y1)) in enumerate(found):
        rx0, ry0, rx1, ry1 = max(x0 - pad, 0), max(y0 - pad, 0), min(x1 + pad, w), min(y1 + pad, h)
        free = torch.from_numpy(np.isin(owner[ry0:ry1, rx0:rx1], (-1, idx))).to(mask.dtype)
        soft = mask[colour, ry0:ry1, rx0:rx1] * free  # this component's soft object mask
        ious = []
        for shape in SHAPES:
            ideal = torch.zeros_like(soft)
            ideal[y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = torch.from_numpy(ideal_masks(y1 - y0, x1 - x0)[shape].copy()).to(soft.dtype)
            inter = (soft * ideal).sum()
            ious.append(inter / (soft.sum() + ideal.sum() - inter).clamp_min(1e-6))
        ious = torch.stack(ious)
        conf = torch.sigmoid((ious.max() - MIN_SCORE) / tau)
        probs = torch.softmax(ious / tau, 0) * conf
        colour_share = share[:, y0:y1, x0:x1][:, torch.from_numpy(pixels)].mean(1)  # [K]
        ys = torch.arange(ry0, ry1, dtype=soft.dtype) + 0.5
        xs = torch.arange(rx0, rx1, dtype=soft.dtype) + 0.5
        total = soft.sum().clamp_min(1e-6)
        centre = torch.stack([(soft.sum(0) * xs).sum() / total, (soft.sum(1) * ys).sum() / total])
        comps.append({"color": colour, "box": (x0, y0, x1, y1), "q": dict(zip(SHAPES, probs)),
                      "colour_share": colour_share, "centre": centre})
    return comps


def _count_term(expected: int, found: Tensor) -> Tensor:
    return (1 - (expected - found).abs() / expected).clamp(0, 1)


def soft_geneval_score(comps: list[dict], meta: dict, softness: float = 0.1) -> Tensor:
    """The verifier's partial credit (eval.shapes.verifier.evaluate_detections) on soft components."""
    zero = comps[0]["centre"].new_zeros(()) if comps else torch.zeros(())
    terms, tops = [], []
    for clause in meta.get("include", []):
        name, count = clause["class"], clause["count"]
        ranked = sorted(comps, key=lambda c: -float(c["q"].get(name, zero).detach()))
        weights = [c["q"].get(name, zero) for c in ranked]
        terms.append(_count_term(count, torch.stack(weights).sum() if weights else zero))
        top = ranked[:count]
        if "color" in clause:
            k = COLORS.index(clause["color"])
            n_colour = sum((c["q"][name] * c["colour_share"][k] for c in top), zero)
            terms.append(_count_term(count, n_colour))
        if "position" in clause:
            relation, target = clause["position"]
            target_name, targets = tops[target]
            term = zero
            if len(top) >= count and len(targets) > 0:
                term = torch.stack([c["q"][name] for c in top] + [t["q"][target_name] for t in targets]).prod()
                for c in top:
                    for t in targets:
                        dims = torch.tensor([c["box"][2] - c["box"][0] + t["box"][2] - t["box"][0],
                                             c["box"][3] - c["box"][1] + t["box"][3] - t["box"][1]], dtype=c["centre"].dtype)
                        term = term * _relation_probs(c["centre"], t["centre"], dims, softness)[relation]
            terms.append(term)
        tops.append((name, top))
    return torch.stack(terms).mean() if terms else zero


def soft_geneval_scores(images: Tensor, metas: Sequence[dict | None], alpha_softness: float = 0.1, tau: float = 0.03,
                        pad: int = 1, softness: float = 0.1) -> tuple[Tensor, Tensor]:
    """(scores [B], components seen [B]) of :class:`ShapesSoftGenEvalReward` for images [B, 3, H, W]
    in [0, 1] (resized to 64 px; float64 stays float64) and their GenEval metadata (None: NaN, -1)."""
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
    images = images.clamp(0, 1)
    mask, share = soft_palette(images, alpha_softness)
    scores, counts = [], []
    for i, meta in enumerate(metas):
        if meta is None:
            scores.append(images.new_tensor(float("nan")))
            counts.append(-1)
            continue
        comps = soft_components(images[i], mask[i], share[i], pad, tau)
        scores.append(soft_geneval_score(comps, meta, softness).to(images.dtype))
        counts.append(len(comps))
    return torch.stack(scores), torch.tensor(counts)


@register_reward("shapes_soft_geneval")
class ShapesSoftGenEvalReward(Reward):
    """Differentiable surrogate of "shapes_geneval" (partial credit), per image; see the module
    docstring for the construction. Raw range [0, 1]; the gradient reaches every pixel of the
    detected objects and their borders. Images of other sizes are resized to 64 px
    (differentiably). Metadata as for "shapes_geneval" (``metadata=`` or looked up from the
    prompt); a sample with neither scores NaN (counted in "missing_metadata"). extras:
    "components" [B] (how many components the surrogate saw).
    """

    name = "shapes_soft_geneval"
    raw_range = (0.0, 1.0)
    differentiable = True
    modalities = (IMAGE,)
    requires_prompts = False

    def __init__(self, alpha_softness: float = 0.1, tau: float = 0.03, pad: int = 1, softness: float = 0.1):
        if alpha_softness <= 0 or tau <= 0 or softness <= 0 or pad < 0:
            raise ValueError("shapes_soft_geneval: alpha_softness, tau and softness must be > 0 and pad >= 0")
        self.alpha_softness, self.tau, self.pad, self.softness = alpha_softness, tau, pad, softness

    def score(self, samples: Tensor, prompts: Sequence[str] | None, metadata=None, **kwargs) -> RewardOutput:
        metas = resolve_shapes_metadata(self.name, samples.shape[0], prompts, metadata)
        scores, counts = soft_geneval_scores(samples, metas, self.alpha_softness, self.tau, self.pad, self.softness)
        return RewardOutput(scores, {"components": counts, "missing_metadata": sum(m is None for m in metas)})
