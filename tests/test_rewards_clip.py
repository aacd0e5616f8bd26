"""CLIP-family rewards on tiny random models of the real classes, checked against hand
computations from the models' own embeddings (rewards/clip.py)."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewards import WeightedSum, build_reward, registered_rewards
from rewards.clip import OPENAI_MEAN, OPENAI_STD, AestheticHead, ClipEncoder

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

SIZE = 32  # tiny models' input size
PROMPTS = ["a photo of a red circle", "a blue square", "a photo of a red circle", "two green triangles"]
TINY_OPEN_CLIP = {  # open_clip model config (the same schema as its model_configs/*.json)
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def open_clip_model():
    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_OPEN_CLIP).eval()


@pytest.fixture(scope="module")
def hf_clip():
    """(tiny transformers CLIPModel, the exact CLIP BPE tokenizer)."""
    from samplers.models.clip_tokenizer import build_clip_tokenizer

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **tower),
        vision_config=dict(image_size=SIZE, patch_size=8, **tower),
        projection_dim=16,
    )
    return transformers.CLIPModel(config).eval(), build_clip_tokenizer()


def text_flipped(model):
    """A copy whose text embeddings are negated: cosines change sign (tiny random CLIPs give
    every image-text pair the same sign, so this is how a test reaches both sides of a clamp)."""
    flipped = copy.deepcopy(model)
    projection = flipped.text_projection
    (projection.weight if hasattr(projection, "weight") else projection).data.neg_()
    return flipped


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(len(PROMPTS), 3, SIZE, SIZE)


def normalise_pixels(x):
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def open_clip_embeddings(model, x, texts):
    image = F.normalize(model.encode_image(normalise_pixels(x)), dim=-1)
    text = F.normalize(model.encode_text(open_clip.SimpleTokenizer(context_length=77)(texts)), dim=-1)
    return image, text


@torch.no_grad()
def hf_embeddings(model, tokenizer, x, texts):
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    image = model.get_image_features(pixel_values=normalise_pixels(x)).pooler_output
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_names_registered():
    assert {"clip_score", "vlm_rm", "pickscore", "hpsv2", "aesthetic"} <= set(registered_rewards())


def test_preprocess_matches_open_clip_transform(open_clip_model):
    """Torch resize-short-side + centre crop + normalise == open_clip's PIL eval transform."""
    from PIL import Image

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 56), indexing="ij")
    x = torch.stack([yy, xx, (yy + xx) / 2])[None]  # smooth, non-square [1, 3, 40, 56]
    x = (x * 255).round() / 255
    pil = Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    reference = open_clip.image_transform(SIZE, is_train=False)(pil)
    ours = ClipEncoder(open_clip_model).preprocess(x)[0]
    assert ours.shape == reference.shape == (3, SIZE, SIZE)
    assert (ours - reference).abs().max() < 0.05  # PIL bicubic on uint8 vs torch on floats


@pytest.mark.parametrize("backend", ["open_clip", "transformers"])
def test_clip_score_by_hand(backend, open_clip_model, hf_clip, images):
    texts = ["A photo depicts " + p for p in PROMPTS]
    scores = []
    for flip in (False, True):
        if backend == "open_clip":
            model = text_flipped(open_clip_model) if flip else open_clip_model
            reward = build_reward({"name": "clip_score", "model": model})
            image, text = open_clip_embeddings(model, images, texts)
        else:
            model = text_flipped(hf_clip[0]) if flip else hf_clip[0]
            reward = build_reward({"name": "clip_score", "model": model, "tokenizer": hf_clip[1]})
            image, text = hf_embeddings(model, hf_clip[1], images, texts)
        cosine = (image * text).sum(-1)
        out = reward(images, PROMPTS)
        torch.testing.assert_close(out.extras["cosine"], cosine, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.scores, 2.5 * cosine.clamp_min(0), atol=1e-5, rtol=1e-5)
        scores.append(out.scores)
    scores = torch.cat(scores)
    assert (scores > 0).any() and (scores == 0).any()  # both sides of max(cos, 0) were checked
    assert reward.raw_range == (0.0, 2.5)


