"""GDRO: group-level direct reward optimisation (Wang et al., CVPR 2026), fully offline.

    align rollout configs/shapes/rollout.yaml          # once: K reference samples per prompt, scored
    align train configs/shapes/gdro.yaml [key=value ...] [--resume]

No sampling, SDE or log-probs inside the loop (ALGORITHMS.md section 3): the training data are
groups of K clean latents x0 that the frozen reference generated with its ODE sampler, each
with its explicit reward r (align/rollout_store.py). One optimizer step over a batch of groups:

  for each group: one timestep t and one noise eps shared by its K samples
  -> x_t = (1 - t) x0 + t eps, target v = eps - x0 (rectified-flow forward process)
  -> implicit reward s_i = -beta (||v - v_theta(x_t, t, c)||^2 - ||v - v_ref(x_t, t, c)||^2)
  -> Plackett-Luce loss of s against the ranking by r, soft targets softmax(r / tau)
     + gamma * flow-matching MSE on the group's top-reward sample (without it GDRO collapses)
  -> clip -> step -> EMA.

Velocities are the conditional branch (no CFG), as in Diffusion-DPO; the reference is the base
model with LoRA disabled (or a frozen copy for a full fine-tune). An epoch is one pass over the
store's groups in a seeded order; timesteps and noise are seeded by (seed, epoch, group), so a
resumed run, or P ranks, train exactly what one uninterrupted process would.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .config import doc, register_config
from .data import PromptConfig, derive_seed
from .losses import flow_matching_loss, gdro_implicit_reward, gdro_loss
from .rollout_store import RolloutStore
from .runtime import LoraSettings, reference_policy, transformer_as
from .trainer import (EMAConfig, OptimizerConfig, RunSettings, WeightedMeans, make_ema, optimizer_step, run_epochs,
                      setup_run)

__all__ = ["GDROConfig", "GDROSamplerConfig", "TrainingGroups", "forward_noise", "group_timesteps_and_noise",
           "load_training_groups", "gdro_objective", "train"]

_ORDER, _TIMESTEP = 1, 2  # derive_seed purposes


# ============================================================================= config


@dataclass
class GDROSamplerConfig:
    """Held-out evaluation sampling (training never samples) and text-encoding batches."""

    eval_num_steps: int = doc(40, "Steps of the deterministic ODE sampler for held-out evaluation.")
    guidance: float = doc(4.5, "CFG scale of held-out evaluation (training uses the conditional velocity).")
    shift: float = doc(3.0, "Timestep shift s of the evaluation sigma schedule.")
    negative_prompt: str = doc("", "Negative prompt of CFG at evaluation.")
    batch_size: int = doc(8, "Samples per evaluation batch; also prompts per text-encoder batch.")
    resolution: int | None = doc(None, "Square image side in px of evaluation (null: the model's native size).")

    def __post_init__(self):
        if self.eval_num_steps < 1 or self.batch_size < 1:
            raise ValueError("sampler.eval_num_steps and sampler.batch_size must be >= 1")

    @property
    def eval_guidance(self) -> float:  # the name flow_grpo.evaluate reads
        return self.guidance


@register_config("gdro")
@dataclass
class GDROConfig(RunSettings):
    """GDRO with LoRA (or a full fine-tune) on a rollout store. Defaults: the paper's GenEval setting."""

    model: str = doc("shapesworld", "The reference model the store was sampled from: 'shapesworld', 'toy:test', "
                                    "a diffusers folder or a hub id.")
    store: str = doc("runs/shapes/rollouts", "Rollout store folder written by `align rollout`.")
    rank_by: str | None = doc(None, "Stored reward that ranks each group (null: the store's first reward).")
    skip_corrupt_shards: bool = doc(False, "Train on the intact shards if some are corrupt (warns); false: stop "
                                           "with an error naming the shard.")
    drop_tied_groups: bool = doc(True, "Skip groups whose K rewards are all equal: they rank nothing [inferred].")
    lora: LoraSettings = doc(LoraSettings(), "LoRA settings (paper: rank 32; rank 0 = full fine-tune).")
    tau: float = doc(0.05, "Soft-target temperature: q = softmax(r / tau) over the not-yet-placed samples "
                           "(0: hard ranks; k = 2 is then Diffusion-DPO).")
    beta: float = doc(6.0, "Implicit-reward scale beta (paper: 6 GenEval, 12 OCR).")
    gamma: float = doc(1.0, "Weight of the flow-matching regulariser on each group's top-reward sample "
                            "(paper: 1.0 GenEval, 0.5 OCR; 0 collapses).")
    timestep_sampling: Literal["logit_normal", "uniform"] = doc(
        "logit_normal", "Density of the shared timestep t: sigmoid(N(0, 1)) as SD3 was trained, or U(0, 1) "
                        "[inferred; the paper does not say].")
    share_noise: bool = doc(True, "The K samples of a group share the noise eps as well as t [inferred].")
    groups_per_step: int = doc(8, "Groups per optimizer step, over all ranks (a multiple of the rank count).")
    micro_batch_groups: int = doc(4, "Groups per training forward on each rank (gradients accumulate).")
    num_epochs: int = doc(10, "Passes over the store's groups (a resumed run continues up to this number).")
    optimizer: OptimizerConfig = doc(OptimizerConfig(), "AdamW settings (paper LoRA: lr 3e-4) and clipping.")
    ema: EMAConfig = doc(EMAConfig(), "EMA of the trainable parameters (the paper evaluates EMA weights).")
    eval_reward: str | dict | None = doc(None, "Reward of the held-out evaluation (null: the store's spec of "
                                               "`rank_by`).")
    monitor_rewards: list[str | dict] = doc(["shapes_quality"], "Rewards scored on the held-out samples, never "
                                            "optimised (eval_<name>_mean): flags reward hacking.")
    prompts: PromptConfig = doc(PromptConfig(), "Held-out prompts (the eval_* keys). Training prompts are the "
                                                "store's; split and file are not used.")
    sampler: GDROSamplerConfig = doc(GDROSamplerConfig(), "Held-out evaluation sampling.")
    output_dir: str = doc("runs/gdro", "Run folder: config.yaml, metrics.csv, checkpoints/, final/.")
    checkpoint_every: int = doc(1, "Save a checkpoint every N epochs (and always at the end); 0 = end only.")
    eval_every: int = doc(2, "Evaluate held-out prompts before epochs 0, N, 2N... and after training; 0 = never.")

    def __post_init__(self):
        super().__post_init__()
        if self.tau < 0 or self.beta <= 0 or self.gamma < 0:
            raise ValueError("need tau >= 0, beta > 0 and gamma >= 0")
        for name in ("groups_per_step", "micro_batch_groups", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# ============================================================================= data


@dataclass
class TrainingGroups:
    """The store's usable groups in memory. latents: [G, K, *latent] float32; rewards: [G, K];
    group_ids: [G] store group indices (seed keys); prompts: distinct prompts; prompt_index: [G]."""

    latents: Tensor
    rewards: Tensor
    group_ids: Tensor
    prompts: list[str]
    prompt_index: Tensor

    def __len__(self) -> int:
        return self.rewards.shape[0]


def load_training_groups(store: RolloutStore, rank_by: str | None = None, skip_corrupt: bool = False,
                         drop_tied: bool = True) -> tuple[TrainingGroups, dict[str, float]]:
    """Every finished group of `store` with finite rewards `rank_by` (and, with `drop_tied`, not all
    equal). Returns the groups and counts (train_groups, dropped_nan_groups, dropped_tied_groups)."""
    rank_by = rank_by or store.reward_names[0]
    if rank_by not in store.reward_names:
        raise ValueError(f"rank_by={rank_by!r} is not a reward of the store {store.root} "
                         f"(it has {', '.join(store.reward_names)})")
    if not store.complete:
        warnings.warn(f"rollout store {store.root} is incomplete ({len(store.shards)} of "
                      f"{store.manifest['num_shards']} shards); training on the finished ones", stacklevel=2)
    latents, rewards, ids, prompts = [], [], [], []
    nan, tied = 0, 0
    for group in store.groups(skip_corrupt=skip_corrupt):
        r = group.rewards[rank_by]  # [K]
        if not bool(torch.isfinite(r).all()):
            nan += 1
        elif drop_tied and bool((r == r[0]).all()):
            tied += 1
        else:
            latents.append(group.latents)
            rewards.append(r)
            ids.append(group.index)
            prompts.append(group.prompt)
    if not latents:
        raise ValueError(f"rollout store {store.root}: no group to train on ({nan} with missing rewards, "
                         f"{tied} with all {store.group_size} rewards equal)")
    unique = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(unique)}
    groups = TrainingGroups(torch.stack(latents), torch.stack(rewards), torch.tensor(ids), unique,
                            torch.tensor([where[p] for p in prompts]))
    return groups, {"train_groups": len(groups), "dropped_nan_groups": nan, "dropped_tied_groups": tied}


