"""Tests for align/losses.py: the property tests of ALGORITHMS.md sections 1, 3 and 4."""

import math

import pytest
import torch
import torch.nn.functional as F

from align.losses import (
    clipped_policy_loss,
    crd_implicit_reward,
    crd_kl,
    crd_loss,
    crd_target,
    flow_grpo_kl,
    flow_matching_loss,
    gdro_implicit_reward,
    gdro_loss,
)
from samplers.steps import kl_between_means

torch.set_num_threads(1)

SHAPES = {"image": (4, 2, 3, 3), "video": (4, 2, 2, 3, 3)}  # (B, C, H, W) and (B, C, T, H, W)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- clipped loss


def test_clipped_loss_at_ratio_one_is_minus_mean_advantage():
    log_prob = _randn(8).requires_grad_()
    advantages = _randn(8, seed=1)
    loss, metrics = clipped_policy_loss(log_prob, log_prob.detach().clone(), advantages, 1e-4)
    torch.testing.assert_close(loss, -advantages.mean())
    assert metrics["approx_kl"] == 0 and metrics["clip_fraction"] == 0
    assert metrics["ratio_min"] == metrics["ratio_max"] == 1
    assert all(not v.requires_grad for v in metrics.values())
    loss.backward()  # d/dlp of -A ratio at ratio 1 is -A / B
    torch.testing.assert_close(log_prob.grad, -advantages / 8)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clipped_loss_gradient(sign):
    eps = 0.1
    old = torch.zeros(2)
    advantages = torch.full((2,), sign)
    # Beyond the clip range in the direction the advantage pushes: no gradient.
    outside = torch.full((2,), sign * 0.3, requires_grad=True)  # ratio e^{+-0.3} outside [0.9, 1.1]
    clipped_policy_loss(outside, old, advantages, eps)[0].backward()
    assert (outside.grad == 0).all()
    # Beyond it in the other direction: the unclipped term is the max, the gradient pulls back.
    wrong_way = torch.full((2,), -sign * 0.3, requires_grad=True)
    clipped_policy_loss(wrong_way, old, advantages, eps)[0].backward()
    torch.testing.assert_close(wrong_way.grad, -advantages * torch.exp(wrong_way.detach()) / 2)


def test_clip_fraction_and_approx_kl_hand_example():
    log_ratio = torch.tensor([0.0, 0.05, -0.2, 0.3])  # |ratio - 1| > 0.1 for the last two
    loss, metrics = clipped_policy_loss(log_ratio, torch.zeros(4), torch.ones(4), 0.1)
    assert metrics["clip_fraction"].item() == 0.5
    torch.testing.assert_close(metrics["approx_kl"], 0.5 * log_ratio.square().mean())
    torch.testing.assert_close(metrics["ratio_max"], torch.tensor(math.exp(0.3)))
    ratio = log_ratio.exp()
    expected = torch.maximum(-ratio, -ratio.clamp(0.9, 1.1)).mean()
    torch.testing.assert_close(loss, expected)


def test_clipped_loss_rejects_broadcasting_shapes():
    with pytest.raises(ValueError):
        clipped_policy_loss(torch.zeros(4), torch.zeros(4, 1), torch.zeros(4), 0.1)


@pytest.mark.parametrize("kind", SHAPES)
def test_flow_grpo_kl_reuses_samplers(kind):
    mean, ref = _randn(*SHAPES[kind]), _randn(*SHAPES[kind], seed=1)
    std = torch.tensor([0.5, 1.0, 0.0, 2.0])
    kl = flow_grpo_kl(mean, ref, std)
    assert kl.shape == (4,) and kl[2] == 0
    torch.testing.assert_close(kl, kl_between_means(mean, ref, std))
    expected = (mean - ref).square().mean(dim=tuple(range(1, mean.ndim))) / (2 * 0.5**2)
    torch.testing.assert_close(kl[0], expected[0])


# ----------------------------------------------------------------------------- GDRO


