"""DiffusionNFT: properties of the loss derived from its definition, and the trainer end to end."""

from __future__ import annotations

import math

import pytest
import torch

from align.advantages import group_advantages
from align.losses import crd_target, nft_loss


def _points(b=4, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = (eps - x0) + 0.3 * torch.randn(b, *shape, generator=g)  # an imperfect old policy
    return x0, eps, t, x_t, v_old


def _grad(v_theta, v_old, x_t, x0, t, r, beta):
    v = v_theta.clone().requires_grad_(True)
    loss, _ = nft_loss(v, v_old, x_t, x0, t, r, beta=beta)
    (grad,) = torch.autograd.grad(loss, v)
    return grad


def test_gradient_at_old_is_advantage_weighted_flow_matching_whatever_beta():
    x0, eps, t, x_t, v_old = _points()
    r = torch.tensor([0.0, 0.25, 0.75, 1.0])
    D = x0[0].numel()
    error = x_t - t.view(-1, 1, 1, 1) * v_old - x0  # x0-prediction error of the old policy = t (v* - v_old)
    w = error.abs().mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    expected = (2 * r - 1).view(-1, 1, 1, 1) * 5.0 * 2 * t.view(-1, 1, 1, 1) ** 2 * (v_old - (eps - x0)) / (w * D) / 4
    for beta in (0.1, 1.0, 3.0):
        torch.testing.assert_close(_grad(v_old, v_old, x_t, x0, t, r, beta), expected, rtol=1e-5, atol=1e-7)


def test_half_optimal_samples_give_no_gradient_at_old():
    """r = 1/2 (an average sample): no pull toward the model's own samples, the cause of self-training drift."""
    x0, _, t, x_t, v_old = _points(seed=1)
    grad = _grad(v_old, v_old, x_t, x0, t, torch.full((4,), 0.5), beta=1.0)
    assert grad.abs().max() < 1e-7


def test_descent_on_positive_moves_toward_target_and_negative_away():
    x0, eps, t, x_t, v_old = _points(seed=2)
    target = eps - x0
    for r, sign in ((torch.ones(4), -1), (torch.zeros(4), 1)):
        step = -_grad(v_old, v_old, x_t, x0, t, r, beta=1.0)  # gradient-descent direction
        moved = v_old + 1e-2 * step / step.abs().max()
        before = (v_old - target).square().sum(dim=(1, 2, 3))
        after = (moved - target).square().sum(dim=(1, 2, 3))
        assert bool(((after - before) * sign > 0).all())


def test_reward_shift_and_scale_of_a_group_change_nothing():
    rewards = torch.tensor([0.1, 0.7, 0.4, 0.9, 0.2, 0.2, 0.8, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    r0 = crd_target(group_advantages(rewards, groups, std="group", eps=0)[0])
    r1 = crd_target(group_advantages(rewards * 3 + 7, groups, std="group", eps=0)[0])
    torch.testing.assert_close(r0, r1)
    x0, _, t, x_t, v_old = _points(b=8, seed=3)
    v = v_old + 0.1
    torch.testing.assert_close(nft_loss(v, v_old, x_t, x0, t, r0)[0], nft_loss(v, v_old, x_t, x0, t, r1)[0])


def test_r_one_with_beta_one_is_weighted_x0_flow_matching():
    x0, eps, t, x_t, v_old = _points(seed=4)
    v = (eps - x0) + 0.05 * torch.randn_like(x0)
    loss, metrics = nft_loss(v, v_old, x_t, x0, t, torch.ones(4), beta=1.0, scale=1.0)
    e = x_t - t.view(-1, 1, 1, 1) * v - x0
    expected = (e.square().mean(dim=(1, 2, 3)) / e.abs().mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)
    assert math.isclose(float(metrics["nft_loss"]), float(expected), rel_tol=1e-6)


def test_bad_input_is_named():
    x0, _, t, x_t, v_old = _points()
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v_old, v_old, x_t, x0, t, torch.ones(4), beta=0)
    with pytest.raises(ValueError, match="t and r"):
        nft_loss(v_old, v_old, x_t, x0, t[:2], torch.ones(4))
    with pytest.raises(ValueError, match="shapes"):
        nft_loss(v_old[:, :1], v_old, x_t, x0, t, torch.ones(4))


def test_nft_trains_every_lora_weight_and_resumes_exactly(tmp_path):
    from align.config import load_config
    from align.nft import NFTConfig, train

    def config(out, epochs, resume=False):
        return load_config(NFTConfig, "configs/shapes/nft.yaml", [
            "model=toy:test", "reward=shapes_saturation", f"num_epochs={epochs}", "group_size=4", "groups_per_epoch=2", "sampler.batch_size=8",
            "sampler.num_steps=4", "sampler.eval_num_steps=2", "prompts.eval_per_tag=1", "eval_every=0",
            "checkpoint_every=1", "keep_checkpoints=0", "monitor_rewards=[]", "lora.rank=4", "lora.alpha=8",
            "micro_batch_size=4", "optimizer.lr=3e-4", "quiet=true", f"output_dir={out}",
            f"resume={str(resume).lower()}"])

    from safetensors.torch import load_file

    train(config(tmp_path / "a", 2))
    train(config(tmp_path / "b", 1))
    train(config(tmp_path / "b", 2, resume=True))
    first = load_file(str(tmp_path / "a" / "checkpoints" / "epoch_000000" / "weights.safetensors"))
    a = load_file(str(tmp_path / "a" / "checkpoints" / "epoch_000001" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "epoch_000001" / "weights.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)  # resume replays the epoch exactly
    still = {n for n in a if torch.equal(first[n], a[n])}
    # every LoRA weight moved but the context queries of the last (context_pre_only) block, whose output
    # SD3 discards: their LoRA B gets an exactly zero gradient, and so does A while B stays 0 (A then
    # moves only by weight decay, below float32 resolution)
    query = "transformer_blocks.0.attn.add_q_proj.lora_{}.default.weight"
    assert query.format("B") in still and still <= {query.format("A"), query.format("B")}
