"""What the learning benchmark measures on the ShapesWorld image model, as functions.

    evaluate_model(model, split, guidance)   strict / partial accuracy (mean of the six categories and per
                                             category), shapes_quality and the render gap on a balanced
                                             set of 64 samples per category
    load_run_weights(model, checkpoint)      a trainer checkpoint's weights into a fresh base model

Seeds: held-out samples use seed i (as the trainers' evaluation does); train prompts use seeds from
TRAIN_SEED_BASE on, which no training rollout draws (theirs are derived from (seed, epoch, ...)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

TRAIN_SEED_BASE = 10_000_000


def balanced_items(split: str, per_tag: int) -> list[dict]:
    from align.sample import shapesworld_prompts

    return shapesworld_prompts(split, per_tag)


@torch.no_grad()
def evaluate_model(model, split: str, guidance: float, per_tag: int = 64, num_steps: int = 10,
                   batch_size: int = 64) -> dict[str, float]:
    """The benchmark's metrics of `model` on a balanced set of `split` prompts (10-step ODE by default)."""
    from eval.shapes import TAGS
    from eval.shapes import render_gap
    from rewards import build_reward
    from rewards.shapes import to_uint8_images
    from samplers.generate import generate

    items = balanced_items(split, per_tag)
    prompts, metas = [it["prompt"] for it in items], [it["meta"] for it in items]
    base = TRAIN_SEED_BASE if split == "train" else 0
    seeds = [base + i for i in range(len(items))]
    images = generate(model, prompts, seeds, num_steps=num_steps, guidance=guidance, shift=3.0, sampler="ode",
                      batch_size=batch_size)
    verifier, quality = build_reward("shapes_geneval"), build_reward("shapes_quality")
    out = verifier(images, prompts, metadata=metas)
    strict, partial = out.extras["strict"].float().numpy(), out.extras["partial"].float().numpy()
    tags = np.array([m["tag"] for m in metas])
    metrics = {f"strict_{t}": float(strict[tags == t].mean()) for t in TAGS}
    metrics["strict"] = float(np.mean([metrics[f"strict_{t}"] for t in TAGS]))  # mean of categories
    metrics["strict_se"] = float(np.sqrt(np.mean([strict[tags == t].var() / (tags == t).sum() for t in TAGS])
                                         / len(TAGS)))
    metrics["partial"] = float(np.mean([partial[tags == t].mean() for t in TAGS]))
    metrics["quality"] = float(quality(images, prompts).scores.float().mean())  # render gap: eval/shapes/fidelity.py
    metrics["render_gap"] = render_gap(to_uint8_images(images), metas, seeds)
    return metrics


def load_run_weights(model, checkpoint: str | Path) -> None:
    """Load a trainer checkpoint (OUTPUT_DIR/checkpoints/epoch_N, or a final/ folder) into `model` (a fresh
    base model). LoRA runs get the LoRA added with the run's rank and alpha (from OUTPUT_DIR/config.yaml);
    full fine-tunes get every transformer weight."""
    import yaml
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    weights = load_file(str(checkpoint / "weights.safetensors"))
    lora = cfg.get("lora", {})
    if lora.get("rank", 0) > 0:
        model.add_lora(rank=lora["rank"], alpha=lora.get("alpha"), target_modules=lora.get("targets"))
    params = dict(model.transformer.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"{checkpoint}: weights not in the model, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].dtype))


def cumulative_cpu_minutes(run_dir: str | Path) -> dict[int, float]:
    """epoch -> CPU minutes of training (rollouts + updates, evaluation excluded) after that epoch,
    from OUTPUT_DIR/metrics.csv."""
    from align.metrics import read_metrics_csv

    total, out = 0.0, {}
    for row in read_metrics_csv(Path(run_dir) / "metrics.csv"):
        cpu = row.get("cpu_train")
        if cpu is None or (isinstance(cpu, float) and math.isnan(cpu)):
            continue
        total += float(cpu)
        out[int(row["epoch"])] = total / 60
    return out


def write_json(path: str | Path, value) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)
