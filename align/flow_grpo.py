"""Flow-GRPO (Liu et al. 2025) with its Fast and DanceGRPO variants: online RL for flow models.

    align train configs/shapes/flow_grpo.yaml [key=value ...] [--resume]
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no -m align train configs/shapes/flow_grpo.yaml     # 2 ranks (CPU: gloo)

One epoch (docs/ALGORITHMS.md sections 1-2; the data path of ARCHITECTURE.md):
  prompts (K repeats each, this rank's share) -> encode -> SDE rollout under no_grad -> decode
  -> reward -> gather rewards + global group ids -> group advantages -> drop all-zero groups
  -> `updates_per_epoch` optimizer steps, each accumulating over micro-batches x trained steps:
     re-score the stored transition under the current weights, clipped ratio loss + beta KL to
     the reference (LoRA disabled / frozen copy) -> clip grads -> step -> EMA
  -> log -> checkpoint.

Variants (`variant`):
  flow_grpo  SDE (noise level a) on every step; train the first int(T * timestep_fraction).
  fast       Flow-GRPO-Fast: SDE on a random window of `window_size` steps in the first half,
             ODE elsewhere; train only the window.
  dance      DanceGRPO: constant-eta SDE on every step, initial noise shared by each group,
             per-group std advantages, no KL, a random `step_fraction` of the steps trained.
  euphonium  DanceGRPO whose steps in a late window follow the gradient of a latent process
             reward model (align/euphonium.py): dual outcome + process advantages, optional
             distillation of the guided drift into the policy (`euphonium` settings).
Fields left null take the variant's paper default (`resolve_variant_defaults`).

Everything random in an epoch (prompts, noise, SDE window, trained steps, sample order) is
seeded from (seed, epoch), so a resumed run replays exactly the epochs an uninterrupted run
would have, and P ranks process the same global batch as one rank would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from samplers.generate import encode_prompts
from samplers.rollout import Trajectory, random_window, rescore_step, rollout, window_step_types
from samplers.schedules import flow_sigmas

from .advantages import gather_for_advantages, group_advantages, nonzero_group_mask
from .config import doc, register_config
from .data import SampleBatch, derive_seed
from .euphonium import (EuphoniumConfig, build_process_reward, distillation_kl, dual_clipped_loss, make_grad_fn,
                        process_advantages, window_mask)
from .losses import clipped_policy_loss, flow_grpo_kl
from .runtime import LoraSettings, reference_policy, resolve_attention_backend, resolve_mixed_precision, transformer_as
from .trainer import (STEP_NOISE, EMAConfig, OnlineSettings, OptimizerConfig, initial_noise, make_ema, optimizer_step,
                      run_epochs, setup_run)

__all__ = [
    "FlowGRPOConfig",
    "LoraSettings",
    "GRPOSamplerConfig",
    "OptimizerConfig",
    "EMAConfig",
    "train",
    "resolve_variant_defaults",
    "resolve_mixed_precision",
    "resolve_attention_backend",
    "epoch_step_schedule",
    "plan_updates",
    "recompute_old_log_probs",
]

VARIANTS = ("flow_grpo", "fast", "dance", "euphonium")
# Paper defaults that differ per variant; a null config field takes these (ALGORITHMS.md 1-2).
VARIANT_DEFAULTS = {
    "flow_grpo": dict(adv_std="global", adv_eps=1e-4, clip_range=1e-4, kl_beta=0.04, share_initial_noise=False),
    "fast": dict(adv_std="global", adv_eps=1e-4, clip_range=1e-5, kl_beta=0.04, share_initial_noise=False),
    "dance": dict(adv_std="group", adv_eps=1e-8, clip_range=1e-4, kl_beta=0.0, share_initial_noise=True),
    "euphonium": dict(adv_std="group", adv_eps=1e-8, clip_range=1e-4, kl_beta=0.0, share_initial_noise=True),
}
_DANCE_LIKE = ("dance", "euphonium")  # constant-eta SDE on every step, a random subset of steps trained
# Purposes for derive_seed(seed, epoch, PURPOSE, ...): independent streams per use (noise: align.trainer).
_WINDOW, _ORDER, _STEPS = 3, 4, 5


# ============================================================================= config


@dataclass
class GRPOSamplerConfig:
    """How training rollouts and held-out evaluations are sampled."""

    num_steps: int = doc(10, "Denoising steps T of training rollouts (Flow-GRPO's denoising reduction).")
    eval_num_steps: int = doc(40, "Steps of the deterministic ODE sampler for held-out evaluation.")
    noise_level: float = doc(0.7, "Flow-GRPO SDE noise level a (paper: 0.7 SD3.5, 0.9 FLUX, 0.8 Fast).")
    eta: float = doc(0.3, "DanceGRPO's constant diffusion eta (0.3 images, 0.25 video); variant 'dance'.")
    guidance: float = doc(4.5, "CFG scale of rollouts and re-scoring; 1 = the no-CFG variant (half the cost).")
    eval_guidance: float | None = doc(None, "CFG scale for evaluation; null = `guidance`.")
    shift: float = doc(3.0, "Timestep shift s of the sigma schedule.")
    negative_prompt: str = doc("", "Negative prompt of CFG.")
    batch_size: int = doc(8, "Rollouts per forward batch on each rank (also the evaluation batch).")
    resolution: int | None = doc(None, "Square image side in px of rollouts and evaluation (null: the model's "
                                       "native size; SD3.5 recipes train at 512).")

    def __post_init__(self):
        if self.num_steps < 2 or self.eval_num_steps < 1:
            raise ValueError("sampler.num_steps must be >= 2 and eval_num_steps >= 1")
        if self.noise_level < 0 or self.eta < 0:
            raise ValueError("sampler.noise_level and sampler.eta must be >= 0")
        if self.batch_size < 1:
            raise ValueError("sampler.batch_size must be >= 1")


@register_config("flow_grpo")
@dataclass
class FlowGRPOConfig(OnlineSettings):
    """Flow-GRPO / Flow-GRPO-Fast / DanceGRPO. Null fields take the variant's paper default."""

    sampler: GRPOSamplerConfig = doc(GRPOSamplerConfig(), "Rollout and evaluation sampling.")
    variant: Literal["flow_grpo", "fast", "dance", "euphonium"] = doc(
        "flow_grpo", "flow_grpo | fast (SDE window) | dance | euphonium (process-reward-guided dance).")
    euphonium: EuphoniumConfig = doc(EuphoniumConfig(), "variant euphonium: process reward model, guidance "
                                                        "strength and window, dual advantages, distillation.")
    window_size: int = doc(2, "fast: SDE window length (2-3 steps in the first half of the schedule).")
    window_range: Literal["first_half", "all"] = doc("first_half", "fast: where the window may start: the first "
                                                     "half of the steps (the paper) or anywhere but the last step.")
    step_fraction: float = doc(0.6, "dance, euphonium: fraction of the T steps trained, drawn at random per update.")
    timestep_fraction: float = doc(0.99, "flow_grpo: train the first int(T * fraction) steps (the last step's "
                                         "sigma is tiny and its likelihood overflows).")
    shuffle_timesteps: bool = doc(False, "Visit the trained steps in a random order within each micro-batch.")
    share_initial_noise: bool | None = doc(None, "Samples of a group start from the same noise (null: dance only).")
    antithetic_noise: bool = doc(False, "SDE steps give sample pairs of a group opposite noise (z, -z): antithetic "
                                        "variates that cancel much of the policy gradient's variance, most with "
                                        "share_initial_noise. Needs even group_size and sampler.batch_size.")
    adv_std: Literal["global", "group", "none"] | None = doc(
        None, "Advantage std: 'global' batch std (Flow-GRPO), 'group' per prompt (DanceGRPO), 'none'.")
    adv_eps: float | None = doc(None, "Added to the advantage std (null: 1e-4, dance 1e-8).")
    clip_range: float | None = doc(None, "PPO ratio clip eps (null: 1e-4, fast 1e-5).")
    kl_beta: float | None = doc(None, "KL weight to the reference policy; 0 disables it and the reference "
                                      "forward (null: 0.04, dance 0).")
    updates_per_epoch: int = doc(2, "Optimizer steps per pass over the epoch's samples (each accumulates the "
                                    "gradients of its share of samples x trained steps).")
    micro_batch_size: int = doc(8, "Samples per training forward on each rank. Re-scoring reproduces the "
                                   "sampling log-probs bit for bit only if the network sees the same batch "
                                   "shapes (hardware-dependent); see recompute_old_log_probs.")
    cfg_detach_uncond: bool = doc(True, "With CFG, the training forward treats the unconditional branch as a "
                                        "constant, so the gradient reaches the weights through the conditional "
                                        "branch only (the Flow-GRPO reference); false backpropagates through "
                                        "both branches (genalign before 0.2; gradient cosine 0.6-0.8 with the "
                                        "reference's).")
    recompute_old_log_probs: bool = doc(False, "Re-score the trained transitions without grad in the training "
                                               "micro-batches before the first update, so the first ratio is "
                                               "exactly 1 whatever the batch shapes / kernels (one extra forward "
                                               "per trained transition).")
    ema: EMAConfig = doc(EMAConfig(), "EMA of the trainable parameters.")
    output_dir: str = doc("runs/flow_grpo", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")

    def __post_init__(self):
        super().__post_init__()
        if self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        if not 0 < self.timestep_fraction <= 1 or not 0 < self.step_fraction <= 1:
            raise ValueError("timestep_fraction and step_fraction must be in (0, 1]")
        if self.variant == "fast" and not 1 <= self.window_size <= self.sampler.num_steps // 2:
            raise ValueError(f"window_size must be in [1, num_steps // 2 = {self.sampler.num_steps // 2}]")
        for name in ("adv_eps", "clip_range", "kl_beta"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.variant == "euphonium":
            if not (self.euphonium.prm or self.euphonium.process_reward):
                raise ValueError("variant euphonium needs euphonium.prm, a process reward model folder "
                                 "(`align train-prm STORE --out DIR`), or euphonium.process_reward, a "
                                 "differentiable reward scored on x0_hat (e.g. shapes_video_motion)")
            self.euphonium.resolved_window(self.sampler.num_steps)
        if self.antithetic_noise and (self.group_size % 2 or self.sampler.batch_size % 2 or self.prompts.spread_groups):
            raise ValueError("antithetic_noise pairs neighbouring samples of a group: group_size and "
                             "sampler.batch_size must be even and prompts.spread_groups false")


def resolve_variant_defaults(cfg: FlowGRPOConfig) -> FlowGRPOConfig:
    """A copy of cfg with every null variant-dependent field set to the variant's default."""
    defaults = VARIANT_DEFAULTS[cfg.variant]
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


# ============================================================================= setup helpers


def epoch_step_schedule(cfg: FlowGRPOConfig, epoch: int) -> tuple[list[str], dict, list[int]]:
    """(step types of the rollout, step params, candidate trained step indices) for `epoch`."""
    T = cfg.sampler.num_steps
    if cfg.variant == "dance":
        return window_step_types(T, None, "dance_sde"), {"eta": cfg.sampler.eta}, list(range(T))
    if cfg.variant == "euphonium":
        e, eta = cfg.euphonium, cfg.sampler.eta
        types = window_step_types(T, e.resolved_window(T), "guided")
        types = ["dance_sde" if name == "ode" else name for name in types]
        guided = {"eta": eta, "guidance_lambda": e.resolved_lambda(eta), "normalize_grad": e.normalize_grad,
                  "log_prob_under": e.log_prob_under}
        return types, {"dance_sde": {"eta": eta}, "guided": guided}, list(range(T))
    params = {"noise_level": cfg.sampler.noise_level}
    if cfg.variant == "fast":
        if cfg.window_range == "all":  # the last step (sigma -> 0) is never an SDE step
            start, end = random_window(T - 1, cfg.window_size, derive_seed(cfg.seed, epoch, _WINDOW), first_half=False)
        else:
            start, end = random_window(T, cfg.window_size, derive_seed(cfg.seed, epoch, _WINDOW))
        return window_step_types(T, (start, end)), params, list(range(start, end))
    return window_step_types(T, None), params, list(range(max(1, int(T * cfg.timestep_fraction))))


def _trained_steps(cfg: FlowGRPOConfig, candidates: list[int], epoch: int, update: int) -> list[int]:
    """The steps one optimizer update trains: all candidates, or (dance) a random subset."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _STEPS, update))
    steps = list(candidates)
    if cfg.variant in _DANCE_LIKE:
        count = max(1, int(len(steps) * cfg.step_fraction))
        steps = sorted(steps[i] for i in torch.randperm(len(steps), generator=gen)[:count].tolist())
    if cfg.shuffle_timesteps:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=gen).tolist()]
    return steps


# ============================================================================= rollouts, rewards, advantages


@dataclass
class Rollouts:
    """This rank's samples of an epoch: trajectories, their conditioning and rewards."""

    trajectory: Trajectory  # [n] chains
    cond: Any  # conditioning of the n samples (SD3Cond)
    rewards: Tensor  # [n] fp32, NaN = not scored
    extras: dict[str, Tensor]  # per-sample reward extras [n] (e.g. "strict")
    guided_means: dict[int, Tensor] | None = None  # euphonium: step -> [n, *latent] mean the sample was drawn from
    process_rewards: Tensor | None = None  # euphonium: [n, T] r_p of each guided step's input state, NaN elsewhere


@torch.no_grad()
def collect_rollouts(model, reward_fn, batch: SampleBatch, cfg: FlowGRPOConfig, epoch: int,
                     step_types: list[str], step_params: dict, prm=None) -> Rollouts:
    """Sample this rank's chains batch by batch, decode and score them. prm (euphonium): the
    process reward whose gradient guides the "guided" steps; its values there are kept."""
    s = cfg.sampler
    device = model.device
    sigmas = flow_sigmas(s.num_steps, shift=s.shift, device=device)
    cond = encode_prompts(model, batch.prompts, s.guidance, s.negative_prompt)
    noise = initial_noise(cfg.seed, epoch, batch, model.latent_shape(s.resolution, s.resolution),
                          cfg.share_initial_noise).to(device)
    trajectories, rewards, extras, guided, process = [], [], {}, {}, {}
    record: dict[str, Tensor] = {}  # r_p of the latest guided step's input state (make_grad_fn)

    def keep_guided(i, x, v, out):
        if out.guided_mean is not None:
            guided.setdefault(i, []).append(out.guided_mean.detach())
        if "reward" in record:
            process.setdefault(i, []).append(record.pop("reward"))

    for start in range(0, len(batch), s.batch_size):
        idx = slice(start, start + s.batch_size)
        # step noise seeded by the batch's first global sample: the same for any rank layout whose
        # per-rank sample count is a multiple of the batch size
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(cfg.seed, epoch, STEP_NOISE, int(batch.sample_ids[start])))
        params = step_params
        if prm is not None:
            params = {**step_params, "guided": {**step_params["guided"], "grad_fn": make_grad_fn(
                prm, batch.prompts[idx], batch.metadata[idx], record)}}
        traj = rollout(model, cond.index(idx), sigmas, step_types=step_types, step_params=params,
                       guidance=s.guidance, initial_noise=noise[idx], generator=generator,
                       antithetic=cfg.antithetic_noise, callback=keep_guided if cfg.variant == "euphonium" else None)
        images = model.decode(traj.final)
        out = reward_fn(images, batch.prompts[idx], metadata=batch.metadata[idx], group_ids=batch.group_ids[idx])
        trajectories.append(traj)
        rewards.append(out.scores.float().cpu())
        for key, value in out.extras.items():
            if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == images.shape[0]:
                extras.setdefault(key, []).append(value.detach().float().cpu())
    extras = {k: torch.cat(v) for k, v in extras.items() if len(v) == len(trajectories)}
    guided_means = {i: torch.cat(means) for i, means in guided.items()} or None
    process_rewards = None
    if process:
        process_rewards = torch.full((len(batch), s.num_steps), float("nan"))
        for i, values in process.items():
            process_rewards[:, i] = torch.cat(values)
    return Rollouts(Trajectory.cat(trajectories), cond, torch.cat(rewards), extras, guided_means, process_rewards)


def compute_advantages(cfg: FlowGRPOConfig, rollouts: Rollouts, batch: SampleBatch, accelerator):
    """Advantages over the batch gathered from every rank.

    Returns (advantages [N] and keep mask [N], both indexed by global sample id, metrics). keep
    is False for the samples of groups whose advantages are all zero (no gradient signal).
    """
    ids = batch.sample_ids.to(accelerator.device)
    rewards, group_ids = gather_for_advantages(rollouts.rewards.to(accelerator.device),
                                               batch.group_ids.to(accelerator.device), accelerator)  # [N], [N]
    sample_ids = accelerator.gather(ids) if accelerator.num_processes > 1 else ids  # [N]
    advantages, metrics = group_advantages(rewards, group_ids, std=cfg.adv_std, eps=cfg.adv_eps,
                                           clip=cfg.adv_clip, unbiased=cfg.variant in _DANCE_LIKE)  # [N]
    keep = nonzero_group_mask(advantages, group_ids)  # [N]
    by_id = torch.zeros(batch.num_samples, dtype=torch.float32)
    by_id[sample_ids.cpu()] = advantages.float().cpu()
    keep_by_id = torch.zeros(batch.num_samples, dtype=torch.bool)
    keep_by_id[sample_ids.cpu()] = keep.cpu()
    out = {k: float(v) for k, v in metrics.items()}
    out["adv_clip_fraction"] = out.pop("clip_fraction")
    out["kept_fraction"] = float(keep.float().mean())
    for key, values in rollouts.extras.items():  # reward extras over the whole batch (e.g. strict)
        gathered = accelerator.gather(values.to(accelerator.device)) if accelerator.num_processes > 1 else values
        out[f"reward_{key}"] = float(torch.nanmean(gathered.float()))
    return by_id, keep_by_id, out


def compute_process_advantages(cfg: FlowGRPOConfig, rollouts: Rollouts, batch: SampleBatch,
                               accelerator) -> tuple[Tensor, dict[str, float]]:
    """Euphonium's per-step process advantages [n, T] of this rank's samples (0 outside the
    guidance window), standardised within each group over the batch gathered from all ranks."""
    T = cfg.sampler.num_steps
    window = window_mask(T, cfg.euphonium.resolved_window(T))
    if rollouts.process_rewards is None:
        raise ValueError("euphonium's process advantages need rollouts collected with a prm")
    local = rollouts.process_rewards  # [n, T], NaN outside the window
    values, group_ids, sample_ids = local, batch.group_ids, batch.sample_ids
    if accelerator.num_processes > 1:
        device = accelerator.device
        values = accelerator.gather(local.to(device)).cpu()
        group_ids, sample_ids = (accelerator.gather(t.to(device)).cpu() for t in (batch.group_ids, batch.sample_ids))
    advantages = process_advantages(values, group_ids, window, std=cfg.adv_std, clip=cfg.adv_clip)  # [N, T]
    by_id = torch.zeros(batch.num_samples, T)
    by_id[sample_ids] = advantages
    return by_id[batch.sample_ids], {"process_reward_mean": float(values[:, window].nanmean())}


@dataclass
class Update:
    """One optimizer step of an epoch: this rank's micro-batches (local sample indices; [[0]] with
    scale 0 if the rank holds none of the step's samples), the trained steps, and the weight of
    each (sample, step) loss term, P / (samples in the update over all ranks x steps), so that
    DDP's mean over ranks is the mean over the update's (sample, step) pairs."""

    micro_batches: list[list[int]]
    steps: list[int]
    scale: float


def plan_updates(cfg: FlowGRPOConfig, keep: Tensor, batch: SampleBatch, candidate_steps: list[int], epoch: int,
                 num_processes: int) -> list[Update]:
    """The epoch's optimizer steps: for each inner epoch the kept global sample ids, in a seeded
    random order, are split into `updates_per_epoch` chunks. Chunks are global (identical on every
    rank and for any number of ranks); empty ones are skipped by all ranks alike."""
    local_index = {int(s): i for i, s in enumerate(batch.sample_ids)}  # global id -> local index
    updates = []
    for inner in range(cfg.inner_epochs):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _ORDER, inner))
        order = torch.randperm(keep.numel(), generator=gen)
        for chunk_index, chunk in enumerate(torch.tensor_split(order[keep[order]], cfg.updates_per_epoch)):
            if chunk.numel() == 0:
                continue
            steps = _trained_steps(cfg, candidate_steps, epoch, inner * cfg.updates_per_epoch + chunk_index)
            local = [local_index[s] for s in chunk.tolist() if s in local_index]
            micro_batches = [local[i : i + cfg.micro_batch_size] for i in range(0, len(local), cfg.micro_batch_size)]
            scale = num_processes / (chunk.numel() * len(steps))
            updates.append(Update(micro_batches, steps, scale) if micro_batches else Update([[0]], steps, 0.0))
    return updates


