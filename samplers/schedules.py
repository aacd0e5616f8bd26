"""Noise schedules (sigma grids) for rectified-flow sampling.

Convention: x_t = (1 - t) x0 + t eps with sigma = t, so sigma = 1 is pure noise and 0 is data.
A schedule for S denoising steps is a float32 tensor of S + 1 sigmas running from 1 down to a
final 0; step i goes from sigmas[i] to sigmas[i + 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["shift_sigmas", "flow_sigmas", "exponential_time_shift", "image_seq_len_shift_mu", "flux_sigmas",
           "scheduler_sigmas"]


def shift_sigmas(sigmas: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 timestep shift: sigma' = s sigma / (1 + (s - 1) sigma).

    Works on python floats, numpy arrays and tensors (any shape); s > 1 spends more steps at
    high noise. shift = 1 is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(
    num_steps: int,
    shift: float = 3.0,
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sigmas of `StableDiffusion3Pipeline` with `FlowMatchEulerDiscreteScheduler(shift=shift)`.

    Returns a float32 tensor [num_steps + 1]: sigmas[0] = 1, sigmas[-1] = 0. The diffusers
    timesteps are `sigmas[:-1] * num_train_timesteps`.

    This reproduces diffusers bit for bit, including one detail that is easy to miss: the
    scheduler's `sigma_min` is the *already shifted* training sigma shift(1 / num_train_timesteps)
    (computed in float32), and `set_timesteps` shifts the linspace between 1 and that value again.
    So the last non-zero sigma is shift(shift(1/N)) (0.0089 for shift 3), not shift(1/N).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n_train = num_train_timesteps
    # Scheduler __init__: training sigmas in float32 torch, shifted; only the ends are used.
    train_end = torch.tensor([float(n_train), 1.0], dtype=torch.float32) / n_train
    train_end = shift * train_end / (1 + (shift - 1) * train_end)
    sigma_max, sigma_min = train_end[0].item(), train_end[1].item()
    # set_timesteps: linspace of timesteps in float64 numpy, back to sigmas, shifted again.
    sigmas = np.linspace(sigma_max * n_train, sigma_min * n_train, num_steps) / n_train
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
    return torch.cat([sigmas, torch.zeros(1)]).to(device)


def exponential_time_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Resolution-dependent shift (FLUX): sigma' = e^mu / (e^mu + (1 / sigma - 1)).

    Equals `shift_sigmas(sigmas, e^mu)`; sigma = 0 maps to 0.
    """
    return shift_sigmas(sigmas, math.exp(mu))


def image_seq_len_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu linear in the number of image tokens (diffusers' `calculate_shift`)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_sigmas(
    num_steps: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sigmas of diffusers' `FluxPipeline` (linspace(1, 1/S, S), exponential shift, final 0).

    Returns float32 [num_steps + 1].
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    mu = image_seq_len_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
    return torch.cat([sigmas, torch.zeros(1)]).to(device)


def scheduler_sigmas(
    scheduler,
    num_steps: int,
    sigmas=None,
    mu: float | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The float32 [num_steps + 1] sigmas (final 0) a diffusers flow scheduler sets for a pipeline
    call: `set_timesteps(num_steps, mu=mu)`, or `set_timesteps(sigmas=sigmas, mu=mu)` when the
    pipeline passes its own sigma grid (FLUX: linspace(1, 1/S, S)). A fresh scheduler is built
    from `scheduler`'s config, so the caller's scheduler state is untouched and the result is the
    pipeline's bit for bit (dynamic shift, `shift_terminal` and the rest come from the config).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    fresh = type(scheduler).from_config(scheduler.config)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is None:
        fresh.set_timesteps(num_steps, **kwargs)
    else:
        fresh.set_timesteps(sigmas=sigmas, **kwargs)
    out = fresh.sigmas.to(torch.float32)
    if out.numel() != num_steps + 1:
        raise ValueError(f"scheduler {type(scheduler).__name__} set {out.numel() - 1} steps, expected {num_steps}")
    return out.to(device)
