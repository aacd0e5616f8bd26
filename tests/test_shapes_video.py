"""ShapesWorld-Video: prompts and splits, ground-truth clips, the tracking verifier and its reward."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from eval.shapes_video import (
    HELD_OUT_COLOR_DIRECTION,
    NUM_FRAMES,
    SPEED_THRESHOLD,
    VIDEO_TAGS,
    Clip,
    aggregate_video,
    all_video_prompts,
    clip_for_prompt,
    evaluate_clip,
    is_held_out,
    render_clip,
    video_prompts,
)
from eval.shapes_video.verify import track_objects


def _meta(prompt: str) -> dict:
    return next(m for m in all_video_prompts() if m["prompt"] == prompt)


def test_captions_read_as_specified():
    prompts = {m["prompt"] for m in all_video_prompts()}
    for text in ["a red circle moving right", "an orange square moving down slowly", "a blue triangle moving up quickly",
                 "a red circle moving left and a blue square moving right", "three purple triangles moving down",
                 "two green circles moving up"]:
        assert text in prompts
    assert {m["tag"] for m in all_video_prompts()} == set(VIDEO_TAGS)


def test_splits_hold_out_colour_direction_compositions():
    train, test = video_prompts("train"), video_prompts("test")
    assert {m["prompt"] for m in train}.isdisjoint(m["prompt"] for m in test)
    assert len(train) + len(test) == len(all_video_prompts())
    pairs_in_train = {(c["color"], c["direction"]) for m in train for c in m["objects"]}
    assert pairs_in_train.isdisjoint(HELD_OUT_COLOR_DIRECTION)
    # every held-out colour and direction is still seen in training, only not together
    for color, direction in HELD_OUT_COLOR_DIRECTION:
        assert any(c == color for c, _ in pairs_in_train) and any(d == direction for _, d in pairs_in_train)
    assert all(is_held_out(m) for m in test)
    for split in (train, test):
        assert {m["tag"] for m in split} == set(VIDEO_TAGS)


def test_ground_truth_clips_respect_the_world_rules():
    for k, meta in enumerate(all_video_prompts()[::37]):
        clip = clip_for_prompt(meta, (7, k))
        assert len(clip.objects) == sum(c["count"] for c in meta["objects"])
        for obj in clip.objects:
            speed = math.hypot(obj.vx, obj.vy)
            clause = next(c for c in meta["objects"] if (c["color"], c["shape"]) == (obj.color, obj.shape))
            if clause["speed"]:
                assert (speed < SPEED_THRESHOLD) == (clause["speed"] == "slow")
            for t in range(NUM_FRAMES):
                x0, y0, x1, y1 = obj.at(t).bbox
                assert min(x0, y0) >= 2 and max(x1, y1) <= 62
        frames = render_clip(clip)
        assert frames.shape == (NUM_FRAMES, 64, 64, 3) and frames.dtype == np.uint8


def test_verifier_is_strict_on_ground_truth_clips_across_seeds():
    rng = np.random.default_rng(0)
    by_tag = {tag: [m for m in all_video_prompts() if m["tag"] == tag] for tag in VIDEO_TAGS}
    metas = [by_tag[tag][int(rng.integers(len(by_tag[tag])))] for tag in VIDEO_TAGS for _ in range(40)]
    results = [evaluate_clip(render_clip(clip_for_prompt(m, (11, i))), m) for i, m in enumerate(metas)]
    summary = aggregate_video(results, metas)
    assert summary["strict"] >= 0.99, [r["reason"] for r in results if not r["strict"]]
    assert summary["direction"] == 1.0 and summary["partial"] >= 0.99
    assert all(v["n"] == 40 for v in summary["per_tag"].values())


def test_verifier_tracks_identity_and_velocity():
    meta = _meta("a red circle moving left and a blue square moving right")
    clip = clip_for_prompt(meta, 3)
    tracks = track_objects(render_clip(clip))
    assert len(tracks) == 2 and all(len(t.detections) == NUM_FRAMES for t in tracks)
    for track in tracks:
        obj = next(o for o in clip.objects if o.color == track.color)
        assert track.shape == obj.shape
        np.testing.assert_allclose(track.velocity, (obj.vx, obj.vy), atol=0.3)


def test_verifier_catches_each_kind_of_error():
    meta = _meta("a red circle moving right slowly")
    clip = clip_for_prompt(meta, 5)
    frames = render_clip(clip)
    backwards = evaluate_clip(frames[::-1], meta)
    assert not backwards["strict"] and not backwards["direction"] and 0 < backwards["partial"] < 1
    frozen = evaluate_clip(np.repeat(frames[:1], NUM_FRAMES, axis=0), meta)
    assert not frozen["direction"] and "direction static" in frozen["reason"]
    fast = dataclasses.replace(clip.objects[0], vx=4.0)
    too_fast = evaluate_clip(render_clip(Clip([dataclasses.replace(fast, x0=10.0)])), meta)
    assert too_fast["direction"] and not too_fast["strict"] and "speed fast" in too_fast["reason"]
    wrong_colour = evaluate_clip(frames, _meta("a blue circle moving right slowly"))
    assert not wrong_colour["strict"] and not wrong_colour["direction"]
    wrong_shape = evaluate_clip(frames, _meta("a red square moving right slowly"))
    assert wrong_shape["direction"] and not wrong_shape["strict"] and wrong_shape["partial"] == pytest.approx(0.8)

    count_meta = _meta("three green squares moving down")
    three = clip_for_prompt(count_meta, 2)
    two = evaluate_clip(render_clip(dataclasses.replace(three, objects=three.objects[:2])), count_meta)
    assert not two["strict"] and two["count"] == 2 and "found 2" in two["reason"]
    # an object that vanishes after 3 frames is not an object
    flicker = render_clip(three)
    flicker[3:] = render_clip(dataclasses.replace(three, objects=three.objects[:2]))[3:]
    assert evaluate_clip(flicker, count_meta)["count"] == 2


def test_reward_scores_videos_and_reports_nan_for_unknown_prompts():
    from rewards.base import build_reward
    import rewards.shapes_video  # noqa: F401  (registers "shapes_video_verifier")

    metas = [_meta("a yellow triangle moving down"), _meta("two red squares moving left")]
    clips = np.stack([render_clip(clip_for_prompt(m, i)) for i, m in enumerate(metas)])
    videos = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255  # [B, 3, T, H, W]
    prompts = [m["prompt"] for m in metas]
    reward = build_reward("shapes_video_verifier")
    out = reward(videos, prompts)
    assert out.scores.tolist() == [1.0, 1.0] and out.extras["reasons"] == ["", ""]
    reversed_videos = videos.flip(2)
    strict = build_reward({"name": "shapes_video_verifier", "mode": "direction"})(reversed_videos, prompts)
    assert strict.scores.tolist() == [0.0, 0.0]
    unknown = reward(videos, ["a photo of a dog", prompts[1]])
    assert math.isnan(unknown.scores[0]) and unknown.scores[1] == 1.0 and unknown.nan_count == 1
    upscaled = torch.nn.functional.interpolate(videos.flatten(1, 2), size=(96, 96), mode="bilinear")
    assert reward(upscaled.reshape(2, 3, NUM_FRAMES, 96, 96).clamp(0, 1), prompts).scores.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="videos"):
        reward(videos[:, :, 0], prompts)


def test_shipped_prompt_files_match_the_splits():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "eval" / "shapes_video"
    for split in ("train", "test"):
        lines = (folder / f"prompts_{split}.txt").read_text().splitlines()
        assert lines == [m["prompt"] for m in video_prompts(split)]


def test_quality_monitor_scores_clips_as_the_mean_of_their_frames():
    """shapes_quality (the trainers' unoptimised monitor) on videos: the mean of its per-frame
    image scores, so a clip with a corrupted frame scores lower than the clean clip."""
    from rewards import build_reward

    quality = build_reward("shapes_quality")
    meta = video_prompts("test")[0]
    frames = render_clip(clip_for_prompt(meta, rng=0))  # (T, H, W, 3) uint8
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2).float()[None] / 255  # [1, 3, T, H, W]
    noisy = clip.clone()
    noisy[:, :, 3] = torch.rand(noisy[:, :, 3].shape, generator=torch.Generator().manual_seed(0))
    out = quality(torch.cat([clip, noisy]), None)
    per_frame = quality(noisy[0].transpose(0, 1), None).scores  # the noisy clip's frames as images
    assert out.scores[0] == pytest.approx(1.0, abs=0.02)
    assert out.scores[1] == pytest.approx(float(per_frame.mean()), abs=1e-6)
    assert out.scores[1] < out.scores[0] - 0.05
    assert out.extras["mean_residual"].shape == (2,)


def _clips(metas: list[dict], seed: int = 0) -> torch.Tensor:
    clips = np.stack([render_clip(clip_for_prompt(m, seed + i)) for i, m in enumerate(metas)])
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255  # [B, 3, T, H, W]


def test_motion_reward_scores_true_captions_high_and_reversed_ones_low():
    """The differentiable surrogate agrees with the verifier on ground-truth clips of every category:
    the true caption scores near 1 and above the same caption with every direction reversed."""
    from eval.shapes_video.world import OPPOSITE
    from rewards.base import build_reward

    metas = video_prompts("test")[::9] + video_prompts("train")[::37]
    assert {m["tag"] for m in metas} == set(VIDEO_TAGS)
    videos = _clips(metas)
    reward = build_reward("shapes_video_motion")
    true = reward(videos, [m["prompt"] for m in metas])
    reversed_metas = [{**m, "objects": [{**o, "direction": OPPOSITE[o["direction"]]} for o in m["objects"]]}
                      for m in metas]
    wrong = reward(videos, None, metadata=reversed_metas)
    assert true.scores.min() > 0.9 and wrong.scores.max() < 0.7
    assert (true.scores > wrong.scores).all()
    speed = [m for m in metas if m["tag"] == "speed"][0]
    other = {**speed, "objects": [{**speed["objects"][0], "speed": "fast" if speed["objects"][0]["speed"] == "slow"
                                   else "slow"}]}
    pair = reward(_clips([speed, speed]), None, metadata=[speed, other]).scores
    assert pair[0] > pair[1] + 0.2  # the speed class is read too
    unknown = reward(videos[:2], ["a photo of a dog", metas[1]["prompt"]])
    assert math.isnan(unknown.scores[0]) and unknown.extras["missing_metadata"] == 1


def test_motion_reward_gradient_is_exact_and_climbing_it_moves_the_object_the_stated_way():
    from rewards.base import build_reward
    from rewards.shapes_video import colour_masses, mass_centroids, motion_scores, weighted_slope

    meta = _meta("a red circle moving right")
    small = (_clips([meta])[:, :, :3, 20:30, 20:30].double() * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: motion_scores(v, [meta])[0], (small,), eps=1e-6, atol=1e-7)

    # a static, blurred red circle (every frame the first one, soft-edged like a decoded x0 estimate;
    # the soft masks of crisp edges are saturated); asked to move right, pixel-space gradient ascent
    # shifts its centroid rightwards over the clip
    still = _clips([meta])[0, :, :1].repeat(1, NUM_FRAMES, 1, 1)  # [3, T, H, W]
    still = torch.nn.functional.avg_pool2d(still.transpose(0, 1), 5, 1, 2, count_include_pad=False).transpose(0, 1)
    motion = build_reward("shapes_video_motion")
    video = still[None].requires_grad_(True)
    before = float(motion(video, [meta["prompt"]]).scores.detach())
    for _ in range(30):
        (grad,) = torch.autograd.grad(motion(video, [meta["prompt"]]).scores.sum(), video)
        video = (video + 300.0 * grad).clamp(0, 1).detach().requires_grad_(True)
    after = float(motion(video, [meta["prompt"]]).scores.detach())
    mass, centres, weights = mass_centroids(colour_masses(video.detach())[:, 0], min_mass=20.0)
    assert after > before + 0.1
    assert float(weighted_slope(centres, weights)[0, 0]) > 0.5  # px per frame, rightwards
