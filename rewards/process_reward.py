"""Latent process reward model (PRM): the outcome reward predicted from a noisy latent.

r_p(x_t, sigma, c) estimates E[r(x_0) | x_t] for the flow model's samples, so a sampler can be
steered along grad_x r_p before the image exists (Euphonium, Zhong et al. 2026; ALGORITHMS.md
section 5). It works on the flow model's latents, images [B, C, H, W] or videos [B, C, T, H, W],
and is a small differentiable network, so the gradient is cheap.

Architecture (:class:`LatentPRM`): three 3x3 convolutions (the first FiLM-modulated by an MLP of
Fourier features of sigma and the prompt vector), global mean pooling; for videos every frame is
encoded and the head sees the mean over frames and the last-minus-first frame feature (motion).
The prompt vector is the flow model's pooled text embedding (:func:`prompt_vectors`).

Training (``align train-prm``, :func:`train_prm`): from a rollout store (``align rollout``): the
final latents x_0 of K samples per prompt and their outcome reward r. Each step draws samples and
sigma ~ U(0, 1) and noises them with the forward process, x_t = (1 - sigma) x_0 + sigma eps (for a
well-trained flow its marginals are the sampler's marginals). Loss: MSE of the standardised
reward (the model stores the mean and std and answers on the reward's scale) plus a pairwise
logistic ranking term within each prompt group (guidance needs the order of a group's samples).

Evaluation (:func:`evaluate_prm`) uses states the sampler really visits: deterministic ODE
trajectories of held-out (TEST-split) prompts; at several steps it reports the Spearman
correlation of r_p(x_t) with the trajectory's final reward, pooled over all samples and within
prompt groups (mean over groups).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rewards.base import cosine_lr
from samplers.progress import track

CONFIG_FILE, WEIGHTS_FILE = "config.json", "prm.safetensors"

__all__ = ["DecodedProcessReward", "LatentPRM", "prompt_vectors", "save_prm", "load_prm", "fit_prm", "train_prm", "evaluate_prm", "spearman",
           "tweedie_estimate"]


def average_ranks(values) -> np.ndarray:
    """[N] -> [N] 1-based ranks; tied values share the mean of the ranks they span
    (e.g. [10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]  # start of each run of equal values
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(first) - 1]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation: the Pearson correlation of the average ranks (ties share their
    mean rank). NaN when either side is constant, has fewer than 2 values or holds a NaN."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values vs {len(b)}")
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any() or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt((ra * ra).sum() * (rb * rb).sum()))


def _sigma_features(sigma: Tensor, count: int = 8) -> Tensor:
    """[B] -> [B, 2 count + 1] Fourier features of sigma in [0, 1]."""
    freqs = math.pi * 2.0 ** torch.arange(count, device=sigma.device, dtype=torch.float32)
    angles = sigma.float()[:, None] * freqs
    return torch.cat([sigma.float()[:, None], angles.sin(), angles.cos()], dim=1)


