"""Can the policy learn the guided drift? Euphonium's guidance distillation on its own.

    python -m eval.distill_fit configs/shapes/video_euphonium.yaml --epochs 4 --steps 1000 lora.rank=0 --out runs/distill

Collects the guided rollouts of the config's first ``--epochs`` epochs (its process reward,
window and lambda), then takes ``--steps`` AdamW steps on the distillation KL alone
(align.euphonium.distillation_kl: ||mu_g - mu_theta||^2 / (2 eta^2 D), one random window step and
``--micro-batch`` random samples per step). Every ``--log-every`` steps it prints that KL on a
fixed probe set: the first micro-batch of epoch 0, all window steps. Before and after it prints
held-out means of the plain ODE, which runs with no process reward.
In the RL loop distillation gets one optimizer step per update (2 per epoch by default). This
shows how much of the guided drift the weights can absorb with far more steps, and whether
absorbing it carries the guidance gain into unguided sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch


def fit_guided_drift(cfg, *, epochs: int = 2, steps: int = 300, lr: float = 1e-4, micro_batch: int = 16,
                     log_every: int = 50, eval_prompts: int = 96, quiet: bool = False, model=None,
                     out: str | Path | None = None) -> dict:
    """Returns {"before": held-out means, "after": ..., "probe_kl": [(step, KL)], "train_kl": [..]}.
    cfg: a FlowGRPOConfig with variant euphonium; model: a FlowModel adapter (default: load cfg.model).
    out: also write OUT/final (the LoRA in diffusers format, or the whole model folder with
    lora.rank 0, as `align train` does) and OUT/distill_fit.json (the result)."""
    from align.data import PromptDataset, load_prompt_items
    from align.euphonium import build_process_reward, distillation_kl
    from align.flow_grpo import collect_rollouts, epoch_step_schedule, resolve_variant_defaults
    from align.trainer import evaluate
    from align.runtime import load_flow_model, make_accelerator, setup_trainable
    from rewards import build_reward
    from samplers.rollout import rescore_step

    cfg = resolve_variant_defaults(cfg)
    if cfg.variant != "euphonium":
        raise ValueError(f"eval.distill_fit: the config's variant is {cfg.variant!r}; it needs variant: euphonium")
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator("no")
    model = model if model is not None else load_flow_model(cfg.model, accelerator.device)
    reward = build_reward(cfg.reward)
    prm = build_process_reward(cfg.euphonium, model, accelerator.device)
    trainable, _ = setup_trainable(model, cfg.lora, torch.float32, frozen_reference=False)
    data = PromptDataset(load_prompt_items(cfg.prompts.split, cfg.prompts.file), seed=cfg.seed)
    eval_items = load_prompt_items(cfg.prompts.eval_split, cfg.prompts.eval_file,
                                   cfg.prompts.eval_per_tag)[:eval_prompts]
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    start = time.perf_counter()
    rollouts = []
    for epoch in range(epochs):
        batch = data.epoch_batch(epoch, cfg.groups_per_epoch, cfg.group_size, 1, 0, cfg.prompts.spread_groups)
        types, params, _ = epoch_step_schedule(cfg, epoch)
        rollouts.append(collect_rollouts(model, reward, batch, cfg, epoch, types, params, prm))
    window = sorted(rollouts[0].guided_means or {})
    if not window:
        raise ValueError("eval.distill_fit: no guided steps; check euphonium.window and guidance_lambda (> 0)")
    micro_batch = min(micro_batch, len(rollouts[0].rewards))
    say(f"{epochs} epochs of guided rollouts in {time.perf_counter() - start:.0f} s; window steps {window}")

    def kl(r, index: torch.Tensor, i: int) -> torch.Tensor:
        traj = r.trajectory.select(index)
        new = rescore_step(model, r.cond.index(index), traj, i)
        return distillation_kl(new.mean, r.guided_means[i][index], cfg.sampler.eta,
                               float(traj.sigmas[i] - traj.sigmas[i + 1])).mean()

    probe_index = torch.arange(micro_batch)

    @torch.no_grad()
    def probe() -> float:
        return sum(float(kl(rollouts[0], probe_index, i)) for i in window) / len(window)

    @torch.no_grad()
    def held_out() -> dict:
        m = evaluate(model, reward, eval_items, cfg, accelerator)
        return {k[len("eval_"):-len("_mean")]: round(v, 4) for k, v in m.items()
                if k.startswith("eval_") and k.endswith("_mean")}

    result = {"before": held_out(), "probe_kl": [(0, probe())], "train_kl": []}
    say(f"before: {result['before']}; probe KL {result['probe_kl'][0][1]:.4f}")
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, weight_decay=cfg.optimizer.weight_decay)
    rng = random.Random(cfg.seed)
    for step in range(1, steps + 1):
        r = rollouts[rng.randrange(len(rollouts))]
        loss = kl(r, torch.tensor(rng.sample(range(len(r.rewards)), micro_batch)), rng.choice(window))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.optimizer.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result["train_kl"].append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            result["probe_kl"].append((step, probe()))
            say(f"step {step}: probe KL {result['probe_kl'][-1][1]:.4f} ({time.perf_counter() - start:.0f} s)")
    result["after"] = held_out()
    say(f"after: {result['after']}")
    if out is not None:
        _write(model, cfg.lora.rank, Path(out), result)
        say(f"wrote {Path(out) / 'final'}")
    return result


def _write(model, lora_rank: int, out: Path, result: dict) -> None:
    """OUT/final (LoRA in diffusers format, or the whole model folder) and OUT/distill_fit.json,
    each built aside and moved into place, so a crash never leaves a half-written one."""
    from align.checkpoint import replace_dir

    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    (model.save_lora if lora_rank > 0 else model.save_pretrained)(folder)
    replace_dir(folder, out / "final")
    tmp = out / ".distill_fit.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "distill_fit.json")


def main(argv=None) -> dict:
    from align.config import load_config
    from align.flow_grpo import FlowGRPOConfig

    parser = argparse.ArgumentParser(prog="python -m eval.distill_fit", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a Flow-GRPO YAML with variant: euphonium")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. lora.rank=0")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of guided rollouts to distil from")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps on the distillation KL")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--micro-batch", type=int, default=16, help="samples per step (one window step each)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-prompts", type=int, default=96, help="held-out prompts before and after")
    parser.add_argument("--out", default=None, help="write OUT/final (the distilled weights) and OUT/distill_fit.json")
    args = parser.parse_intermixed_args(argv)
    if args.epochs < 1 or args.steps < 1 or args.micro_batch < 1 or args.log_every < 1 or args.eval_prompts < 1:
        parser.error("--epochs, --steps, --micro-batch, --log-every and --eval-prompts must be >= 1")
    cfg = load_config(FlowGRPOConfig, args.config, args.overrides)
    return fit_guided_drift(cfg, epochs=args.epochs, steps=args.steps, lr=args.lr, micro_batch=args.micro_batch,
                            log_every=args.log_every, eval_prompts=args.eval_prompts, out=args.out)


if __name__ == "__main__":
    main()