def test_vlm_rm_by_hand(open_clip_model, images):
    goal, baseline, alpha = ["a red circle", "a circle that is red"], ["a shape"], 0.5
    reward = build_reward({"name": "vlm_rm", "model": open_clip_model, "goal": goal, "baseline": baseline,
                           "alpha": alpha})
    x, goals = open_clip_embeddings(open_clip_model, images, goal)
    _, base = open_clip_embeddings(open_clip_model, images[:1], baseline)
    g, b = goals.mean(0), base.mean(0)
    d = g - b
    projection = alpha * torch.outer(d, d) / d.dot(d) + (1 - alpha) * torch.eye(len(d))
    expected = 1 - 0.5 * ((x - g) @ projection).pow(2).sum(-1)
    out = reward(images, None)  # fixed goal: prompts not needed
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-5)
    assert out.scores.abs().max() <= 1

    # alpha = 0 with one goal is plain cosine similarity (the paper's remark); per-sample goals.
    plain = build_reward({"name": "vlm_rm", "model": reward.encoder})
    x, text = open_clip_embeddings(open_clip_model, images, PROMPTS)
    torch.testing.assert_close(plain(images, PROMPTS).scores, (x * text).sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs prompts"):
        plain(images, None)
    with pytest.raises(ValueError, match="baseline"):
        build_reward({"name": "vlm_rm", "model": reward.encoder, "alpha": 0.5})


def test_pickscore_by_hand(hf_clip, images):
    model, tokenizer = hf_clip
    reward = build_reward({"name": "pickscore", "model": model, "tokenizer": tokenizer})
    image, text = hf_embeddings(model, tokenizer, images, PROMPTS)
    scale = model.logit_scale.exp().item()
    out = reward(images, PROMPTS)
    torch.testing.assert_close(out.scores, scale * (image * text).sum(-1), atol=1e-4, rtol=1e-5)
    assert reward.raw_range == pytest.approx((-scale, scale))


def test_transformers_clip_reloads_from_local_path(hf_clip, images, tmp_path):
    """A saved CLIPModel + CLIPProcessor loads by path (from_pretrained) and scores the same."""
    model, tokenizer = hf_clip
    model.save_pretrained(tmp_path)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": SIZE},
                                                      crop_size={"height": SIZE, "width": SIZE})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)
    reloaded = build_reward({"name": "pickscore", "model": str(tmp_path), "processor": str(tmp_path), "device": "cpu"})
    in_memory = build_reward({"name": "pickscore", "model": model, "tokenizer": tokenizer})
    torch.testing.assert_close(reloaded(images, PROMPTS).scores, in_memory(images, PROMPTS).scores)
    # Without processor=, the tokenizer and mean/std are read from beside the weights.
    by_path = build_reward({"name": "clip_score", "model": str(tmp_path), "device": "cpu"})
    same = build_reward({"name": "clip_score", "model": model, "tokenizer": tokenizer})
    torch.testing.assert_close(by_path(images, PROMPTS).extras["cosine"], same(images, PROMPTS).extras["cosine"])


def test_hpsv2_loads_checkpoint_by_name(open_clip_model, images, tmp_path):
    """Model name via open_clip's config registry + an HPS-style {"state_dict": ...} file."""
    (tmp_path / "genalign-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "genalign-tiny-clip.json")
    checkpoint = tmp_path / "hps.pt"
    torch.save({"state_dict": open_clip_model.state_dict()}, checkpoint)
    reward = build_reward({"name": "hpsv2", "model": "genalign-tiny-clip", "checkpoint": str(checkpoint),
                           "device": "cpu"})
    image, text = open_clip_embeddings(open_clip_model, images, PROMPTS)
    torch.testing.assert_close(reward(images, PROMPTS).scores, (image * text).sum(-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pretrained"):
        ClipEncoder(open_clip_model, pretrained="openai")


def test_aesthetic_by_hand(hf_clip, images, tmp_path):
    model, _ = hf_clip
    torch.manual_seed(2)
    head = AestheticHead(16).eval()
    torch.save(head.state_dict(), tmp_path / "head.pth")
    reward = build_reward({"name": "aesthetic", "model": model, "head": str(tmp_path / "head.pth")})
    image, _ = hf_embeddings(*hf_clip, images, PROMPTS[:1])
    with torch.no_grad():
        expected = head(image)
    out = reward(images)  # prompt-blind
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-5)


def test_batching_resize_and_video(open_clip_model):
    torch.manual_seed(3)
    big = torch.rand(5, 3, 48, 40)  # resized and cropped to 32
    prompts = PROMPTS + ["a yellow square"]
    whole = build_reward({"name": "hpsv2", "model": open_clip_model, "batch_size": 32})
    chunked = build_reward({"name": "hpsv2", "model": open_clip_model, "batch_size": 2})
    torch.testing.assert_close(chunked(big, prompts).scores, whole(big, prompts).scores, atol=1e-6, rtol=1e-6)

    video = torch.rand(2, 3, 3, SIZE, SIZE)  # (B, 3, T, H, W): mean of per-frame scores
    per_frame = torch.stack([whole(video[:, :, t], PROMPTS[:2]).scores for t in range(3)], 1)
    torch.testing.assert_close(whole(video, PROMPTS[:2]).scores, per_frame.mean(1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["clip_score", "vlm_rm", "pickscore", "hpsv2", "aesthetic"])
def test_gradients_reach_pixels(name, open_clip_model, hf_clip):
    model = text_flipped(open_clip_model) if name == "clip_score" else open_clip_model  # cos > 0: not clamped
    spec = {"name": name, "model": model}
    if name == "aesthetic":
        spec["head"] = AestheticHead(16)
    reward = build_reward(spec)
    assert reward.differentiable
    samples = torch.rand(2, 3, 40, 40, requires_grad=True)  # through the resize too
    out = reward(samples, PROMPTS[:2])
    out.scores.sum().backward()
    assert samples.grad is not None and torch.isfinite(samples.grad).all() and samples.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())


def test_group_zscored_sum_of_clip_rewards(open_clip_model, images):
    """Decoupled multi-reward normalisation: each reward z-scored within its prompt group."""
    clip_score = build_reward({"name": "clip_score", "model": open_clip_model})
    hps = build_reward({"name": "hpsv2", "model": clip_score.encoder})
    groups = torch.tensor([0, 1, 0, 1])
    out = WeightedSum([(clip_score, 1.0), (hps, 0.5)], normalize="group")(images, PROMPTS, group_ids=groups)
    for g in (0, 1):
        assert out.scores[groups == g].sum().abs() < 1e-5  # each z-score sums to 0 within a group
    assert not math.isnan(float(out.scores.sum()))
