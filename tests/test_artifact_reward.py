"""The artefact generator (eval/shapes/artifacts.py) and the artifact_classifier reward."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from eval.shapes import prompts, render, scene_for_prompt
from eval.shapes.artifacts import KINDS, MIN_CHANGE, corrupt, render_clean, sample_artifact_dataset
from rewards import build_reward
from rewards.artifact import ArtifactClassifierReward, auroc, load_backbone, train_artifact_head


@pytest.fixture(scope="module")
def clean_image() -> np.ndarray:
    meta = next(m for m in prompts("train") if m["tag"] == "two_object")
    return render(scene_for_prompt(meta, rng=0))


@pytest.fixture(scope="module")
def reward() -> ArtifactClassifierReward:
    return build_reward("artifact_classifier")


def _as_samples(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255  # a copy: renders are read-only


# ----------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("kind", KINDS)
def test_each_corruption_changes_the_image_and_is_seeded(clean_image, kind):
    original = clean_image.copy()
    for severity in (0.0, 0.5, 1.0):
        a = corrupt(clean_image, kind, rng=3, severity=severity)
        assert a.dtype == np.uint8 and a.shape == clean_image.shape
        assert np.abs(a.astype(int) - clean_image.astype(int)).max() >= MIN_CHANGE * 255, (kind, severity)
        np.testing.assert_array_equal(a, corrupt(clean_image, kind, rng=3, severity=severity))  # deterministic
        np.testing.assert_array_equal(a, corrupt(clean_image, kind, np.random.default_rng(3), severity))
    assert not np.array_equal(corrupt(clean_image, kind, 3, 0.5), corrupt(clean_image, kind, 4, 0.5))
    np.testing.assert_array_equal(clean_image, original)  # pure: the input is untouched
    as_float = corrupt(clean_image.astype(np.float32) / 255, kind, 3, 0.5)
    assert as_float.dtype == np.float32 and 0 <= as_float.min() and as_float.max() <= 1


def test_corrupt_rejects_bad_arguments(clean_image):
    with pytest.raises(ValueError, match="unknown artefact kind"):
        corrupt(clean_image, "jpeg", 0)
    with pytest.raises(ValueError, match="severity"):
        corrupt(clean_image, "grid", 0, severity=1.5)


def test_dataset_sampler_is_balanced_seeded_and_mixes_sources():
    model_like = render_clean(4, 99, "test")  # stands in for base-model samples
    data = sample_artifact_dataset(6, 0, "train", model_samples=model_like)
    assert data.images.shape == (20, 64, 64, 3) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0.0] * 10 + [1.0] * 10
    assert data.kinds[:10] == ["clean"] * 10 and set(data.kinds[10:]) <= set(KINDS)
    assert data.source.count("model") == 8
    for clean, bad in zip(data.images[:10], data.images[10:]):
        assert not np.array_equal(clean, bad)
    again = sample_artifact_dataset(6, 0, "train", model_samples=model_like)
    np.testing.assert_array_equal(data.images, again.images)


def test_auroc_matches_pair_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)  # many ties
    labels = rng.integers(0, 2, size=40)
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
             for p, n in itertools.product(scores[labels == 1], scores[labels == 0])]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))
    assert np.isnan(auroc(scores, np.zeros(40)))


# ----------------------------------------------------------------------------- the shipped head


def test_shipped_head_separates_fresh_heldout_data(reward):
    """Fresh held-out data (test-split renders and base-model samples, seeds unseen in training)."""
    from samplers.generate import generate
    from samplers.models import load_model

    texts = [m["prompt"] for m in prompts("test")][::9][:16]
    samples = generate(load_model("shapesworld"), texts, [2_000_000 + i for i in range(len(texts))])
    samples = (samples.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    data = sample_artifact_dataset(48, np.random.default_rng(2024), "test", model_samples=samples)
    out = reward(_as_samples(data.images))
    assert reward.raw_range == (0.0, 1.0) and out.scores.min() >= 0 and out.scores.max() <= 1
    assert torch.allclose(out.scores, 1 - out.extras["p_artifact"])
    assert auroc(out.extras["p_artifact"].numpy(), data.labels) >= 0.9


def test_gradient_reaches_the_pixels(reward, clean_image):
    samples = _as_samples(clean_image[None]).requires_grad_(True)
    reward(samples).scores.sum().backward()
    assert samples.grad is not None and torch.isfinite(samples.grad).all() and samples.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.backbone.parameters())


def test_videos_and_other_sizes(reward, clean_image):
    video = _as_samples(clean_image[None]).unsqueeze(2).repeat(1, 1, 3, 1, 1)  # [1, 3, T=3, 64, 64]
    image_score = reward(_as_samples(clean_image[None])).scores
    assert torch.allclose(reward(video).scores, image_score, atol=1e-5)
    large = torch.nn.functional.interpolate(_as_samples(clean_image[None]), size=(128, 128), mode="bilinear")
    assert reward(large).scores.shape == (1,)


# ----------------------------------------------------------------------------- training


def test_two_step_training_smoke(tmp_path, clean_image):
    out = tmp_path / "head"
    config = train_artifact_head(out, renders=8, model_samples=2, test_renders=8, test_model_samples=2, steps=2,
                                 show_progress=False, log=lambda *_: None)
    assert {p.name for p in out.iterdir()} == {"head.safetensors", "config.json"}
    assert (out / "head.safetensors").stat().st_size < 1_000_000
    assert set(config["heldout"]["auroc_per_kind"]) <= set(KINDS) and 0 <= config["heldout"]["auroc"] <= 1
    loaded = ArtifactClassifierReward.from_pretrained(out)
    scores = loaded(_as_samples(clean_image[None])).scores
    assert scores.shape == (1,) and 0 <= float(scores) <= 1
    # a second run replaces the folder atomically (no leftovers beside it)
    train_artifact_head(out, renders=8, model_samples=0, test_renders=8, test_model_samples=0, steps=2,
                        show_progress=False, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]


def test_generic_backbone_path_with_a_tiny_random_clip_vision_model(tmp_path, clean_image):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    backbone = load_backbone(vision)
    assert backbone(_as_samples(clean_image[None])).shape == (1, 32, 1)
    out = tmp_path / "clip_head"
    config = train_artifact_head(out, backbone=vision, renders=8, model_samples=0, test_renders=8,
                                 test_model_samples=0, steps=2, show_progress=False, log=lambda *_: None)
    assert config["backbone"].startswith("custom") and config["channels"] == 32 and config["cells"] == 1
    with pytest.raises(ValueError, match="backbone="):
        ArtifactClassifierReward(out)
    reward = ArtifactClassifierReward(out, backbone=vision)
    samples = _as_samples(clean_image[None]).requires_grad_(True)
    reward(samples).scores.sum().backward()
    assert samples.grad.abs().sum() > 0


def test_cli_parses_train_artifact(tmp_path):
    from align.cli import build_parser

    args = build_parser().parse_args(["train-artifact", "--out", str(tmp_path), "--steps", "3"])
    assert args.out == tmp_path and args.steps == 3 and callable(args.func)
