"""GDRO on the tiny random SD3 model: the paper's properties through the trainer's own objective
(theta = reference gives log k!, k = 2 with tau -> 0 is Diffusion-DPO, a constant added to the
implicit rewards changes nothing), shared timestep and noise per group, and a 2-epoch run that
updates every LoRA weight, checkpoints, evaluates and resumes to the same weights."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from align.config import load_config
from align.gdro import (GDROConfig, encode_prompts, forward_noise, gdro_objective, group_timesteps_and_noise,
                        load_training_groups, train)
from align.losses import gdro_implicit_reward, gdro_loss
from align.metrics import read_metrics_csv
from align.rollout_store import CorruptShardError, RolloutConfig, RolloutStore, build_store
from align.runtime import LoraSettings, setup_trainable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """8 groups of 4 samples of the toy model, ranked by saturation (continuous: no ties)."""
    out = tmp_path_factory.mktemp("gdro") / "store"
    cfg = load_config(RolloutConfig, data=dict(model="toy:test", rewards=["shapes_saturation"], num_groups=8,
                                               group_size=4, num_steps=2, batch_size=16, groups_per_shard=4,
                                               save_images=False, device="cpu", quiet=True, output_dir=str(out)))
    build_store(cfg)
    return out


def tiny_config(tmp_path: Path, store: Path, **overrides) -> GDROConfig:
    data = dict(model="toy:test", store=str(store), lora=dict(rank=4), groups_per_step=4, micro_batch_groups=2,
                num_epochs=2, eval_every=0, checkpoint_every=1, keep_checkpoints=0, quiet=True,
                output_dir=str(tmp_path / "run"), ema=dict(update_interval=1), monitor_rewards=[],
                prompts=dict(eval_num_prompts=2), sampler=dict(eval_num_steps=2, batch_size=4))
    data.update(overrides)
    return load_config(GDROConfig, REPO / "configs" / "shapes" / "gdro.yaml", data=data)


def lora_model(perturb: bool):
    """The toy model with a rank-4 LoRA: fresh (B = 0, so theta = reference exactly) or perturbed."""
    from samplers.models.shapesworld import toy_components

    model = toy_components("test", seed=0)
    trainable, reference = setup_trainable(model, LoraSettings(rank=4), torch.float32, frozen_reference=True)
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in trainable.values():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, reference


def batch(store_dir: Path, model, groups: list[int], k: int | None = None):
    """(x0 [g, K, ...], rewards [g, K], cond rows, t [g], noise [g, K, ...]) of store groups, epoch 0."""
    data, _ = load_training_groups(RolloutStore(store_dir))
    idx = torch.tensor(groups)
    x0, rewards = data.latents[idx][:, :k], data.rewards[idx][:, :k]
    k = rewards.shape[1]
    cond = encode_prompts(model, data.prompts, 8).index(data.prompt_index[idx].repeat_interleave(k))
    t, noise = group_timesteps_and_noise(data.group_ids[idx], k, x0.shape[2:], seed=0, epoch=0)
    return x0, rewards, cond, t, noise


# ----------------------------------------------------------------------------- the paper's properties


@pytest.mark.parametrize("tau", [0.0, 0.05])
def test_theta_equal_to_reference_gives_sum_of_log_k_minus_i_plus_1(store_dir, tau):
    model, reference = lora_model(perturb=False)
    x0, rewards, cond, t, noise = batch(store_dir, model, [0, 1, 2])
    with torch.no_grad():
        loss, metrics = gdro_objective(model, model.transformer, reference, x0, rewards, cond, t, noise,
                                       beta=6.0, tau=tau, gamma=0.0)
    k = rewards.shape[1]
    expected = sum(math.log(k - i + 1) for i in range(1, k))  # log k! = log 24
    assert float(metrics["implicit_reward_std"]) == 0.0
    torch.testing.assert_close(loss, torch.tensor(expected))


@pytest.mark.parametrize("tau", [0.0, 1e-7])  # rewards of a pair differ by >~ 1e-4
def test_k2_with_tau_to_zero_is_diffusion_dpo(store_dir, tau):
    model, reference = lora_model(perturb=True)
    x0, rewards, cond, t, noise = batch(store_dir, model, [0, 3, 5], k=2)
    with torch.no_grad():
        loss, _ = gdro_objective(model, model.transformer, reference, x0, rewards, cond, t, noise,
                                 beta=6.0, tau=tau, gamma=0.0)
        # Diffusion-DPO (Wallace et al. 2024, eq. 14 with velocity targets), written out directly
        x_t = forward_noise(x0.flatten(0, 1), noise.flatten(0, 1), t.repeat_interleave(2))
        sigma = t.repeat_interleave(2)
        target = (noise - x0).flatten(0, 1)
        error = (model.velocity(x_t, sigma, cond) - target).square().mean((1, 2, 3)).view(3, 2)
        with model.lora_disabled():
            ref_error = (model.velocity(x_t, sigma, cond) - target).square().mean((1, 2, 3)).view(3, 2)
    win = rewards.argmax(1)
    rows = torch.arange(3)
    diff = (error - ref_error)  # [3, 2]
    margin = -6.0 * (diff[rows, win] - diff[rows, 1 - win])
    assert not torch.allclose(margin, torch.zeros(3))
    torch.testing.assert_close(loss, -F.logsigmoid(margin).mean(), rtol=1e-5, atol=1e-6)


def test_a_constant_added_to_the_implicit_rewards_leaves_the_loss_unchanged(store_dir):
    model, reference = lora_model(perturb=True)
    x0, rewards, cond, t, noise = batch(store_dir, model, [0, 1, 2, 3])
    g, k = rewards.shape
    x_t = forward_noise(x0.flatten(0, 1), noise.flatten(0, 1), t.repeat_interleave(k))
    with torch.no_grad():
        v_theta = model.velocity(x_t, t.repeat_interleave(k), cond)
        with model.lora_disabled():
            v_ref = model.velocity(x_t, t.repeat_interleave(k), cond)
    s = gdro_implicit_reward((noise - x0).flatten(0, 1), v_theta, v_ref, beta=6.0).view(g, k)
    for tau in (0.0, 0.05):
        base = gdro_loss(s, rewards, tau)[0]
        torch.testing.assert_close(gdro_loss(s + 2.5, rewards, tau)[0], base)
        torch.testing.assert_close(gdro_loss(s + torch.tensor([[1.0], [-3.0], [0.5], [7.0]]), rewards, tau)[0], base)


def test_timestep_and_noise_are_shared_within_a_group_and_independent_of_batching():
    ids = torch.tensor([3, 5, 9])
    t, noise = group_timesteps_and_noise(ids, 4, (4, 8, 8), seed=0, epoch=2)
    assert t.shape == (3,) and noise.shape == (3, 4, 4, 8, 8) and ((t > 0) & (t < 1)).all()
    assert all(torch.equal(noise[g, 0], noise[g, j]) for g in range(3) for j in range(4))
    assert not torch.equal(noise[0, 0], noise[1, 0]) and len(set(t.tolist())) == 3
    t5, noise5 = group_timesteps_and_noise(torch.tensor([5]), 4, (4, 8, 8), seed=0, epoch=2)
    assert torch.equal(t5[0], t[1]) and torch.equal(noise5[0], noise[1])
    assert not torch.equal(group_timesteps_and_noise(ids, 4, (4, 8, 8), seed=0, epoch=3)[0], t)
    _, own = group_timesteps_and_noise(ids, 4, (4, 8, 8), seed=0, epoch=2, share_noise=False)
    assert not torch.equal(own[0, 0], own[0, 1])
    tu, _ = group_timesteps_and_noise(ids, 4, (4, 8, 8), seed=0, epoch=2, sampling="uniform")
    assert ((tu >= 0) & (tu < 1)).all() and not torch.equal(tu, t)


# ----------------------------------------------------------------------------- data


def test_training_groups_drop_tied_and_failed_groups_and_name_corrupt_shards(store_dir, tmp_path):
    data, info = load_training_groups(RolloutStore(store_dir))
    assert info == {"train_groups": 8, "dropped_nan_groups": 0, "dropped_tied_groups": 0}
    assert data.latents.shape == (8, 4, 4, 8, 8) and data.rewards.shape == (8, 4)
    with pytest.raises(ValueError, match="rank_by='nope'"):
        load_training_groups(RolloutStore(store_dir), "nope")
    copy = Path(shutil.copytree(store_dir, tmp_path / "store"))
    (copy / "shard_00001.safetensors").write_bytes(b"truncated")
    with pytest.raises(CorruptShardError, match="shard_00001.safetensors"):
        load_training_groups(RolloutStore(copy))
    with pytest.warns(UserWarning, match="shard_00001"):
        data, info = load_training_groups(RolloutStore(copy), skip_corrupt=True)
    assert info["train_groups"] == 4 and data.group_ids.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- the trainer


def fresh_model():
    from samplers.models.shapesworld import toy_components

    return toy_components("test", seed=0)


def test_two_epochs_update_every_lora_weight_checkpoint_evaluate_and_resume(store_dir, tmp_path):
    cfg = tiny_config(tmp_path, store_dir, eval_every=1)
    model = fresh_model()
    metrics = train(cfg, model=model)
    run = Path(cfg.output_dir)
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # 2 training epochs + the final evaluation row
    first = rows[0]
    assert first["train_groups"] == 8 and first["optimizer_steps"] == 2 and rows[1]["global_step"] == 4
    assert abs(first["gdro_loss"] - math.log(24)) < 0.05  # starts at theta = reference
    for key in ("gdro_loss", "reg_loss", "loss", "pairwise_accuracy", "top1_accuracy", "grad_norm",
                "eval_reward_mean"):
        assert math.isfinite(first[key]), key
    assert "final_eval_reward_mean" in metrics
    assert [e for e, _ in list_checkpoints(run)] == [0, 1]
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file() and (run / "summary.md").is_file()
    weights, _, _ = load_checkpoint(latest_checkpoint(run))
    initial = _initial_lora(cfg)
    assert weights.keys() == initial.keys()
    # as in test_flow_grpo: the last SD3 block is context_pre_only, so its add_q_proj gets no gradient
    no_gradient = {"transformer_blocks.0.attn.add_q_proj.lora_B.default.weight"}
    unchanged = {n for n in weights if torch.equal(weights[n], initial[n])}
    assert unchanged == no_gradient, f"LoRA weights not updated: {sorted(unchanged - no_gradient)[:3]}"

    # resume: 1 epoch, then continue to 2 == the 2-epoch run above
    resumed_cfg = tiny_config(tmp_path / "b", store_dir, num_epochs=1)
    train(resumed_cfg, model=fresh_model())
    resumed_cfg = tiny_config(tmp_path / "b", store_dir, num_epochs=2, resume=True)
    train(resumed_cfg, model=fresh_model())
    resumed, _, _ = load_checkpoint(latest_checkpoint(resumed_cfg.output_dir))
    for name in weights:
        torch.testing.assert_close(resumed[name], weights[name], rtol=1e-6, atol=1e-8, msg=name)
    assert [r["epoch"] for r in read_metrics_csv(Path(resumed_cfg.output_dir) / "metrics.csv")] == [0, 1]


def _initial_lora(cfg: GDROConfig) -> dict[str, torch.Tensor]:
    model = fresh_model()
    torch.manual_seed(cfg.seed)
    model.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.targets)
    return {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("bad", [dict(tau=-1.0), dict(beta=0.0), dict(gamma=-0.5), dict(groups_per_step=0)])
def test_config_rejects_bad_values(tmp_path, store_dir, bad):
    from align.config import ConfigError

    with pytest.raises(ConfigError):
        tiny_config(tmp_path, store_dir, **bad)