class LatentPRM(nn.Module):
    """r_p(latents [B, C, H, W] or [B, C, T, H, W], sigma [B] or scalar, text [B, D]) -> [B]."""

    def __init__(self, latent_channels: int = 4, text_dim: int = 48, hidden: int = 64):
        super().__init__()
        self.config = {"latent_channels": latent_channels, "text_dim": text_dim, "hidden": hidden}
        self.stem = nn.Conv2d(latent_channels, hidden, 3, padding=1)
        self.film = nn.Sequential(nn.Linear(17 + text_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden + 17 + text_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # the head predicts standardised rewards; these map them back to the reward's own scale
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    def forward(self, latents: Tensor, sigma: Tensor | float, text: Tensor) -> Tensor:
        if latents.ndim not in (4, 5):
            raise ValueError(f"latents must be [B, C, H, W] or [B, C, T, H, W], got {tuple(latents.shape)}")
        b = latents.shape[0]
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).reshape(-1).expand(b)
        cond = torch.cat([_sigma_features(sigma), text.float()], dim=1)  # [B, 17 + D]
        frames = latents.shape[2] if latents.ndim == 5 else 1
        x = latents.float()
        if latents.ndim == 5:  # every frame through the same encoder
            x = x.permute(0, 2, 1, 3, 4).reshape(b * frames, *x.shape[1:2], *x.shape[3:])
        scale, shift = self.film(cond).repeat_interleave(frames, 0)[:, :, None, None].chunk(2, dim=1)
        h = self.body(self.stem(x) * (1 + scale) + shift).mean(dim=(2, 3)).reshape(b, frames, -1)
        pooled = torch.cat([h.mean(1), h[:, -1] - h[:, 0]], dim=1)  # motion is 0 for images
        return self.reward_mean + self.reward_std * self.head(torch.cat([pooled, cond], dim=1)).squeeze(1)

    def reward_and_grad(self, latents: Tensor, sigma: Tensor | float, text: Tensor) -> tuple[Tensor, Tensor]:
        """(r_p [B], d r_p / d latents [B, *latent]) for guidance; no graph is kept."""
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            r = self(x, sigma, text)
            (grad,) = torch.autograd.grad(r.sum(), x)
        return r.detach(), grad


@torch.no_grad()
def prompt_vectors(model, prompts: Sequence[str]) -> Tensor:
    """[B, D] prompt vector of a flow model adapter: its pooled text embedding, else the mean of
    its token embeddings."""
    unique = list(dict.fromkeys(prompts))
    cond = model.encode_prompt(unique, negative_prompt=None)
    pooled = getattr(cond, "pooled", None)
    vectors = pooled if pooled is not None else cond.prompt_embeds.mean(1)
    return vectors.float()[torch.tensor([unique.index(p) for p in prompts])].cpu()


def save_prm(directory: str | Path, prm: LatentPRM, metadata: dict) -> Path:
    """Writes config.json + prm.safetensors into a temporary folder and moves it into place."""
    from safetensors.torch import save_file

    from align.checkpoint import replace_dir

    directory = Path(directory)
    tmp = directory.parent / f".tmp-{directory.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in prm.state_dict().items()}, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps({**prm.config, "metadata": metadata}, indent=2) + "\n")
    replace_dir(tmp, directory)
    return directory


def load_prm(directory: str | Path, device: str | torch.device = "cpu") -> LatentPRM:
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no process reward model ({CONFIG_FILE} + {WEIGHTS_FILE}); "
                                "train one with `align train-prm STORE --out DIR`")
    config = json.loads((directory / CONFIG_FILE).read_text())
    prm = LatentPRM(config["latent_channels"], config["text_dim"], config["hidden"])
    prm.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return prm.to(device).eval()


def _ranking_loss(pred: Tensor, target: Tensor, groups: Tensor) -> Tensor:
    """Pairwise logistic loss over pairs of the same group with different targets (0 if none)."""
    same = groups[:, None] == groups[None, :]
    better = (target[:, None] > target[None, :]) & same  # [B, B]: i should score above j
    if not better.any():
        return pred.sum() * 0.0
    margin = pred[:, None] - pred[None, :]
    return nn.functional.softplus(-margin[better]).mean()


