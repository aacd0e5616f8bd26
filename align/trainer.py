"""The trainer core: what every alignment trainer shares, as public functions.

A trainer (align/flow_grpo.py, crd.py, gdro.py, nft.py, awm.py) holds its config, its loss and its
epoch; this module holds the rest:

    run = setup_run(cfg, model, reward, frozen_reference)   accelerator, model, reward, trainable
                                                             weights, optimizer, prompts, monitors
    samples = collect_samples(run, batch, ...)               rollouts -> decode -> reward (final latents)
    targets = advantage_targets(...)                         group advantages over all ranks
    optimizer_step(run)                                      clip -> step -> zero_grad
    fit_samples(run, samples, ...)                           a forward-process trainer's optimizer steps
    run_epochs(run, epoch_fn, ema=..., state=...)            the epoch loop: held-out evaluation and the
                                                             hacking monitor, progress, metrics.csv /
                                                             TensorBoard / PNG curve, checkpoint cadence,
                                                             atomic save and exact resume, Ctrl-C save,
                                                             final evaluation, export, summary table

Everything random in an epoch is seeded from (seed, epoch, purpose, ...) through `derive_seed`, so
a resumed run replays exactly the epochs an uninterrupted run would have, and P ranks see the same
global batch as one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor

from samplers.generate import encode_prompts
from samplers.rollout import rollout
from samplers.schedules import flow_sigmas, shift_sigmas

from .advantages import distributed_group_advantages
from .checkpoint import load_checkpoint, prepare_output_dir, rng_state, save_checkpoint, set_rng_state
from .config import doc, save_config
from .data import PromptConfig, PromptDataset, SampleBatch, derive_seed, load_prompt_items
from .ema import EMA
from .metrics import MetricsLogger, TrainingProgress, write_summary
from .runtime import (WEIGHT_DTYPES, LoraSettings, configure_transformer, load_flow_model, make_accelerator,
                      setup_trainable)

__all__ = ["RunSettings", "OnlineSettings", "OptimizerConfig", "EMAConfig", "ForwardSamplerConfig", "Run",
           "setup_run", "initial_noise", "Samples", "collect_samples", "advantage_targets", "optimizer_step",
           "evaluate", "reward_name", "save_run", "restore_run", "export_final", "make_ema", "summary_line",
           "fit_samples", "run_epochs", "StateBundle", "WeightedMeans", "Update", "plan_updates", "stratified_times",
           "training_times", "training_noise", "NOISE", "STEP_NOISE"]

# Purposes for derive_seed(seed, epoch, PURPOSE, ...) shared by the trainers (independent streams).
NOISE, STEP_NOISE = 1, 2


# ============================================================================= shared settings


@dataclass
class RunSettings:
    """The run folder, its cadence and the machinery every trainer config shares (its base class; a
    trainer redeclares a field to change its default, e.g. output_dir)."""

    seed: int = doc(0, "Seed of everything random (prompts, noise, sample order, training points, LoRA init).")
    output_dir: str = doc("runs/train", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")
    checkpoint_every: int = doc(10, "Save a checkpoint every N epochs (and always at the end); 0 = end only.")
    keep_checkpoints: int = doc(2, "Keep the newest N checkpoints (0 = keep all).")
    eval_grid_size: int = doc(24, "Held-out samples (spread over the set) saved as a captioned grid at every "
                                  "evaluation, OUTPUT_DIR/samples/epoch_NNNN.png; 0 = none.")
    eval_every: int = doc(10, "Evaluate held-out prompts before epochs 0, N, 2N... and after training; 0 = never.")
    resume: bool = doc(False, "Continue from the newest checkpoint in output_dir (if any).")
    overwrite: bool = doc(False, "Delete a previous run in output_dir and start again; without it (or resume) a "
                                 "fresh start into a folder holding checkpoints or metrics is refused.")
    mixed_precision: Literal["no", "fp16", "bf16"] = doc(
        "no", "Frozen weights / autocast dtype on CUDA ('no' on CPU); step and loss math is fp32 regardless.")
    gradient_checkpointing: bool = doc(False, "Recompute transformer activations in backward (saves memory).")
    attention_backend: Literal["sdpa", "xformers"] = doc(
        "sdpa", "'sdpa' (torch) or 'xformers' (only with the package and CUDA; otherwise warns and uses sdpa).")
    find_unused_parameters: bool = doc(False, "DDP find_unused_parameters (needed if some trainable weights get "
                                              "no gradient in a forward).")
    wandb_project: str | None = doc(None, "Also log metrics to this Weights & Biases project (needs `pip install "
                                          "wandb`; CSV, TensorBoard and the PNG curve are always written).")
    quiet: bool = doc(False, "No per-epoch summary line on the console.")

    def __post_init__(self):
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("checkpoint_every, eval_every and keep_checkpoints must be >= 0")


@dataclass
class OptimizerConfig:
    """AdamW on the trainable parameters."""

    lr: float = doc(3e-4, "Learning rate (Flow-GRPO LoRA: 3e-4; full fine-tunes want ~1e-5).")
    weight_decay: float = doc(1e-4, "AdamW weight decay.")
    betas: tuple[float, float] = doc((0.9, 0.999), "AdamW betas.")
    eps: float = doc(1e-8, "AdamW epsilon.")
    max_grad_norm: float = doc(1.0, "Clip the global gradient norm to this (0 = no clipping, norm still logged).")


@dataclass
class EMAConfig:
    """Exponential moving average of the trainable parameters."""

    enabled: bool = doc(True, "Keep an EMA of the trainable parameters.")
    decay: float = doc(0.9, "EMA decay (Flow-GRPO: 0.9), warmed up as min((1 + n) / (10 + n), decay).")
    update_interval: int = doc(8, "Optimizer steps between EMA updates (Flow-GRPO: 8).")
    use_for_eval: bool = doc(True, "Evaluate held-out prompts with the EMA weights.")


@dataclass
class OnlineSettings(RunSettings):
    """What every online trainer (sampling its own rollouts each epoch) shares: the model and its trainable
    weights, the reward, prompts and monitors, groups per epoch, group advantages, the optimizer and its
    steps. A trainer redeclares a field to change its default."""

    model: str = doc("shapesworld", "'shapesworld' (built-in), 'toy:test' (tiny random model), a diffusers folder "
                                    "or a hub id.")
    lora: LoraSettings = doc(LoraSettings(), "LoRA settings (rank 0 = full fine-tune; the KL reference is then a "
                                             "frozen copy).")
    reward: str | dict = doc("shapes_geneval", "Reward spec for rewards.build_reward: a registered name, "
                                               "'pkg.module:attr' or a dict with arguments. A reward model on "
                                               "its own GPU: {name: pickscore, device: 'cuda:1'}; served: "
                                               "{name: remote, url: ...}.")
    prompts: PromptConfig = doc(PromptConfig(), "Training and held-out prompts.")
    monitor_rewards: list[str | dict] = doc(["shapes_quality"], "Rewards scored on the held-out samples and never "
                                            "optimised (logged as eval_<name>_mean): one that falls while the "
                                            "trained reward rises flags reward hacking.")
    group_size: int = doc(24, "Samples per prompt K (a group; paper: 24).")
    groups_per_epoch: int = doc(48, "Prompt groups per epoch, over all ranks.")
    num_epochs: int = doc(100, "Epochs to train (a resumed run continues up to this number).")
    adv_std: Literal["global", "group", "none"] = doc(
        "global", "Advantage std: 'global' batch std (Flow-GRPO), 'group' per prompt (DanceGRPO), 'none'.")
    adv_eps: float = doc(1e-4, "Added to the advantage std.")
    adv_clip: float = doc(5.0, "Clip advantages to +-adv_clip.")
    optimizer: OptimizerConfig = doc(OptimizerConfig(), "AdamW settings and gradient clipping.")
    updates_per_epoch: int = doc(1, "Optimizer steps per pass over the epoch's samples.")
    inner_epochs: int = doc(1, "Passes over the epoch's samples.")

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2 (advantages compare the samples of a group)")
        for name in ("groups_per_epoch", "num_epochs", "updates_per_epoch", "inner_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.adv_clip <= 0:
            raise ValueError("adv_clip must be > 0")


@dataclass
class ForwardSamplerConfig:
    """Rollouts and held-out evaluation of the trainers that train on final samples (forward process)."""

    num_steps: int = doc(10, "Denoising steps of training rollouts.")
    eval_num_steps: int = doc(40, "Steps of the deterministic ODE sampler for held-out evaluation.")
    step_type: str = doc("ode", "Step of the training rollouts, any name in samplers.steps.STEPS ('ode', "
                                "'flow_grpo_sde', 'dance_sde', 'cps'): only final samples are trained on, so "
                                "any sampler works.")
    step_params: dict[str, float] = doc({}, "Parameters of a stochastic step, e.g. {noise_level: 0.7}.")
    guidance: float = doc(1.0, "CFG scale of rollouts and of the training forwards (1 = CFG-free).")
    eval_guidance: float | None = doc(None, "CFG scale for evaluation; null = `guidance`.")
    shift: float = doc(3.0, "Timestep shift of the sampling sigma schedule.")
    negative_prompt: str = doc("", "Negative prompt of CFG.")
    batch_size: int = doc(8, "Rollouts per forward batch on each rank (also the evaluation batch).")
    resolution: int | None = doc(None, "Square image side in px (null: the model's native size).")

    def __post_init__(self):
        from samplers.steps import STEPS

        if self.num_steps < 1 or self.eval_num_steps < 1 or self.batch_size < 1:
            raise ValueError("sampler.num_steps, eval_num_steps and batch_size must be >= 1")
        if self.step_type not in STEPS:
            raise ValueError(f"sampler.step_type must be one of {sorted(STEPS)}, got {self.step_type!r}")


def reward_name(spec: str | dict) -> str:
    """The name a reward spec is logged under (eval_<name>_mean)."""
    return spec if isinstance(spec, str) else str(spec.get("name", spec.get("type", "monitor")))


@dataclass
class Run:
    """A training run's live objects (built by `setup_run`)."""

    cfg: Any
    accelerator: Any
    model: Any  # FlowModel adapter; keeps the raw transformer
    policy: Any  # the transformer as prepared by accelerate (DDP-wrapped with several ranks)
    reward_fn: Any
    trainable: dict[str, torch.nn.Parameter]
    reference: Any  # frozen transformer copy (full fine-tune with a KL), else None (LoRA disabled = reference)
    optimizer: Any
    train_data: PromptDataset
    eval_items: list[dict]
    monitors: dict[str, Any]
    out_dir: Path
    checkpoint: Path | None = None  # to resume from (prepare_output_dir), None for a fresh start
    phase: Callable[[str], None] = lambda text: None  # says what the epoch is doing (set by run_epochs)
    dirty: bool = False  # weights changed since the last finished epoch (set by optimizer_step)

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes


