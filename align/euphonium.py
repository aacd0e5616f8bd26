"""Euphonium (Zhong et al. 2026): process-reward-gradient guided SDE, dual-reward GRPO, and the
distillation that lets the final model sample without the process reward model (ALGORITHMS.md
section 5). Pure functions; the guided step itself is ``samplers.steps.guided_sde_step`` (the
rollout calls it with ``grad_fn``), the process reward model is ``rewards.process_reward``.

The guided SDE adds (eps_t / beta) grad_x r_p dt to the DanceGRPO SDE. Discretised with
D = sigma_i - sigma_{i+1} > 0: mu_g = mu + lambda D grad_x r_p(x, sigma_i, c), lambda =
eta^2 / (2 beta), next = mu_g + eta sqrt(D) z, guidance only in a late window of steps.

Training is Flow-GRPO's loop with ``variant: euphonium`` (align/flow_grpo.py): DanceGRPO rollouts
whose window steps are guided by ``grad_fn`` (:func:`make_grad_fn`, which also records r_p at
each window step's state for the process advantages), the outcome and process clipped losses summed, and
the distillation KL on window steps weighted by ``euphonium.distill_weight``. Caveat: groups whose
outcome rewards tie are dropped as in Flow-GRPO, even if their process advantages differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .advantages import GroupIds, group_advantages
from .config import doc
from .losses import clipped_policy_loss

__all__ = ["guidance_lambda", "window_mask", "process_advantages", "dual_advantages", "dual_clipped_loss", "distillation_target",
           "distillation_kl", "build_process_reward"]


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


def process_advantages(process_rewards: Tensor, group_ids: GroupIds, window: Tensor, std: str = "group",
                       clip: float | None = 5.0) -> Tensor:
    """[N, S] per step k inside the window, (r_p - mean_group^k) / std_group^k (clipped to +-clip);
    exactly 0 outside it. process_rewards: [N, S] r_p(x_k^i, sigma_k, c) at every step's input
    state (values outside the window are ignored); window: [S] bool."""
    if process_rewards.ndim != 2 or process_rewards.shape[1] != window.numel():
        raise ValueError(f"process_rewards must be [N, {window.numel()}], got {tuple(process_rewards.shape)}")
    process = torch.zeros(process_rewards.shape, dtype=torch.float32)
    for k in torch.nonzero(window).flatten().tolist():
        process[:, k], _ = group_advantages(process_rewards[:, k].float().cpu(), group_ids, std=std, clip=clip)
    return process


def dual_advantages(process_rewards: Tensor, outcome_rewards: Tensor, group_ids: GroupIds, window: Tensor,
                    std: str = "group", clip: float | None = 5.0) -> tuple[Tensor, Tensor]:
    """Dual-reward GRPO advantages (Euphonium sec. 3.3): (process [N, S] as
    :func:`process_advantages`, outcome [N] = (r_o - mean_group) / std_group, clipped). The paper
    sums the two in its A_{k,i}; the losses keep them apart (:func:`dual_clipped_loss`)."""
    process = process_advantages(process_rewards, group_ids, window, std, clip)
    outcome, _ = group_advantages(outcome_rewards, group_ids, std=std, clip=clip)
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


# ----------------------------------------------------------------------------- trainer pieces


@dataclass
class EuphoniumConfig:
    """Euphonium settings (used with `variant: euphonium`)."""

    prm: str | None = doc(None, "Folder of a latent process reward model (`align train-prm`); this or "
                                "process_reward.")
    process_reward: str | None = doc(None, "Name of a differentiable reward scored on the decoded one-step estimate "
                                           "x0_hat = x_t - sigma v (rewards.process_reward.DecodedProcessReward; "
                                           "e.g. shapes_video_motion): a process reward that needs no training.")
    beta: float = doc(3.125, "Guidance temperature beta: lambda = eta^2 / (2 beta) (paper: 3.125 with eta 0.25).")
    guidance_lambda: float | None = doc(None, "A fixed lambda instead of eta^2 / (2 beta).")
    window: list[int] | None = doc(None, "[start, end) of the guided steps (null: the last quarter of the steps, "
                                         "the paper's 12-15 of 16).")
    normalize_grad: bool = doc(False, "Rescale grad_x r_p to unit L2 norm per sample.")
    log_prob_under: str = doc("unguided", "Score transitions under the 'unguided' policy mean (paper default) "
                                          "or the 'guided' mean.")
    process_advantages: bool = doc(True, "Dual-reward GRPO: add the clipped loss of the per-step process "
                                         "advantages in the window (false: outcome advantages only).")
    distill_weight: float = doc(0.0, "Weight of the distillation KL ||mu_g - mu_theta||^2 / (2 eta^2 D) on "
                                     "window steps: the trained model learns the guided drift itself.")

    def __post_init__(self):
        if self.prm and self.process_reward:
            raise ValueError("euphonium: give prm (a trained latent PRM) or process_reward (a reward name), not both")
        if self.log_prob_under not in ("unguided", "guided"):
            raise ValueError("euphonium.log_prob_under must be 'unguided' or 'guided'")
        if self.distill_weight < 0:
            raise ValueError("euphonium.distill_weight must be >= 0")

    def resolved_window(self, num_steps: int) -> tuple[int, int]:
        if self.window is None:
            return num_steps - max(1, num_steps // 4), num_steps
        if len(self.window) != 2:
            raise ValueError(f"euphonium.window must be [start, end], got {self.window}")
        window_mask(num_steps, tuple(self.window))  # validates
        return int(self.window[0]), int(self.window[1])

    def resolved_lambda(self, eta: float) -> float:
        return self.guidance_lambda if self.guidance_lambda is not None else guidance_lambda(eta, self.beta)


def prompt_vector(cond) -> Tensor:
    """[B, D] the conditioning's prompt vector, as rewards.process_reward.prompt_vectors makes it."""
    pooled = getattr(cond, "pooled", None)
    return (pooled if pooled is not None else cond.prompt_embeds.mean(1)).float()


def build_process_reward(settings: EuphoniumConfig, model, device):
    """The configured process reward: a trained latent PRM (`prm` folder) or a differentiable reward
    scored on the decoded x0_hat of `model` (`process_reward`)."""
    from rewards.process_reward import DecodedProcessReward, load_prm

    return load_prm(settings.prm, device) if settings.prm else DecodedProcessReward(model, settings.process_reward)


def make_grad_fn(prm, prompts: list[str], metadata: list | None = None, record: dict | None = None):
    """grad_fn(x, sigma [B], cond, velocity) -> grad_x r_p for samplers.rollout's guided steps, for
    the samples of `prompts` (and their `metadata`) in order. prm: a LatentPRM (reads the prompt
    vector of `cond`) or a DecodedProcessReward (reads x0_hat = x - sigma velocity). record, if
    given: record["reward"] = r_p [B] (cpu) of the latest call, the process reward of that state."""
    from rewards.process_reward import DecodedProcessReward

    def grad_fn(x: Tensor, sigma: Tensor, cond, velocity: Tensor | None = None) -> Tensor:
        if isinstance(prm, DecodedProcessReward):
            if velocity is None:
                raise ValueError("a decoded process reward needs the step's velocity")
            r, grad = prm.reward_and_grad(x, sigma, velocity, prompts, metadata)
        else:
            r, grad = prm.reward_and_grad(x, sigma, prompt_vector(cond).to(x.device))
        if record is not None:
            record["reward"] = r.float().cpu()
        return grad
    return grad_fn
