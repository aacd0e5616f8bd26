"""The latent process reward model: shapes, gradients, video motion, atomic save/load; it learns
a spatial reward it predicts (and climbs) on held-out latents; it trains from a real rollout store
and is evaluated on real ODE trajectories."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.config import load_config
from align.rollout_store import RolloutConfig, RolloutStore, build_store
from rewards.process_reward import (LatentPRM, average_ranks, evaluate_prm, fit_prm, load_prm, prompt_vectors,
                                    save_prm, spearman, train_prm)

YAML = Path(__file__).resolve().parents[1] / "configs" / "shapes" / "rollout.yaml"


def _store(out: Path, groups: int, seed: int) -> Path:
    cfg = load_config(RolloutConfig, YAML, ["model=toy:test", "rewards=[shapes_saturation]", "group_size=4",
                                            "num_steps=2", "batch_size=32", "device=cpu", "quiet=true",
                                            f"num_groups={groups}", "groups_per_shard=16", f"seed={seed}",
                                            f"output_dir={out}"])
    build_store(cfg)
    return out


def test_spearman_with_ties_matches_a_hand_computed_case():
    # a = [1, 2, 2, 3] ranks [1, 2.5, 2.5, 4]; b ranks [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5] and
    # [-1.5, .5, -.5, 1.5]; r = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert average_ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert average_ranks([3, 1, 3, 3]).tolist() == [3, 1, 3, 3]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotone, not linear
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 2], [1, float("nan")]))


def test_shapes_gradients_and_video_motion():
    torch.manual_seed(0)
    prm = LatentPRM(latent_channels=4, text_dim=8, hidden=16)
    text = torch.randn(3, 8)
    images = torch.randn(3, 4, 8, 8)
    r, grad = prm.reward_and_grad(images, torch.tensor([0.1, 0.5, 0.9]), text)
    assert r.shape == (3,) and grad.shape == images.shape and grad.abs().sum() > 0
    assert torch.allclose(r, prm(images, torch.tensor([0.1, 0.5, 0.9]), text))
    video = torch.randn(2, 4, 5, 8, 8)
    out = prm(video, 0.3, text[:2])
    assert out.shape == (2,)
    # the head sees last-minus-first frame features: playing a clip backwards changes its score
    assert not torch.allclose(out, prm(video.flip(2), 0.3, text[:2]))
    with pytest.raises(ValueError, match="latents must be"):
        prm(torch.randn(3, 4, 8), 0.5, text)


def test_save_load_round_trip_and_missing_folder(tmp_path):
    prm = LatentPRM(latent_channels=4, text_dim=8, hidden=16)
    save_prm(tmp_path / "prm", prm, {"note": "x"})
    save_prm(tmp_path / "prm", prm, {"note": "y"})  # replacing an existing folder
    loaded = load_prm(tmp_path / "prm")
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 8)
    torch.testing.assert_close(loaded(x, 0.4, text), prm(x, 0.4, text), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prm"]  # no temporary folder left
    with pytest.raises(FileNotFoundError, match="align train-prm"):
        load_prm(tmp_path / "missing")


def _synthetic(n: int, seed: int):
    """Latents whose reward is a spatial feature (channel 0 brighter on the left than on the
    right, through a tanh), groups of 4 sharing a random prompt vector."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, 8, 8, generator=gen)
    r = torch.tanh(x0[:, 0, :, :4].mean((1, 2)) - x0[:, 0, :, 4:].mean((1, 2)))
    text = torch.randn(n // 4, 6, generator=gen).repeat_interleave(4, 0)
    return x0, r, torch.arange(n) // 4, text


def test_learns_a_spatial_reward_and_predicts_it_on_held_out_latents():
    x0, r, groups, text = _synthetic(512, seed=0)
    hx0, hr, hgroups, htext = _synthetic(256, seed=1)
    untrained = LatentPRM(4, 6, 32)
    prm, log = fit_prm(x0, r, groups, text, steps=300, batch_groups=16, hidden=32, quiet=True)
    assert log[-1]["mse"] < log[0]["mse"]
    with torch.no_grad():
        clean = spearman(prm(hx0, 0.0, htext), hr)
        noisy = spearman(prm(0.05 * hx0 + 0.95 * torch.randn_like(hx0), 0.95, htext), hr)
        before = spearman(untrained(hx0, 0.0, htext), hr)
        within = [spearman(prm(hx0[hgroups == g], 0.0, htext[hgroups == g]), hr[hgroups == g]) for g in range(8)]
    assert clean > 0.8 and abs(before) < 0.3, (clean, before)
    assert sum(within) / len(within) > 0.5  # it orders a group's samples, what guidance needs
    assert noisy < clean  # the reward is mostly unreadable under 95% noise
    # its gradient points uphill: a small step along grad_x r_p raises the true reward
    _, grad = prm.reward_and_grad(hx0, 0.0, htext)
    stepped = hx0 + 0.3 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    uphill = torch.tanh(stepped[:, 0, :, :4].mean((1, 2)) - stepped[:, 0, :, 4:].mean((1, 2)))
    assert (uphill > hr).float().mean() > 0.9


def test_train_prm_on_a_real_rollout_store(tmp_path):
    store = _store(tmp_path / "store", groups=8, seed=0)
    prm, info = train_prm(store, tmp_path / "prm", model="toy:test", steps=20, batch_groups=4, hidden=16, quiet=True)
    assert info["reward"] == "shapes_saturation" and info["samples"] == 32 and len(info["log"]) == 10
    loaded = load_prm(tmp_path / "prm")
    assert loaded.config == prm.config and float(loaded.reward_std) == pytest.approx(float(prm.reward_std))
    groups = list(RolloutStore(store).groups())
    assert float(loaded.reward_mean) == pytest.approx(torch.cat([g.rewards["shapes_saturation"] for g in groups]).mean().item())
    with pytest.raises(ValueError, match="no reward 'pickscore'"):
        train_prm(store, None, model="toy:test", reward="pickscore", steps=1)


def test_evaluation_on_ode_trajectories_runs_end_to_end():
    prm = LatentPRM(latent_channels=4, text_dim=prompt_vectors_dim(), hidden=8)
    rows = evaluate_prm(prm, model="toy:test", reward="shapes_saturation", prompts_per_tag=1, group_size=2,
                        num_steps=2, steps=(0, 2))
    assert [r["step"] for r in rows] == [0, 2] and rows[0]["sigma"] == 1.0 and rows[1]["sigma"] == 0.0
    assert all(math.isfinite(r["pooled"]) for r in rows)


def test_tweedie_reference_is_the_outcome_at_the_end_and_a_one_step_estimate_before():
    """The training-free process reward: the reward of the decoded Tweedie estimate. At the final
    state it is the outcome itself (Spearman 1); before, it scores x_t - sigma v(x_t)."""
    from samplers.generate import encode_prompts
    from align.runtime import load_flow_model
    from rewards.process_reward import tweedie_estimate

    rows = evaluate_prm(None, model="toy:test", reward="shapes_saturation", prompts_per_tag=1, group_size=3,
                        num_steps=2, steps=(1, 2), tweedie=["shapes_saturation"])
    assert [r["step"] for r in rows] == [1, 2] and "pooled" not in rows[0]
    assert rows[1]["shapes_saturation:pooled"] == pytest.approx(1.0)
    assert rows[1]["shapes_saturation:within_group"] == pytest.approx(1.0)
    assert math.isfinite(rows[0]["shapes_saturation:pooled"])

    flow = load_flow_model("toy:test")
    cond = encode_prompts(flow, ["a circle", "a square"], 2.0, "")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.6)
    expected = x - sigma * flow.velocity(x, sigma, cond, guidance=2.0)
    torch.testing.assert_close(tweedie_estimate(flow, x, sigma, cond, 2.0, batch_size=1), expected)