@torch.no_grad()
def encode_prompts(model, prompts: list[str], batch_size: int):
    """Conditioning (no CFG) of every prompt, encoded once in batches, kept on the CPU."""
    conds = [model.encode_prompt(prompts[i : i + batch_size], negative_prompt=None).to("cpu")
             for i in range(0, len(prompts), batch_size)]
    return type(conds[0]).cat(conds)  # the family's Cond type (e.g. SD3Cond)


# ============================================================================= the objective


def forward_noise(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """Rectified-flow forward process x_t = (1 - t) x0 + t eps -> [B, *latent] (t: [B])."""
    t = t.float().reshape(-1, *[1] * (x0.ndim - 1))  # [B, 1, ...]
    return (1 - t) * x0.float() + t * noise.float()


def group_timesteps_and_noise(group_ids: Tensor, group_size: int, latent_shape, seed: int, epoch: int,
                              sampling: str = "logit_normal", share_noise: bool = True) -> tuple[Tensor, Tensor]:
    """(t [g], eps [g, K, *latent]) for groups `group_ids` at `epoch`: one t per group (and one eps
    if share_noise), each group seeded by (seed, epoch, group id) so any batching gives the same."""
    ts, noises = [], []
    for group in group_ids.tolist():
        gen = torch.Generator().manual_seed(derive_seed(seed, epoch, _TIMESTEP, group))
        ts.append(torch.sigmoid(torch.randn(1, generator=gen)) if sampling == "logit_normal"
                  else torch.rand(1, generator=gen))
        eps = torch.randn(1 if share_noise else group_size, *latent_shape, generator=gen)
        noises.append(eps.expand(group_size, *latent_shape))
    return torch.cat(ts), torch.stack(noises)


def gdro_objective(model, policy, reference, x0: Tensor, rewards: Tensor, cond, t: Tensor, noise: Tensor,
                   beta: float, tau: float, gamma: float) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_GDRO + gamma L_reg for g groups of K samples (ALGORITHMS.md sec. 3).

    x0, noise: [g, K, *latent]; rewards: [g, K] explicit; cond: g K rows, group-major; t: [g].
    policy: the (DDP-wrapped) trainable transformer; reference: None (LoRA disabled) or a frozen copy.
    """
    g, k = rewards.shape
    x0, noise = x0.flatten(0, 1), noise.flatten(0, 1)  # [gK, *latent]
    sigma = t.float().repeat_interleave(k)  # [gK] shared within each group
    x_t = forward_noise(x0, noise, sigma)  # [gK, *latent]
    with torch.no_grad(), reference_policy(model, reference):
        v_ref = model.velocity(x_t, sigma, cond, guidance=1.0)  # [gK, *latent]
    with transformer_as(model, policy):
        v_theta = model.velocity(x_t, sigma, cond, guidance=1.0)  # [gK, *latent]
    s = gdro_implicit_reward(noise - x0, v_theta, v_ref, beta).view(g, k)  # [g, K]
    rank_loss, metrics = gdro_loss(s, rewards, tau)
    top = rewards.argmax(dim=1) + torch.arange(g, device=rewards.device) * k  # [g] best sample of each group
    reg = flow_matching_loss(v_theta[top], x0[top], noise[top])
    loss = rank_loss + gamma * reg
    return loss, {**metrics, "reg_loss": reg.detach(), "loss": loss.detach()}


# ============================================================================= the loop


def train(cfg: GDROConfig, model=None) -> dict[str, Any]:
    """Run GDRO on `cfg.store`; returns the last epoch's metrics (plus the final evaluation).

    model: a FlowModel adapter to train in place (default: load `cfg.model`). Works on one
    process and under `accelerate launch` (groups_per_step must divide by the rank count).
    """
    from rewards import build_reward

    # ---- offline data: whole groups of the rollout store
    store = RolloutStore(cfg.store)
    data, data_info = load_training_groups(store, cfg.rank_by, cfg.skip_corrupt_shards, cfg.drop_tied_groups)
    if len(data) < cfg.groups_per_step:
        raise ValueError(f"only {len(data)} usable groups in {cfg.store}, fewer than groups_per_step="
                         f"{cfg.groups_per_step}")
    if store.manifest["config"]["model"] != cfg.model:
        warnings.warn(f"the store was sampled from {store.manifest['config']['model']!r} but the reference here "
                      f"is {cfg.model!r}", stacklevel=2)
    rank_by = cfg.rank_by or store.reward_names[0]
    reward_fn = build_reward(cfg.eval_reward if cfg.eval_reward is not None else store.manifest["rewards"][rank_by])

    # ---- model, reference, trainable parameters, optimizer, prompts of the store
    run = setup_run(cfg, model, reward_fn, frozen_reference=True)
    if data.latents.shape[2] != run.model.latent_shape()[0]:  # any resolution, but the model's latent channels
        raise ValueError(f"store latents {tuple(data.latents.shape[2:])} do not fit the model's latent shape "
                         f"{tuple(run.model.latent_shape())}")
    P, rank = run.num_processes, run.accelerator.process_index
    if cfg.groups_per_step % P:
        raise ValueError(f"groups_per_step={cfg.groups_per_step} must be a multiple of the {P} processes")
    cond = encode_prompts(run.model, data.prompts, cfg.sampler.batch_size)
    ema = make_ema(run)
    steps_per_epoch = len(data) // cfg.groups_per_step  # the remainder waits for another epoch's order

    def epoch_fn(epoch: int, global_step: int) -> tuple[dict[str, Any], int]:
        # ---- optimizer steps over the groups in a seeded order: accumulate -> clip -> step -> EMA
        run.phase(f"epoch {epoch + 1}: training")
        start = time.perf_counter()
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _ORDER)))
        stats, grad_norms = WeightedMeans(), []
        for step in range(steps_per_epoch):
            mine = order[step * cfg.groups_per_step : (step + 1) * cfg.groups_per_step][rank::P]
            micro = torch.split(mine, cfg.micro_batch_groups)
            for index, groups in enumerate(micro):
                last = index == len(micro) - 1  # DDP all-reduces on the last backward only
                with contextlib.nullcontext() if last else run.accelerator.no_sync(run.policy):
                    loss, step_metrics = _micro_batch_loss(run.model, run.policy, run.reference, data, cond, groups,
                                                           cfg, epoch)
                    run.accelerator.backward(loss * (len(groups) / len(mine)))
                stats.add(step_metrics, len(groups))
            grad_norms.append(optimizer_step(run))
            global_step += 1
            if ema is not None:
                ema.update(global_step)
        metrics = {**data_info, "time_train": time.perf_counter() - start, **stats.reduce(run.accelerator)}
        metrics["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        metrics["optimizer_steps"] = len(grad_norms)
        return metrics, global_step

    title = f"GDRO on {cfg.model} ({store.group_size} per group, ranked by {rank_by})"
    return run_epochs(run, epoch_fn, title=title, summary=SUMMARY, ema=ema)


def _micro_batch_loss(model, policy, reference, data: TrainingGroups, cond, groups: Tensor, cfg: GDROConfig,
                      epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
    """gdro_objective on the groups `groups` (indices into `data`) at `epoch`'s timesteps and noise."""
    device = model.device
    x0, rewards = data.latents[groups], data.rewards[groups]  # [g, K, *latent], [g, K]
    k = rewards.shape[1]
    t, noise = group_timesteps_and_noise(data.group_ids[groups], k, x0.shape[2:], cfg.seed, epoch,
                                         cfg.timestep_sampling, cfg.share_noise)
    rows = cond.index(data.prompt_index[groups].repeat_interleave(k)).to(device)
    return gdro_objective(model, policy, reference, x0.to(device), rewards.to(device), rows, t.to(device),
                          noise.to(device), cfg.beta, cfg.tau, cfg.gamma)


# (label, metric, format) of the epoch summary line
SUMMARY = [("loss", "loss", ".3f"),
           ("pl", "gdro_loss", ".3f"),
           ("reg", "reg_loss", ".3f"),
           ("pair acc", "pairwise_accuracy", ".2f")]
