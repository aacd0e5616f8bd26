"""DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117): online RL on the forward process, negative-aware.

    align train configs/shapes/nft.yaml [key=value ...] [--resume]

One epoch (NVlabs/DiffusionNFT scripts/train_nft_sd3.py):
  prompts (K repeats each) -> rollouts with the OLD policy (deterministic ODE, CFG-free by default),
  final latents only -> decode -> reward -> group advantages A over all ranks -> r = clip(A)/10 + 1/2
  -> `updates_per_epoch` optimizer steps; each accumulates, per micro-batch and training time t
     (the sampling schedule's sigmas, a fresh eps each):
       x_t = (1 - t) x0 + t eps; v_old (old policy), v_ref (base weights, for the KL), v_theta (grad)
       L = nft_loss(v_theta, v_old, r, beta)  +  kl_beta * |v_theta - v_ref|^2      (align/losses.py)
     -> clip grads -> step -> EMA (evaluation weights)
  -> old <- d old + (1 - d) theta, d = min(0.001 s, 0.5) (s = optimizer steps so far)
  -> log -> checkpoint.

NFT needs no likelihoods, no SDE and no CFG at training time: any sampler works, and a sample's
loss only asks how far the new velocity moved from the old one on the forward process. Its loss is
contrastive: at theta = old a sample with r = 1/2 contributes no gradient, so an average sample
does not pull the model toward its own outputs (the drift of plain self-training).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from samplers.schedules import flow_sigmas

from .config import doc, register_config
from .ema import EMA, DecaySchedule
from .losses import crd_target, nft_loss, velocity_kl
from .runtime import reference_policy, transformer_as
from .trainer import (EMAConfig, ForwardSamplerConfig, OnlineSettings, Run, StateBundle,
                      advantage_targets, collect_samples, fit_samples, make_ema, run_epochs, setup_run, training_times)

__all__ = ["NFTConfig", "train", "nft_step_loss"]

_ORDER, _TIMES, _TRAIN_NOISE = 4, 6, 7  # derive_seed purposes


@register_config("nft")
@dataclass
class NFTConfig(OnlineSettings):
    """DiffusionNFT. Defaults are the reference's SD3.5-M GenEval recipe (config/nft.py: sd3_geneval)."""

    sampler: ForwardSamplerConfig = doc(ForwardSamplerConfig(guidance=1.0), "Rollout and evaluation sampling "
                                        "(paper: CFG-free deterministic rollouts, guidance 1; the training "
                                        "forward uses the same guidance).")
    share_initial_noise: bool = doc(False, "Samples of a group start from the same noise.")
    sample_with_old: bool = doc(True, "Draw rollouts with the old policy (the reference) rather than the "
                                      "current weights.")
    beta: float = doc(1.0, "NFT's beta: the implicit policies v± = old ± beta (theta - old) (paper GenEval: 1).")
    loss_scale: float = doc(5.0, "Factor of the policy loss (the reference's adv_clip_max).")
    kl_beta: float = doc(1e-4, "Weight of the v-space KL |v_theta - v_ref|^2 to the base weights (paper: 1e-4; "
                               "0 disables it and the reference forward).")
    train_timesteps: Literal["schedule", "stratified"] = doc(
        "schedule", "Training times: sigmas of the sampling schedule (reference) or stratified shifted times.")
    timestep_fraction: float = doc(0.99, "schedule: the first int(T * fraction) sigmas of the T-step sampling "
                                         "schedule are candidates (paper: 0.99).")
    num_train_timesteps: int | None = doc(None, "Times per sample and update. schedule: null = every candidate "
                                                "(paper), else one per stratum; stratified: null = 10.")
    timestep_shift: float = doc(3.0, "stratified: shift s of t' = s t / (1 + (s - 1) t).")
    old_decay: DecaySchedule = doc(DecaySchedule(0.0, 0.001, 0, 0.5), "Decay of the old policy after each "
                                   "epoch: min(0.001 s, 0.5) (paper decay_type 1).")
    micro_batch_size: int = doc(8, "Samples per training forward on each rank (x the training times).")
    ema: EMAConfig = doc(EMAConfig(decay=0.9, update_interval=1), "EMA of the trainable weights for evaluation "
                                                                  "(paper: 0.9 every step).")
    output_dir: str = doc("runs/nft", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")

    def __post_init__(self):
        super().__post_init__()
        if self.micro_batch_size < 1 or (self.num_train_timesteps is not None and self.num_train_timesteps < 1):
            raise ValueError("micro_batch_size and num_train_timesteps must be >= 1 (num_train_timesteps may be null)")
        if self.beta <= 0 or self.loss_scale <= 0 or self.timestep_shift <= 0:
            raise ValueError("beta, loss_scale and timestep_shift must be > 0")
        if self.kl_beta < 0:
            raise ValueError("kl_beta must be >= 0")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError("timestep_fraction must be in (0, 1]")
        if self.train_timesteps == "schedule" and int(self.sampler.num_steps * self.timestep_fraction) < 1:
            raise ValueError("int(sampler.num_steps * timestep_fraction) must be >= 1")


def nft_schedule(cfg: NFTConfig) -> Tensor | None:
    """The candidate training times of the 'schedule' mode (the first int(T * fraction) sampling sigmas),
    or None for stratified times."""
    if cfg.train_timesteps != "schedule":
        return None
    count = int(cfg.sampler.num_steps * cfg.timestep_fraction)
    return flow_sigmas(cfg.sampler.num_steps, shift=cfg.sampler.shift)[:count].float()


def nft_step_loss(run: Run, old: EMA, x0: Tensor, cond, r: Tensor, t: Tensor, noise: Tensor
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """NFT loss of one micro-batch at its training points, all times in one forward.

    x0: [b, *latent]; r: [b]; t: [k, b]; noise: [k, b, *latent]. Returns (loss averaged over the k b
    points, metrics)."""
    cfg, model = run.cfg, run.model
    k, b = t.shape
    x0k = x0.unsqueeze(0).expand(k, *x0.shape).reshape(k * b, *x0.shape[1:])  # [k b, *latent]
    tk = t.reshape(k * b)  # [k b]
    x_t = (1 - tk.view(-1, *[1] * (x0.ndim - 1))) * x0k + tk.view(-1, *[1] * (x0.ndim - 1)) * noise.reshape(x0k.shape)
    condk = cond.index(torch.arange(b, device=x0.device).repeat(k))
    guidance = cfg.sampler.guidance
    with torch.no_grad():
        with old.swapped():
            v_old = model.velocity(x_t, tk, condk, guidance)
        v_ref = None
        if cfg.kl_beta:
            with reference_policy(model, run.reference):
                v_ref = model.velocity(x_t, tk, condk, guidance)
    with transformer_as(model, run.policy):
        v_theta = model.velocity(x_t, tk, condk, guidance)  # [k b, *latent]
    loss, metrics = nft_loss(v_theta, v_old, x_t, x0k, tk, r.repeat(k), beta=cfg.beta, scale=cfg.loss_scale)
    kl = velocity_kl(v_theta, v_ref).mean() if v_ref is not None else loss.new_zeros(())
    metrics["kl"] = kl.detach()
    return loss + cfg.kl_beta * kl, metrics


def train(cfg: NFTConfig, model=None, reward=None) -> dict[str, Any]:
    """Run DiffusionNFT as configured; returns the last epoch's metrics (plus the final evaluation).

    model: a FlowModel adapter to train in place (default: load `cfg.model`); reward: a Reward (default:
    build `cfg.reward`). Works on one process and under `accelerate launch`."""
    run = setup_run(cfg, model, reward, frozen_reference=bool(cfg.kl_beta))
    old = EMA(run.trainable.items(), decay=0.0, warmup=False)  # the old policy, starts at the initial weights
    ema = make_ema(run)
    schedule = nft_schedule(cfg)
    count = cfg.num_train_timesteps  # schedule: None = every candidate
    if schedule is None and count is None:
        count = 10  # stratified times' default
    P, rank = run.num_processes, run.accelerator.process_index

    def epoch_fn(epoch: int, global_step: int) -> tuple[dict[str, Any], int]:
        batch = run.train_data.epoch_batch(epoch, cfg.groups_per_epoch, cfg.group_size, P, rank,
                                           cfg.prompts.spread_groups)
        with old.swapped() if cfg.sample_with_old else contextlib.nullcontext():
            samples = collect_samples(run.model, run.reward_fn, batch, cfg.sampler, cfg.seed, epoch,
                                      share_noise=cfg.share_initial_noise)
        advantages, metrics = advantage_targets(cfg, samples.rewards, samples.extras, batch, run.accelerator)
        run.phase(f"epoch {epoch + 1}: training")

        def times(mb: list[int], inner: int) -> Tensor:
            return training_times(count, schedule, cfg.timestep_shift, cfg.seed, batch, mb, epoch, inner, _TIMES)

        def step_loss(x0, cond, r, t, noise):
            return nft_step_loss(run, old, x0, cond, r, t, noise)

        fitted, global_step = fit_samples(run, samples, batch, epoch, global_step, times, step_loss,
                                          crd_target(advantages, clip=cfg.adv_clip), ema)  # r in [0, 1]
        old.decay = cfg.old_decay(global_step)
        old.update(global_step)  # interval 1: old <- d old + (1 - d) theta
        return {**metrics, **fitted, "old_decay": old.decay}, global_step

    return run_epochs(run, epoch_fn, title=f"nft on {cfg.model}", summary=SUMMARY, ema=ema,
                      state=StateBundle(old=old, ema=ema))


SUMMARY = [("nft", "nft_loss", ".3g"), ("kl", "kl", ".2e")]  # (label, metric, format) of the epoch line
