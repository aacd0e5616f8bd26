"""Losses of the alignment algorithms as pure functions (docs ALGORITHMS.md sections 1-4).

Velocities and latents are [B, *latent]: images (B,C,H,W) or videos (B,C,T,H,W); every
per-sample quantity is a mean over dims 1..n (the reference implementations' reduction), so
one function serves both. Math is in fp32 (inputs of lower precision are upcast).
Losses return (loss scalar, metrics) with metrics a dict of detached 0-d tensors.
Quantities that are targets or come from frozen / old networks (old log-probs, advantages,
explicit rewards, v_ref, v_old, v*) are detached inside: gradients flow only to the policy's
outputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.advantages import GroupIds, group_mean
from samplers.steps import kl_between_means

__all__ = [
    "clipped_policy_loss",
    "flow_grpo_kl",
    "gdro_loss",
    "gdro_implicit_reward",
    "crd_loss",
    "crd_implicit_reward",
    "crd_target",
    "crd_kl",
    "flow_matching_loss",
    "nft_loss",
    "velocity_kl",
    "awm_log_prob",
    "AWM_WEIGHTINGS",
]


def _per_sample_mean(values: Tensor) -> Tensor:
    """[B, ...] -> [B] mean over all non-batch dims ([B] is returned as is)."""
    return values.mean(dim=tuple(range(1, values.ndim))) if values.ndim > 1 else values


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:  # [B] against [B, 1] would silently broadcast to [B, B]
        raise ValueError(f"shapes must match, got {shapes}")


def _detached(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().float() for name, value in metrics.items()}


# ----------------------------------------------------------------------------- Flow-GRPO


def clipped_policy_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate as in Flow-GRPO (eq. 5 of Liu et al. 2025).

    log_prob: [B] under the current policy (with grad); old_log_prob: [B] stored at sampling;
    advantages: [B]; clip_range: eps (1e-4 Flow-GRPO, 1e-5 fast, 1e-3 Wan).
    ratio = exp(lp - old); L = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))).
    Metrics: policy_loss, approx_kl = 0.5 mean((lp - old)^2) (as flow_grpo logs), clip_fraction
    = mean(|ratio - 1| > eps), ratio_mean / ratio_min / ratio_max.
    Any equal shapes work (e.g. [B, S] for several steps at once); the mean is over all.
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    log_ratio = log_prob.float() - old_log_prob.detach().float()  # [B]
    ratio = torch.exp(log_ratio)  # [B]
    advantages = advantages.detach().float()  # [B]
    unclipped = -advantages * ratio  # [B]
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [B]
    loss = torch.maximum(unclipped, clipped).mean()  # scalar
    metrics = {
        "policy_loss": loss,
        "approx_kl": 0.5 * log_ratio.square().mean(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
        "ratio_mean": ratio.mean(),
        "ratio_min": ratio.min(),
        "ratio_max": ratio.max(),
    }
    return loss, _detached(metrics)


def flow_grpo_kl(mean: Tensor, ref_mean: Tensor, std: Tensor | float) -> Tensor:
    """Flow-GRPO's KL to the reference policy per sample -> [B].

    mean, ref_mean: [B, *latent] transition means of the policy and of the reference (LoRA
    disabled); std: StepOutput.noise_scale ([B] or float; Flow-GRPO's std_dev_t).
    KL = mean_dims((mean - ref_mean)^2) / (2 std^2) (samplers.steps.kl_between_means); 0 where
    std = 0. The reference mean is detached. Loss term: beta * flow_grpo_kl(...).mean().
    """
    return kl_between_means(mean, ref_mean.detach(), std, reduction="mean")  # [B]


# ----------------------------------------------------------------------------- GDRO


def gdro_loss(
    implicit_rewards: Tensor, explicit_rewards: Tensor, tau: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """GDRO's Plackett-Luce loss with soft targets (Wang et al. 2026; ALGORITHMS.md sec. 3).

    implicit_rewards s: [G, k] (with grad; gdro_implicit_reward), explicit_rewards r: [G, k]
    (finite). With each group sorted by r descending and q_i(j) = softmax_{j >= i}(r_j / tau),
        L = mean_groups sum_{i=1..k-1} [ logsumexp_{m >= i} s_m - sum_{j >= i} q_i(j) s_j ].
    tau = 0: hard targets (the rank-only Plackett-Luce loss; k = 2 is Diffusion-DPO's
    -log sigmoid(s_w - s_l)), implemented by masking the logits, never dividing by tau.

    Ties in r (common with discrete rewards, e.g. GenEval's) use Efron's method, as for the
    Cox partial likelihood (which is this Plackett-Luce likelihood): at the l-th (l = 0..d-1)
    of d tied positions every sample of the tie counts with weight (d - l) / d, its probability
    of being still unplaced under a random order of the tie, in both the normaliser and the soft
    targets (w_ij = 0 if r_j > r_i, (d - l) / d if r_j = r_i, 1 if r_j < r_i; the sum then runs
    to i = k, whose term is 0 without ties). Without ties this is exactly the formula above; with
    ties the loss does not depend on how tied samples are ordered, still equals log k! at s = 0,
    and tau = 0 is still the tau -> 0+ limit (q_i uniform over the tie).
    Metrics: gdro_loss, implicit_reward_mean / _std, top1_accuracy (argmax s is a best-r
    sample), pairwise_accuracy (of pairs with r_a > r_b, the fraction with s_a > s_b).
    """
    _check_same_shape(implicit_rewards=implicit_rewards, explicit_rewards=explicit_rewards)
    if implicit_rewards.ndim != 2:
        raise ValueError(f"expected [G, k] rewards, got shape {tuple(implicit_rewards.shape)}")
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    s = implicit_rewards.float()  # [G, k]
    r = explicit_rewards.detach().float()  # [G, k]
    if not bool(torch.isfinite(r).all()):
        raise ValueError("explicit rewards must be finite (drop groups with failed rewards)")
    k = s.shape[1]

    # Position i of the ranking is held by sample i; w[i, j]: weight of sample j still unplaced.
    tied = r[:, :, None] == r[:, None, :]  # [G, k(i), k(j)]
    before = torch.ones(k, k, dtype=torch.bool, device=s.device).tril(-1)  # [k, k] j < i
    tie_size = tied.sum(-1, keepdim=True).float()  # [G, k, 1] d
    tie_rank = (tied & before).sum(-1, keepdim=True).float()  # [G, k, 1] l
    weights = torch.where(tied, (tie_size - tie_rank) / tie_size, (r[:, None, :] < r[:, :, None]).float())  # [G, k, k]
    log_weights = torch.log(weights)  # [G, k, k] -inf for samples already placed

    log_normaliser = torch.logsumexp(s[:, None, :] + log_weights, dim=-1)  # [G, k]
    if tau > 0:
        logits = r[:, None, :] / tau + log_weights  # [G, k, k]
    else:  # hard targets: the tau -> 0+ limit keeps only the tie of sample i
        logits = log_weights.masked_fill(~tied, -torch.inf)  # [G, k, k]
    targets = torch.softmax(logits, dim=-1)  # [G, k, k] q_i(j), 0 where w = 0
    expected = (targets * s[:, None, :]).sum(-1)  # [G, k] sum_j q_i(j) s_j
    loss = (log_normaliser - expected).sum(1).mean()  # scalar

    with torch.no_grad():
        best = r.max(dim=1).values  # [G]
        top1 = torch.gather(r, 1, s.argmax(dim=1, keepdim=True)).squeeze(1) == best  # [G]
        better = r[:, :, None] > r[:, None, :]  # [G, k, k] pairs a over b
        agree = better & (s[:, :, None] > s[:, None, :])  # [G, k, k]
        metrics = {
            "gdro_loss": loss,
            "implicit_reward_mean": s.mean(),
            "implicit_reward_std": s.std(unbiased=False),
            "top1_accuracy": top1.float().mean(),
            "pairwise_accuracy": agree.sum() / better.sum().clamp_min(1),
        }
    return loss, _detached(metrics)


def gdro_implicit_reward(v_target: Tensor, v_theta: Tensor, v_ref: Tensor, beta: float) -> Tensor:
    """GDRO implicit reward s = -beta (||v - v_theta||^2 - ||v - v_ref||^2) -> [B].

    v_target: [B, *latent] the flow-matching target v = eps - x0; v_theta: [B, *latent] the
    policy's prediction at (x_t, t, c) (with grad); v_ref: the frozen reference's (detached).
    ||.||^2 is the MEAN over non-batch dims (an MSE, as in the paper and Diffusion-DPO), so beta
    does not depend on the latent size (beta 12 OCR / 6 GenEval).
    """
    _check_same_shape(v_target=v_target, v_theta=v_theta, v_ref=v_ref)
    target = v_target.detach().float()  # [B, *latent]
    policy_error = _per_sample_mean((v_theta.float() - target).square())  # [B]
    ref_error = _per_sample_mean((v_ref.detach().float() - target).square())  # [B]
    return -beta * (policy_error - ref_error)  # [B]


def flow_matching_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Rectified-flow MSE to v = noise - x0 -> scalar (mean over all elements and the batch).

    v_pred, x0, noise: [B, *latent]. GDRO's L_reg on each group's top-reward sample.
    """
    _check_same_shape(v_pred=v_pred, x0=x0, noise=noise)
    target = (noise.float() - x0.float()).detach()  # [B, *latent]
    return (v_pred.float() - target).square().mean()  # scalar


# ----------------------------------------------------------------------------- CRD


def crd_implicit_reward(v_theta: Tensor, v_old: Tensor, v_star: Tensor, floor: float = 1e-5) -> Tensor:
    """CRD implicit reward with adaptive weights (Zhu et al. 2026; ALGORITHMS.md sec. 4) -> [B].

    v_theta: [B, *latent] current prediction at x_t (with grad); v_old: the old snapshot's at
    the same x_t; v_star = eps - x0: the target. Weights (no grad, floor 1e-5):
    w_theta = mean_dims|v_theta - v*|, w_old = mean_dims|v_old - v*|;
    R = -mean_dims[(v_theta - v*)^2 / w_theta - (v_old - v*)^2 / w_old].
    """
    _check_same_shape(v_theta=v_theta, v_old=v_old, v_star=v_star)
    target = v_star.detach().float()  # [B, *latent]
    error_theta = v_theta.float() - target  # [B, *latent]
    error_old = v_old.detach().float() - target  # [B, *latent]
    with torch.no_grad():
        w_theta = _per_sample_mean(error_theta.abs()).clamp_min(floor)  # [B]
        w_old = _per_sample_mean(error_old.abs()).clamp_min(floor)  # [B]
    return -(_per_sample_mean(error_theta.square()) / w_theta - _per_sample_mean(error_old.square()) / w_old)  # [B]


def crd_target(advantages: Tensor, clip: float = 5.0) -> Tensor:
    """External target r~ = clip(A, -clip, clip) / (2 clip) + 0.5 in [0, 1] -> [B] (detached).

    With the paper's clip = 5 this is clip(A, -5, 5) / 10 + 0.5.
    """
    return advantages.detach().float().clamp(-clip, clip) / (2 * clip) + 0.5  # [B]


def crd_loss(
    implicit_rewards: Tensor, targets: Tensor, group_ids: GroupIds, beta_crd: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Centred reward distillation loss (Zhu et al. 2026; ALGORITHMS.md sec. 4).

    implicit_rewards R: [B] (crd_implicit_reward, with grad); targets r~: [B] (crd_target);
    group_ids: [B] prompt groups. Centring is WITHIN each prompt group (not over the batch,
    which would mix prompts): R_bar = stopgrad(mean_group R), r_bar = mean_group r~,
        L = mean_i (beta (R_i - R_bar) - (r~_i - r_bar))^2 * (5 / beta).
    Invariant to any per-group constant added to R. Singleton groups contribute 0.
    Metrics: crd_loss, implicit_reward_mean, implicit_reward_centred_std, target_centred_std.
    """
    _check_same_shape(implicit_rewards=implicit_rewards, targets=targets)
    R = implicit_rewards.float()  # [B]
    r = targets.detach().float()  # [B]
    R_centred = R - group_mean(R.detach(), group_ids)  # [B]
    r_centred = r - group_mean(r, group_ids)  # [B]
    loss = (beta_crd * R_centred - r_centred).square().mean() * (5.0 / beta_crd)  # scalar
    metrics = {
        "crd_loss": loss,
        "implicit_reward_mean": R.mean(),
        "implicit_reward_centred_std": R_centred.square().mean().sqrt(),
        "target_centred_std": r_centred.square().mean().sqrt(),
    }
    return loss, _detached(metrics)


def crd_kl(
    v_theta: Tensor, v_ref_cfg: Tensor, targets: Tensor, beta_kl: float = 0.1, floor: float = 1e-4
) -> tuple[Tensor, Tensor]:
    """CRD's reward-adaptive KL anchor to the CFG-guided reference (ALGORITHMS.md sec. 4).

    v_theta: [B, *latent] (with grad); v_ref_cfg: [B, *latent] v_ref(0) + w (v_ref(c) - v_ref(0))
    (detached); targets r~: [B] in [0, 1]. With m = floor / beta_kl and
    D_i = mean_dims (v_theta - v_ref_cfg)^2:
        L_KL = beta_kl * mean_i[(m + r~_i (1 - m)) D_i].
    Returns (loss scalar, coef [B] detached) with coef = beta_kl (m + r~ (1 - m)), the effective
    weight of D_i, which lies in [floor, beta_kl] for r~ in [0, 1]: high-reward samples are
    anchored at full strength, low-reward ones almost free. beta_kl = 0 turns the term off.
    """
    _check_same_shape(v_theta=v_theta, v_ref_cfg=v_ref_cfg)
    if targets.shape != v_theta.shape[:1]:
        raise ValueError(f"targets must be [B] = {tuple(v_theta.shape[:1])}, got {tuple(targets.shape)}")
    if beta_kl == 0:
        zero = (v_theta.float() * 0).sum()  # keeps the graph, zero gradient
        return zero, torch.zeros_like(targets, dtype=torch.float32)
    if not 0 < floor <= beta_kl:
        raise ValueError(f"need 0 < floor <= beta_kl, got floor={floor}, beta_kl={beta_kl}")
    m = floor / beta_kl
    coef = beta_kl * (m + targets.detach().float() * (1 - m))  # [B]
    distance = _per_sample_mean((v_theta.float() - v_ref_cfg.detach().float()).square())  # [B]
    return (coef * distance).mean(), coef.detach()  # scalar, [B]


# ----------------------------------------------------------------------------- DiffusionNFT


def nft_loss(
    v_theta: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, beta: float = 1.0,
    scale: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DiffusionNFT's negative-aware fine-tuning loss (Zheng et al. 2025, arXiv 2509.16117, eq. 8).

    v_theta: [B, *latent] the trained velocity at x_t (with grad); v_old: the old policy's at the
    same x_t; x_t = (1 - t) x0 + t eps: [B, *latent]; x0: the clean samples; t: [B] in (0, 1];
    r: [B] optimality probabilities in [0, 1] (`crd_target` of the group advantages).
    Implicit policies v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta;
    each is scored in x0 space, x0± = x_t - t v±, with its squared error divided by its own detached
    mean absolute error (the reference's adaptive weighting, floor 1e-5):
        L = scale * mean_i [r_i L+_i + (1 - r_i) L-_i] / beta.
    `scale` is the reference's adv_clip_max factor. At v_theta = v_old the gradient w.r.t. v_theta
    is (2 r - 1) * scale * 2 t^2 (v_old - v*) / (w D) per element (D elements, v* = eps - x0): an
    advantage-weighted flow-matching step, zero for r = 1/2 whatever the samples (no drift toward
    the model's own samples), independent of beta.
    Metrics: nft_loss, nft_positive, nft_negative (unweighted per-branch means), old_deviation
    (mean (v_theta - v_old)^2).
    """
    _check_same_shape(v_theta=v_theta, v_old=v_old, x_t=x_t, x0=x0)
    if t.shape != v_theta.shape[:1] or r.shape != v_theta.shape[:1]:
        raise ValueError(f"t and r must be [B] = {tuple(v_theta.shape[:1])}, got {tuple(t.shape)} and {tuple(r.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    v = v_theta.float()  # [B, *latent]
    old = v_old.detach().float()  # [B, *latent]
    target = x0.detach().float()  # [B, *latent]
    tt = t.detach().float().reshape(-1, *[1] * (v.ndim - 1))  # [B, 1, ...]
    xt = x_t.detach().float()

    def branch(velocity: Tensor) -> Tensor:
        error = xt - tt * velocity - target  # [B, *latent] x0-prediction error
        with torch.no_grad():
            weight = _per_sample_mean(error.abs()).clamp_min(1e-5)  # [B]
        return _per_sample_mean(error.square()) / weight  # [B]

    positive = branch(beta * v + (1 - beta) * old)  # [B]
    negative = branch((1 + beta) * old - beta * v)  # [B]
    rr = r.detach().float()  # [B]
    loss = (scale * (rr * positive + (1 - rr) * negative) / beta).mean()  # scalar
    metrics = {"nft_loss": loss, "nft_positive": positive.mean(), "nft_negative": negative.mean(),
               "old_deviation": (v - old).square().mean()}
    return loss, _detached(metrics)


def velocity_kl(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """The v-space KL surrogate to a reference, mean_dims (v_theta - v_ref)^2 -> [B] (DiffusionNFT's and
    AWM's KL term; for two Gaussian steps of equal variance it is proportional to their KL)."""
    _check_same_shape(v_theta=v_theta, v_ref=v_ref)
    return _per_sample_mean((v_theta.float() - v_ref.detach().float()).square())  # [B]


# ----------------------------------------------------------------------------- AWM

AWM_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")


def awm_log_prob(v_theta: Tensor, v_star: Tensor, t: Tensor, weighting: str = "uniform",
                 ghuber_power: float = 0.25) -> Tensor:
    """Advantage Weighted Matching's surrogate log-likelihood of a clean sample (Xue et al. 2025,
    arXiv 2509.25050, sec. 3) -> [B]: the negative flow-matching error e = mean_dims (v_theta - v*)^2
    at a forward-process point, weighted by w(t):
        uniform: -e;  t: -t e;  t2: -t^2 e;  huber: -t (sqrt(e + 1e-10) - 1e-5);
        ghuber: -t ((e + 1e-10)^p - 1e-10^p) / p   (p = ghuber_power, the reference's 0.25).
    v_theta: [B, *latent] (with grad); v* = eps - x0; t: [B] in (0, 1]."""
    _check_same_shape(v_theta=v_theta, v_star=v_star)
    if weighting not in AWM_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")
    error = _per_sample_mean((v_theta.float() - v_star.detach().float()).square())  # [B]
    tt = t.detach().float()  # [B]
    if weighting == "uniform":
        return -error
    if weighting == "t":
        return -tt * error
    if weighting == "t2":
        return -tt.square() * error
    if weighting == "huber":
        return -tt * ((error + 1e-10).sqrt() - 1e-5)
    p = ghuber_power
    return -tt * ((error + 1e-10).pow(p) - 1e-10 ** p) / p