def setup_run(cfg, model=None, reward=None, frozen_reference: bool = False) -> Run:
    """The output folder rule first (prepare_output_dir: resume, overwrite or refuse, before anything
    loads), then the accelerator, model (cfg.model unless given), reward (cfg.reward unless given),
    trainable weights (LoRA or full, cfg.lora), attention / checkpointing, AdamW (cfg.optimizer), prompts
    and monitors."""
    from rewards import build_reward

    accelerator = make_accelerator(cfg.mixed_precision, cfg.find_unused_parameters)
    checkpoint = prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, accelerator.is_main_process)
    torch.manual_seed(cfg.seed)  # LoRA init; everything in the loop has its own seeded generator
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    model = model if model is not None else load_flow_model(cfg.model, accelerator.device)
    model.to(accelerator.device)
    reward_fn = reward if reward is not None else build_reward(cfg.reward)
    trainable, reference = setup_trainable(model, cfg.lora, weight_dtype, frozen_reference=frozen_reference)
    configure_transformer(model, cfg.attention_backend, cfg.gradient_checkpointing)
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(trainable.values(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps)
    # only the trainable module goes through prepare (DDP); the adapter keeps the raw transformer for
    # sampling, LoRA switching and saving, and borrows the wrapped one for forwards under grad
    policy, optimizer = accelerator.prepare(model.transformer, optimizer)
    train_data = PromptDataset(load_prompt_items(cfg.prompts.split, cfg.prompts.file), seed=cfg.seed)
    eval_items = load_prompt_items(cfg.prompts.eval_split, cfg.prompts.eval_file,
                                   cfg.prompts.eval_per_tag)[: cfg.prompts.eval_num_prompts]
    monitors = {reward_name(spec): build_reward(spec) for spec in cfg.monitor_rewards}
    return Run(cfg, accelerator, model, policy, reward_fn, trainable, reference, optimizer, train_data, eval_items,
               monitors, Path(cfg.output_dir), checkpoint)


# ============================================================================= rollouts and rewards


def initial_noise(seed: int, epoch: int, batch: SampleBatch, latent_shape, share: bool) -> Tensor:
    """[n, *latent] noise seeded per sample (or per group if `share`), independent of the rank layout."""
    keys = batch.group_ids if share else batch.sample_ids
    return torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(
        derive_seed(seed, epoch, NOISE, int(share), int(k)))) for k in keys])


