"""Euphonium (Zhong et al. 2026): process-reward-gradient guided SDE, dual-reward GRPO, and the
distillation that lets the final model sample without the process reward model (ALGORITHMS.md
section 5). Pure functions; the guided step itself is ``samplers.steps.guided_sde_step`` (the
rollout calls it with ``grad_fn``), the process reward model is ``rewards.process_reward``.

The guided SDE adds (eps_t / beta) grad_x r_p dt to the DanceGRPO SDE. Discretised with
D = sigma_i - sigma_{i+1} > 0: mu_g = mu + lambda D grad_x r_p(x, sigma_i, c), lambda =
eta^2 / (2 beta), next = mu_g + eta sqrt(D) z, guidance only in a late window of steps.

Not here yet: the training loop (rollouts with a guided window, the process reward model at each
window step, the two clipped losses per step, the distillation term) — see issue 7.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .advantages import GroupIds, group_advantages
from .losses import clipped_policy_loss

__all__ = ["guidance_lambda", "window_mask", "dual_advantages", "dual_clipped_loss", "distillation_target",
           "distillation_kl"]


def guidance_lambda(eta: float, beta: float) -> float:
    """lambda = eta^2 / (2 beta): the guided SDE's drift scale (0.01 at eta 0.25, beta 3.125)."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 (beta -> inf is no guidance), got {beta}")
    return eta**2 / (2 * beta)


def window_mask(num_steps: int, window: tuple[int, int]) -> Tensor:
    """[S] bool, True for the guided steps start <= i < end (the paper: 12-15 of 16)."""
    start, end = window
    if not 0 <= start < end <= num_steps:
        raise ValueError(f"guidance window {window} must satisfy 0 <= start < end <= {num_steps}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[start:end] = True
    return mask


def dual_advantages(process_rewards: Tensor, outcome_rewards: Tensor, group_ids: GroupIds, window: Tensor,
                    std: str = "group", clip: float | None = 5.0) -> tuple[Tensor, Tensor]:
    """Dual-reward GRPO advantages (Euphonium sec. 3.3).

    process_rewards: [N, S] r_p(x_k^i, sigma_k, c) at every step's input state (any value outside
    the window is ignored); outcome_rewards: [N]; group_ids: [N] (samples of one prompt and one
    initial noise); window: [S] bool.
    Returns (process [N, S]: per step k, (r_p - mean_group^k) / std_group^k inside the window and
    exactly 0 outside; outcome [N]: (r_o - mean_group) / std_group), each clipped to +-clip. The
    paper sums the two in its A_{k,i}; the losses keep them apart (:func:`dual_clipped_loss`).
    """
    if process_rewards.ndim != 2 or process_rewards.shape[1] != window.numel():
        raise ValueError(f"process_rewards must be [N, {window.numel()}], got {tuple(process_rewards.shape)}")
    outcome, _ = group_advantages(outcome_rewards, group_ids, std=std, clip=clip)
    process = torch.zeros_like(process_rewards, dtype=torch.float32)
    for k in torch.nonzero(window).flatten().tolist():
        process[:, k], _ = group_advantages(process_rewards[:, k].float(), group_ids, std=std, clip=clip)
    return process, outcome


def dual_clipped_loss(log_prob: Tensor, old_log_prob: Tensor, outcome_advantages: Tensor,
                      process_advantages: Tensor, clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The two clipped surrogates of one step, summed: L = L_clip(A_outcome) + L_clip(A_process).

    All arguments [B] for one step k (process_advantages = the [N, S] tensor's column k, zero
    outside the window, where the process term vanishes). Metrics of the outcome term, plus
    "process_loss".
    """
    outcome, metrics = clipped_policy_loss(log_prob, old_log_prob, outcome_advantages, clip_range)
    process, _ = clipped_policy_loss(log_prob, old_log_prob, process_advantages, clip_range)
    return outcome + process, {**metrics, "process_loss": process.detach()}


def _per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *[1] * (like.ndim - 1)) if value.ndim else value


def distillation_target(v: Tensor, grad: Tensor, sigma: Tensor | float, lam: float, eta: float) -> Tensor:
    """The velocity whose unguided DanceGRPO mean equals the guided mean mu_g:
    v' = v - lambda grad / (1 + eta^2 (1 - sigma) / (2 sigma)).

    Regressing v_theta onto v' (no gradient through it) internalises the guidance, so the
    distilled model samples without the process reward model. sigma: scalar or [B], > 0.
    """
    s = _per_sample(sigma, v)
    return (v - lam * grad / (1 + eta**2 * (1 - s) / (2 * s))).detach()


def distillation_kl(mean_theta: Tensor, guided_mean: Tensor, eta: float, step: Tensor | float) -> Tensor:
    """KL(N(mu_g, eta^2 D) || N(mu_theta, eta^2 D)) = ||mu_g - mu_theta||^2 / (2 eta^2 D), averaged over
    the latent dimensions (as the log-probs are) -> [B]. step: D = sigma_i - sigma_{i+1} (scalar or [B])."""
    d = _per_sample(step, mean_theta)
    return ((guided_mean.detach() - mean_theta).square() / (2 * eta**2 * d)).flatten(1).mean(1)
