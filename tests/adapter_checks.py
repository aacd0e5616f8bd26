"""Checks every diffusers-family adapter must pass (used by tests/test_<family>_adapter.py).

Each takes a tiny adapter (samplers/models/tiny.py) and asserts one claim of issue 27: SDE
re-scoring is exact, a LoRA saved by genalign loads into the family's pipeline, one epoch of
Flow-GRPO and of CRD trains every LoRA weight, load_model recognises a saved pipeline folder.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from samplers.rollout import rescore, rollout


def assert_sde_rescore_is_exact(model, cond, sigmas: torch.Tensor, guidance: float, batch: int = 2) -> None:
    """Re-scoring every stored Flow-GRPO SDE transition reproduces its log-prob bit for bit."""
    traj = rollout(model, cond, sigmas, step_types="flow_grpo_sde", step_params={"noise_level": 0.7},
                   guidance=guidance, batch_size=batch, generator=torch.Generator().manual_seed(0))
    steps = list(range(traj.num_steps - 1))
    log_prob, _, _ = rescore(model, cond, traj, steps)
    assert torch.isfinite(traj.log_probs).all()
    torch.testing.assert_close(log_prob, traj.log_probs[:, :-1], atol=0, rtol=0)


def perturb_lora(model, seed: int = 1, scale: float = 0.2) -> None:
    """lora_B starts at zero: give every LoRA matrix random values so the adapter changes outputs."""
    with torch.no_grad():
        for i, (name, p) in enumerate(sorted(model.named_parameters())):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)) * scale)


def lora_model(model, rank: int = 4):
    tuned = copy.deepcopy(model)
    tuned.add_lora(rank=rank)
    perturb_lora(tuned)
    return tuned


def trainer_config(trainer: str, tmp_path: Path, **overrides):
    """The trainers' own tiny test settings (tests/test_flow_grpo.py, test_crd.py, test_nft.py): 2 groups
    x 4 samples, 4 steps, LoRA rank 4, the mean-saturation reward, one epoch."""
    from align.config import load_config

    common = dict(model="toy:test", reward="shapes_saturation", group_size=4, groups_per_epoch=2, num_epochs=1,
                  lora=dict(rank=4), sampler=dict(num_steps=4, eval_num_steps=2, batch_size=4),
                  output_dir=str(tmp_path / trainer), eval_every=0, quiet=True, prompts=dict(eval_num_prompts=2))
    if trainer == "flow_grpo":
        from align.flow_grpo import FlowGRPOConfig as Config

        common.update(micro_batch_size=4, ema=dict(update_interval=1))
    elif trainer == "crd":
        from align.crd import CRDConfig as Config

        common.update(num_train_timesteps=2)
    elif trainer == "nft":
        from align.nft import NFTConfig as Config

        common.update(micro_batch_size=4, monitor_rewards=[])
    else:
        raise ValueError(f"unknown trainer {trainer!r}")
    for key, value in overrides.items():
        common[key] = {**common[key], **value} if isinstance(value, dict) and isinstance(common.get(key), dict) else value
    return load_config(Config, data=common)


def assert_one_epoch_trains_every_lora_weight(trainer: str, make_model, tmp_path: Path, no_gradient=(),
                                              **overrides) -> dict:
    """One epoch of `trainer` ("flow_grpo", "crd" or "nft") on a fresh `make_model()`: every LoRA
    weight moves except exactly those named in `no_gradient` (weights whose output the model
    discards, e.g. the text stream of an MMDiT's last block); for Flow-GRPO the first update's
    ratio is exactly 1."""
    import importlib

    cfg = trainer_config(trainer, tmp_path, **overrides)
    reference = make_model()
    torch.manual_seed(cfg.seed)  # as `train` does right before adding the LoRA
    reference.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.targets)
    before = {n: p.detach().clone() for n, p in reference.transformer.named_parameters() if "lora_" in n}
    model = make_model()
    metrics = importlib.import_module(f"align.{trainer}").train(cfg, model=model)
    # the trainers optimise the LoRA of `model.transformer` (every family's trained module)
    after = {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" in n}
    assert after.keys() == before.keys() and len(after) > 0
    unchanged = sorted(n for n in after if torch.equal(after[n], before[n]))
    assert unchanged == sorted(no_gradient), f"LoRA weights not updated: {sorted(set(unchanged) - set(no_gradient))[:3]}"
    assert math.isfinite(metrics["reward_mean"]) and math.isfinite(metrics["grad_norm"])
    if trainer == "flow_grpo":
        assert metrics["first_update_approx_kl"] == 0.0 and metrics["first_update_ratio_error"] == 0.0
    return metrics


def assert_load_model_recognises(pipe, tmp_path: Path, adapter_class) -> object:
    """A folder written by the family's own pipeline loads through load_model as `adapter_class`."""
    from samplers.models import load_model

    pipe.save_pretrained(str(tmp_path / "pipe"))
    loaded = load_model(tmp_path / "pipe")
    assert type(loaded) is adapter_class
    return loaded