@pytest.mark.parametrize("tau", [0.0, 1e-6])
def test_gdro_k2_hard_targets_is_diffusion_dpo(tau):
    s = _randn(5, 2).requires_grad_()
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.2], [-1.0, 2.0], [5.0, 4.0]])
    winner = r.argmax(1, keepdim=True)
    s_w, s_l = s.gather(1, winner).squeeze(1), s.gather(1, 1 - winner).squeeze(1)
    loss, _ = gdro_loss(s, r, tau)
    torch.testing.assert_close(loss, -F.logsigmoid(s_w - s_l).mean())


@pytest.mark.parametrize("k", [2, 4, 6])
def test_gdro_theta_equals_ref_gives_log_k_factorial(k):
    s = torch.zeros(3, k)  # theta = ref: every implicit reward is 0
    r = _randn(3, k)
    expected = sum(math.log(k - i + 1) for i in range(1, k))  # = log k!
    for tau in (0.0, 0.05, 10.0):
        torch.testing.assert_close(gdro_loss(s, r, tau)[0], torch.tensor(expected))
    # Same with real velocities: v_theta = v_ref gives s = 0 exactly.
    v, v_theta = _randn(3 * k, 2, 2, 2), _randn(3 * k, 2, 2, 2, seed=1)
    s = gdro_implicit_reward(v, v_theta, v_theta.clone(), beta=12.0).reshape(3, k)
    torch.testing.assert_close(gdro_loss(s, r, 0.05)[0], torch.tensor(expected))


def test_gdro_invariant_to_a_constant_shift():
    s, r = _randn(4, 6), _randn(4, 6, seed=1)
    for tau in (0.0, 0.05, 1.0):
        base = gdro_loss(s, r, tau)[0]
        torch.testing.assert_close(gdro_loss(s + 3.7, r, tau)[0], base)
        # Per-group constants too: each group's loss is shift invariant.
        torch.testing.assert_close(gdro_loss(s + _randn(4, 1, seed=2), r, tau)[0], base)


def test_gdro_matches_the_formula_and_large_tau_is_uniform():
    s, r = _randn(1, 4), torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    tau = 0.2
    order = r[0].argsort(descending=True)
    s_sorted, r_sorted = s[0, order], r[0, order]
    expected = 0.0
    for i in range(3):
        q = torch.softmax(r_sorted[i:] / tau, 0)
        expected += torch.logsumexp(s_sorted[i:], 0) - (q * s_sorted[i:]).sum()
    torch.testing.assert_close(gdro_loss(s, r, tau)[0], expected)
    # tau -> inf: q_i uniform over the remaining samples.
    uniform = sum(torch.logsumexp(s_sorted[i:], 0) - s_sorted[i:].mean() for i in range(3))
    torch.testing.assert_close(gdro_loss(s, r, 1e6)[0], uniform)
    assert not torch.allclose(gdro_loss(s, r, 1e-3)[0], uniform)


def test_gdro_ties_are_order_independent():
    s = _randn(2, 5)
    r = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0, 1.0]])  # GenEval-like ties
    for tau in (0.0, 0.05, 1.0):
        loss = gdro_loss(s, r, tau)[0]
        for perm in ([3, 1, 2, 0, 4], [4, 3, 2, 1, 0]):
            torch.testing.assert_close(gdro_loss(s[:, perm], r[:, perm], tau)[0], loss)
        swapped_ties = s[:, [1, 3, 2, 0, 4]]  # permute s among tied samples only (row 0's tie)
        torch.testing.assert_close(gdro_loss(torch.stack([swapped_ties[0], s[1]]), r, tau)[0], loss)
    torch.testing.assert_close(gdro_loss(s, r, 0.0)[0], gdro_loss(s, r, 1e-6)[0])  # the tau -> 0+ limit
    expected = math.log(math.factorial(5))  # theta = ref still gives log k!
    torch.testing.assert_close(gdro_loss(torch.zeros(2, 5), r, 0.05)[0], torch.tensor(expected))
    # k = 2 tie (Efron): [lse(s1, s2) - mean s] + [log((e^s1 + e^s2) / 2) - mean s].
    s2 = s[:1, :2]
    expected = 2 * torch.logsumexp(s2[0], 0) - math.log(2) - 2 * s2.mean()
    torch.testing.assert_close(gdro_loss(s2, torch.ones(1, 2), 0.0)[0], expected)


