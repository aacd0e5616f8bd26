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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from samplers.rollout import rollout
from samplers.schedules import flow_sigmas, shift_sigmas

from .advantages import GroupIds, distributed_group_advantages
from .checkpoint import prepare_output_dir
from .config import doc, register_config, save_config
from .data import PromptConfig, PromptDataset, SampleBatch, derive_seed, load_prompt_items
from .ema import EMA
from .flow_grpo import (OptimizerConfig, _encode, _export_final, _initial_noise, _restore, _reward_name, _save,
                        evaluate)
from .losses import crd_implicit_reward, crd_kl, crd_loss, crd_target
from .metrics import MetricsLogger, TrainingProgress, write_summary
from .runtime import (WEIGHT_DTYPES, LoraSettings, configure_transformer, load_flow_model, make_accelerator,
                      reference_policy, setup_trainable, transformer_as)

__all__ = ["CRDConfig", "CRDSamplerConfig", "DecaySchedule", "Snapshots", "stratified_timesteps", "noised",
           "crd_objective", "collect_samples", "plan_updates", "train"]

# Purposes for derive_seed(seed, epoch, PURPOSE, ...): independent streams per use.
_STEP_NOISE, _ORDER, _TIMESTEPS, _TRAIN_NOISE = 2, 4, 6, 7


# ============================================================================= config


@dataclass
class DecaySchedule:
    """EMA decay of a snapshot at optimizer step s: 0 before `delay`, then min(start + rate (s - delay), cap)."""

    start: float = doc(0.25, "Decay at s = delay.")
    rate: float = doc(0.005, "Increase of the decay per optimizer step.")
    delay: int = doc(0, "Optimizer steps during which the decay is 0 (the snapshot follows the weights).")
    cap: float = doc(0.999, "Upper bound of the decay (< 1).")

    def __post_init__(self):
        if self.start < 0 or self.rate < 0 or self.delay < 0 or not 0 <= self.cap < 1:
            raise ValueError("decay schedule needs start, rate, delay >= 0 and 0 <= cap < 1")

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.delay else min(self.start + self.rate * (step - self.delay), self.cap)


@dataclass
class CRDSamplerConfig:
    """How training rollouts and held-out evaluations are sampled."""

    num_steps: int = doc(10, "Denoising steps of training rollouts.")
    eval_num_steps: int = doc(40, "Steps of the deterministic ODE sampler for held-out evaluation.")
    step_type: str = doc("ode", "Step of the training rollouts, any name in samplers.steps.STEPS ('ode', "
                                "'flow_grpo_sde', 'dance_sde', 'cps'): CRD trains on final samples only, so "
                                "any sampler works.")
    step_params: dict[str, float] = doc({}, "Parameters of a stochastic step, e.g. {noise_level: 0.7}.")
    guidance: float = doc(1.0, "CFG scale of rollouts and of the v_theta / v_old forwards (paper: 1, CFG-free; "
                               "the KL anchor brings the guided model's behaviour in).")
    eval_guidance: float | None = doc(None, "CFG scale for evaluation; null = `guidance`.")
    shift: float = doc(3.0, "Timestep shift of the sampling sigma schedule.")
    negative_prompt: str = doc("", "Negative prompt of CFG (rollouts with guidance > 1 and the KL reference).")
    batch_size: int = doc(8, "Rollouts per forward batch on each rank (also the evaluation batch).")
    resolution: int | None = doc(None, "Square image side in px (null: the model's native size).")

    def __post_init__(self):
        from samplers.steps import STEPS

        if self.num_steps < 1 or self.eval_num_steps < 1 or self.batch_size < 1:
            raise ValueError("sampler.num_steps, eval_num_steps and batch_size must be >= 1")
        if self.step_type not in STEPS:
            raise ValueError(f"sampler.step_type must be one of {sorted(STEPS)}, got {self.step_type!r}")


