"""Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050): policy gradient on the forward process.

    align train configs/shapes/awm.yaml [key=value ...] [--resume]

One epoch (scxue/advantage_weighted_matching scripts/train_sd3_awm.py):
  prompts (K repeats each) -> rollouts with the current weights (any sampler; ODE by default), final
  latents only -> decode -> reward -> group advantages A over all ranks, clipped and scaled to
  A' = clip(A, +-adv_clip) / adv_clip * advantage_max
  -> `updates_per_epoch` optimizer steps; each accumulates, per micro-batch, at `num_train_timesteps`
     discrete times of the sampling schedule (one per stratum, shared by a prompt group):
       x_t = (1 - t) x0 + t eps; log p = -w(t) |v_theta - (eps - x0)|^2       (awm_log_prob)
       L = PPO clip(exp(log p - log p_old), A')                                 (clipped_policy_loss)
           + kl_beta |v_theta - v_ref|^2 + ema_kl_beta |v_theta - v_kl_ema|^2  (velocity_kl)
     -> clip grads -> step -> EMA (evaluation weights)
  -> KL-EMA <- d KL-EMA + (1 - d) theta, d = min(0.001 s, 0.3)
  -> log -> checkpoint.

The flow-matching error stands in for the intractable likelihood: its gradient, weighted by the
advantage, is the score-matching direction toward good samples and away from bad ones. log p_old is
the same quantity under the weights of the epoch's start: with one optimizer step per epoch (the
reference's on-policy setting) the ratio is exactly 1 and the detached log p serves; otherwise the
epoch's starting weights are kept as a snapshot and re-scored (one extra forward per micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from samplers.schedules import flow_sigmas

from .config import doc, register_config
from .ema import EMA, DecaySchedule
from .losses import AWM_WEIGHTINGS, awm_log_prob, clipped_policy_loss, velocity_kl
from .runtime import reference_policy, transformer_as
from .trainer import (EMAConfig, ForwardSamplerConfig, OnlineSettings, Run, StateBundle,
                      advantage_targets, collect_samples, fit_samples, make_ema, run_epochs, setup_run, training_times)

__all__ = ["AWMConfig", "train", "awm_schedule", "awm_step_loss"]

_ORDER, _TIMES, _TRAIN_NOISE = 4, 6, 7  # derive_seed purposes


@register_config("awm")
@dataclass
class AWMConfig(OnlineSettings):
    """Advantage Weighted Matching. Defaults are the reference's SD3.5-M GenEval recipe without CFG
    (config/dgx_awm.py: geneval_sd3_no_cfg_1node)."""

    groups_per_epoch: int = doc(48, "Prompt groups per epoch, over all ranks.")
    sampler: ForwardSamplerConfig = doc(ForwardSamplerConfig(num_steps=14, guidance=1.0), "Rollout and "
                                        "evaluation sampling (paper: 14 steps, no CFG; the training forward uses "
                                        "the same guidance).")
    share_initial_noise: bool = doc(False, "Samples of a group start from the same noise.")
    num_train_timesteps: int = doc(6, "Training times per sample and update, one per stratum of the candidate "
                                      "schedule sigmas (paper: 6).")
    timestep_fraction: float = doc(0.9, "Candidates: sigmas 1 .. int(T * fraction) - 1 of the T-step sampling "
                                        "schedule (the reference's discrete times without the first; paper 0.9).")
    weighting: Literal["uniform", "t", "t2", "huber", "ghuber"] = doc(
        "ghuber", "w(t) of the flow-matching log-likelihood (awm_log_prob; paper GenEval: ghuber).")
    ghuber_power: float = doc(0.25, "Power p of the 'ghuber' weighting (paper: 0.25).")
    clip_range: float = doc(1.0, "PPO ratio clip eps (paper GenEval: 1; base config 1e-4).")
    advantage_max: float = doc(1.0, "Advantages are scaled to clip(A) / adv_clip * advantage_max (paper: 1).")
    kl_beta: float = doc(1e-3, "Weight of |v_theta - v_ref|^2 to the base weights (paper GenEval: 1e-3).")
    ema_kl_beta: float = doc(1.0, "Weight of |v_theta - v_kl_ema|^2 to a slow EMA of the policy (paper: 1).")
    kl_ema_decay: DecaySchedule = doc(DecaySchedule(0.0, 0.001, 0, 0.3), "Decay of the KL-EMA after each epoch: "
                                      "min(0.001 s, 0.3) (paper 'linear').")
    micro_batch_size: int = doc(8, "Samples per training forward on each rank (x the training times).")
    ema: EMAConfig = doc(EMAConfig(decay=0.99, update_interval=1), "EMA of the trainable weights for evaluation "
                                                                   "(paper: 0.99 every step).")
    output_dir: str = doc("runs/awm", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")

    def __post_init__(self):
        super().__post_init__()
        if self.micro_batch_size < 1 or self.num_train_timesteps < 1:
            raise ValueError("micro_batch_size and num_train_timesteps must be >= 1")
        if self.weighting not in AWM_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}")
        for name in ("clip_range", "advantage_max", "ghuber_power"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.kl_beta < 0 or self.ema_kl_beta < 0:
            raise ValueError("kl_beta and ema_kl_beta must be >= 0")
        if len(awm_schedule(self)) < 1:
            raise ValueError("timestep_fraction leaves no candidate training time: need int(num_steps * fraction) >= 2")


def awm_schedule(cfg: AWMConfig) -> Tensor:
    """Candidate training times: sigmas 1 .. int(T * fraction) - 1 of the sampling schedule."""
    T = cfg.sampler.num_steps
    return flow_sigmas(T, shift=cfg.sampler.shift)[1 : int(T * cfg.timestep_fraction)].float()


def awm_step_loss(run: Run, x0: Tensor, cond, advantages: Tensor, t: Tensor, noise: Tensor, old: EMA | None,
                  kl_ema: EMA | None) -> tuple[Tensor, dict[str, Tensor]]:
    """AWM loss of one micro-batch at its training points, all times in one forward.

    x0: [b, *latent]; advantages: [b] (scaled); t: [k, b]; noise: [k, b, *latent]; old: the weights of the
    epoch's start (None: the detached current log-likelihood is the old one, ratio 1); kl_ema: the slow EMA
    (None: no EMA-KL)."""
    cfg, model = run.cfg, run.model
    k, b = t.shape
    x0k = x0.unsqueeze(0).expand(k, *x0.shape).reshape(k * b, *x0.shape[1:])  # [k b, *latent]
    tk = t.reshape(k * b)  # [k b]
    eps = noise.reshape(x0k.shape)
    tt = tk.view(-1, *[1] * (x0.ndim - 1))
    x_t, v_star = (1 - tt) * x0k + tt * eps, eps - x0k
    condk = cond.index(torch.arange(b, device=x0.device).repeat(k))
    guidance = cfg.sampler.guidance

    def log_prob(v: Tensor) -> Tensor:
        return awm_log_prob(v, v_star, tk, cfg.weighting, cfg.ghuber_power)  # [k b]

    with torch.no_grad():
        v_ref = v_ema = old_lp = None
        if cfg.kl_beta:
            with reference_policy(model, run.reference):
                v_ref = model.velocity(x_t, tk, condk, guidance)
        if kl_ema is not None:
            with kl_ema.swapped():
                v_ema = model.velocity(x_t, tk, condk, guidance)
        if old is not None:
            with old.swapped():
                old_lp = log_prob(model.velocity(x_t, tk, condk, guidance))
    with transformer_as(model, run.policy):
        v_theta = model.velocity(x_t, tk, condk, guidance)  # [k b, *latent]
    lp = log_prob(v_theta)
    loss, metrics = clipped_policy_loss(lp, lp.detach() if old_lp is None else old_lp, advantages.repeat(k),
                                        cfg.clip_range)
    kl = velocity_kl(v_theta, v_ref).mean() if v_ref is not None else loss.new_zeros(())
    ema_kl = velocity_kl(v_theta, v_ema).mean() if v_ema is not None else loss.new_zeros(())
    metrics.update(kl=kl.detach(), ema_kl=ema_kl.detach(), log_prob=lp.detach().mean())
    return loss + cfg.kl_beta * kl + cfg.ema_kl_beta * ema_kl, metrics


def train(cfg: AWMConfig, model=None, reward=None) -> dict[str, Any]:
    """Run AWM as configured; returns the last epoch's metrics (plus the final evaluation).

    model: a FlowModel adapter to train in place (default: load `cfg.model`); reward: a Reward (default:
    build `cfg.reward`). Works on one process and under `accelerate launch`."""
    run = setup_run(cfg, model, reward, frozen_reference=bool(cfg.kl_beta))
    on_policy = cfg.updates_per_epoch * cfg.inner_epochs == 1
    old = None if on_policy else EMA(run.trainable.items(), decay=0.0, warmup=False)  # weights at the epoch's start
    kl_ema = EMA(run.trainable.items(), decay=0.0, warmup=False) if cfg.ema_kl_beta else None
    ema = make_ema(run)
    schedule = awm_schedule(cfg)
    P, rank = run.num_processes, run.accelerator.process_index

    def epoch_fn(epoch: int, global_step: int) -> tuple[dict[str, Any], int]:
        batch = run.train_data.epoch_batch(epoch, cfg.groups_per_epoch, cfg.group_size, P, rank,
                                           cfg.prompts.spread_groups)
        samples = collect_samples(run.model, run.reward_fn, batch, cfg.sampler, cfg.seed, epoch,
                                  share_noise=cfg.share_initial_noise)
        advantages, metrics = advantage_targets(cfg, samples.rewards, samples.extras, batch, run.accelerator)
        if old is not None:
            old.update(global_step)  # decay 0: a copy of the weights at the epoch's start
        run.phase(f"epoch {epoch + 1}: training")

        def times(mb: list[int], inner: int) -> Tensor:
            return training_times(cfg.num_train_timesteps, schedule, 1.0, cfg.seed, batch, mb, epoch, inner, _TIMES)

        def step_loss(x0, cond, scaled, t, noise):
            return awm_step_loss(run, x0, cond, scaled, t, noise, old, kl_ema)

        scaled = advantages.clamp(-cfg.adv_clip, cfg.adv_clip) / cfg.adv_clip * cfg.advantage_max  # [n]
        fitted, global_step = fit_samples(run, samples, batch, epoch, global_step, times, step_loss, scaled, ema)
        metrics.update(fitted)
        if kl_ema is not None:
            kl_ema.decay = cfg.kl_ema_decay(global_step)
            kl_ema.update(global_step)
            metrics["kl_ema_decay"] = kl_ema.decay
        return metrics, global_step

    return run_epochs(run, epoch_fn, title=f"awm on {cfg.model}", summary=SUMMARY, ema=ema,
                      state=StateBundle(kl_ema=kl_ema, ema=ema))


# (label, metric, format) of the epoch summary line
SUMMARY = [("loss", "policy_loss", ".3g"),
           ("kl", "kl", ".2e"),
           ("ema-kl", "ema_kl", ".2e")]