def test_gdro_gradient_and_metrics():
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    r = torch.tensor([[0.0, 1.0, 2.0]])  # the ranking agrees with r
    loss, metrics = gdro_loss(s, r, 0.0)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 2] < 0  # push the best one up
    assert metrics["top1_accuracy"] == 1 and metrics["pairwise_accuracy"] == 1
    assert gdro_loss(-s.detach(), r, 0.0)[1]["pairwise_accuracy"] == 0


@pytest.mark.parametrize("kind", SHAPES)
def test_gdro_implicit_reward(kind):
    v, v_theta, v_ref = (_randn(*SHAPES[kind], seed=i) for i in range(3))
    v_theta.requires_grad_()
    s = gdro_implicit_reward(v, v_theta, v_ref, beta=6.0)
    dims = tuple(range(1, v.ndim))
    expected = -6.0 * ((v - v_theta).square().mean(dims) - (v - v_ref).square().mean(dims))
    assert s.shape == (4,)
    torch.testing.assert_close(s, expected)
    s.sum().backward()
    assert v_theta.grad is not None


@pytest.mark.parametrize("kind", SHAPES)
def test_flow_matching_loss(kind):
    v_pred, x0, noise = (_randn(*SHAPES[kind], seed=i) for i in range(3))
    torch.testing.assert_close(flow_matching_loss(v_pred, x0, noise), F.mse_loss(v_pred, noise - x0))
    assert flow_matching_loss(noise - x0, x0, noise) == 0


# ----------------------------------------------------------------------------- CRD

GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def test_crd_invariant_to_per_group_constants():
    R, r = _randn(8), torch.rand(8, generator=torch.Generator().manual_seed(1))
    base = crd_loss(R, r, GROUP_IDS)[0]
    torch.testing.assert_close(crd_loss(R + 2.5, r, GROUP_IDS)[0], base)
    per_group = torch.tensor([1.0, -3.0, 7.0])[GROUP_IDS]  # a different constant per prompt
    torch.testing.assert_close(crd_loss(R + per_group, r, GROUP_IDS)[0], base)
    # The same holds for the targets (per-prompt reward offsets do not matter).
    torch.testing.assert_close(crd_loss(R, r + 0.1 * per_group, GROUP_IDS)[0], base)
    # Centring over the whole batch (one group) is NOT invariant to per-group constants:
    # that is why CRD centres within each prompt group.
    batch = torch.zeros(8, dtype=torch.long)
    whole = crd_loss(R, r, batch)[0]
    assert not torch.allclose(crd_loss(R + per_group, r, batch)[0], whole)
    # Group ids may be prompts.
    prompts = [f"p{i}" for i in GROUP_IDS.tolist()]
    torch.testing.assert_close(crd_loss(R, r, prompts)[0], base)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_crd_zero_at_the_optimum_and_hand_value(beta):
    r = torch.tensor([0.2, 0.5, 0.8, 0.1, 0.9, 0.5, 0.3, 0.4])
    r_centred = r - torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.35, 0.35])
    R = r_centred / beta + torch.tensor([4.0, -2.0, 1.0])[GROUP_IDS]  # beta (R - R_bar) = r~ - r_bar
    assert crd_loss(R, r, GROUP_IDS, beta_crd=beta)[0].item() == pytest.approx(0, abs=1e-12)
    # Off the optimum: mean((beta (R - R_bar) - (r~ - r_bar))^2) * 5 / beta.
    R = torch.zeros(8)
    loss, metrics = crd_loss(R, r, GROUP_IDS, beta_crd=beta)
    torch.testing.assert_close(loss, r_centred.square().mean() * 5 / beta)
    assert metrics["implicit_reward_centred_std"] == 0