@register_config("crd")
@dataclass
class CRDConfig:
    """Centred reward distillation. Defaults are the paper's (SD3.5-M, LoRA 32, 512 px)."""

    model: str = doc("shapesworld", "'shapesworld' (built-in), 'toy:test' (tiny random model), a diffusers folder "
                                    "or a hub id.")
    lora: LoraSettings = doc(LoraSettings(), "LoRA settings (rank 0 = full fine-tune; the reference is then a "
                                             "frozen copy and each snapshot a full fp32 copy).")
    reward: str | dict = doc("shapes_geneval", "Reward spec for rewards.build_reward (name, 'pkg.module:attr' "
                                               "or a dict with arguments).")
    prompts: PromptConfig = doc(PromptConfig(), "Training and held-out prompts (spread_groups must stay false: "
                                                "centring needs whole groups on a rank).")
    monitor_rewards: list[str | dict] = doc(["shapes_quality"], "Rewards scored on held-out samples and never "
                                                                "optimised (eval_<name>_mean).")
    group_size: int = doc(24, "Samples per prompt K (a group).")
    groups_per_epoch: int = doc(48, "Prompt groups per epoch, over all ranks (a multiple of the rank count).")
    num_epochs: int = doc(100, "Epochs to train (a resumed run continues up to this number).")
    sampler: CRDSamplerConfig = doc(CRDSamplerConfig(), "Rollout and evaluation sampling.")
    share_initial_noise: bool = doc(False, "Samples of a group start from the same noise (only useful with an "
                                           "SDE step_type).")
    num_train_timesteps: int = doc(20, "Training times t per sample and update, one in each of this many equal "
                                       "strata of [0, 1), then shifted (paper: 20).")
    timestep_shift: float = doc(3.0, "Shift s of the training times t' = s t / (1 + (s - 1) t) (paper: 3).")
    beta_crd: float = doc(1.0, "beta of L_CRD = mean (beta (R - R_bar) - (r~ - r_bar))^2 * 5 / beta.")
    weight_floor: float = doc(1e-5, "Floor of the adaptive weights mean|v - v*| of the implicit reward.")
    adv_std: Literal["global", "group", "none"] = doc("global", "Advantage std: batch ('global'), per prompt "
                                                                "('group') or none; A is then clipped.")
    adv_eps: float = doc(1e-4, "Added to the advantage std.")
    adv_clip: float = doc(5.0, "Clip A to +-adv_clip; the target is r~ = A / (2 adv_clip) + 0.5 in [0, 1].")
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
    inner_epochs: int = doc(1, "Passes over the epoch's samples.")
    micro_batch_groups: int = doc(1, "Whole prompt groups per training forward (centring needs the group).")
    seed: int = doc(0, "Seed of everything random.")
    output_dir: str = doc("runs/crd", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")
    checkpoint_every: int = doc(10, "Save a checkpoint every N epochs (and at the end); 0 = end only.")
    keep_checkpoints: int = doc(2, "Keep the newest N checkpoints (0 = keep all).")
    eval_grid_size: int = doc(24, "Held-out samples saved as a captioned grid per evaluation; 0 = none.")
    eval_every: int = doc(10, "Evaluate held-out prompts before epochs 0, N, 2N... and after training; 0 = never.")
    resume: bool = doc(False, "Continue from the newest checkpoint in output_dir (if any).")
    overwrite: bool = doc(False, "Delete a previous run in output_dir and start again; without it (or resume) a "
                                 "fresh start into a folder holding checkpoints or metrics is refused.")
    mixed_precision: Literal["no", "fp16", "bf16"] = doc("no", "Frozen weights' dtype on CUDA ('no' on CPU).")
    gradient_checkpointing: bool = doc(False, "Recompute transformer activations in backward (saves memory).")
    attention_backend: Literal["sdpa", "xformers"] = doc("sdpa", "'sdpa' or 'xformers' (CUDA only).")
    find_unused_parameters: bool = doc(False, "DDP find_unused_parameters.")
    wandb_project: str | None = doc(None, "Also log to this Weights & Biases project.")
    quiet: bool = doc(False, "No per-epoch summary line on the console.")

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (centring compares the samples of a group)")
        for name in ("groups_per_epoch", "num_epochs", "num_train_timesteps", "updates_per_epoch", "inner_epochs",
                     "micro_batch_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.beta_crd <= 0 or self.timestep_shift <= 0 or self.adv_clip <= 0:
            raise ValueError("beta_crd, timestep_shift and adv_clip must be > 0")
        if self.beta_kl < 0 or (self.beta_kl > 0 and not 0 < self.kl_floor <= self.beta_kl):
            raise ValueError("need beta_kl >= 0 and, with a KL, 0 < kl_floor <= beta_kl")
        if self.prompts.spread_groups:
            raise ValueError("prompts.spread_groups must be false: CRD centres within groups held by one rank")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("checkpoint_every, eval_every and keep_checkpoints must be >= 0")


# ============================================================================= pure pieces


def stratified_timesteps(count: int, shift: float, generator: torch.Generator | None = None) -> Tensor:
    """[count] training times: u_k uniform in [k / count, (k + 1) / count), shifted to s u / (1 + (s - 1) u)."""
    u = (torch.arange(count, dtype=torch.float32) + torch.rand(count, generator=generator)) / count
    return shift_sigmas(u, shift)


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


@dataclass
class Samples:
    """This rank's samples of an epoch: final latents only, their conditioning and rewards."""

    latents: Tensor  # [n, *latent] fp32 clean samples x0
    cond: Any  # conditioning of the n samples, with negatives when CFG is needed (SD3Cond)
    rewards: Tensor  # [n] fp32, NaN = not scored
    extras: dict[str, Tensor]  # per-sample reward extras [n] (e.g. "strict")


def _max_guidance(cfg: CRDConfig) -> float:
    """Largest CFG scale any forward of the epoch uses (> 1: encode the negative prompt too)."""
    return max(cfg.sampler.guidance, cfg.kl_guidance if cfg.beta_kl else 1.0)


@torch.no_grad()
def collect_samples(model, reward_fn, batch: SampleBatch, cfg: CRDConfig, epoch: int) -> Samples:
    """Sample this rank's share with the model's current weights, keep the final latents, score them."""
    s = cfg.sampler
    device = model.device
    sigmas = flow_sigmas(s.num_steps, shift=s.shift, device=device)
    cond = _encode(model, batch.prompts, _max_guidance(cfg), s.negative_prompt)
    noise = _initial_noise(cfg, batch, epoch, model.latent_shape(s.resolution, s.resolution),
                           cfg.share_initial_noise).to(device)
    finals, rewards, extras = [], [], {}
    for start in range(0, len(batch), s.batch_size):
        idx = slice(start, start + s.batch_size)
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(cfg.seed, epoch, _STEP_NOISE, int(batch.sample_ids[start])))
        final = rollout(model, cond.index(idx), sigmas, step_types=s.step_type, step_params=dict(s.step_params),
                        guidance=s.guidance, initial_noise=noise[idx], generator=generator).final
        images = model.decode(final)
        out = reward_fn(images, batch.prompts[idx], metadata=batch.metadata[idx], group_ids=batch.group_ids[idx])
        finals.append(final)
        rewards.append(out.scores.float().cpu())
        for key, value in out.extras.items():
            if isinstance(value, Tensor) and value.ndim == 1 and value.shape[0] == images.shape[0]:
                extras.setdefault(key, []).append(value.detach().float().cpu())
    extras = {k: torch.cat(v) for k, v in extras.items() if len(v) == len(finals)}
    return Samples(torch.cat(finals).float(), cond, torch.cat(rewards), extras)


def compute_targets(cfg: CRDConfig, samples: Samples, batch: SampleBatch, accelerator) -> tuple[Tensor, dict]:
    """Targets r~ [n] of this rank's samples from advantages over the gathered batch, and metrics."""
    device = accelerator.device
    advantages, metrics = distributed_group_advantages(
        samples.rewards.to(device), batch.group_ids.to(device), accelerator,
        std=cfg.adv_std, eps=cfg.adv_eps, clip=cfg.adv_clip)  # [n]
    out = {k: float(v) for k, v in metrics.items()}
    out["adv_clip_fraction"] = out.pop("clip_fraction")
    for key, values in samples.extras.items():  # reward extras over the whole batch (e.g. strict)
        gathered = accelerator.gather(values.to(device)) if accelerator.num_processes > 1 else values
        out[f"reward_{key}"] = float(torch.nanmean(gathered.float()))
    return crd_target(advantages, clip=cfg.adv_clip).cpu(), out


# ============================================================================= policy update


@dataclass
class GroupUpdate:
    """One optimizer step: this rank's micro-batches (local sample indices, whole groups), the inner epoch
    (seeds its training times and noise), and the weight P / (samples in the step over all ranks x training
    times) of each (sample, time) term, so DDP's mean over ranks is the mean over the step's terms. A rank
    holding none of the step's groups runs one zero-weight pass (scale 0) so the all-reduce still matches."""

    micro_batches: list[list[int]]
    inner: int
    scale: float


def plan_updates(cfg: CRDConfig, batch: SampleBatch, epoch: int, num_processes: int) -> list[GroupUpdate]:
    """For each inner epoch, the global group ids in a seeded order split into `updates_per_epoch` chunks
    (identical on every rank and for any rank count); each rank trains its groups of a chunk."""
    local: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        local.setdefault(g, []).append(i)
    m = cfg.micro_batch_groups
    updates = []
    for inner in range(cfg.inner_epochs):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _ORDER, inner))
        for chunk in torch.tensor_split(torch.randperm(batch.num_groups, generator=gen), cfg.updates_per_epoch):
            if chunk.numel() == 0:
                continue
            mine = [local[g] for g in chunk.tolist() if g in local]
            micro_batches = [sum(mine[i : i + m], []) for i in range(0, len(mine), m)]
            scale = num_processes / (chunk.numel() * batch.group_size * cfg.num_train_timesteps)
            updates.append(GroupUpdate(micro_batches, inner, scale) if micro_batches
                           else GroupUpdate([next(iter(local.values()))], inner, 0.0))
    return updates