@torch.no_grad()
def recompute_old_log_probs(model, rollouts: Rollouts, updates: list[Update]) -> None:
    """Replace the sampling log-probs of the trained transitions by a no-grad re-score in the
    training micro-batches (before any update, so under the sampling weights).

    Sampling and training run the network on differently shaped batches (and possibly other
    kernels or precisions), which can make the first update's ratio differ from 1 by more than
    the clip range; re-scoring with the training shapes removes that. Costs one forward per
    trained transition. A transition trained in several inner epochs keeps its first re-score.
    """
    traj = rollouts.trajectory
    log_probs, done = traj.log_probs.clone(), torch.zeros_like(traj.log_probs, dtype=torch.bool)  # [n, T]
    for update in updates:
        if update.scale == 0:
            continue
        for mb in update.micro_batches:
            index = torch.tensor(mb)
            sub, cond = traj.select(index), rollouts.cond.index(index)
            for i in update.steps:
                new = rescore_step(model, cond, sub, i).log_prob.to(log_probs.device)  # [b]
                keep_old = done[index, i]
                log_probs[index, i] = torch.where(keep_old, log_probs[index, i], new)
                done[index, i] = True
    traj.log_probs = log_probs


# ============================================================================= evaluation


# ============================================================================= policy update


class LossStats:
    """Sample-weighted sums of the loss metrics of an epoch (all updates, and the first update,
    which runs before any optimizer step: its ratio must be exactly 1)."""

    KEYS = ("policy_loss", "approx_kl", "clip_fraction", "kl", "distill_kl")

    def __init__(self):
        self.sums = {k: 0.0 for k in self.KEYS}
        self.weight = 0.0
        self.first = {"approx_kl": 0.0, "clip_fraction": 0.0}
        self.first_weight = 0.0
        self.first_ratio_error = 0.0

    def add(self, metrics: dict[str, float], weight: float, first_update: bool) -> None:
        for key in self.KEYS:
            self.sums[key] += metrics[key] * weight
        self.weight += weight
        if first_update and weight > 0:
            for key in self.first:
                self.first[key] += metrics[key] * weight
            self.first_weight += weight
            error = max(abs(metrics["ratio_min"] - 1), abs(metrics["ratio_max"] - 1))
            self.first_ratio_error = max(self.first_ratio_error, error)

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over every rank's micro-batches (NaN if nothing was trained)."""
        values = torch.tensor([*self.sums.values(), self.weight, *self.first.values(), self.first_weight],
                              dtype=torch.float64, device=accelerator.device)
        ratio_error = torch.tensor([self.first_ratio_error], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "sum")
            ratio_error = accelerator.gather(ratio_error).max()[None]
        values = values.tolist()
        sums, weight = values[: len(self.KEYS)], values[len(self.KEYS)]
        first, first_weight = values[len(self.KEYS) + 1 : -1], values[-1]
        out = {k: s / weight if weight else math.nan for k, s in zip(self.KEYS, sums)}
        out.update({f"first_update_{k}": s / first_weight if first_weight else math.nan
                    for k, s in zip(self.first, first)})
        out["first_update_ratio_error"] = float(ratio_error[0]) if first_weight else math.nan
        out["trained_transitions"] = weight  # (sample, step) pairs trained, over all updates
        return out


