"""CRD: centred reward distillation (Zhu et al. 2026, arXiv 2603.14128), forward-process RL for flow models.

    align train configs/shapes/crd.yaml [key=value ...] [--resume]

One epoch (docs ALGORITHMS.md section 4; DiffusionNFT's forward-process loop):
  prompts (K repeats, whole groups on each rank) -> encode -> rollouts with the SAMPLER snapshot
  (deterministic ODE by default, any step of samplers.steps), only the final latents kept -> decode
  -> reward -> group advantages A over the batch gathered from all ranks -> targets r~ = clip(A)/10 + 0.5
  -> `updates_per_epoch` optimizer steps; each accumulates, per micro-batch of whole prompt groups and
     per stratified training time t (no log-probs, no trajectories):
       x_t = (1 - t) x0 + t eps, v* = eps - x0 (the same x_t for every network)
       v_old (old snapshot), v_ref_cfg (pretrained weights, CFG scale w), v_theta (trained, with grad)
       L = L_CRD(implicit reward R centred within each prompt group vs r~ centred likewise)
           + reward-adaptive KL of v_theta to v_ref_cfg
     -> clip grads -> step
  -> old <- EMA(theta, d_old(s)), sampler <- EMA(theta, d_sampler(s))   (s = optimizer steps so far)
  -> log -> checkpoint.

Everything random (prompts, rollout noise, group order, training times and noise) is seeded from
(seed, epoch, ...), so a resumed run replays the epochs an uninterrupted run would have, and P
ranks see the same global batch as one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .advantages import GroupIds
from .config import doc, register_config
from .data import PromptConfig, SampleBatch
from .ema import EMA, DecaySchedule
from .losses import crd_implicit_reward, crd_kl, crd_loss, crd_target
from .runtime import reference_policy, transformer_as
from .trainer import (ForwardSamplerConfig, OnlineSettings, OptimizerConfig, Run, Samples, Update, WeightedMeans,
                      advantage_targets, collect_samples, optimizer_step, run_epochs, setup_run, training_noise,
                      training_times)
from .trainer import plan_updates as plan_core_updates
from .trainer import stratified_times as stratified_timesteps

__all__ = ["CRDConfig", "DecaySchedule", "Snapshots", "stratified_timesteps", "noised", "crd_objective",
           "plan_updates", "train"]

# Purposes for derive_seed(seed, epoch, PURPOSE, ...): independent streams per use.
_ORDER, _TIMESTEPS, _TRAIN_NOISE = 4, 6, 7


# ============================================================================= config


@register_config("crd")
@dataclass
class CRDConfig(OnlineSettings):
    """Centred reward distillation. Defaults are the paper's (SD3.5-M, LoRA 32, 512 px)."""

    prompts: PromptConfig = doc(PromptConfig(), "Training and held-out prompts (spread_groups must stay false: "
                                                "centring needs whole groups on a rank).")
    sampler: ForwardSamplerConfig = doc(ForwardSamplerConfig(), "Rollout and evaluation sampling (paper: CFG-free "
                                        "rollouts and v_theta / v_old forwards, guidance 1; the KL anchor brings the "
                                        "guided model's behaviour in).")
    share_initial_noise: bool = doc(False, "Samples of a group start from the same noise (only useful with an "
                                           "SDE step_type).")
    num_train_timesteps: int = doc(20, "Training times t per sample and update, one in each of this many equal "
                                       "strata of [0, 1), then shifted (paper: 20).")
    timestep_shift: float = doc(3.0, "Shift s of the training times t' = s t / (1 + (s - 1) t) (paper: 3).")
    beta_crd: float = doc(1.0, "beta of L_CRD = mean (beta (R - R_bar) - (r~ - r_bar))^2 * 5 / beta.")
    weight_floor: float = doc(1e-5, "Floor of the adaptive weights mean|v - v*| of the implicit reward.")
    adv_std: Literal["global", "group", "none"] = doc("global", "Advantage std: batch ('global'), per prompt "
                                                                "('group') or none; A is then clipped.")
    beta_kl: float = doc(0.1, "KL weight beta_KL to the CFG-guided pretrained model (0: no KL, no reference "
                              "forward).")
    kl_floor: float = doc(1e-4, "Smallest KL coefficient (r~ = 0): coef = beta_KL (m + r~ (1 - m)), m = "
                                "kl_floor / beta_KL.")
    kl_guidance: float = doc(4.5, "CFG scale w of the KL anchor v_ref(0) + w (v_ref(c) - v_ref(0)).")
    old_decay: DecaySchedule = doc(DecaySchedule(0.25, 0.005, 0), "Decay of the old snapshot (the implicit "
                                   "reward's moving reference): min(0.25 + 0.005 s, 0.999).")
    sampler_decay: DecaySchedule = doc(DecaySchedule(0.0, 0.0075, 75), "Decay of the sampling snapshot: 0 for "
                                       "s < 75, then min(0.0075 (s - 75), 0.999).")
    optimizer: OptimizerConfig = doc(OptimizerConfig(), "AdamW settings and gradient clipping (paper lr 3e-4).")
    updates_per_epoch: int = doc(2, "Optimizer steps per pass over the epoch's groups.")
    micro_batch_groups: int = doc(1, "Whole prompt groups per training forward (centring needs the group).")
    output_dir: str = doc("runs/crd", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_train_timesteps", "micro_batch_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.beta_crd <= 0 or self.timestep_shift <= 0:
            raise ValueError("beta_crd and timestep_shift must be > 0")
        if self.beta_kl < 0 or (self.beta_kl > 0 and not 0 < self.kl_floor <= self.beta_kl):
            raise ValueError("need beta_kl >= 0 and, with a KL, 0 < kl_floor <= beta_kl")
        if self.prompts.spread_groups:
            raise ValueError("prompts.spread_groups must be false: CRD centres within groups held by one rank")


# ============================================================================= pure pieces


def noised(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Forward process: (x_t, v*) with x_t = (1 - t) x0 + t eps and v* = eps - x0.

    x0, noise: [B, *latent]; t: [B] in [0, 1]."""
    t = t.to(x0).reshape(-1, *[1] * (x0.ndim - 1))  # [B, 1, ...]
    return (1 - t) * x0 + t * noise, noise - x0


def crd_objective(v_theta: Tensor, v_old: Tensor, v_ref_cfg: Tensor | None, v_star: Tensor, targets: Tensor,
                  group_ids: GroupIds, cfg: CRDConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_CRD + L_KL of one training time for a micro-batch of whole groups (ALGORITHMS.md sec. 4).

    v_*: [b, *latent] at the same x_t (v_theta with grad; v_ref_cfg None without KL); targets r~: [b];
    group_ids: [b]. Metrics: crd_loss, kl_loss, kl_coef, and crd_loss's implicit-reward statistics.
    """
    R = crd_implicit_reward(v_theta, v_old, v_star, floor=cfg.weight_floor)  # [b]
    loss, metrics = crd_loss(R, targets, group_ids, beta_crd=cfg.beta_crd)
    if v_ref_cfg is None:
        kl, coef = loss.new_zeros(()), torch.zeros_like(targets, dtype=torch.float32)
    else:
        kl, coef = crd_kl(v_theta, v_ref_cfg, targets, beta_kl=cfg.beta_kl, floor=cfg.kl_floor)
    metrics.update(kl_loss=kl.detach().float(), kl_coef=coef.mean())
    return loss + kl, metrics


class Snapshots:
    """CRD's decoupled EMA snapshots of the trained weights, both starting at the initial weights.

    old:     the moving reference v_old of the implicit reward;
    sampler: the weights that draw the rollouts.
    `advance(s)` runs once per epoch after its optimizer steps: snapshot <- d snapshot + (1 - d) theta
    with d from each snapshot's DecaySchedule at the global optimizer step s.
    """

    def __init__(self, named_parameters: dict[str, torch.nn.Parameter], old: DecaySchedule, sampler: DecaySchedule):
        self.schedules = {"old": old, "sampler": sampler}
        self.ema = {name: EMA(named_parameters.items(), decay=0.0, warmup=False) for name in self.schedules}

    @property
    def old(self) -> EMA:
        return self.ema["old"]

    @property
    def sampler(self) -> EMA:
        return self.ema["sampler"]

    def advance(self, step: int) -> dict[str, float]:
        """Blend the current weights into both snapshots; returns {"old_decay", "sampler_decay"}."""
        decays = {}
        for name, ema in self.ema.items():
            ema.decay = self.schedules[name](step)
            ema.update(step)  # update_interval 1: always
            decays[f"{name}_decay"] = ema.decay
        return decays

    def state_dict(self) -> dict:
        return {name: ema.state_dict() for name, ema in self.ema.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, ema in self.ema.items():
            ema.load_state_dict(state[name])


# ============================================================================= rollouts and targets


def _max_guidance(cfg: CRDConfig) -> float:
    """Largest CFG scale any forward of the epoch uses (> 1: encode the negative prompt too)."""
    return max(cfg.sampler.guidance, cfg.kl_guidance if cfg.beta_kl else 1.0)


def plan_updates(cfg: CRDConfig, batch: SampleBatch, epoch: int, num_processes: int) -> list[Update]:
    """The core's plan of whole prompt groups (centring needs the group on one rank and in one
    micro-batch); each (sample, training time) term of a step weighs its scale / num_train_timesteps."""
    return [dataclasses.replace(u, scale=u.scale / cfg.num_train_timesteps)
            for u in plan_core_updates(cfg, batch, epoch, num_processes, _ORDER, whole_groups=True)]


def accumulate_gradients(run: Run, snapshots: Snapshots, samples: Samples, targets: Tensor, batch: SampleBatch,
                         update: Update, epoch: int, stats: WeightedMeans) -> None:
    """Backward of one optimizer step's loss, micro-batch by micro-batch and training time by time."""
    cfg, model, device = run.cfg, run.model, run.device
    guidance = cfg.sampler.guidance
    num_times = cfg.num_train_timesteps if update.scale > 0 else 1
    passes_left = len(update.micro_batches) * num_times
    for mb in update.micro_batches:
        index = torch.tensor(mb)
        x0, cond = samples.latents[index].to(device), samples.cond.index(index.to(samples.latents.device))
        t = training_times(cfg.num_train_timesteps, None, cfg.timestep_shift, cfg.seed, batch, mb, epoch,
                           update.inner, _TIMESTEPS)  # [T, b]
        noise = training_noise(cfg.seed, batch, mb, epoch, update.inner, cfg.num_train_timesteps, x0.shape[1:],
                               _TRAIN_NOISE)  # [T, b, *latent]
        points = [noised(x0, noise[k].to(device), t[k].to(device)) for k in range(num_times)]  # (x_t, v*)
        with torch.no_grad():  # frozen networks first: one snapshot swap per micro-batch
            with snapshots.old.swapped():
                v_old = [model.velocity(x_t, t[k].to(device), cond, guidance) for k, (x_t, _) in enumerate(points)]
            v_ref = [None] * num_times
            if cfg.beta_kl:
                with reference_policy(model, run.reference):
                    v_ref = [model.velocity(x_t, t[k].to(device), cond, cfg.kl_guidance)
                             for k, (x_t, _) in enumerate(points)]
        for k, (x_t, v_star) in enumerate(points):
            passes_left -= 1  # DDP all-reduces gradients on the last backward only
            with contextlib.nullcontext() if passes_left == 0 else run.accelerator.no_sync(run.policy):
                with transformer_as(model, run.policy):
                    v_theta = model.velocity(x_t, t[k].to(device), cond, guidance)  # [b, *latent]
                loss, metrics = crd_objective(v_theta, v_old[k], v_ref[k], v_star, targets[index].to(device),
                                              batch.group_ids[index], cfg)
                run.accelerator.backward(loss * (len(mb) * update.scale))
            stats.add(metrics, len(mb) if update.scale > 0 else 0.0)


# ============================================================================= the loop


def train(cfg: CRDConfig, model=None, reward=None) -> dict[str, Any]:
    """Run CRD as configured; returns the last epoch's metrics (plus the final evaluation).

    model: a FlowModel adapter to train in place (default: load `cfg.model`); reward: a Reward (default:
    build `cfg.reward`). Works on one process and under `accelerate launch`.
    """
    run = setup_run(cfg, model, reward, frozen_reference=bool(cfg.beta_kl))
    P, rank = run.num_processes, run.accelerator.process_index
    if cfg.groups_per_epoch % P:
        raise ValueError(f"groups_per_epoch={cfg.groups_per_epoch} must be a multiple of the {P} processes "
                         "(each rank holds whole prompt groups)")
    snapshots = Snapshots(run.trainable, cfg.old_decay, cfg.sampler_decay)  # saved in the checkpoint's "ema" slot

    def epoch_fn(epoch: int, global_step: int) -> tuple[dict[str, Any], int]:
        start = time.perf_counter()
        batch = run.train_data.epoch_batch(epoch, cfg.groups_per_epoch, cfg.group_size, P, rank)
        with snapshots.sampler.swapped():  # rollouts from the sampling snapshot
            samples = collect_samples(run.model, run.reward_fn, batch, cfg.sampler, cfg.seed, epoch,
                                      share_noise=cfg.share_initial_noise, encode_guidance=_max_guidance(cfg))
        advantages, metrics = advantage_targets(cfg, samples.rewards, samples.extras, batch, run.accelerator)
        targets = crd_target(advantages, clip=cfg.adv_clip)  # r~ [n]
        metrics["time_rollout"] = time.perf_counter() - start
        run.phase(f"epoch {epoch + 1}: training")
        stats, norms = WeightedMeans(), []
        for update in plan_updates(cfg, batch, epoch, P):
            accumulate_gradients(run, snapshots, samples, targets, batch, update, epoch, stats)
            norms.append(optimizer_step(run))
            global_step += 1
        metrics.update(snapshots.advance(global_step))  # old and sampler snapshots, once per epoch
        metrics.update(stats.reduce(run.accelerator))
        metrics.update(grad_norm=sum(norms) / len(norms) if norms else 0.0, optimizer_steps=len(norms),
                       time_train=time.perf_counter() - start - metrics["time_rollout"])
        return metrics, global_step

    return run_epochs(run, epoch_fn, title=f"crd on {cfg.model}", summary=SUMMARY, state=snapshots)


SUMMARY = [("crd", "crd_loss", ".3g"), ("kl", "kl_loss", ".2e")]  # (label, metric, format) of the epoch line
