"""shapes_soft_geneval: the differentiable surrogate of the ShapesWorld image verifier."""

from __future__ import annotations

import math

import pytest
import torch

from eval.shapes import TAGS, detect, evaluate, prompts, render, scene_for_prompt
from eval.shapes.world import ObjectSpec, Scene
from rewards import build_reward
from rewards.shapes import to_uint8_images
from rewards.shapes_soft import soft_geneval_scores

SWAP = {"circle": "square", "square": "triangle", "triangle": "circle"}


def _images(metas, dtype=torch.float32):
    arrays = [render(scene_for_prompt(m, rng=i)).copy() for i, m in enumerate(metas)]
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).to(dtype) / 255


def test_soft_verifier_agrees_with_the_verifier_on_true_and_shape_swapped_captions():
    metas = [m for split in ("train", "test") for tag in TAGS for m in [m for m in prompts(split) if m["tag"] == tag][-3:]]
    images = _images(metas)
    soft, verifier = build_reward("shapes_soft_geneval"), build_reward("shapes_geneval")
    true = soft(images, [m["prompt"] for m in metas]).scores
    # ground truth, where the verifier gives every one 1.0; the soft colour share of a pixel stays
    # below 1 next to a close palette colour (orange-red, purple-blue), hence not exactly 1
    assert true.min() > 0.85 and true.mean() > 0.97
    swapped = [{**m, "include": [{**c, "class": SWAP[c["class"]]} for c in m["include"]]} for m in metas]
    wrong = soft(images, None, metadata=swapped).scores
    wrong_verifier = verifier(images, None, metadata=swapped).scores
    assert (true > wrong + 0.3).all()
    assert (wrong - wrong_verifier).abs().max() < 0.15  # the verifier's partial credit, softened


def test_gradient_is_exact_and_climbing_it_turns_a_square_into_the_asked_circle():
    soft = build_reward("shapes_soft_geneval")
    meta = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    square = render(Scene([ObjectSpec("square", "red", 32.0, 32.0, 22.0)])).copy()
    image = torch.from_numpy(square).permute(2, 0, 1)[None].double() / 255
    # soft-edged, like a decoded one-step estimate x0_hat
    image = torch.nn.functional.avg_pool2d(image, 3, 1, 1, count_include_pad=False)

    def patched(patch):  # the score (float64) as a function of a 6x6 patch on the square's corner
        full = image.clone()
        full[:, :, 19:25, 19:25] = patch
        return soft_geneval_scores(full, [meta])[0]

    # (x 0.95 + 0.02: off the kink of the clamp to the colour segment at flat colours)
    patch = (image[:, :, 19:25, 19:25] * 0.95 + 0.02).requires_grad_(True)
    assert torch.autograd.gradcheck(patched, (patch,), eps=1e-6, atol=1e-6)

    x = image.clone().requires_grad_(True)
    before = float(soft(x, None, metadata=[meta]).scores.detach())
    assert evaluate(to_uint8_images(x)[0], meta)["partial"] == 0.0  # a square, not a circle
    for _ in range(20):
        (grad,) = torch.autograd.grad(soft(x, None, metadata=[meta]).scores.sum(), x)
        x = (x + grad / grad.norm()).clamp(0, 1).detach().requires_grad_(True)
    assert float(soft(x, None, metadata=[meta]).scores.detach()) > before + 0.8
    assert [d.shape for d in detect(to_uint8_images(x)[0])] == ["circle"]
    assert evaluate(to_uint8_images(x)[0], meta)["strict"]


def test_unknown_prompts_score_nan_and_bad_settings_are_rejected():
    metas = prompts("train")[:2]
    out = build_reward("shapes_soft_geneval")(_images(metas), ["a photo of a dog", metas[1]["prompt"]])
    assert math.isnan(out.scores[0]) and not math.isnan(out.scores[1])
    assert out.extras["missing_metadata"] == 1 and out.extras["components"][1] >= 1
    with pytest.raises(ValueError, match="needs prompts"):
        build_reward("shapes_soft_geneval")(_images(metas), None)
    with pytest.raises(ValueError, match="must be > 0"):
        build_reward({"name": "shapes_soft_geneval", "tau": 0})