def score_images(reward_fn, images: Tensor, batch: SampleBatch, idx) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward of decoded images of batch[idx] -> (scores [b] fp32 on the CPU, per-sample extras [b])."""
    out = reward_fn(images, batch.prompts[idx], metadata=batch.metadata[idx], group_ids=batch.group_ids[idx])
    extras = {k: v.detach().float().cpu() for k, v in out.extras.items()
              if isinstance(v, Tensor) and v.ndim == 1 and v.shape[0] == images.shape[0]}
    return out.scores.float().cpu(), extras


def cat_extras(chunks: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Concatenate per-chunk extras, keeping the keys every chunk has."""
    keys = set.intersection(*(set(c) for c in chunks)) if chunks else set()
    return {k: torch.cat([c[k] for c in chunks]) for k in sorted(keys)}


@dataclass
class Samples:
    """This rank's samples of an epoch: final latents only, their conditioning and rewards."""

    latents: Tensor  # [n, *latent] fp32 clean samples x0
    cond: Any  # conditioning of the n samples (with negatives when some forward uses CFG)
    rewards: Tensor  # [n] fp32, NaN = not scored
    extras: dict[str, Tensor]  # per-sample reward extras [n] (e.g. "strict")


@torch.no_grad()
def collect_samples(model, reward_fn, batch: SampleBatch, sampler, seed: int, epoch: int, *,
                    share_noise: bool = False, encode_guidance: float | None = None) -> Samples:
    """Sample this rank's share with the model's current weights, keep the final latents, score them.

    sampler: a config with num_steps, shift, step_type, step_params, guidance, negative_prompt,
    batch_size, resolution. encode_guidance: the largest CFG scale any later forward needs (the
    negative prompt is encoded when it is > 1; default: sampler.guidance)."""
    device = model.device
    sigmas = flow_sigmas(sampler.num_steps, shift=sampler.shift, device=device)
    guidance = sampler.guidance if encode_guidance is None else max(encode_guidance, sampler.guidance)
    cond = encode_prompts(model, batch.prompts, guidance, sampler.negative_prompt)
    noise = initial_noise(seed, epoch, batch, model.latent_shape(sampler.resolution, sampler.resolution),
                          share_noise).to(device)
    finals, rewards, extras = [], [], []
    for start in range(0, len(batch), sampler.batch_size):
        idx = slice(start, start + sampler.batch_size)
        generator = torch.Generator(device=device).manual_seed(
            derive_seed(seed, epoch, STEP_NOISE, int(batch.sample_ids[start])))
        final = rollout(model, cond.index(idx), sigmas, step_types=sampler.step_type,
                        step_params=dict(sampler.step_params), guidance=sampler.guidance,
                        initial_noise=noise[idx], generator=generator).final
        scores, more = score_images(reward_fn, model.decode(final), batch, idx)
        finals.append(final)
        rewards.append(scores)
        extras.append(more)
    return Samples(torch.cat(finals).float(), cond, torch.cat(rewards), cat_extras(extras))