def training_points(cfg: CRDConfig, batch: SampleBatch, index: list[int], epoch: int, inner: int,
                    latent_shape) -> tuple[Tensor, Tensor]:
    """(t [T, b], noise [T, b, *latent]) for local samples `index`: the T stratified times are shared by a
    group (its centred implicit rewards then compare equal t), the noise is per sample."""
    T = cfg.num_train_timesteps
    t = torch.stack([stratified_timesteps(T, cfg.timestep_shift, torch.Generator().manual_seed(
        derive_seed(cfg.seed, epoch, _TIMESTEPS, inner, int(batch.group_ids[i])))) for i in index], dim=1)
    noise = torch.stack([torch.randn((T, *latent_shape), generator=torch.Generator().manual_seed(
        derive_seed(cfg.seed, epoch, _TRAIN_NOISE, inner, int(batch.sample_ids[i])))) for i in index], dim=1)
    return t, noise


class LossStats:
    """Sample-weighted means of the per-pass metrics over an epoch's updates and all ranks."""

    KEYS = ("crd_loss", "kl_loss", "kl_coef", "implicit_reward_mean", "implicit_reward_centred_std",
            "target_centred_std")

    def __init__(self):
        self.sums, self.weight = [0.0] * len(self.KEYS), 0.0

    def add(self, metrics: dict[str, Tensor], weight: float) -> None:
        self.sums = [s + float(metrics[k]) * weight for s, k in zip(self.sums, self.KEYS)]
        self.weight += weight

    def reduce(self, accelerator) -> dict[str, float]:
        values = torch.tensor([*self.sums, self.weight], dtype=torch.float64, device=accelerator.device)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "sum")
        *sums, weight = values.tolist()
        return {k: s / weight if weight else math.nan for k, s in zip(self.KEYS, sums)}