def fit_prm(x0: Tensor, r: Tensor, groups: Tensor, text: Tensor, *, steps: int = 1500, batch_groups: int = 16,
            lr: float = 2e-3, hidden: int = 64, rank_weight: float = 1.0, seed: int = 0,
            quiet: bool = False) -> tuple[LatentPRM, list[dict]]:
    """Fits a LatentPRM to clean latents x0 [N, *latent], outcome rewards r [N], prompt-group ids
    [N] and prompt vectors [N, D]: each step takes ``batch_groups`` whole groups, noises them to
    sigma ~ U(0, 1) with the forward process, and minimises the standardised MSE plus
    ``rank_weight`` x the within-group pairwise ranking loss. Returns (model in eval mode, log)."""
    torch.manual_seed(seed)
    ids = groups.unique()
    prm = LatentPRM(x0.shape[1], text.shape[1], hidden)
    prm.reward_mean.fill_(r.mean())
    prm.reward_std.fill_(r.std().clamp_min(1e-6))
    optimizer = torch.optim.AdamW(prm.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed)
    start, log = time.perf_counter(), []
    for step in track(range(steps), "train-prm", quiet=quiet):
        chosen = ids[torch.randperm(len(ids), generator=gen)[:batch_groups]]
        index = torch.nonzero(torch.isin(groups, chosen)).squeeze(1)
        sigma = torch.rand(len(index), generator=gen)
        noise = torch.randn(x0[index].shape, generator=gen)
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        z = (prm((1 - s) * x0[index] + s * noise, sigma, text[index]) - prm.reward_mean) / prm.reward_std
        mse = nn.functional.mse_loss(z, (r[index] - prm.reward_mean) / prm.reward_std)
        rank = _ranking_loss(z, r[index], groups[index])
        loss = mse + rank_weight * rank
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, steps // 10) == 0:
            log.append({"step": step + 1, "mse": round(mse.item(), 4), "rank": round(rank.item(), 4)})
            if not quiet:
                print(f"step {step + 1}/{steps} mse {mse.item():.4f} rank {rank.item():.4f} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    return prm.eval(), log


def train_prm(store: str | Path, out: str | Path | None = None, *, model: str = "shapesworld", reward: str | None = None,
              steps: int = 1500, batch_groups: int = 16, lr: float = 2e-3, hidden: int = 64, rank_weight: float = 1.0,
              seed: int = 0, quiet: bool = False) -> tuple[LatentPRM, dict]:
    """Trains a LatentPRM on a rollout store's (final latent, outcome reward) pairs."""
    from align.rollout_store import RolloutStore
    from align.runtime import load_flow_model

    torch.manual_seed(seed)
    rollout_store = RolloutStore(store)
    reward = reward or rollout_store.reward_names[0]
    if reward not in rollout_store.reward_names:
        raise ValueError(f"{store}: no reward {reward!r}; it has {rollout_store.reward_names}")
    latents, rewards, prompts, groups = [], [], [], []
    for g in rollout_store.groups():
        latents.append(g.latents.float())
        rewards.append(g.rewards[reward].float())
        prompts += [g.prompt] * len(g.latents)
        groups += [g.index] * len(g.latents)
    x0, r, groups = torch.cat(latents), torch.cat(rewards), torch.tensor(groups)
    valid = torch.isfinite(r)
    text = prompt_vectors(load_flow_model(model), prompts)
    start = time.perf_counter()
    prm, log = fit_prm(x0[valid], r[valid], groups[valid], text[valid], steps=steps, batch_groups=batch_groups, lr=lr,
                       hidden=hidden, rank_weight=rank_weight, seed=seed, quiet=quiet)
    info = {"store": str(store), "reward": reward, "model": model, "steps": steps, "samples": int(valid.sum()),
            "seconds": round(time.perf_counter() - start, 1), "log": log}
    if out is not None:
        save_prm(out, prm, info)
    return prm, info


class DecodedProcessReward:
    """Training-free process reward: a differentiable pixel reward R on the decoded one-step
    estimate of the clean sample, r_p(x_t, sigma, c) = R(decode(x_t - sigma v), c).

    v is the velocity the sampler has just computed at x_t and is treated as a constant, so
    grad_x r_p = (d R / d x0_hat) through the VAE decoder only: no backward pass through the
    transformer (the stop-gradient approximation of x0-prediction guidance). Unlike
    :class:`LatentPRM` it needs no training and ranks a prompt's samples exactly as R ranks their
    x0_hat (``python -m eval.prm_reference --reward NAME`` measures how well that tracks the
    outcome). R gets the prompts and metadata of the samples being guided.
    """

    def __init__(self, flow, reward):
        from rewards import build_reward

        self.flow = flow
        self.reward = build_reward(reward) if isinstance(reward, str) else reward
        if not getattr(self.reward, "differentiable", False):
            raise ValueError(f"process reward {getattr(self.reward, 'name', reward)!r} is not differentiable: "
                             "reward-gradient guidance needs a reward whose gradient reaches the pixels")

    def reward_and_grad(self, latents: Tensor, sigma: Tensor, velocity: Tensor, prompts: Sequence[str],
                        metadata: Sequence | None = None) -> tuple[Tensor, Tensor]:
        """(r_p [B], d r_p / d latents [B, *latent]); sigma [B] or scalar, velocity [B, *latent]."""
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
            r = self.reward(self.flow.decode(x - s * velocity.detach().float()), list(prompts),
                            metadata=metadata).scores
            (grad,) = torch.autograd.grad(r.nan_to_num(0.0).sum(), x)
        return r.detach().float(), grad


@torch.no_grad()
def tweedie_estimate(flow, latents: Tensor, sigma: Tensor, cond, guidance: float, batch_size: int = 64) -> Tensor:
    """x0_hat = x_t - sigma v(x_t): the flow's one-step (Tweedie) estimate of the clean latent."""
    chunks = []
    for start in range(0, latents.shape[0], batch_size):
        part = slice(start, start + batch_size)
        x = latents[part]
        chunks.append(x - sigma * flow.velocity(x, sigma, cond.index(part), guidance=guidance))
    return torch.cat(chunks)


@torch.no_grad()
def evaluate_prm(prm: LatentPRM | None, *, model: str = "shapesworld", reward: str | None = None,
                 split: str = "test", prompts_per_tag: int = 8, group_size: int = 8, num_steps: int = 10,
                 guidance: float = 4.5, shift: float = 3.0, steps: Sequence[int] = (0, 2, 4, 6, 8, 10),
                 seed: int = 1234, tweedie: Sequence[str] = ()) -> list[dict]:
    """Spearman of r_p(x_t) with the final reward along ODE trajectories of held-out prompts.

    Prompts are ShapesWorld's (ShapesWorld-Video's for a video model), `prompts_per_tag` of each
    category; reward None: the world's verifier. Returns one row per step index: {"step", "sigma",
    "pooled", "within_group"} (within_group:
    mean over prompt groups whose rewards are not all equal). ``tweedie``: reward names scored
    on the decoded Tweedie estimate x0_hat(x_t) (:func:`tweedie_estimate`), a training-free
    process reward, reported as "<name>:pooled" / "<name>:within_group" (prm None: only these).
    """
    from samplers.generate import encode_prompts
    from align.sample import shapesworld_prompts, shapesworld_video_prompts
    from align.runtime import load_flow_model
    from rewards import build_reward
    from samplers.rollout import rollout
    from samplers.schedules import flow_sigmas

    flow = load_flow_model(model)
    video = len(flow.latent_shape(64, 64)) == 4
    reward = reward or ("shapes_video_verifier" if video else "shapes_geneval")
    pick = shapesworld_video_prompts if video else shapesworld_prompts
    items = [item for item in pick(split, prompts_per_tag) for _ in range(group_size)]
    prompts, metadata = [item["prompt"] for item in items], [item.get("meta") for item in items]
    sigmas = flow_sigmas(num_steps, shift=shift)
    cond = encode_prompts(flow, prompts, guidance, "")
    traj = rollout(flow, cond, sigmas, step_types="ode", guidance=guidance, batch_size=len(items),
                   generator=torch.Generator().manual_seed(seed))
    outcome = build_reward(reward)(flow.decode(traj.final), prompts, metadata=metadata).scores.float().numpy()
    text = prompt_vectors(flow, prompts) if prm is not None else None
    groups = np.repeat(np.arange(len(items) // group_size), group_size)
    references = {name: build_reward(name) for name in tweedie}

    def correlations(pred: np.ndarray, prefix: str = "") -> dict:
        within = [spearman(pred[groups == g], outcome[groups == g]) for g in np.unique(groups)]
        within = [w for w in within if math.isfinite(w)]
        return {prefix + "pooled": spearman(pred, outcome),
                prefix + "within_group": float(np.mean(within)) if within else math.nan}

    rows = []
    for i in steps:
        row = {"step": int(i), "sigma": round(float(sigmas[i]), 3)}
        if prm is not None:
            row |= correlations(prm(traj.latents[:, i], sigmas[i].expand(len(items)), text).numpy())
        if references:
            x0_hat = tweedie_estimate(flow, traj.latents[:, i], sigmas[i], cond, guidance) if i < num_steps \
                else traj.final
            images = flow.decode(x0_hat)
            for name, ref in references.items():
                scores = ref(images, prompts, metadata=metadata).scores.float().numpy()
                row |= correlations(scores, f"{name}:")
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="rollout store written by `align rollout` (final latents + rewards)")
    parser.add_argument("--out", type=Path, default=Path("runs/prm"), help="output folder (written atomically)")
    parser.add_argument("--model", default="shapesworld", help="the flow model whose latents the store holds")
    parser.add_argument("--reward", default=None, help="which of the store's rewards to predict (default: its first)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-groups", type=int, default=16, help="prompt groups per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rank-weight", type=float, default=1.0, help="weight of the within-group ranking loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts-per-tag", type=int, default=8,
                        help="held-out TEST prompts per category for the Spearman report (0: skip)")


def main(args: argparse.Namespace) -> None:
    prm, info = train_prm(args.store, args.out, model=args.model, reward=args.reward, steps=args.steps,
                          batch_groups=args.batch_groups, lr=args.lr, hidden=args.hidden,
                          rank_weight=args.rank_weight, seed=args.seed)
    print(f"wrote {args.out} ({info['samples']} samples, {info['seconds']:.0f}s)")
    if args.eval_prompts_per_tag:
        print("Spearman of r_p(x_t) with the final reward, ODE trajectories of held-out prompts:")
        print(f"  {'step':>4} {'sigma':>6} {'pooled':>7} {'within group':>13}")
        for row in evaluate_prm(prm, model=args.model, reward=info["reward"], prompts_per_tag=args.eval_prompts_per_tag):
            print(f"  {row['step']:>4} {row['sigma']:>6.3f} {row['pooled']:>7.3f} {row['within_group']:>13.3f}")
