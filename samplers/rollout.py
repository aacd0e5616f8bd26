"""The sampling loop: run a flow model through a sigma schedule with per-step step functions.

`rollout` returns a `Trajectory` (every latent, per-step log-probs, which steps were stochastic);
training re-scores its stored transitions under the current weights with `rescore`.
The model's `velocity` is the only model call per step; everything else is a few element-wise
ops on the latents, with no host-device synchronisation inside the loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from samplers.steps import STEPS, StepOutput, get_step

__all__ = [
    "FlowModel",
    "Trajectory",
    "Transition",
    "rollout",
    "rescore",
    "rescore_step",
    "window_step_types",
    "random_window",
]


@runtime_checkable
class FlowModel(Protocol):
    """What the sampler needs from a model adapter (samplers/models/<family>.py).

    velocity: v = eps - x0 predicted at `latents` [B, *latent_shape] and noise level `sigma` [B]
    (sigma in [0, 1], not timesteps x 1000), with classifier-free guidance `guidance` applied
    inside (1 = no CFG). Returns a tensor shaped like `latents` in any float dtype.
    """

    def velocity(self, latents: Tensor, sigma: Tensor, cond: Any, guidance: float, detach_uncond: bool = False
                 ) -> Tensor: ...

    @property
    def latent_shape(self) -> tuple[int, ...]: ...  # (C, H, W) or (C, T, H, W); a method is accepted

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...


class Transition(NamedTuple):
    """One stored step i: x [B, *latent] -> next [B, *latent] at sigma -> sigma_next.

    The sigmas are python floats, as the rollout passed them to the step function, so calling
    the step on (x, v, sigma, sigma_next, next=next) reproduces old_log_prob bit for bit.
    """

    step_index: int
    x: Tensor
    next: Tensor
    sigma: float
    sigma_next: float
    old_log_prob: Tensor  # [B]


@dataclass
class Trajectory:
    """A batch of sampled chains.

    latents:     [B, S + 1, *latent] fp32; latents[:, 0] is the initial noise, latents[:, -1] the
                 final sample.
    log_probs:   [B, S] fp32 log-prob of each transition under the sampling policy (0 for ODE).
    sigmas:      [S + 1] fp32 schedule (on the latents' device).
    sde_mask:    [S] bool, True where the step type is stochastic (not "ode").
    step_types:  S step names (keys of samplers.steps.STEPS).
    step_params: parameters as given to `rollout` (flat, or per step name), reused by `rescore`.
    guidance:    CFG scale used for sampling; `rescore` reuses it unless told otherwise.
    reduction:   log-prob reduction used ("mean" or "sum").
    means:       [B, S, *latent] transition means if `rollout(store_means=True)`, else None.
    """

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    sde_mask: Tensor
    step_types: list[str]
    step_params: dict = field(default_factory=dict)
    guidance: float = 1.0
    reduction: str = "mean"
    means: Tensor | None = None

    @property
    def final(self) -> Tensor:
        """[B, *latent] the final latents."""
        return self.latents[:, -1]

    @property
    def initial_noise(self) -> Tensor:
        """[B, *latent] the noise the chains started from."""
        return self.latents[:, 0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def sde_steps(self) -> list[int]:
        """Indices of the stochastic steps."""
        return [i for i, name in enumerate(self.step_types) if name != "ode"]

    def to(self, device: torch.device | str | None = None, non_blocking: bool = False) -> "Trajectory":
        """Copy of the trajectory with every tensor on `device` (e.g. "cpu" to free the GPU)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return replace(
            self,
            latents=move(self.latents),
            log_probs=move(self.log_probs),
            sigmas=move(self.sigmas),
            sde_mask=move(self.sde_mask),
            means=move(self.means),
        )

    def select(self, index: Tensor | Sequence[int] | slice) -> "Trajectory":
        """Trajectory of a subset of the batch (e.g. a training micro-batch)."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.latents.device)
        return replace(
            self,
            latents=self.latents[index],
            log_probs=self.log_probs[index],
            means=None if self.means is None else self.means[index],
        )

    @classmethod
    def cat(cls, trajectories: Sequence["Trajectory"]) -> "Trajectory":
        """Concatenate trajectories sampled with the same schedule and step types along the batch."""
        first = trajectories[0]
        for other in trajectories[1:]:
            if other.step_types != first.step_types or not torch.equal(
                other.sigmas.to(first.sigmas.device), first.sigmas
            ):
                raise ValueError("can only concatenate trajectories with the same sigmas and step types")
        means = None if first.means is None else torch.cat([t.means for t in trajectories])
        return replace(
            first,
            latents=torch.cat([t.latents for t in trajectories]),
            log_probs=torch.cat([t.log_probs for t in trajectories]),
            means=means,
        )

    def transitions(self, trainable_only: bool = True) -> Iterator[Transition]:
        """Yield the stored transitions in order (only the stochastic ones if trainable_only)."""
        sigmas = self.sigmas.tolist()
        for i in range(self.num_steps):
            if trainable_only and self.step_types[i] == "ode":
                continue
            yield Transition(
                i, self.latents[:, i], self.latents[:, i + 1], sigmas[i], sigmas[i + 1], self.log_probs[:, i]
            )


# ----------------------------------------------------------------------------- schedule helpers


def window_step_types(num_steps: int, window: tuple[int, int] | None, sde: str = "flow_grpo_sde") -> list[str]:
    """Step names: `sde` for i in [start, end) of `window` (all steps if None), "ode" elsewhere."""
    get_step(sde)
    if window is None:
        return [sde] * num_steps
    start, end = window
    if not 0 <= start <= end <= num_steps:
        raise ValueError(f"window {window} must satisfy 0 <= start <= end <= num_steps={num_steps}")
    return [sde if start <= i < end else "ode" for i in range(num_steps)]


def random_window(
    num_steps: int,
    size: int,
    rng: random.Random | torch.Generator | int | None = None,
    first_half: bool = True,
) -> tuple[int, int]:
    """Random window (start, start + size) of SDE steps for Flow-GRPO-Fast.

    start is uniform in [0, limit - size] with limit = num_steps // 2 if first_half (the
    reference's `sde_window_range = (0, num_steps // 2)`) else num_steps. rng: random.Random,
    torch.Generator, an int seed or None (module-level `random`).
    """
    limit = num_steps // 2 if first_half else num_steps
    if not 1 <= size <= limit:
        raise ValueError(
            f"window size {size} must be in [1, {limit}] for num_steps={num_steps}, first_half={first_half}"
        )
    high = limit - size  # inclusive
    if isinstance(rng, torch.Generator):
        start = int(torch.randint(0, high + 1, (1,), generator=rng).item())
    else:
        if isinstance(rng, int):
            rng = random.Random(rng)
        start = (rng or random).randint(0, high)
    return start, start + size


# ----------------------------------------------------------------------------- the loop


def _expand_step_types(step_types: str | Sequence[str], num_steps: int) -> list[str]:
    types = [step_types] * num_steps if isinstance(step_types, str) else list(step_types)
    if len(types) != num_steps:
        raise ValueError(f"got {len(types)} step types for {num_steps} steps")
    for name in set(types):
        get_step(name)
    return types


def _params_for(name: str, step_params: dict | None) -> dict:
    """Parameters of step `name`.

    step_params is either flat ({"noise_level": 0.7}, given to every stochastic step; "ode" steps
    get none) or keyed by step name ({"flow_grpo_sde": {...}, "guided": {...}}).
    For "guided" steps a callable `grad_fn(x, sigma [B], cond, velocity=v) -> grad` may replace
    `grad` (v: the velocity just computed at x).
    """
    if not step_params:
        return {}
    if any(key in STEPS for key in step_params):
        unknown = [key for key in step_params if key not in STEPS]
        if unknown:
            raise ValueError(f"step_params mixes step names with other keys: {unknown}")
        return dict(step_params.get(name, {}))
    return {} if name == "ode" else dict(step_params)


def _antithetic_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """[B, *latent] fp32 noise: z for even rows, -z for the odd row after each."""
    gen_device = generator.device if generator is not None else x.device
    z = torch.randn((x.shape[0] // 2, *x.shape[1:]), generator=generator, device=gen_device, dtype=torch.float32)
    return torch.stack([z, -z], dim=1).reshape(x.shape).to(x.device)


def _call_step(
    name: str,
    params: dict,
    model: FlowModel,
    cond: Any,
    x: Tensor,
    sigma_vec: Tensor,
    sigma: float,
    sigma_next: float,
    guidance: float,
    **step_kwargs: Any,
) -> tuple[Tensor, StepOutput]:
    """One velocity call and one step.

    sigma_vec: [B] the current sigma on the model's device (for the network); sigma, sigma_next:
    the same values as python floats (for the step: no device sync, bit-reproducible).
    """
    kwargs = {"detach_uncond": True} if step_kwargs.pop("detach_uncond", False) else {}
    v = model.velocity(x.to(model.dtype), sigma_vec, cond, guidance, **kwargs)
    grad_fn = params.pop("grad_fn", None)
    if grad_fn is not None:
        if params.get("log_prob_under", "unguided") == "guided" or step_kwargs.get("next") is None:
            with torch.enable_grad():
                params["grad"] = grad_fn(x, sigma_vec, cond, velocity=v)
    return v, get_step(name)(x, v, sigma, sigma_next, **params, **step_kwargs)


def _initial_noise(
    shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None,
    group_size: int | None,
    share: bool,
) -> Tensor:
    batch = shape[0]
    if share:
        if not group_size or batch % group_size:
            raise ValueError(f"share_initial_noise needs a group_size dividing the batch ({batch}), got {group_size}")
        shape = (batch // group_size, *shape[1:])
    gen_device = generator.device if generator is not None else device
    noise = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    return noise.repeat_interleave(group_size, dim=0) if share else noise


def rollout(
    model: FlowModel,
    cond: Any,
    sigmas: Tensor | Sequence[float],
    *,
    step_types: str | Sequence[str] = "flow_grpo_sde",
    step_params: dict | None = None,
    guidance: float = 1.0,
    initial_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    group_size: int | None = None,
    share_initial_noise: bool = False,
    latent_shape: Sequence[int] | None = None,
    grad: bool = False,
    store_means: bool = False,
    store_device: torch.device | str | None = None,
    reduction: str = "mean",
    antithetic: bool = False,
    callback: Callable[[int, Tensor, Tensor, StepOutput], None] | None = None,
) -> Trajectory:
    """Sample B chains through `sigmas` and record every transition.

    model: a FlowModel; cond: its conditioning for B samples (opaque here).
    sigmas: [S + 1] schedule from 1 down to 0 (samplers.schedules.flow_sigmas).
    step_types: one step name for all S steps or a list of S names (window_step_types).
    step_params: flat dict for every stochastic step, or {step name: dict} (see _params_for).
    initial_noise: [B, *latent]; else drawn with `generator` for `batch_size` samples of shape
      `latent_shape` (default: the model's; `model.latent_shape` may be a tuple or a method
      called without arguments), the same noise for each consecutive group of `group_size`
      samples if share_initial_noise.
    generator: torch.Generator for the initial and the per-step noise (may live on the CPU).
    grad: run with autograd (else under torch.no_grad()).
    store_means: keep every transition mean ([B, S, *latent], memory!).
    store_device: where latents are kept (default: the model's device).
    antithetic: stochastic steps draw z for samples 0, 2, 4, ... and use -z for 1, 3, 5, ...
      (B even). Every chain keeps its exact distribution and log-probs; a pair that starts from
      the same state explores opposite directions (antithetic variates), which cancels the
      even-order part of the reward in a group's policy gradient.
    callback(i, x, v, out): called after step i with its input, velocity and StepOutput.
    """
    device = torch.device(model.device)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).to(device)
    num_steps = sigmas.numel() - 1
    if num_steps < 1:
        raise ValueError("sigmas must hold at least 2 values")
    types = _expand_step_types(step_types, num_steps)
    params = [_params_for(name, step_params) for name in types]

    if initial_noise is not None:
        if share_initial_noise:
            raise ValueError("pass either initial_noise or share_initial_noise, not both")
        x = initial_noise.to(device=device, dtype=torch.float32)
    else:
        if batch_size is None:
            raise ValueError("batch_size is needed when initial_noise is not given")
        if latent_shape is None:
            latent_shape = model.latent_shape() if callable(model.latent_shape) else model.latent_shape
        shape = (batch_size, *latent_shape)
        x = _initial_noise(shape, device, generator, group_size, share_initial_noise)
    store = device if store_device is None else torch.device(store_device)

    if antithetic and x.shape[0] % 2:
        raise ValueError(f"antithetic step noise pairs samples: the batch size must be even, got {x.shape[0]}")
    sigma_values = sigmas.tolist()  # the one host-device sync
    sigma_vecs = sigmas[:-1, None].expand(-1, x.shape[0])  # [S, B] views for the network
    latents, log_probs, means = [x.to(store)], [], []
    with torch.set_grad_enabled(grad):
        for i in range(num_steps):
            noise = _antithetic_noise(x, generator) if antithetic and types[i] != "ode" else None
            v, out = _call_step(
                types[i], dict(params[i]), model, cond, x, sigma_vecs[i], sigma_values[i], sigma_values[i + 1],
                guidance, noise=noise, generator=generator, reduction=reduction,
            )
            if callback is not None:
                callback(i, x, v, out)
            x = out.next
            latents.append(x.to(store))
            log_probs.append(out.log_prob)
            if store_means:
                means.append(out.mean.to(store))

    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1).to(store),
        sigmas=sigmas.to(store),
        sde_mask=torch.tensor([name != "ode" for name in types], device=store),
        step_types=types,
        step_params=dict(step_params or {}),
        guidance=guidance,
        reduction=reduction,
        means=torch.stack(means, dim=1) if store_means else None,
    )


def rescore_step(
    model: FlowModel,
    cond: Any,
    traj: Trajectory,
    step_index: int,
    step_name: str | None = None,
    step_params: dict | None = None,
    guidance: float | None = None,
    detach_uncond: bool = False,
) -> StepOutput:
    """Re-score the stored transition `step_index` under the model's current weights.

    Defaults (step name, parameters, guidance, reduction) are the ones the trajectory was sampled
    with, so with unchanged weights the log-prob equals traj.log_probs[:, step_index] exactly.
    Runs in the caller's autograd mode (grad flows to the model unless under torch.no_grad()).
    detach_uncond: with CFG, the unconditional branch is a constant for autograd (Flow-GRPO's
    training forward); the value is the same.
    """
    name = traj.step_types[step_index] if step_name is None else step_name
    params = _params_for(name, traj.step_params if step_params is None else step_params)
    device = torch.device(model.device)
    sigmas = traj.sigmas.to(device=device, dtype=torch.float32)
    x = traj.latents[:, step_index].to(device)
    next = traj.latents[:, step_index + 1].to(device)
    sigma_values = sigmas[step_index : step_index + 2].tolist()
    _, out = _call_step(
        name, params, model, cond, x, sigmas[step_index].expand(x.shape[0]), sigma_values[0], sigma_values[1],
        traj.guidance if guidance is None else guidance, next=next, reduction=traj.reduction,
        detach_uncond=detach_uncond,
    )
    return out


def rescore(
    model: FlowModel,
    cond: Any,
    traj: Trajectory,
    step_index: int | Sequence[int],
    step_name: str | None = None,
    step_params: dict | None = None,
    guidance: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(log_prob, mean, std) of stored transition(s) under the current weights (see rescore_step).

    int step_index: log_prob [B], mean [B, *latent], std [B].
    sequence of K indices: log_prob [B, K], mean [B, K, *latent], std [B, K] (one velocity call
    per index; for memory, trainers usually loop over single indices and backprop each).
    """
    if isinstance(step_index, int):
        out = rescore_step(model, cond, traj, step_index, step_name, step_params, guidance)
        return out.log_prob, out.mean, out.std
    outs = [rescore_step(model, cond, traj, int(i), step_name, step_params, guidance) for i in step_index]
    return (
        torch.stack([o.log_prob for o in outs], dim=1),
        torch.stack([o.mean for o in outs], dim=1),
        torch.stack([o.std for o in outs], dim=1),
    )