def accumulate_gradients(model, policy, reference, rollouts: Rollouts, advantages: Tensor, update: Update,
                         cfg: FlowGRPOConfig, accelerator, stats: LossStats, first_update: bool,
                         process: Tensor | None = None) -> None:
    """Backward of one optimizer update's loss, micro-batch by micro-batch and step by step.

    advantages: [n] of this rank's samples. A rank with none of the update's samples runs one
    zero-weight pass (update.scale = 0) so that DDP's gradient all-reduce still matches.
    process: euphonium's per-step process advantages [n, T] (0 outside the window): their clipped
    loss is added to the outcome one; with euphonium.distill_weight, window steps also pull the
    policy mean onto the guided mean the sample was drawn from.
    """
    distill_weight = cfg.euphonium.distill_weight if cfg.variant == "euphonium" else 0.0
    scale = update.scale
    passes = [(mb, i) for mb in update.micro_batches for i in update.steps]
    for pass_index, (mb, i) in enumerate(passes):
        index = torch.tensor(mb)
        traj, cond = rollouts.trajectory.select(index), rollouts.cond.index(index)
        adv = advantages[index].to(accelerator.device)  # [b]
        last = pass_index == len(passes) - 1  # DDP all-reduces gradients on the last backward only
        with contextlib.nullcontext() if last else accelerator.no_sync(policy):
            kl = torch.zeros(len(mb), device=accelerator.device)  # [b]
            if cfg.kl_beta:
                with torch.no_grad(), reference_policy(model, reference):
                    ref = rescore_step(model, cond, traj, i)
            with transformer_as(model, policy):
                # log p of the stored transition, with grad (through the conditional CFG branch only, as the
                # reference does, unless cfg_detach_uncond is off)
                new = rescore_step(model, cond, traj, i, detach_uncond=cfg.cfg_detach_uncond)
            if process is None:
                policy_loss, metrics = clipped_policy_loss(new.log_prob, traj.log_probs[:, i], adv, cfg.clip_range)
            else:  # dual-reward GRPO: outcome + process clipped surrogates (the latter 0 outside the window)
                policy_loss, metrics = dual_clipped_loss(new.log_prob, traj.log_probs[:, i], adv,
                                                         process[index, i].to(accelerator.device), cfg.clip_range)
            if cfg.kl_beta:
                kl = flow_grpo_kl(new.mean, ref.mean, new.noise_scale)  # [b]
            distill = torch.zeros(len(mb), device=accelerator.device)  # [b]
            if distill_weight and rollouts.guided_means and i in rollouts.guided_means:
                step = float(traj.sigmas[i] - traj.sigmas[i + 1])
                distill = distillation_kl(new.mean, rollouts.guided_means[i][index].to(accelerator.device),
                                          cfg.sampler.eta, step)  # [b]
            loss = (policy_loss + cfg.kl_beta * kl.mean() + distill_weight * distill.mean()) * (len(mb) * scale)
            accelerator.backward(loss)
        metrics = {**{k: float(v) for k, v in metrics.items()}, "kl": float(kl.detach().mean()),
                   "distill_kl": float(distill.detach().mean())}
        stats.add(metrics, len(mb) if scale > 0 else 0.0, first_update)


