"""The self-consumption control: plain flow matching on the model's own verifier-correct samples.

    python -m experiments.learning.self_consumption --source own --rounds 2 --out runs/self_consumption
    python -m experiments.learning.self_consumption --source renders --rounds 2 --out runs/self_consumption

Each round (the setting of the learning issue): for every train prompt draw `--best-of` samples with the
10-step ODE at CFG `--guidance`, keep the best by the verifier if it is strict-correct (source 'own'),
or render a scene of the prompt instead (source 'renders', the control of the control); then
`--steps` AdamW steps of `--batch` on the flow-matching loss |v - (eps - x0)|^2 at uniform t, on the
full transformer (lr `--lr`), optionally with a v-space anchor `--kl` |v - v_ref|^2 to the base model
at the same points (drift control). `--loss-guidance` picks the velocity the loss is on: the CFG
combination (4.5, as the issue measured) or the conditional branch alone (1). After each round:
strict / partial accuracy on train prompts (fresh seeds) and held-out compositions, 384 each, at CFG 4.5.
A method that learns from its own samples can only be trusted if this stays put: the issue's target is
train-prompt strict within 0.02 of the base after two rounds.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from .measure import evaluate_model, write_json


def correct_samples(model, items: list[dict], best_of: int, guidance: float, seed: int, rnd: int,
                    reencode: bool = True):
    """Latents [n, *latent] of the best strict-correct sample of each prompt (prompts with none are
    skipped), the prompts and the rollouts' strict accuracy. reencode: the VAE encoding of the decoded
    image (as a dataset of images would be used) rather than the sampled latent itself."""
    from rewards import build_reward
    from samplers.generate import generate

    verifier = build_reward("shapes_geneval")
    prompts = [it["prompt"] for it in items for _ in range(best_of)]
    metas = [it["meta"] for it in items for _ in range(best_of)]
    seeds = [20_000_000 + 1_000_000 * seed + 100_000 * rnd + i for i in range(len(prompts))]
    images, sampled = generate(model, prompts, seeds, num_steps=10, guidance=guidance, shift=3.0, sampler="ode",
                               batch_size=64, return_latents=True)
    out = verifier(images, prompts, metadata=metas)
    strict, partial = out.extras["strict"].view(-1, best_of), out.extras["partial"].view(-1, best_of)
    best = (strict * 10 + partial).argmax(dim=1)  # strict first, then partial credit
    keep = [i for i in range(len(items)) if strict[i, best[i]] == 1]
    index = [i * best_of + int(best[i]) for i in keep]
    latents = sampled[index]
    if reencode:
        with torch.no_grad():
            latents = torch.cat([model.encode(images[index][j:j + 64]) for j in range(0, len(index), 64)])
    return latents, [items[i]["prompt"] for i in keep], float(strict.float().mean())


def rendered_samples(model, items: list[dict], seed: int, rnd: int):
    """Latents of one render per prompt (a new scene each round)."""
    from eval.shapes import render, scene_for_prompt

    images = np.stack([render(scene_for_prompt(it["meta"], rng=[seed, rnd, i])) for i, it in enumerate(items)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        latents = torch.cat([model.encode(pixels[j:j + 64]) for j in range(0, len(pixels), 64)])
    return latents, [it["prompt"] for it in items]


def fine_tune(model, reference, latents, prompts, steps: int, batch: int, lr: float, loss_guidance: float,
              kl: float, seed: int) -> None:
    """`steps` AdamW steps of flow matching (+ kl |v - v_ref|^2) on (latents, prompts), full transformer."""
    gen = torch.Generator().manual_seed(seed)
    model.transformer.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(model.transformer.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch,), generator=gen)
        x0 = latents[idx]
        cond = model.encode_prompt([prompts[i] for i in idx.tolist()],
                                   negative_prompt="" if loss_guidance > 1 else None)
        t = torch.rand(batch, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        tt = t.view(-1, 1, 1, 1)
        x_t = (1 - tt) * x0 + tt * eps
        v = model.velocity(x_t, t, cond, loss_guidance)
        loss = (v - (eps - x0)).square().mean()
        if kl:
            with torch.no_grad():
                raw = model.transformer
                model.transformer = reference
                v_ref = model.velocity(x_t, t, cond, loss_guidance)
                model.transformer = raw
            loss = loss + kl * (v - v_ref).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.transformer.parameters(), 1.0)
        optimizer.step()
    model.transformer.requires_grad_(False).eval()


def run_control(source: str, seed: int, out: Path, rounds: int = 2, best_of: int = 8, guidance: float = 4.5,
                loss_guidance: float = 4.5, steps: int = 60, batch: int = 64, lr: float = 2e-5, kl: float = 0.0,
                per_tag: int = 64, reencode: bool = True) -> list[dict]:
    """The control's rounds (cached in OUT/seed_S.json); returns [{round, cpu_minutes, train, test}, ...]."""
    import json

    from align.sample import shapesworld_prompts
    from samplers.models import load_model

    cache = out / f"seed_{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    torch.manual_seed(seed)
    model = load_model("shapesworld").eval().requires_grad_(False)
    reference = copy.deepcopy(model.transformer) if kl else None
    items = shapesworld_prompts("train")
    rows = [{"round": 0, "cpu_minutes": 0.0, **{s: evaluate_model(model, s, 4.5, per_tag) for s in ("train", "test")}}]
    cpu = 0.0
    for rnd in range(1, rounds + 1):
        start = time.process_time()
        if source == "own":
            latents, prompts, rollout_strict = correct_samples(model, items, best_of, guidance, seed, rnd, reencode)
        else:
            (latents, prompts), rollout_strict = rendered_samples(model, items, seed, rnd), float("nan")
        fine_tune(model, reference, latents, prompts, steps, batch, lr, loss_guidance, kl, seed * 1000 + rnd)
        cpu += (time.process_time() - start) / 60
        rows.append({"round": rnd, "cpu_minutes": cpu, "kept": len(prompts), "rollout_strict": rollout_strict,
                     **{s: evaluate_model(model, s, 4.5, per_tag) for s in ("train", "test")}})
        print(f"[control {source}] seed {seed} round {rnd}: train strict {rows[-1]['train']['strict']:.3f}, "
              f"held-out {rows[-1]['test']['strict']:.3f}, colours {rows[-1]['train']['strict_colors']:.2f}",
              flush=True)
    write_json(cache, rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["own", "renders"], default="own")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--best-of", type=int, default=8)
    p.add_argument("--guidance", type=float, default=4.5, help="CFG of the rollouts")
    p.add_argument("--loss-guidance", type=float, default=4.5, help="velocity trained: CFG combination (4.5) or "
                                                                     "conditional branch (1)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--kl", type=float, default=0.0, help="weight of the v-space anchor to the base model")
    p.add_argument("--latents", choices=["reencoded", "sampled"], default="reencoded",
                   help="own samples: train on the VAE encoding of the decoded images, or on the sampled latents")
    p.add_argument("--out", type=Path, default=Path("runs/self_consumption"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    name = f"{args.source}_g{args.guidance:g}_lg{args.loss_guidance:g}_kl{args.kl:g}_lr{args.lr:g}_{args.latents}"
    for seed in args.seeds:
        rows = run_control(args.source, seed, args.out / name, args.rounds, args.best_of, args.guidance,
                           args.loss_guidance, args.steps, args.batch, args.lr, args.kl,
                           reencode=args.latents == "reencoded")
        for row in rows:
            print(f"{name} seed {seed} round {row['round']}: train strict {row['train']['strict']:.3f} "
                  f"held-out strict {row['test']['strict']:.3f} quality {row['test']['quality']:.3f} "
                  f"render gap {row['test']['render_gap']:.3f}")


if __name__ == "__main__":
    main()
