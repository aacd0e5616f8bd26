"""`align pretrain-video-toy`: trains the ShapesWorld-Video base model on the CPU.

The VAE is the image toy's (frozen, per frame) and the text encoder starts from the image toy's
(samplers/models/shapesworld_video.py), so only one phase runs: the `WanTransformer3DModel` and the
text encoder jointly, rectified-flow matching (x_t = (1 - t) x0 + t eps, target v = eps - x0,
logit-normal t, optionally SD3-shifted: `--timestep-shift`), 10% caption dropout to "" for
classifier-free guidance, AdamW with warm-up and cosine decay, on pre-encoded latents of
ground-truth clips of TRAIN-split prompts only (category balanced). Everything is seeded, so the
same command gives the same weights. At the end it samples held-out (test-split) prompts and
reports the verifier's accuracies (`eval_log.json`).

    nice -n 10 env OMP_NUM_THREADS=2 python -m align.pretrain_video_toy

Defaults (4400 steps x 32 clips, 10,000 clips, lr 1e-3, timestep shift 3, coordinate input
channels, 2 threads) made the shipped weights: 32.7 min of training on 2 threads (33.1 with
evaluation), final flow loss ~0.10. Held-out (test-split) direction accuracy 0.46, strict 0.23,
partial 0.67 (train split 0.55 / 0.22 / 0.70), inside issue 7's 0.3-0.75 direction target; two
objects moving in opposite directions stay at 0 (both directions are never right at once).
Without the coordinate channels the transformer is position-blind on near-pure noise
(samplers/models/wan.py) and held-out direction stayed at 0.03-0.05 however long it trained
(2200 or 4400 steps, shift 1 or 3, wider heads); with them at the old length (2200 steps of 5000
clips) it was still 0.02: direction needs both.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rewards.base import cosine_lr
from samplers.progress import track
from samplers.schedules import shift_sigmas


def balanced_metas(split: str, n: int, rng: np.random.Generator) -> list[dict]:
    """n prompts of `split`, each ShapesWorld-Video category equally likely, uniform within."""
    from eval.shapes_video import VIDEO_TAGS, video_prompts

    by_tag = {tag: [m for m in video_prompts(split) if m["tag"] == tag] for tag in VIDEO_TAGS}
    tags = rng.integers(0, len(VIDEO_TAGS), size=n)
    return [by_tag[VIDEO_TAGS[t]][rng.integers(0, len(by_tag[VIDEO_TAGS[t]]))] for t in tags]


def clips_tensor(metas: list[dict], rng: np.random.Generator) -> torch.Tensor:
    """Ground-truth clips -> float videos in [0, 1], [B, 3, T, H, W]."""
    from eval.shapes_video import render_clips

    return torch.from_numpy(render_clips(metas, rng)).permute(0, 4, 1, 2, 3).float() / 255.0


@torch.no_grad()
def encode_dataset(model, n: int, rng: np.random.Generator, batch: int = 8) -> tuple[torch.Tensor, list[str]]:
    """n train clips encoded to normalised latents [n, C, T, h, w] and their prompts.

    Small batches: the per-frame VAE is several times faster per frame on 64 frames than on 512."""
    metas = balanced_metas("train", n, rng)
    latents = [model.encode(clips_tensor(metas[i:i + batch], rng))
               for i in track(range(0, n, batch), f"pretrain-video-toy: rendering and encoding {n} clips", unit="batches")]
    return torch.cat(latents), [m["prompt"] for m in metas]


def sample_timesteps(batch: int, gen: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """Training t in (0, 1): logit-normal(0, 1), then the SD3 timestep shift t' = s t / (1 + (s - 1) t)
    (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
    Sec. 5.3.2, eq. 23; `samplers.schedules.shift_sigmas`). shift 1 = plain logit-normal (the
    shipped run); shift 3 = the sampler's shift, P(t > 0.9) 1.4% -> 13.6%: the direction word only matters at
    high noise, where the sampler's first steps are (sigmas 1, 0.96, 0.91, 0.86)."""
    t = torch.sigmoid(torch.randn(batch, generator=gen))
    return t if shift == 1.0 else shift_sigmas(t, shift)