def accumulate_gradients(model, policy, reference, snapshots: Snapshots, samples: Samples, targets: Tensor,
                         batch: SampleBatch, update: GroupUpdate, cfg: CRDConfig, epoch: int, accelerator,
                         stats: LossStats) -> None:
    """Backward of one optimizer step's loss, micro-batch by micro-batch and training time by time."""
    device, guidance = accelerator.device, cfg.sampler.guidance
    num_times = cfg.num_train_timesteps if update.scale > 0 else 1
    passes_left = len(update.micro_batches) * num_times
    for mb in update.micro_batches:
        index = torch.tensor(mb)
        x0, cond = samples.latents[index].to(device), samples.cond.index(index.to(samples.latents.device))
        t, noise = training_points(cfg, batch, mb, epoch, update.inner, x0.shape[1:])  # [T, b], [T, b, *latent]
        points = [noised(x0, noise[k].to(device), t[k].to(device)) for k in range(num_times)]  # (x_t, v*)
        with torch.no_grad():  # frozen networks first: one snapshot swap per micro-batch
            with snapshots.old.swapped():
                v_old = [model.velocity(x_t, t[k].to(device), cond, guidance) for k, (x_t, _) in enumerate(points)]
            v_ref = [None] * num_times
            if cfg.beta_kl:
                with reference_policy(model, reference):
                    v_ref = [model.velocity(x_t, t[k].to(device), cond, cfg.kl_guidance)
                             for k, (x_t, _) in enumerate(points)]
        for k, (x_t, v_star) in enumerate(points):
            passes_left -= 1  # DDP all-reduces gradients on the last backward only
            with contextlib.nullcontext() if passes_left == 0 else accelerator.no_sync(policy):
                with transformer_as(model, policy):
                    v_theta = model.velocity(x_t, t[k].to(device), cond, guidance)  # [b, *latent]
                loss, metrics = crd_objective(v_theta, v_old[k], v_ref[k], v_star, targets[index].to(device),
                                              batch.group_ids[index], cfg)
                accelerator.backward(loss * (len(mb) * update.scale))
            stats.add(metrics, len(mb) if update.scale > 0 else 0.0)


