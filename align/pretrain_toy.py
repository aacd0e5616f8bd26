"""`align pretrain-toy`: trains the ShapesWorld base model from scratch on the CPU.

Two seeded phases, both on ShapesWorld renders of TRAIN-split prompts only:
1. the VAE (`AutoencoderKL`, 64 px <-> 4x16x16), reconstruction MSE + a small KL;
   its latent mean/std then set the VAE's `shift_factor` / `scaling_factor`, as in SD3;
2. the transformer and both CLIP text encoders jointly, rectified-flow matching
   (x_t = (1 - t) x0 + t eps, target v = eps - x0, logit-normal t as in SD3), 10% caption
   dropout to "" for classifier-free guidance, AdamW with warm-up and cosine decay.
Latents are encoded once (posterior mode) from a pre-rendered image set, so phase 2 never
runs the VAE. The result is saved in diffusers layout (`SD3Adapter.save_pretrained`).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rewards.base import cosine_lr
from samplers.progress import track


def sample_train_metas(n: int, rng: np.random.Generator) -> list[dict]:
    """n train-split prompts, category-balanced (each tag equally likely, then uniform within)."""
    from eval.shapes.world import TAGS, prompts

    by_tag = {tag: [m for m in prompts("train") if m["tag"] == tag] for tag in TAGS}
    tags = rng.integers(0, len(TAGS), size=n)
    return [by_tag[TAGS[t]][rng.integers(0, len(by_tag[TAGS[t]]))] for t in tags]


def render_batch(metas: list[dict], rng: np.random.Generator) -> torch.Tensor:
    """Renders one random scene per prompt -> float images in [0, 1], [B, 3, 64, 64]."""
    from eval.shapes.world import render, scene_for_prompt

    arr = np.stack([render(scene_for_prompt(m, rng)) for m in metas])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def train_vae(vae, steps: int, batch: int, lr: float, kl_weight: float, rng, log, crop: int = 32) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, steps // 20))
    for step in track(range(steps), "pretrain-toy: VAE"):
        images = render_batch(sample_train_metas(batch, rng), rng) * 2 - 1
        # the VAE is fully convolutional: random 32 px crops train it 4x cheaper than full images
        y, x = rng.integers(0, images.shape[-1] - crop + 1, size=2)
        images = images[..., y:y + crop, x:x + crop]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, images)
        kl = posterior.kl().mean() / images[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log("vae", step, mse=mse.item(), kl=kl.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(model, n: int, rng, batch: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Renders n train scenes and encodes them: raw VAE latents [n, 4, 16, 16] and prompts."""
    metas = sample_train_metas(n, rng)
    latents = []
    for i in track(range(0, n, batch), f"pretrain-toy: rendering and encoding {n} scenes", unit="batches"):
        images = render_batch(metas[i:i + batch], rng)
        latents.append(model.vae.encode(images * 2 - 1).latent_dist.mode())
    return torch.cat(latents), [m["prompt"] for m in metas]


def train_flow(model, latents, prompts, steps, batch, lr, warmup, caption_dropout, gen, log, snapshot=None):
    for m in (model.transformer, model.text_encoder, model.text_encoder_2):
        m.train().requires_grad_(True)
    # Token embeddings (49,408 rows, ~30 used) stay at their random init: fixed random features
    # cost nothing to optimise, and AdamW over the full tables would dominate the step time.
    for encoder in (model.text_encoder, model.text_encoder_2):
        encoder.text_model.embeddings.token_embedding.requires_grad_(False)
    params = [p for m in (model.transformer, model.text_encoder, model.text_encoder_2)
              for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    n = latents.shape[0]
    for step in track(range(steps), "pretrain-toy: flow matching"):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = latents[idx]
        drop = torch.rand(batch, generator=gen) < caption_dropout
        batch_prompts = ["" if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist())]
        cond = model.encode_prompt(batch_prompts, negative_prompt=None, grad=True)
        t = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=gen)
        tb = t.view(-1, 1, 1, 1)
        xt = (1 - tb) * x0 + tb * eps
        v = model.velocity(xt, t, cond, guidance=1.0)
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log("flow", step, loss=loss.item(), grad_norm=float(grad_norm), lr=sched.get_last_lr()[0])
        if snapshot and step > 0 and step % snapshot[0] == 0:
            snapshot[1](step)
    for m in (model.transformer, model.text_encoder, model.text_encoder_2):
        m.eval().requires_grad_(False)


def pretrain_toy(out: Path, seed: int = 0, vae_steps: int = 1200, vae_batch: int = 32, vae_lr: float = 2e-3,
                 kl_weight: float = 1e-4, dataset_size: int = 40000, steps: int = 7000, batch: int = 64,
                 lr: float = 1e-3, warmup: int = 300, caption_dropout: float = 0.1, threads: int = 2,
                 snapshot_every: int = 0) -> Path:
    """Trains the toy model and saves it to `out`. Returns `out`."""
    from samplers.models.shapesworld import toy_components

    from .checkpoint import replace_dir

    torch.set_num_threads(threads)
    out = Path(out)
    # Everything is written to a sibling work folder and swapped in at the end, so a killed run
    # never leaves a half-written model where a good one was (e.g. the shipped weights).
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = toy_components("shapesworld", seed=seed)
    start = time.time()
    log_file = open(work / "pretrain_log.csv", "w", newline="")
    writer = csv.writer(log_file)
    writer.writerow(["phase", "step", "elapsed_s", "metric", "value"])

    def log(phase, step, **metrics):
        elapsed = time.time() - start
        for k, v in metrics.items():
            writer.writerow([phase, step, f"{elapsed:.1f}", k, f"{v:.6g}"])
        log_file.flush()
        print(f"[{elapsed / 60:5.1f} min] {phase} step {step}: "
              + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)

    train_vae(model.vae, vae_steps, vae_batch, vae_lr, kl_weight, rng, log)
    raw, prompts = encode_dataset(model, dataset_size, rng)
    mean, std = raw.mean().item(), raw.std().item()
    model.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
    latents = (raw - mean) / std
    log("data", 0, latent_mean=mean, latent_std=std, images=dataset_size)

    def snapshot(step):
        model.save_pretrained(work / "snapshots" / f"step{step:06d}")

    train_flow(model, latents, prompts, steps, batch, lr, warmup, caption_dropout, gen, log,
               snapshot=(snapshot_every, snapshot) if snapshot_every else None)
    model.save_pretrained(work, settings={"pretrain": dict(seed=seed, vae_steps=vae_steps, steps=steps, batch=batch,
                                                           lr=lr, dataset_size=dataset_size)})
    log("done", steps, minutes=(time.time() - start) / 60)
    log_file.close()
    replace_dir(work, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.models.shapesworld import SHAPESWORLD_DIR

    parser.add_argument("--out", type=Path, default=SHAPESWORLD_DIR,
                        help="output folder (default: the package's shipped weights folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=7000, help="transformer training steps (batch 64)")
    parser.add_argument("--dataset-size", type=int, default=40000, help="pre-rendered training images")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--snapshot-every", type=int, default=0, help="also save snapshots every N steps")


def main(args: argparse.Namespace) -> None:
    pretrain_toy(args.out, seed=args.seed, vae_steps=args.vae_steps, steps=args.steps,
                 dataset_size=args.dataset_size, lr=args.lr, threads=args.threads,
                 snapshot_every=args.snapshot_every)