# ============================================================================= the loop


def train(cfg: FlowGRPOConfig, model=None, reward=None) -> dict[str, Any]:
    """Run Flow-GRPO as configured; returns the last epoch's metrics (plus the final evaluation).

    model: a FlowModel adapter to train in place (default: load `cfg.model`); reward: a Reward
    (default: build `cfg.reward`). Works on one process and under `accelerate launch`.
    """
    cfg = resolve_variant_defaults(cfg)
    run = setup_run(cfg, model, reward, frozen_reference=bool(cfg.kl_beta))
    P, rank = run.num_processes, run.accelerator.process_index
    prm = build_process_reward(cfg.euphonium, run.model, run.device) if cfg.variant == "euphonium" else None
    ema = make_ema(run)

    def epoch_fn(epoch: int, global_step: int) -> tuple[dict[str, Any], int]:
        # ---- rollouts of this rank's share of groups_per_epoch x group_size samples
        start = time.perf_counter()
        batch = run.train_data.epoch_batch(epoch, cfg.groups_per_epoch, cfg.group_size, P, rank,
                                           cfg.prompts.spread_groups)
        step_types, step_params, candidate_steps = epoch_step_schedule(cfg, epoch)
        rollouts = collect_rollouts(run.model, run.reward_fn, batch, cfg, epoch, step_types, step_params, prm)
        metrics = {"time_rollout": time.perf_counter() - start}

        # ---- advantages over the batch gathered from all ranks; no-signal groups dropped
        advantages_by_id, keep, advantage_metrics = compute_advantages(cfg, rollouts, batch, run.accelerator)
        metrics.update(advantage_metrics)
        advantages = advantages_by_id[batch.sample_ids]  # [n] this rank's samples
        process = None
        if prm is not None and cfg.euphonium.process_advantages:
            process, process_metrics = compute_process_advantages(cfg, rollouts, batch, run.accelerator)
            metrics.update(process_metrics)

        # ---- policy updates: accumulate -> clip -> step -> EMA
        run.phase(f"epoch {epoch + 1}: training")
        train_start = time.perf_counter()
        updates = plan_updates(cfg, keep, batch, candidate_steps, epoch, P)
        if cfg.recompute_old_log_probs:
            recompute_old_log_probs(run.model, rollouts, updates)
        stats, grad_norms = LossStats(), []
        for update in updates:
            accumulate_gradients(run.model, run.policy, run.reference, rollouts, advantages, update, cfg,
                                 run.accelerator, stats, first_update=not grad_norms, process=process)
            grad_norms.append(optimizer_step(run))
            global_step += 1
            if ema is not None:
                ema.update(global_step)
        metrics["time_train"] = time.perf_counter() - train_start
        metrics.update(stats.reduce(run.accelerator))  # over all ranks
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        metrics["optimizer_steps"] = len(grad_norms)
        return metrics, global_step

    return run_epochs(run, epoch_fn, title=f"{cfg.variant} on {cfg.model}", summary=SUMMARY, ema=ema)


# (label, metric, format) of the epoch summary line
SUMMARY = [("kept", "kept_fraction", ".2f"),
           ("kl", "kl", ".2e"),
           ("clip", "clip_fraction", ".3f")]