def advantage_targets(cfg, rewards: Tensor, extras: dict[str, Tensor], batch: SampleBatch,
                      accelerator) -> tuple[Tensor, dict[str, float]]:
    """Group advantages [n] (cfg.adv_std / adv_eps / adv_clip) of this rank's samples over the batch
    gathered from all ranks, and metrics: reward statistics and reward_<extra> means (e.g. strict)."""
    device = accelerator.device
    advantages, metrics = distributed_group_advantages(rewards.to(device), batch.group_ids.to(device), accelerator,
                                                       std=cfg.adv_std, eps=cfg.adv_eps, clip=cfg.adv_clip)
    out = {k: float(v) for k, v in metrics.items()}
    out["adv_clip_fraction"] = out.pop("clip_fraction")
    for key, values in extras.items():
        gathered = accelerator.gather(values.to(device)) if accelerator.num_processes > 1 else values
        out[f"reward_{key}"] = float(torch.nanmean(gathered.float()))
    return advantages.cpu(), out


def optimizer_step(run: Run) -> float:
    """Clip the gradient norm (cfg.optimizer.max_grad_norm; 0 = none), step, zero the gradients;
    returns the norm before clipping."""
    max_norm = run.cfg.optimizer.max_grad_norm
    norm = run.accelerator.clip_grad_norm_(list(run.trainable.values()), max_norm if max_norm > 0 else math.inf)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.dirty = True
    return float(norm)