def prompt_vectors_dim() -> int:
    from align.runtime import load_flow_model

    return prompt_vectors(load_flow_model("toy:test"), ["a circle"]).shape[1]


def test_decoded_process_reward_is_the_reward_of_the_decoded_one_step_estimate():
    """r_p(x_t) = R(decode(x_t - sigma v)) with v held fixed: its value is that, and its gradient is
    the directional derivative of that function (finite differences along the gradient)."""
    from samplers.generate import encode_prompts
    from align.runtime import load_flow_model
    from rewards import build_reward
    from rewards.process_reward import DecodedProcessReward

    flow = load_flow_model("toy:test")
    prompts = ["a photo of a red circle", "a photo of a blue square"]
    cond = encode_prompts(flow, prompts, 2.0, "")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.6)
    with torch.no_grad():
        v = flow.velocity(x, sigma, cond, guidance=2.0)
    prm = DecodedProcessReward(flow, "shapes_saturation")
    r, grad = prm.reward_and_grad(x, sigma, v, prompts)
    saturation = build_reward("shapes_saturation")
    with torch.no_grad():
        expected = saturation(flow.decode(x - 0.6 * v), prompts).scores
        torch.testing.assert_close(r, expected)
        h = 1e-2
        unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        up = saturation(flow.decode(x + h * unit - 0.6 * v), prompts).scores
        down = saturation(flow.decode(x - h * unit - 0.6 * v), prompts).scores
    torch.testing.assert_close((up - down) / (2 * h), grad.flatten(1).norm(dim=1), rtol=0.05, atol=1e-5)
    with pytest.raises(ValueError, match="not differentiable"):
        DecodedProcessReward(flow, "shapes_geneval")