# ============================================================================= the loop


def train(cfg: CRDConfig, model=None, reward=None) -> dict[str, Any]:
    """Run CRD as configured; returns the last epoch's metrics (plus the final evaluation).

    model: a FlowModel adapter to train in place (default: load `cfg.model`); reward: a Reward (default:
    build `cfg.reward`). Works on one process and under `accelerate launch`.
    """
    from rewards import build_reward

    accelerator = make_accelerator(cfg.mixed_precision, cfg.find_unused_parameters)
    is_main, P, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    if cfg.groups_per_epoch % P:
        raise ValueError(f"groups_per_epoch={cfg.groups_per_epoch} must be a multiple of the {P} processes "
                         "(each rank holds whole prompt groups)")
    out_dir = Path(cfg.output_dir)
    # before any loading: refuse (or clear, with overwrite) a previous run; None is a fresh start
    checkpoint = prepare_output_dir(out_dir, cfg.resume, cfg.overwrite, is_main)
    torch.manual_seed(cfg.seed)  # LoRA init; everything in the loop has its own seeded generator
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]

    # ---- model, reward, trainable parameters, snapshots, optimizer
    model = model if model is not None else load_flow_model(cfg.model, accelerator.device)
    model.to(accelerator.device)
    reward_fn = reward if reward is not None else build_reward(cfg.reward)
    trainable, reference = setup_trainable(model, cfg.lora, weight_dtype, frozen_reference=bool(cfg.beta_kl))
    configure_transformer(model, cfg.attention_backend, cfg.gradient_checkpointing)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(trainable.values(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    policy, optimizer = accelerator.prepare(model.transformer, optimizer)  # the adapter keeps the raw module
    snapshots = Snapshots(trainable, cfg.old_decay, cfg.sampler_decay)

    # ---- data, resume, logging
    train_data = PromptDataset(load_prompt_items(cfg.prompts.split, cfg.prompts.file), seed=cfg.seed)
    eval_items = load_prompt_items(cfg.prompts.eval_split, cfg.prompts.eval_file,
                                   cfg.prompts.eval_per_tag)[: cfg.prompts.eval_num_prompts]
    monitors = {_reward_name(spec): build_reward(spec) for spec in cfg.monitor_rewards}
    start_epoch, global_step = 0, 0
    if checkpoint is not None:  # snapshots travel in the checkpoint's "ema" slot
        start_epoch, global_step = _restore(checkpoint, accelerator, trainable, optimizer, snapshots)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if checkpoint is not None and not cfg.quiet:
            print(f"resuming from {checkpoint} (epoch {start_epoch} of {cfg.num_epochs})")
    title = f"crd on {cfg.model}"
    logger = MetricsLogger(out_dir, keep_through_epoch=start_epoch - 1 if checkpoint is not None else None,
                           title=title, enabled=is_main, wandb_project=cfg.wandb_project,
                           run_config=dataclasses.asdict(cfg))
    metrics: dict[str, Any] = {}
    last_saved = start_epoch - 1 if checkpoint is not None else None
    completed, dirty = start_epoch - 1, False  # last finished epoch; weights changed since then?

    try:
        with TrainingProgress(cfg.num_epochs, start_epoch, enabled=is_main, quiet=cfg.quiet) as progress:
            for epoch in range(start_epoch, cfg.num_epochs):
                epoch_start = time.perf_counter()
                metrics = {}

                # ---- held-out evaluation of the trained weights after `epoch` epochs
                if cfg.eval_every and epoch % cfg.eval_every == 0:
                    progress.phase(f"epoch {epoch + 1}: evaluating")
                    metrics.update(evaluate(model, reward_fn, eval_items, cfg, accelerator, monitors,
                                            grid_path=out_dir / "samples" / f"epoch_{epoch:04d}.png"))
                    metrics["time_eval"] = time.perf_counter() - epoch_start

                # ---- rollouts from the sampling snapshot, rewards, targets
                progress.phase(f"epoch {epoch + 1}: sampling")
                cpu_start = time.process_time()  # training cost, evaluation excluded
                rollout_start = time.perf_counter()
                batch = train_data.epoch_batch(epoch, cfg.groups_per_epoch, cfg.group_size, P, rank)
                with snapshots.sampler.swapped():
                    samples = collect_samples(model, reward_fn, batch, cfg, epoch)
                metrics["time_rollout"] = time.perf_counter() - rollout_start
                targets, target_metrics = compute_targets(cfg, samples, batch, accelerator)
                metrics.update(target_metrics)

                # ---- optimizer steps on the forward process: accumulate -> clip -> step
                progress.phase(f"epoch {epoch + 1}: training")
                train_start = time.perf_counter()
                stats, grad_norms = LossStats(), []
                for update in plan_updates(cfg, batch, epoch, P):
                    accumulate_gradients(model, policy, reference, snapshots, samples, targets, batch, update, cfg,
                                         epoch, accelerator, stats)
                    max_norm = o.max_grad_norm if o.max_grad_norm > 0 else math.inf
                    grad_norms.append(float(accelerator.clip_grad_norm_(list(trainable.values()), max_norm)))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step, dirty = global_step + 1, True
                metrics.update(snapshots.advance(global_step))  # old and sampler snapshots, once per epoch
                metrics["time_train"] = time.perf_counter() - train_start
                metrics["cpu_train"] = time.process_time() - cpu_start  # this process, all its threads

                # ---- log (metrics are over all ranks)
                metrics.update(stats.reduce(accelerator))
                metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
                metrics["optimizer_steps"], metrics["global_step"] = len(grad_norms), global_step
                metrics["time_epoch"] = time.perf_counter() - epoch_start
                logger.log(epoch, metrics)
                progress.advance(epoch, _summary(metrics))
                completed, dirty = epoch, False

                # ---- checkpoint at intervals and after the last epoch
                if epoch == cfg.num_epochs - 1 or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
                    _save(accelerator, model, cfg, epoch, global_step, trainable, optimizer, snapshots)
                    last_saved = epoch
    except KeyboardInterrupt:
        # as in Flow-GRPO: save the last finished epoch if nothing changed since, on one process only
        if P == 1 and not dirty and completed >= 0 and completed != last_saved:
            _save(accelerator, model, cfg, completed, global_step, trainable, optimizer, snapshots)
            print(f"interrupted: saved the checkpoint of epoch {completed}", flush=True)
        raise

    # ---- after training: final held-out evaluation and export
    if cfg.eval_every and start_epoch < cfg.num_epochs:
        final = evaluate(model, reward_fn, eval_items, cfg, accelerator, monitors,
                         grid_path=out_dir / "samples" / f"epoch_{cfg.num_epochs:04d}.png")
        metrics.update({f"final_{k}": v for k, v in final.items()})
        logger.log(cfg.num_epochs, final)  # an evaluation-only row: the weights after the last epoch
    if is_main:
        _export_final(model, cfg, None)
        logger.close()
        write_summary(logger.rows, out_dir / "summary.md", title, echo=not cfg.quiet)
    accelerator.wait_for_everyone()
    metrics["last_checkpoint_epoch"] = last_saved
    return metrics


def _summary(m: dict[str, Any]) -> str:
    parts = [f"reward {m.get('reward_mean', math.nan):.3f}±{m.get('reward_std', math.nan):.3f}"]
    if "eval_reward_mean" in m:
        parts.append(f"held-out {m['eval_reward_mean']:.3f}")
    parts += [f"crd {m.get('crd_loss', math.nan):.3g}", f"kl {m.get('kl_loss', math.nan):.2e}",
              f"|g| {m.get('grad_norm', math.nan):.3g}", f"{m.get('time_epoch', 0.0):.1f}s"]
    return " | ".join(parts)