def test_crd_gradient_stops_at_the_group_mean():
    R = _randn(8).requires_grad_()
    r = torch.full((8,), 0.5)
    crd_loss(R, r, GROUP_IDS)[0].backward()
    values = R.detach()
    R_centred = values - torch.stack([values[:3].mean(), values[3:6].mean(), values[6:].mean()])[GROUP_IDS]
    torch.testing.assert_close(R.grad, 2 * R_centred * 5 / 8)  # no gradient through R_bar


@pytest.mark.parametrize("kind", SHAPES)
def test_crd_implicit_reward(kind):
    v_theta, v_old, v_star = (_randn(*SHAPES[kind], seed=i) for i in range(3))
    v_theta.requires_grad_()
    R = crd_implicit_reward(v_theta, v_old, v_star)
    dims = tuple(range(1, v_star.ndim))
    w_theta = (v_theta.detach() - v_star).abs().mean(dims, keepdim=True)
    w_old = (v_old - v_star).abs().mean(dims, keepdim=True)
    expected = -((v_theta - v_star).square() / w_theta - (v_old - v_star).square() / w_old).mean(dims)
    assert R.shape == (4,)
    torch.testing.assert_close(R, expected)
    assert crd_implicit_reward(v_old, v_old, v_star).abs().max() == 0  # theta = old: R = 0
    # Weights are constants: dR/dv_theta = -2 (v_theta - v*) / (w_theta n).
    R.sum().backward()
    n = v_star[0].numel()
    torch.testing.assert_close(v_theta.grad, -2 * (v_theta.detach() - v_star) / (w_theta * n))
    # The floor keeps an exact prediction finite.
    assert torch.isfinite(crd_implicit_reward(v_star, v_old, v_star)).all()


def test_crd_target_range():
    advantages = torch.tensor([-100.0, -5.0, -1.0, 0.0, 2.5, 5.0, 100.0])
    target = crd_target(advantages)
    torch.testing.assert_close(target, torch.tensor([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0]))
    assert 0 <= target.min() and target.max() <= 1


@pytest.mark.parametrize("kind", SHAPES)
def test_crd_kl(kind):
    v_theta, v_ref = _randn(*SHAPES[kind]), _randn(*SHAPES[kind], seed=1)
    targets = torch.tensor([0.0, 0.3, 0.7, 1.0])
    beta_kl = 0.1
    loss, coef = crd_kl(v_theta, v_ref, targets, beta_kl=beta_kl)
    # The effective coefficient beta_kl (m + r~ (1 - m)) spans [1e-4, beta_kl] for r~ in [0, 1].
    torch.testing.assert_close(coef[[0, 3]], torch.tensor([1e-4, beta_kl]))
    assert (coef >= 1e-4 - 1e-12).all() and (coef <= beta_kl + 1e-12).all()
    assert (coef.diff() > 0).all()
    distance = (v_theta - v_ref).square().mean(dim=tuple(range(1, v_theta.ndim)))
    m = 1e-4 / beta_kl
    torch.testing.assert_close(loss, beta_kl * ((m + targets * (1 - m)) * distance).mean())
    zero, zero_coef = crd_kl(v_theta, v_ref, targets, beta_kl=0.0)
    assert zero == 0 and (zero_coef == 0).all()


@pytest.mark.parametrize("kind", SHAPES)
def test_crd_end_to_end_shapes(kind):
    v_theta, v_old, v_star, v_ref = (_randn(*SHAPES[kind], seed=i) for i in range(4))
    v_theta.requires_grad_()
    targets = crd_target(torch.tensor([1.0, -1.0, 0.5, 3.0]))
    R = crd_implicit_reward(v_theta, v_old, v_star)
    loss = crd_loss(R, targets, torch.tensor([0, 0, 1, 1]))[0] + crd_kl(v_theta, v_ref, targets)[0]
    loss.backward()
    assert loss.ndim == 0 and v_theta.grad.shape == v_theta.shape and torch.isfinite(v_theta.grad).all()