class WeightedMeans:
    """Weighted means of per-pass metrics over an epoch's updates and all ranks."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
        self.weight += weight

    def reduce(self, accelerator) -> dict[str, float]:
        """Means over every rank's passes (NaN if nothing was trained); every rank must call it with
        the same keys."""
        keys = sorted(self.sums)
        values = torch.tensor([*(self.sums[k] for k in keys), self.weight], dtype=torch.float64,
                              device=accelerator.device)
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, "sum")
        *sums, weight = values.tolist()
        return {k: v / weight if weight else math.nan for k, v in zip(keys, sums)}


# ============================================================================= update plans


@dataclass
class Update:
    """One optimizer step: this rank's micro-batches (local sample indices), the inner epoch (seeds its
    training points), and the weight P / (samples in the step over all ranks) of each sample's loss, so
    that DDP's mean over ranks is the mean over the step's samples. A rank with none of the step's
    samples runs one zero-weight pass (scale 0) so the all-reduce still matches."""

    micro_batches: list[list[int]]
    inner: int
    scale: float


def plan_updates(cfg, batch: SampleBatch, epoch: int, num_processes: int, purpose: int,
                 keep: Tensor | None = None, whole_groups: bool = False) -> list[Update]:
    """The epoch's optimizer steps: for each of cfg.inner_epochs passes, the global sample ids (those
    with keep [N] True, default all) in a seeded order, split into cfg.updates_per_epoch chunks (the
    same on every rank for any rank count); each rank trains its samples of a chunk in micro-batches
    of cfg.micro_batch_size. whole_groups: order and split prompt groups instead, micro-batches of
    cfg.micro_batch_groups whole groups (for losses that compare the samples of a group)."""
    local: dict[int, list[int]] = {}  # global unit id -> local sample indices
    for i, (s, g) in enumerate(zip(batch.sample_ids.tolist(), batch.group_ids.tolist())):
        local.setdefault(g if whole_groups else s, []).append(i)
    units = batch.num_groups if whole_groups else batch.num_samples
    unit_size = batch.group_size if whole_groups else 1
    keep = torch.ones(units, dtype=torch.bool) if keep is None else keep
    m = cfg.micro_batch_groups if whole_groups else cfg.micro_batch_size
    updates = []
    for inner in range(cfg.inner_epochs):
        order = torch.randperm(units, generator=torch.Generator().manual_seed(
            derive_seed(cfg.seed, epoch, purpose, inner)))
        for chunk in torch.tensor_split(order[keep[order]], cfg.updates_per_epoch):
            if chunk.numel() == 0:
                continue
            mine = [local[u] for u in chunk.tolist() if u in local]
            micro_batches = [sum(mine[i : i + m], []) for i in range(0, len(mine), m)]
            scale = num_processes / (chunk.numel() * unit_size)
            updates.append(Update(micro_batches, inner, scale) if micro_batches
                           else Update([next(iter(local.values()))], inner, 0.0))
    return updates


def stratified_times(count: int, shift: float, generator: torch.Generator | None = None) -> Tensor:
    """[count] training times: u_k uniform in [k / count, (k + 1) / count), shifted to s u / (1 + (s - 1) u)."""
    u = (torch.arange(count, dtype=torch.float32) + torch.rand(count, generator=generator)) / count
    return shift_sigmas(u, shift)


def training_times(count: int | None, schedule: Tensor | None, shift: float, seed: int, batch: SampleBatch,
                   index: list[int], epoch: int, inner: int, purpose: int) -> Tensor:
    """[k, b] forward-process times of local samples `index`, shared by a prompt group (seeded by its id).

    schedule None: k = count stratified times u in [j/k, (j+1)/k), shifted by `shift` (CRD).
    schedule [S] (sigmas of the sampling schedule): all S if count is None or >= S (DiffusionNFT), else
    one index per stratum of the S (AWM's discrete times)."""
    k = len(schedule) if schedule is not None and (count is None or count >= len(schedule)) else count
    if schedule is not None and k == len(schedule):
        return schedule[:, None].expand(len(schedule), len(index)).clone()
    columns = []
    for i in index:
        gen = torch.Generator().manual_seed(derive_seed(seed, epoch, purpose, inner, int(batch.group_ids[i])))
        if schedule is None:
            columns.append(stratified_times(k, shift, gen))
        else:
            u = (torch.arange(k, dtype=torch.float32) + torch.rand(k, generator=gen)) / k
            columns.append(schedule[(u * len(schedule)).long().clamp_max(len(schedule) - 1)])
    return torch.stack(columns, dim=1)


def training_noise(seed: int, batch: SampleBatch, index: list[int], epoch: int, inner: int, count: int,
                   latent_shape, purpose: int) -> Tensor:
    """[count, b, *latent] forward-process noise of local samples `index`, seeded per sample."""
    return torch.stack([torch.randn((count, *latent_shape), generator=torch.Generator().manual_seed(
        derive_seed(seed, epoch, purpose, inner, int(batch.sample_ids[i])))) for i in index], dim=1)


def fit_samples(run: Run, samples: Samples, batch: SampleBatch, epoch: int, global_step: int,
                times_fn: Callable[[list[int], int], Tensor], step_loss: Callable[..., tuple[Tensor, dict]],
                signal: Tensor, ema: EMA | None = None, purposes: tuple[int, int] = (4, 7)
                ) -> tuple[dict[str, float], int]:
    """The optimizer steps of a forward-process trainer (NFT, AWM) on an epoch's final samples.

    For each update of plan_updates and each micro-batch: times_fn(local indices, inner) -> t [k, b];
    seeded noise [k, b, *latent]; step_loss(x0 [b, *latent], cond, signal [b], t, noise) -> (loss, metrics),
    whose backward is weighted so DDP's mean is the mean over the step's samples; then clip, step, EMA.
    signal: [n] per-sample training signal (NFT's r, AWM's scaled advantages). purposes: derive_seed
    streams of the sample order and the noise. Returns (metrics: loss means over all ranks, grad_norm,
    optimizer_steps; global step)."""
    order_purpose, noise_purpose = purposes
    stats, norms = WeightedMeans(), []
    for update in plan_updates(run.cfg, batch, epoch, run.num_processes, order_purpose):
        passes_left = len(update.micro_batches)
        for mb in update.micro_batches:
            index = torch.tensor(mb)
            t = times_fn(mb, update.inner)  # [k, b]
            noise = training_noise(run.cfg.seed, batch, mb, epoch, update.inner, t.shape[0],
                                   samples.latents.shape[1:], noise_purpose)  # [k, b, *latent]
            passes_left -= 1  # DDP all-reduces gradients on the last backward only
            with contextlib.nullcontext() if passes_left == 0 else run.accelerator.no_sync(run.policy):
                loss, metrics = step_loss(samples.latents[index].to(run.device),
                                          samples.cond.index(index.to(samples.latents.device)),
                                          signal[index].to(run.device), t.to(run.device), noise.to(run.device))
                run.accelerator.backward(loss * (len(mb) * update.scale))
            stats.add(metrics, len(mb) if update.scale > 0 else 0.0)
        norms.append(optimizer_step(run))
        global_step += 1
        if ema is not None:
            ema.update(global_step)
    out = stats.reduce(run.accelerator)
    out.update(grad_norm=sum(norms) / max(len(norms), 1), optimizer_steps=len(norms))
    return out, global_step


# ============================================================================= held-out evaluation


@torch.no_grad()
def evaluate(model, reward_fn, items: list[dict], cfg, accelerator, monitors: dict | None = None,
             grid_path: Path | None = None) -> dict[str, float]:
    """Held-out means with the ODE sampler at cfg.sampler.eval_num_steps: the trained reward
    ("eval_reward_mean"), its per-sample extras (e.g. "eval_strict_mean"), the monitor rewards
    ("eval_<name>_mean") and, for ShapesWorld prompts, the per-category strict score
    ("eval_strict_<tag>") and the render gap ("eval_render_gap": a reward-blind distance of the samples
    to renders of the same prompts, eval/shapes/fidelity.py; a mean over ranks). Sample i uses seed i,
    so evaluations of different epochs and runs are paired. With `grid_path`, the main process saves
    `cfg.eval_grid_size` of its samples, captioned with the prompt and the headline score, as one PNG."""
    from accelerate.utils import gather_object

    from eval.grid import save_caption_grid
    from samplers.generate import generate
    from samplers.progress import track

    s = cfg.sampler
    repeats = cfg.prompts.eval_samples_per_prompt
    samples = [(index, items[index // repeats]) for index in range(len(items) * repeats)]  # (seed, item)
    mine = samples[accelerator.process_index :: accelerator.num_processes]
    every = max(1, len(mine) // cfg.eval_grid_size) if cfg.eval_grid_size else 0
    results, grid_images, grid_index, gaps = [], [], [], []
    shapes_world = all(isinstance(item.get("meta"), dict) and "tag" in item["meta"] for _, item in mine)
    for start in track(range(0, len(mine), s.batch_size), "held-out evaluation", unit="batches",
                       enabled=accelerator.is_main_process, quiet=cfg.quiet):
        chunk = mine[start : start + s.batch_size]
        prompts = [item["prompt"] for _, item in chunk]
        metas = [item.get("meta") for _, item in chunk]
        images = generate(model, prompts, [i for i, _ in chunk], num_steps=s.eval_num_steps,
                          guidance=s.guidance if s.eval_guidance is None else s.eval_guidance, shift=s.shift,
                          sampler="ode", negative_prompt=s.negative_prompt, batch_size=s.batch_size,
                          resolution=s.resolution)
        images = images.to(model.device)
        out = reward_fn(images, prompts, metadata=metas)
        per_sample = {"reward": out.scores.float().cpu()}
        per_sample.update({k: v.float().cpu() for k, v in out.extras.items()
                           if isinstance(v, Tensor) and v.ndim == 1 and v.shape[0] == len(chunk)})
        for name, monitor in (monitors or {}).items():
            per_sample[name] = monitor(images, prompts, metadata=metas).scores.float().cpu()
        if shapes_world and images.ndim == 4:  # ShapesWorld images (videos have no render gap)
            from eval.shapes.fidelity import rendered_residuals, residuals
            from rewards.shapes import to_uint8_images

            gaps.append((residuals(to_uint8_images(images, size=64)), rendered_residuals(metas, [i for i, _ in chunk])))
        for j in range(len(chunk)):
            if every and (start + j) % every == 0 and len(grid_images) < cfg.eval_grid_size:
                grid_images.append(images[j].cpu())
                grid_index.append(len(results) + j)
        results += [{"tag": (meta or {}).get("tag"), **{k: float(v[j]) for k, v in per_sample.items()}}
                    for j, meta in enumerate(metas)]
    if grid_path is not None and grid_images and accelerator.is_main_process:
        key = "strict" if "strict" in results[0] else "reward"
        captions = [f"{key} {results[i][key]:.2f}: {mine[i][1]['prompt']}" for i in grid_index]
        save_caption_grid(torch.stack(grid_images), captions, grid_path, ncol=6)
    if accelerator.num_processes > 1:
        results = gather_object(results)
    metrics = {}
    for key in [k for k in results[0] if k != "tag"] if results else []:
        values = torch.tensor([r.get(key, math.nan) for r in results])
        metrics[f"eval_{key}_mean"] = float(torch.nanmean(values))
    headline = "strict" if results and "strict" in results[0] else "reward"
    for tag in dict.fromkeys(r["tag"] for r in results if r["tag"]):
        metrics[f"eval_{headline}_{tag}"] = float(torch.nanmean(torch.tensor([r[headline] for r in results
                                                                            if r["tag"] == tag])))
    if shapes_world and gaps:
        from eval.shapes.fidelity import wasserstein

        gap = wasserstein(np.concatenate([g for g, _ in gaps]), np.concatenate([r for _, r in gaps]))
        gap = torch.tensor([gap], device=accelerator.device)
        metrics["eval_render_gap"] = float(accelerator.reduce(gap, "mean") if accelerator.num_processes > 1 else gap)
    metrics["eval_num_samples"] = len(results)
    return metrics


# ============================================================================= checkpoints


def save_run(run: Run, epoch: int, global_step: int, state=None) -> None:
    """Checkpoint of the state after `epoch` (collective: every rank must call it). state: the trainer's
    extra state (an object with state_dict / load_state_dict, e.g. EMA or snapshots), stored in the
    checkpoint's "ema" slot."""
    from accelerate.utils import gather_object

    accelerator, cfg = run.accelerator, run.cfg
    rng = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if accelerator.is_main_process:
        payload = {"optimizer": run.optimizer.state_dict(), "rng": rng,
                   "ema": state.state_dict() if state is not None else None}
        export = (lambda folder: run.model.save_lora(folder / "lora")) if cfg.lora.rank > 0 else None
        save_checkpoint(cfg.output_dir, epoch, {n: p.detach() for n, p in run.trainable.items()}, payload,
                        info={"global_step": global_step}, export=export, keep_last=cfg.keep_checkpoints or None)
    accelerator.wait_for_everyone()


def restore_run(run: Run, path: Path, state=None) -> tuple[int, int]:
    """Load a checkpoint into the run; returns (next epoch, global step)."""
    weights, payload, info = load_checkpoint(path)
    missing = set(run.trainable) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {path} lacks trainable weights, e.g. {sorted(missing)[:3]} "
                         "(was it written with the same model and LoRA settings?)")
    with torch.no_grad():
        for name, p in run.trainable.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    run.optimizer.load_state_dict(payload["optimizer"])
    if state is not None and payload.get("ema") is not None:
        state.load_state_dict(payload["ema"])
    rng = payload.get("rng") or []
    if len(rng) == run.accelerator.num_processes:  # another world size: keep the fresh RNG states
        set_rng_state(rng[run.accelerator.process_index])
    return int(info["epoch"]) + 1, int(info["global_step"])


def export_final(run: Run, ema=None) -> None:
    """OUTPUT_DIR/final (and final_ema with an EMA): the LoRA in diffusers format, or the whole model folder."""
    model = run.model
    save = (lambda d: model.save_lora(d)) if run.cfg.lora.rank > 0 else (lambda d: model.save_pretrained(d))
    save(run.out_dir / "final")
    if ema is not None:
        with ema.swapped():
            save(run.out_dir / "final_ema")


# ============================================================================= the loop


class StateBundle:
    """A trainer's extra state objects by name (EMAs, snapshots; None allowed), saved together in a
    checkpoint."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self) -> dict:
        return {k: v.state_dict() if v is not None else None for k, v in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in self.parts.items():
            if v is not None and state.get(k) is not None:
                v.load_state_dict(state[k])


def summary_line(m: dict[str, Any], fields: list[tuple[str, str, str]]) -> str:
    """The one-line epoch summary: the rollouts' reward (mean ± std) and strict accuracy when logged, the
    held-out reward at evaluations, then `fields` as (label, metric key, format), |g| and the time."""
    parts = [f"reward {m.get('reward_mean', math.nan):.3f}±{m.get('reward_std', math.nan):.3f}"] \
        if "reward_mean" in m else []
    if "reward_strict" in m:
        parts.append(f"strict {m['reward_strict']:.3f}")
    if "eval_reward_mean" in m:
        parts.append(f"held-out {m['eval_reward_mean']:.3f}")
    parts += [f"{label} {m.get(key, math.nan):{fmt}}" for label, key, fmt in fields]
    parts += [f"|g| {m.get('grad_norm', math.nan):.3g}", f"{m.get('time_epoch', 0.0):.1f}s"]
    return " | ".join(parts)


def make_ema(run: Run) -> EMA | None:
    """The EMA of the trainable weights that cfg.ema asks for (None when disabled)."""
    e = run.cfg.ema
    return EMA(run.trainable.items(), e.decay, e.update_interval) if e.enabled else None


def run_epochs(run: Run, epoch_fn: Callable[[int, int], tuple[dict[str, Any], int]], *, title: str,
               summary: list[tuple[str, str, str]], ema: EMA | None = None, state=None) -> dict[str, Any]:
    """The epoch loop every trainer shares; returns the last epoch's metrics (plus the final evaluation).

    epoch_fn(epoch, global_step) -> (metrics, global_step): the trainer's rollouts and optimizer steps
    of one epoch. summary: the trainer's metrics in the epoch's summary line (summary_line). ema: the
    EMA of the weights (make_ema): held-out evaluation uses it if cfg.ema.use_for_eval, and it is
    exported as final_ema. state: what a checkpoint saves besides the
    weights and the optimizer (default: the EMA; a StateBundle for several).
    Around it: held-out evaluation every cfg.eval_every epochs (and after training) with the hacking
    monitor, progress and a summary line per epoch, metrics.csv / TensorBoard / PNG, checkpoints every
    cfg.checkpoint_every epochs and at the end, resume from the newest checkpoint (cfg.resume), a
    checkpoint on Ctrl-C when the weights are those of the last finished epoch, the final export.
    """
    from eval.monitor import HackingMonitor

    cfg, accelerator = run.cfg, run.accelerator
    state = ema if state is None else state
    eval_weights = ema.swapped if ema is not None and cfg.ema.use_for_eval else contextlib.nullcontext
    start_epoch, global_step = 0, 0
    checkpoint = run.checkpoint
    if checkpoint is not None:
        start_epoch, global_step = restore_run(run, checkpoint, state)
    if run.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out_dir / "config.yaml")
        if checkpoint is not None and not cfg.quiet:
            print(f"resuming from {checkpoint} (epoch {start_epoch} of {cfg.num_epochs})", flush=True)
    logger = MetricsLogger(run.out_dir, keep_through_epoch=start_epoch - 1 if checkpoint is not None else None,
                           title=title, enabled=run.is_main, wandb_project=cfg.wandb_project,
                           run_config=dataclasses.asdict(cfg))
    hacking = HackingMonitor(held_out=[f"eval_{name}_mean" for name in run.monitors], history=logger.rows,
                             log_path=run.out_dir / "monitor.jsonl" if run.is_main else None)

    def held_out(epoch: int) -> dict[str, float]:
        run.phase(f"epoch {epoch + 1}: evaluating" if epoch < cfg.num_epochs else "final evaluation")
        with eval_weights():
            out = evaluate(run.model, run.reward_fn, run.eval_items, cfg, accelerator, run.monitors,
                           grid_path=run.out_dir / "samples" / f"epoch_{epoch:04d}.png")
        out.update(hacking.update(epoch, out))
        return out

    metrics: dict[str, Any] = {}
    last_saved = start_epoch - 1 if checkpoint is not None else None
    completed = start_epoch - 1  # last finished epoch
    try:
        with TrainingProgress(cfg.num_epochs, start_epoch, enabled=run.is_main, quiet=cfg.quiet) as progress:
            run.phase = progress.phase
            for epoch in range(start_epoch, cfg.num_epochs):
                epoch_start = time.perf_counter()
                metrics = {}
                if cfg.eval_every and epoch % cfg.eval_every == 0:
                    metrics.update(held_out(epoch))
                    metrics["time_eval"] = time.perf_counter() - epoch_start
                cpu_start = time.process_time()  # training cost, evaluation excluded
                run.phase(f"epoch {epoch + 1}: sampling")
                epoch_metrics, global_step = epoch_fn(epoch, global_step)
                metrics.update(epoch_metrics)
                metrics["cpu_train"] = time.process_time() - cpu_start  # this process, all its threads
                metrics["global_step"] = global_step
                metrics["time_epoch"] = time.perf_counter() - epoch_start
                logger.log(epoch, metrics)
                progress.advance(epoch, summary_line(metrics, summary))
                completed, run.dirty = epoch, False
                if epoch == cfg.num_epochs - 1 or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0):
                    save_run(run, epoch, global_step, state)
                    last_saved = epoch
    except KeyboardInterrupt:
        # Checkpoint at exit if the weights are still those of the last finished epoch (a half-done
        # update phase cannot be resumed exactly), on one process only (with several, ranks stop at
        # different points and a collective save could hang).
        if run.num_processes == 1 and not run.dirty and completed >= 0 and completed != last_saved:
            save_run(run, completed, global_step, state)
            print(f"interrupted: saved the checkpoint of epoch {completed}", flush=True)
        raise

    if cfg.eval_every and start_epoch < cfg.num_epochs:
        final = held_out(cfg.num_epochs)
        metrics.update({f"final_{k}": v for k, v in final.items()})
        logger.log(cfg.num_epochs, final)  # an evaluation-only row: the weights after the last epoch
    if run.is_main:
        export_final(run, ema)
        logger.close()
        write_summary(logger.rows, run.out_dir / "summary.md", title, echo=not cfg.quiet)
    accelerator.wait_for_everyone()
    metrics["last_checkpoint_epoch"] = last_saved
    return metrics