def train_flow(model, latents, prompts, steps, batch, lr, warmup, caption_dropout, gen, log,
               timestep_shift: float = 1.0) -> None:
    modules = (model.transformer, model.text_encoder)
    for m in modules:
        m.train().requires_grad_(True)
    # token embeddings (49,408 rows, ~40 used) stay fixed: cheap random features, as in the image toy
    model.text_encoder.get_input_embeddings().requires_grad_(False)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    n = latents.shape[0]
    for step in track(range(steps), "pretrain-video-toy: flow matching"):
        idx = torch.randint(0, n, (batch,), generator=gen)
        x0 = latents[idx]  # [B, C, T, h, w]
        drop = torch.rand(batch, generator=gen) < caption_dropout
        cond = model.encode_prompt(["" if d else prompts[i] for i, d in zip(idx.tolist(), drop.tolist())],
                                   negative_prompt=None, grad=True)
        t = sample_timesteps(batch, gen, timestep_shift)
        eps = torch.randn(x0.shape, generator=gen)
        tb = t.reshape(-1, *[1] * (x0.ndim - 1))
        v = model.velocity((1 - tb) * x0 + tb * eps, t, cond, guidance=1.0)
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log("flow", step, loss=loss.item(), grad_norm=float(grad_norm), lr=sched.get_last_lr()[0])
    for m in modules:
        m.eval().requires_grad_(False)


@torch.no_grad()
def evaluate_split(model, split: str = "test", num: int = 96, seed: int = 1234, num_steps: int | None = None,
                   guidance: float | None = None, batch_size: int = 32) -> dict:
    """Samples `num` category-balanced prompts of `split` (ODE, the checkpoint's defaults) and
    returns the verifier's summary (`aggregate_video`: strict / partial / direction, per tag)."""
    from eval.grid import to_uint8_videos
    from eval.shapes_video import aggregate_video, evaluate_clip
    from samplers.generate import generate

    metas = balanced_metas(split, num, np.random.default_rng(seed))
    videos = generate(model, [m["prompt"] for m in metas], seeds=[seed + i for i in range(num)],
                      num_steps=num_steps, guidance=guidance, batch_size=batch_size)
    frames = to_uint8_videos(videos)  # (B, T, H, W, 3)
    return aggregate_video([evaluate_clip(f, m) for f, m in zip(frames, metas)], metas)


def pretrain_video_toy(out: Path, seed: int = 0, dataset_size: int = 10000, steps: int = 4400, batch: int = 32,
                       lr: float = 1e-3, warmup: int = 100, caption_dropout: float = 0.1, threads: int = 2,
                       eval_num: int = 96, timestep_shift: float = 3.0, coord_channels: bool = True) -> Path:
    """Trains the toy video model and saves it to `out` (diffusers WanPipeline layout). Returns `out`."""
    from samplers.models.shapesworld_video import toy_video_components

    from .checkpoint import replace_dir

    torch.set_num_threads(threads)
    out = Path(out)
    work = out.with_name(out.name + ".partial")  # swapped in at the end: a killed run leaves `out` intact
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = toy_video_components("shapesworld_video", seed=seed, coord_channels=coord_channels)
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

    latents, prompts = encode_dataset(model, dataset_size, rng)
    log("data", 0, clips=dataset_size, latent_mean=latents.mean().item(), latent_std=latents.std().item())
    train_flow(model, latents, prompts, steps, batch, lr, warmup, caption_dropout, gen, log, timestep_shift)
    train_minutes = (time.time() - start) / 60
    settings = {"pretrain": dict(seed=seed, steps=steps, batch=batch, lr=lr, dataset_size=dataset_size,
                                 train_minutes=round(train_minutes, 1))}
    settings["pretrain"].update(timestep_shift=timestep_shift, coord_channels=coord_channels)
    model.save_pretrained(work, settings=settings)
    log("done", steps, minutes=train_minutes)
    if eval_num:
        results = evaluate_split(model, "test", eval_num)
        results["train"] = evaluate_split(model, "train", eval_num)
        (work / "eval_log.json").write_text(json.dumps(results, indent=2) + "\n")
        log("eval", steps, test_direction=results["direction"], test_strict=results["strict"],
            train_direction=results["train"]["direction"], train_strict=results["train"]["strict"])
    log_file.close()
    replace_dir(work, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from samplers.models.shapesworld_video import VIDEO_DIR

    parser.add_argument("--out", type=Path, default=VIDEO_DIR,
                        help="output folder (default: the package's shipped weights folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4400, help="training steps")
    parser.add_argument("--batch", type=int, default=32, help="clips per training step")
    parser.add_argument("--dataset-size", type=int, default=10000, help="pre-rendered training clips")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timestep-shift", type=float, default=3.0,
                        help="SD3 shift of the logit-normal training t (1: none; 3: the sampler's shift)")
    parser.add_argument("--coord-channels", action=argparse.BooleanOptionalAction, default=True,
                        help="append t / y / x coordinate channels to the transformer input (samplers/models/wan.py)")
    parser.add_argument("--eval-num", type=int, default=96, help="held-out clips sampled at the end (0: none)")


def main(args: argparse.Namespace) -> None:
    pretrain_video_toy(args.out, seed=args.seed, steps=args.steps, batch=args.batch,
                       dataset_size=args.dataset_size, lr=args.lr, threads=args.threads, eval_num=args.eval_num,
                       timestep_shift=args.timestep_shift, coord_channels=args.coord_channels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
