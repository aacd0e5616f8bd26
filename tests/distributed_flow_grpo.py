"""Flow-GRPO on 1 vs 2 processes: the same data, advantages and parameter update.

Run by tests/test_flow_grpo_distributed.py, or by hand:

    python tests/distributed_flow_grpo.py OUT_1
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no tests/distributed_flow_grpo.py OUT_2

Each writes OUT/advantages.pt (epoch 0's gathered rewards, group ids, advantages and keep mask
by global sample id) and a normal run folder OUT/run (checkpoints, metrics.csv). The config
makes groups span ranks: 3 groups of 4 = 12 samples, 6 per rank, so group 1 is split. A rank's
share of an update can be an odd number of samples, so its training micro-batches need not have
the rollout's batch shape; some CPUs (seen on AMD EPYC) then re-score 1 ulp off, so the old
log-probs are re-scored in the training micro-batches (recompute_old_log_probs) and the first
ratio is exactly 1 on any hardware.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def config(out: Path):
    from align.config import load_config
    from align.flow_grpo import FlowGRPOConfig

    return load_config(FlowGRPOConfig, data=dict(
        model="toy:test", reward="shapes_saturation", group_size=4, groups_per_epoch=3, num_epochs=2,
        lora=dict(rank=4), sampler=dict(num_steps=4, eval_num_steps=3, batch_size=2), micro_batch_size=2,
        kl_beta=0.04, updates_per_epoch=2, recompute_old_log_probs=True, output_dir=str(out / "run"), eval_every=1, quiet=True,
        prompts=dict(eval_num_prompts=3), ema=dict(update_interval=1), checkpoint_every=1, keep_checkpoints=0))


def main(out: Path) -> None:
    from accelerate import Accelerator

    from align.data import PromptDataset, load_prompt_items
    from align.flow_grpo import (collect_rollouts, compute_advantages, epoch_step_schedule, resolve_variant_defaults,
                                 train)
    from rewards import build_reward
    from samplers.models.shapesworld import toy_components

    torch.set_num_threads(1)
    cfg = resolve_variant_defaults(config(out))
    accelerator = Accelerator(cpu=True)
    # epoch 0's advantages with the untrained model, computed the way train() does
    model = toy_components("test", seed=0).eval().requires_grad_(False)
    batch = PromptDataset(load_prompt_items("train"), seed=cfg.seed).epoch_batch(
        0, cfg.groups_per_epoch, cfg.group_size, accelerator.num_processes, accelerator.process_index)
    types, params, _ = epoch_step_schedule(cfg, 0)
    rollouts = collect_rollouts(model, build_reward(cfg.reward), batch, cfg, 0, types, params)
    advantages, keep, metrics = compute_advantages(cfg, rollouts, batch, accelerator)
    finals = accelerator.gather(rollouts.trajectory.final.contiguous())  # [N, *latent] in rank order
    ids = accelerator.gather(batch.sample_ids)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        by_id = torch.empty_like(finals)
        by_id[ids] = finals
        torch.save({"advantages": advantages, "keep": keep, "metrics": metrics, "finals": by_id,
                    "num_processes": accelerator.num_processes}, out / "advantages.pt")
    accelerator.wait_for_everyone()
    train(cfg)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
