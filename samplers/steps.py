"""Stateless sampling steps for rectified flows, each returning the Gaussian transition it used.

Conventions (docs ALGORITHMS.md): x_t = (1 - t) x0 + t eps, sigma = t in [0, 1], t = 1 is noise;
the network predicts v = eps - x0; sampling runs t from 1 down to 0 so dt = sigma_next - sigma < 0.
Then x0_hat = x - t v, eps_hat = x + (1 - t) v and score_hat = -eps_hat / t.

Every step is a pure function

    step(x, v, sigma, sigma_next, *, noise=None, generator=None, next=None, reduction="mean",
         **params) -> StepOutput

- x, v: [B, *latent] images (B,C,H,W) or videos (B,C,T,H,W), any float dtype; all math on the
  latents is fp32 and every returned tensor is fp32 (per-sample coefficients are computed in
  float64 and rounded once).
- sigma, sigma_next: python floats, 0-d tensors or per-sample tensors [B]; sigma in (0, 1]
  (sigma = 1 is handled; sigma = 0 is the end of sampling, not a valid step start).
- next=None: sample next = mean + std * z, z = `noise` if given, else drawn with `generator`
  (on the generator's device, then moved to x's device). next given: re-score it, nothing is
  sampled (training recomputes log p of stored transitions under the current weights).
- log_prob: [B], log-density of `next` under N(mean, std^2) reduced over all non-batch dims with
  `reduction` ("mean", as the reference implementations, or "sum"). `next` is detached inside
  the log-prob (as in Flow-GRPO / DanceGRPO), so its gradient flows through `mean` only.
- std = 0 (ODE steps, CPS on its last step, noise level 0): the transition is deterministic and
  log_prob is defined as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = [
    "StepOutput",
    "gaussian_log_prob",
    "kl_between_means",
    "euler_ode_step",
    "flow_grpo_sde_step",
    "dance_sde_step",
    "cps_step",
    "guided_sde_step",
    "STEPS",
    "get_step",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
Scalar = float | Tensor


@dataclass
class StepOutput:
    """Result of one sampling step (all fp32).

    next:        [B, *latent] the sample (or the given `next`, re-scored).
    mean:        [B, *latent] the mean `log_prob` is evaluated under (the policy's mean).
    std:         [B] std of the transition; 0 means deterministic.
    log_prob:    [B] log N(next; mean, std^2) reduced over non-batch dims (0 where std = 0).
    noise_scale: [B] the reference implementations' `std_dev_t`: g in std = g sqrt(|dt|) for the
                 SDE steps (Flow-GRPO: a sqrt(t / (1 - t)); DanceGRPO/guided: eta), the std itself
                 for CPS, 0 for ODE. Flow-GRPO's KL divides by this, not by std:
                 `kl_between_means(mean, ref_mean, noise_scale)`.
    guided_mean: [B, *latent] for the guided step only: the mean `next` was drawn from.
    """

    next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor
    noise_scale: Tensor | None = None
    guided_mean: Tensor | None = None


# ----------------------------------------------------------------------------- helpers
# Per-sample scalars (sigmas, coefficients, stds) are python floats or float64 tensors of shape
# [B or 1, 1, ..., 1]; their arithmetic is float64 either way and they are rounded to fp32 only
# where they meet the latents. So a step costs a handful of ops on the latents (the rollout
# passes python floats), and float and per-sample-tensor sigmas give bit-identical results
# (a trainer may batch transitions of different steps and still reproduce the stored log-probs).

Coefficient = float | Tensor


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _per_sample(value: Scalar, x: Tensor) -> Tensor:
    """Float / 0-d / [B] -> float64 tensor of shape [B or 1, 1, ..., 1] broadcasting against x."""
    t = torch.as_tensor(value, device=x.device).to(torch.float64)
    if t.ndim > 1:
        raise ValueError(f"per-sample scalars must be 0-d or [B], got shape {tuple(t.shape)}")
    return t.reshape(-1, *[1] * (x.ndim - 1))


def _sigmas(sigma: Scalar, sigma_next: Scalar, x: Tensor) -> tuple[Coefficient, Coefficient]:
    """Both as python floats when possible (floats, 0-d CPU tensors: no device sync), else both
    as per-sample float64 tensors."""

    def as_float(value: Scalar) -> float | None:
        if isinstance(value, Tensor):
            return float(value) if value.ndim == 0 and value.device.type == "cpu" else None
        return float(value)

    t, t_next = as_float(sigma), as_float(sigma_next)
    if t is not None and t_next is not None:
        return t, t_next
    return _per_sample(sigma, x), _per_sample(sigma_next, x)


def _f32(value: Coefficient) -> Coefficient:
    """Round a coefficient to fp32 where it meets the latents (floats are cast by torch ops)."""
    return value if isinstance(value, float) else value.float()


def _sqrt(value: Coefficient) -> Coefficient:
    return math.sqrt(value) if isinstance(value, float) else torch.sqrt(value)


def _relu(value: Coefficient) -> Coefficient:
    return max(value, 0.0) if isinstance(value, float) else value.clamp_min(0)


def _first_step_t(t: Coefficient, t_next: Coefficient) -> Coefficient:
    """t, except sigma_next where t == 1 (Flow-GRPO's fix for t / (1 - t) at t = 1)."""
    if isinstance(t, float):
        return t_next if t == 1 else t
    return torch.where(t == 1, t_next, t)


def _batch_vector(value: Coefficient, x: Tensor) -> Tensor:
    """Float or [B or 1, 1, ...] -> [B] fp32."""
    if isinstance(value, float):
        return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)
    return value.reshape(-1).expand(x.shape[0]).float()


def _reduce(values: Tensor, reduction: str) -> Tensor:
    """Reduce [B, ...] over all non-batch dims -> [B]."""
    _check_reduction(reduction)
    if values.ndim == 1:  # mean(dim=()) would reduce everything
        return values
    dims = tuple(range(1, values.ndim))
    return values.mean(dim=dims) if reduction == "mean" else values.sum(dim=dims)


def _per_sample_std(std: Scalar, like: Tensor) -> Coefficient | None:
    """std as a float or a float64 [B or 1] tensor if it is per-sample, None if per element."""
    if isinstance(std, (int, float)):
        return float(std)
    std = torch.as_tensor(std, device=like.device)
    if std.ndim <= 1 or (std.ndim == like.ndim and all(n == 1 for n in std.shape[1:])):
        return std.reshape(-1).to(torch.float64)
    return None


def _scaled_squared_error(a: Tensor, b: Tensor, std: Scalar, reduction: str, with_constants: bool) -> Tensor:
    """reduce((a - b)^2 / (2 std^2) [+ log std + log sqrt(2 pi)]) -> [B] fp32; 0 where std = 0."""
    _check_reduction(reduction)
    per_sample = _per_sample_std(std, a)
    if per_sample is None:  # element-wise std
        std = torch.as_tensor(std, dtype=torch.float32, device=a.device)
        positive = std > 0
        safe = torch.where(positive, std, torch.ones_like(std))
        values = (a.float() - b.float()) ** 2 / (2 * safe**2)
        if with_constants:
            values = values + torch.log(safe) + _LOG_SQRT_2PI
        return _reduce(torch.where(positive, values, torch.zeros_like(values)), reduction)
    # Per-sample std: reduce the squared error first, then scale ([B]-sized ops only).
    squared = _reduce((a.float() - b.float()).square(), reduction)
    count = 1 if reduction == "mean" else a[0].numel()
    if isinstance(per_sample, float):
        if per_sample <= 0:
            return squared * 0.0  # stays in the autograd graph, with zero gradient
        out = squared * (1 / (2 * per_sample * per_sample))
        return out + count * (math.log(per_sample) + _LOG_SQRT_2PI) if with_constants else out
    positive = per_sample > 0
    safe = torch.where(positive, per_sample, torch.ones_like(per_sample))
    out = squared * (1 / (2 * safe * safe)).float()
    if with_constants:
        out = out + (count * (torch.log(safe) + _LOG_SQRT_2PI)).float()
    return torch.where(positive, out, torch.zeros_like(out))


def gaussian_log_prob(next: Tensor, mean: Tensor, std: Scalar, reduction: str = "mean") -> Tensor:
    """log N(next; mean, std^2) per element, reduced over non-batch dims -> [B].

    next, mean: [B, *latent]; std: float, 0-d, [B] or broadcastable to mean. Where std = 0 the
    transition is deterministic and log_prob is defined as 0 (a delta has no finite density; 0
    keeps ratios exp(logp_new - logp_old) = 1 and never produces NaN, in values or gradients).
    """
    return -_scaled_squared_error(next, mean, std, reduction, with_constants=True)


def kl_between_means(mean_a: Tensor, mean_b: Tensor, std: Scalar, reduction: str = "mean") -> Tensor:
    """Flow-GRPO's KL: reduce_dims((mean_a - mean_b)^2) / (2 std^2) -> [B].

    For two Gaussians with the same std this is KL(N(a, std^2) || N(b, std^2)) per element.
    Flow-GRPO passes its `std_dev_t` (StepOutput.noise_scale), not the transition std, which
    scales the KL by 1/|dt| relative to the exact one; pass StepOutput.std for the exact KL.
    Where std = 0 the KL is defined as 0.
    """
    return _scaled_squared_error(mean_a, mean_b, std, reduction, with_constants=False)


def _sample_or_rescore(
    x: Tensor,
    mean: Tensor,
    std: Coefficient,
    *,
    noise: Tensor | None,
    generator: torch.Generator | None,
    next: Tensor | None,
    reduction: str,
    noise_scale: Coefficient,
    log_prob_mean: Tensor | None = None,
    squared_error_log_prob: bool = False,
) -> StepOutput:
    """Draw next ~ N(mean, std^2) (or take the given one) and score it.

    log_prob_mean: mean to score under if not `mean` (guided step).
    squared_error_log_prob: score with -(next - mean)^2 instead of the Gaussian (CPS reference).
    """
    if next is None:
        if noise is None:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        elif noise.shape != mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
        noise = noise.to(device=mean.device, dtype=torch.float32)
        next = torch.add(mean, noise, alpha=std) if isinstance(std, float) else torch.addcmul(mean, std.float(), noise)
    else:
        next = next.to(device=mean.device, dtype=torch.float32)
    score_mean = mean if log_prob_mean is None else log_prob_mean
    if squared_error_log_prob:
        log_prob = -_reduce((next.detach() - score_mean).square(), reduction)
    else:
        log_prob = gaussian_log_prob(next.detach(), score_mean, std, reduction)
    return StepOutput(
        next=next,
        mean=score_mean,
        std=_batch_vector(std, x),
        log_prob=log_prob,
        noise_scale=_batch_vector(noise_scale, x),
        guided_mean=None if log_prob_mean is None else mean,
    )


def _reverse_sde_mean(x: Tensor, v: Tensor, t: Coefficient, dt: Coefficient, g: Coefficient) -> Tensor:
    """Euler-Maruyama mean of the reverse SDE with diffusion g that keeps the flow's marginals.

    dx = [v - (g^2 / 2) score] dt + g dW with score = -(x + (1 - t) v) / t, i.e.
    mean = x + [v + (g^2 / (2t)) (x + (1 - t) v)] dt (Flow-GRPO eq. 9; DanceGRPO with g = eta),
    written as coefficients on x and v like the Flow-GRPO code. g = 0 gives x + v dt exactly.
    """
    c = g * g / (2 * t)
    return x * _f32(1 + c * dt) + v * _f32((1 + c * (1 - t)) * dt)


# ----------------------------------------------------------------------------- steps


def euler_ode_step(
    x: Tensor,
    v: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    next: Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """Deterministic Euler step of the probability-flow ODE: next = x + v dt.

    std = 0 and log_prob = 0 (a deterministic transition has no density; these steps are never
    trained). `noise` and `generator` are accepted for a uniform signature and ignored (no random
    numbers are drawn). A given `next` is returned as is with log_prob 0.
    """
    _check_reduction(reduction)
    x, v = x.float(), v.float()
    t, t_next = _sigmas(sigma, sigma_next, x)
    mean = x + v * _f32(t_next - t)
    zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    next = mean if next is None else next.to(device=x.device, dtype=torch.float32)
    return StepOutput(next=next, mean=mean, std=zeros, log_prob=zeros, noise_scale=zeros)


def flow_grpo_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    noise_level: float = 0.7,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    next: Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """Flow-GRPO SDE step (Liu et al. 2025, eq. 9-10).

    g = a sqrt(t / (1 - t)) with a = noise_level; at t = 1 the ratio is infinite, so, as the
    reference code does (it uses the schedule's sigmas[1], which is the next sigma of the first
    step), t in the denominator is replaced by sigma_next there.
    mean = x + [v + (g^2 / (2t)) (x + (1 - t) v)] dt, std = g sqrt(|dt|).
    noise_level = 0 gives exactly the Euler step (std 0, log_prob 0).
    """
    x, v = x.float(), v.float()
    t, t_next = _sigmas(sigma, sigma_next, x)
    dt = t_next - t
    g = _sqrt(t / (1 - _first_step_t(t, t_next))) * noise_level
    mean = _reverse_sde_mean(x, v, t, dt, g)
    return _sample_or_rescore(
        x, mean, g * _sqrt(abs(dt)),
        noise=noise, generator=generator, next=next, reduction=reduction, noise_scale=g,
    )


def _dance_mean_std(
    x: Tensor, v: Tensor, t: Coefficient, t_next: Coefficient, eta: float
) -> tuple[Tensor, Coefficient]:
    """DanceGRPO: mean = x + dt (v - (eta^2 / 2) score_hat), std = eta sqrt(|dt|).

    score_hat = -(x - (1 - t) x0_hat) / t^2 = -(x + (1 - t) v) / t (same thing, no cancellation).
    """
    dt = t_next - t
    return _reverse_sde_mean(x, v, t, dt, float(eta)), float(eta) * _sqrt(abs(dt))


def dance_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    eta: float = 0.3,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    next: Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """DanceGRPO SDE step with constant diffusion eta (0.3 images, 0.25 video).

    mean = x + dt (v - (eta^2 / 2) score_hat), score_hat = -(x - (1 - t) x0_hat) / t^2,
    std = eta sqrt(|dt|). The reference drops log std and log sqrt(2 pi) from its log-prob by a
    misplaced line break; they are per-step constants that cancel in ratios, we keep them.
    eta = 0 gives exactly the Euler step.
    """
    x, v = x.float(), v.float()
    t, t_next = _sigmas(sigma, sigma_next, x)
    mean, std = _dance_mean_std(x, v, t, t_next, eta)
    return _sample_or_rescore(
        x, mean, std, noise=noise, generator=generator, next=next, reduction=reduction, noise_scale=float(eta)
    )


def cps_step(
    x: Tensor,
    v: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    noise_level: float = 0.7,
    log_prob_form: str = "reference",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    next: Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """Coefficients-preserving sampling (Wang & Yu 2025, Flow-CPS; Flow-GRPO `sde_type="cps"`).

    std = sigma_next sin(a pi / 2); mean = x0_hat (1 - sigma_next) + eps_hat sqrt(sigma_next^2 - std^2)
    with x0_hat = x - t v, eps_hat = x + (1 - t) v, so next keeps the (1 - s, s) coefficients of
    the forward process. a = 0 is the DDIM-like update, which equals Euler algebraically.
    At sigma_next = 0 the step is deterministic (std 0, next = x0_hat).
    Unlike the two SDE steps, its per-step noise does not shrink with the step size, so the chain
    does not converge to the data marginal as steps grow (it under-disperses; see the tests).

    log_prob_form:
      "reference": -(next - mean)^2 reduced over dims, as both the Flow-GRPO and the Flow-CPS
                   code ("remove all constants"). NOTE: this drops the 1 / (2 std^2) factor as
                   well, so ratios exp(logp_new - logp_old) are those of a Gaussian with variance
                   1/2, not std^2; hyper-parameters (clip range) tuned with CPS assume this.
      "gaussian":  the exact Gaussian log-density (gaussian_log_prob).
    """
    if log_prob_form not in ("reference", "gaussian"):
        raise ValueError(f"log_prob_form must be 'reference' or 'gaussian', got {log_prob_form!r}")
    x, v = x.float(), v.float()
    t, t_next = _sigmas(sigma, sigma_next, x)
    std = t_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - _f32(t) * v
    eps_hat = x + _f32(1 - t) * v
    mean = x0_hat * _f32(1 - t_next) + eps_hat * _f32(_sqrt(_relu(t_next * t_next - std * std)))
    return _sample_or_rescore(
        x, mean, std,
        noise=noise, generator=generator, next=next, reduction=reduction, noise_scale=std,
        squared_error_log_prob=log_prob_form == "reference",
    )


def guided_sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    eta: float = 0.25,
    grad: Tensor | None = None,
    guidance_lambda: float = 0.01,
    normalize_grad: bool = False,
    log_prob_under: str = "unguided",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    next: Tensor | None = None,
    reduction: str = "mean",
) -> StepOutput:
    """Euphonium: DanceGRPO step pushed along a process-reward gradient (Zhong et al. 2026).

    mu = DanceGRPO mean; mu_g = mu + lambda D grad with D = sigma - sigma_next > 0 and
    grad = d r_p(x, sigma, c) / dx [B, *latent] (None: no guidance); lambda = eta^2 / (2 beta)
    (0.01 for beta = 3.125, eta = 0.25, the paper's defaults). normalize_grad rescales grad to unit
    L2 norm per sample (over all latent elements). next ~ N(mu_g, eta^2 D).
    log_prob_under: "unguided" (default) scores next under mu (the policy's own mean, which is
    what training re-scores); "guided" scores it under mu_g. StepOutput.mean is the mean used
    for log_prob; StepOutput.guided_mean is mu_g.
    guidance_lambda = 0 or grad = None is exactly dance_sde_step (guided_mean None).
    """
    if log_prob_under not in ("unguided", "guided"):
        raise ValueError(f"log_prob_under must be 'unguided' or 'guided', got {log_prob_under!r}")
    x, v = x.float(), v.float()
    t, t_next = _sigmas(sigma, sigma_next, x)
    mean, std = _dance_mean_std(x, v, t, t_next, eta)
    common = dict(noise=noise, generator=generator, next=next, reduction=reduction, noise_scale=float(eta))
    if grad is None or guidance_lambda == 0:
        return _sample_or_rescore(x, mean, std, **common)
    grad = grad.to(device=x.device, dtype=torch.float32)
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != latent shape {tuple(x.shape)}")
    if normalize_grad:
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        grad = grad / norm.reshape(-1, *[1] * (x.ndim - 1))
    guided = mean + _f32(guidance_lambda * (t - t_next)) * grad
    if log_prob_under == "guided":
        out = _sample_or_rescore(x, guided, std, **common)
        out.guided_mean = guided
        return out
    return _sample_or_rescore(x, guided, std, **common, log_prob_mean=mean)


StepFn = Callable[..., StepOutput]

STEPS: dict[str, StepFn] = {
    "ode": euler_ode_step,
    "flow_grpo_sde": flow_grpo_sde_step,
    "dance_sde": dance_sde_step,
    "cps": cps_step,
    "guided": guided_sde_step,
}


def get_step(name: str) -> StepFn:
    """Step function registered under `name` (see STEPS)."""
    try:
        return STEPS[name]
    except KeyError:
        raise ValueError(f"unknown step {name!r}; valid steps: {', '.join(sorted(STEPS))}") from None
