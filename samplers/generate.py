"""Prompts in, images out: the batched sampling loop `align sample` and evaluations use."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .rollout import rollout
from .schedules import flow_sigmas


def sample_noise(seeds: Sequence[int], latent_shape: Sequence[int], device="cpu") -> torch.Tensor:
    """Initial noise [N, *latent_shape], sample i drawn from its own generator seeded seeds[i],
    so a sample is reproducible from (prompt, seed) whatever the batching."""
    noise = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


def encode_prompts(model, prompts: Sequence[str], guidance: float, negative_prompt: str = ""):
    """Conditioning of n prompts, each distinct prompt encoded once (with negatives if guidance > 1)."""
    unique = list(dict.fromkeys(prompts))
    cond = model.encode_prompt(unique, negative_prompt=negative_prompt if guidance > 1 else None)
    return cond.index(torch.tensor([unique.index(p) for p in prompts], device=model.device))


@torch.no_grad()
def generate(model, prompts: Sequence[str], seeds: Sequence[int] | None = None, *, num_steps: int | None = None,
             guidance: float | None = None, shift: float | None = None, sampler: str = "ode",
             step_params: dict | None = None, negative_prompt: str = "", batch_size: int = 64,
             resolution: int | None = None, progress: Callable[[int], None] | None = None,
             return_latents: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Samples one image per prompt. Returns float images in [0, 1], [N, 3, H, W] on the CPU.

    Defaults for num_steps / guidance / shift come from the checkpoint (`model.defaults`).
    `seeds[i]` fixes sample i's initial noise (default: 0..N-1); stochastic samplers draw their
    step noise from a generator seeded with the batch's first seed.
    `resolution`: square image side in px (default: the model's native size).
    `progress(n)` is called after each batch with the number of samples done in it.
    `return_latents`: also return the final latents [N, *latent] (fp32, CPU) the images decode from.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts to sample")
    if any(not isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
    defaults = getattr(model, "defaults", {})
    num_steps = num_steps or defaults.get("num_steps", 28)
    guidance = defaults.get("guidance", 1.0) if guidance is None else guidance
    shift = shift or defaults.get("shift", 3.0)
    sigmas = flow_sigmas(num_steps, shift=shift)
    latent_shape = model.latent_shape(resolution, resolution)
    images, latents = [], []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start:start + batch_size]
        batch_seeds = seeds[start:start + batch_size]
        cond = model.encode_prompt(batch_prompts, negative_prompt=negative_prompt if guidance > 1 else None)
        noise = sample_noise(batch_seeds, latent_shape, model.device)
        generator = torch.Generator(device=model.device).manual_seed(int(batch_seeds[0]))
        traj = rollout(model, cond, sigmas, step_types=sampler, step_params=step_params, guidance=guidance,
                       initial_noise=noise, generator=generator)
        images.append(model.decode(traj.final).cpu())
        if return_latents:
            latents.append(traj.final.float().cpu())
        if progress is not None:
            progress(len(batch_prompts))
    return (torch.cat(images), torch.cat(latents)) if return_latents else torch.cat(images)
