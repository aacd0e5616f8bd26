"""CRD (ALGORITHMS.md section 4): the paper's property tests on the objective the trainer uses, the
snapshot schedules, and end to end on the tiny random SD3 model (every LoRA weight trains, resume
reproduces an uninterrupted run)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from align.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from align.config import load_any_config, load_config
from align.crd import (CRDConfig, DecaySchedule, Snapshots, crd_objective, noised, plan_updates,
                       stratified_timesteps, train)
from align.data import PromptDataset, load_prompt_items
from align.losses import crd_kl, crd_loss
from align.metrics import read_metrics_csv

GROUP_IDS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_config(tmp_path: Path, **overrides) -> CRDConfig:
    """2 groups x 4 samples, 4 ODE steps, 2 training times, LoRA rank 4 on the 16 px test model; a
    continuous reward (mean saturation) so that the groups of a random model differ."""
    data = dict(model="toy:test", reward="shapes_saturation", group_size=4, groups_per_epoch=2, num_epochs=2,
                lora=dict(rank=4), sampler=dict(num_steps=4, eval_num_steps=3, batch_size=4), num_train_timesteps=2,
                output_dir=str(tmp_path / "run"), eval_every=0, quiet=True, prompts=dict(eval_num_prompts=2))
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return load_config(CRDConfig, data=data)


def fresh_model():
    from samplers.models.shapesworld import toy_components

    return toy_components("test", seed=0)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.transformer.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------- the objective


def test_per_prompt_constant_in_the_implicit_reward_leaves_the_loss_unchanged():
    R, r = _randn(8), torch.rand(8, generator=torch.Generator().manual_seed(1))
    per_prompt = torch.tensor([1.0, -3.0, 7.0])[GROUP_IDS]
    torch.testing.assert_close(crd_loss(R + per_prompt, r, GROUP_IDS)[0], crd_loss(R, r, GROUP_IDS)[0])
    # centring over the whole micro-batch (the public port) would not be invariant
    one_group = torch.zeros(8, dtype=torch.long)
    assert not torch.allclose(crd_loss(R + per_prompt, r, one_group)[0], crd_loss(R, r, one_group)[0])


def test_per_prompt_velocity_offset_of_the_old_model_leaves_the_objective_unchanged():
    # Through the trainer's objective: scaling the old model's error of a whole prompt group changes
    # R by a per-prompt constant (R = -(e_theta - e_old) with e = mean (v - v*)^2 / mean|v - v*|).
    cfg = CRDConfig(beta_kl=0.0)
    v_star, v_theta, v_old = _randn(8, 2, 4, 4), _randn(8, 2, 4, 4, seed=1), _randn(8, 2, 4, 4, seed=2)
    targets = torch.rand(8, generator=torch.Generator().manual_seed(3))
    # v_old' - v* = c (v_old - v*) scales the old term by c; with the same old error for every
    # sample, one c per group shifts R by a per-prompt constant
    v_old = v_star + (v_old - v_star)[:1].expand(8, -1, -1, -1)
    base = crd_objective(v_theta, v_old, None, v_star, targets, GROUP_IDS, cfg)[0]
    scale = torch.tensor([0.5, 2.0, 3.0])[GROUP_IDS].reshape(-1, 1, 1, 1)
    shifted = crd_objective(v_theta, v_star + scale * (v_old - v_star), None, v_star, targets, GROUP_IDS, cfg)[0]
    torch.testing.assert_close(shifted, base)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_zero_loss_at_the_matched_solution(beta):
    r = torch.tensor([0.2, 0.5, 0.8, 0.1, 0.9, 0.5, 0.3, 0.4])
    r_bar = torch.tensor([0.5, 0.5, 0.35])[GROUP_IDS]
    R = (r - r_bar) / beta + torch.tensor([4.0, -2.0, 1.0])[GROUP_IDS]  # beta (R - R_bar) = r~ - r_bar
    assert crd_loss(R, r, GROUP_IDS, beta_crd=beta)[0].item() == pytest.approx(0, abs=1e-12)
    assert crd_loss(R + 0.1 * torch.arange(8.0), r, GROUP_IDS, beta_crd=beta)[0] > 0


def test_kl_coefficient_bounds():
    v_theta, v_ref = _randn(5, 2, 4, 4), _randn(5, 2, 4, 4, seed=1)
    targets = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    for beta_kl in (0.1, 1.0, 1e-4):
        _, coef = crd_kl(v_theta, v_ref, targets, beta_kl=beta_kl, floor=1e-4)
        torch.testing.assert_close(coef[[0, -1]], torch.tensor([1e-4, beta_kl]))  # r~ = 0 -> floor, 1 -> beta_KL
        assert (coef >= 1e-4 - 1e-12).all() and (coef <= beta_kl + 1e-12).all() and (coef.diff() >= 0).all()
    with pytest.raises(ValueError):
        CRDConfig(beta_kl=1e-5)  # kl_floor 1e-4 > beta_kl


def test_objective_with_theta_equal_old_and_ref_is_the_centred_target_variance():
    cfg = CRDConfig()
    v_star, v = _randn(8, 2, 4, 4), _randn(8, 2, 4, 4, seed=1)
    targets = torch.rand(8, generator=torch.Generator().manual_seed(2))
    loss, metrics = crd_objective(v, v, v, v_star, targets, GROUP_IDS, cfg)  # R = 0, D = 0
    r_centred = targets - torch.stack([targets[:3].mean(), targets[3:6].mean(), targets[6:].mean()])[GROUP_IDS]
    torch.testing.assert_close(loss, r_centred.square().mean() * 5)
    assert metrics["kl_loss"] == 0 and 1e-4 <= metrics["kl_coef"] <= 0.1


# ----------------------------------------------------------------------------- schedules and sampling of t


def test_snapshot_decay_schedules():
    cfg = CRDConfig()
    old, sampler = cfg.old_decay, cfg.sampler_decay
    assert [old(s) for s in (0, 1, 50, 100, 149, 150, 10_000)] == pytest.approx(
        [0.25, 0.255, 0.5, 0.75, 0.995, 0.999, 0.999])
    assert [sampler(s) for s in (0, 74, 75, 76, 175, 208, 209, 10_000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.0075, 0.75, 0.9975, 0.999, 0.999])


def test_snapshots_blend_the_weights_with_the_scheduled_decay():
    p = torch.nn.Parameter(torch.zeros(3))
    snapshots = Snapshots({"w": p}, DecaySchedule(0.25, 0.005, 0), DecaySchedule(0.0, 0.0075, 75))
    with torch.no_grad():
        p.fill_(1.0)
    assert snapshots.advance(10) == pytest.approx({"old_decay": 0.3, "sampler_decay": 0.0})
    torch.testing.assert_close(snapshots.old.shadow["w"], torch.full((3,), 0.7))  # 0.3 * 0 + 0.7 * 1
    torch.testing.assert_close(snapshots.sampler.shadow["w"], torch.ones(3))  # d = 0: follows the weights
    state = snapshots.state_dict()
    other = Snapshots({"w": p}, DecaySchedule(), DecaySchedule())
    other.load_state_dict(state)
    torch.testing.assert_close(other.old.shadow["w"], snapshots.old.shadow["w"])


def test_stratified_timesteps_and_forward_process():
    t = stratified_timesteps(20, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert ((t >= torch.arange(20) / 20) & (t < (torch.arange(20) + 1) / 20)).all()  # one per stratum
    shifted = stratified_timesteps(20, shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))
    x0, eps = _randn(2, 2, 3, 3, 3), _randn(2, 2, 3, 3, 3, seed=1)  # video-shaped latents work too
    x_t, v_star = noised(x0, eps, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(x_t, torch.stack([x0[0], eps[1]]))
    torch.testing.assert_close(v_star, eps - x0)


def test_updates_train_whole_groups_once_per_inner_epoch(tmp_path):
    cfg = tiny_config(tmp_path, groups_per_epoch=6, updates_per_epoch=2, micro_batch_groups=2, inner_epochs=2)
    full = PromptDataset(load_prompt_items("train"), seed=0).epoch_batch(0, 6, 4)
    updates = plan_updates(cfg, full, epoch=0, num_processes=1)
    assert len(updates) == 4 and all(u.scale == 1 / (3 * 4 * 2) for u in updates)
    for inner in (0, 1):
        trained = [i for u in updates if u.inner == inner for mb in u.micro_batches for i in mb]
        assert sorted(trained) == list(range(24))
    for u in updates:
        for mb in u.micro_batches:
            groups = full.group_ids[mb]
            assert len(mb) == 4 * len(set(groups.tolist()))  # only whole groups
    # on 2 ranks each rank trains its own groups of the same global chunks
    halves = [PromptDataset(load_prompt_items("train"), seed=0).epoch_batch(0, 6, 4, 2, r) for r in (0, 1)]
    for update, *per_rank in zip(updates, *(plan_updates(cfg, h, 0, 2) for h in halves)):
        global_ids = sorted(int(h.sample_ids[i]) for h, u in zip(halves, per_rank) if u.scale
                            for mb in u.micro_batches for i in mb)
        assert global_ids == sorted(i for mb in update.micro_batches for i in mb)


# ----------------------------------------------------------------------------- end to end


def test_two_epoch_smoke_run_trains_every_lora_weight(tmp_path):
    cfg = tiny_config(tmp_path, eval_every=2)
    model, reference = fresh_model(), fresh_model()
    torch.manual_seed(cfg.seed)  # as `train` does right before adding the LoRA
    reference.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.targets)
    before = lora_state(reference)
    metrics = train(cfg, model=model)

    after = lora_state(model)
    assert after.keys() == before.keys() and len(after) > 0
    # The last SD3 block is context_pre_only: its context-query LoRA gets an exactly-zero gradient
    # (see tests/test_flow_grpo.py); every other LoRA weight must move.
    last = len(model.transformer.transformer_blocks) - 1
    no_gradient = {f"transformer_blocks.{last}.attn.add_q_proj.lora_B.default.weight"}
    unchanged = {n for n in after if torch.equal(after[n], before[n])}
    assert unchanged == no_gradient, sorted(unchanged - no_gradient)[:3]
    assert metrics["optimizer_steps"] == 2 and metrics["global_step"] == 4
    for key in ("reward_mean", "crd_loss", "kl_loss", "grad_norm", "final_eval_reward_mean"):
        assert math.isfinite(metrics[key]), key
    assert metrics["kl_loss"] > 0 and 1e-4 <= metrics["kl_coef"] <= 0.1
    assert metrics["old_decay"] == pytest.approx(0.27) and metrics["sampler_decay"] == 0.0

    run = Path(cfg.output_dir)
    weights, state, _ = load_checkpoint(latest_checkpoint(run))
    # s < 75: the sampling snapshot IS the trained weights; the old snapshot lags behind them
    for name, value in weights.items():
        torch.testing.assert_close(state["ema"]["sampler"]["shadow"][name], value.float())
    assert any(not torch.equal(state["ema"]["old"]["shadow"][n], weights[n]) for n in weights)
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "reward_curve.png").is_file() and (run / "summary.md").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_0000.png", "epoch_0002.png"]
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [0, 1, 2]
    name, saved = load_any_config(run / "config.yaml")
    assert name == "crd" and saved == cfg


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    weights, state, _ = load_checkpoint(latest_checkpoint(run))
    snapshots = {f"{k}.{n}": v for k in ("old", "sampler") for n, v in state["ema"][k]["shadow"].items()}
    return {**weights, **snapshots}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    # an SDE sampler and a sampler snapshot that lags from step 2 on: both must be restored exactly
    base = dict(num_epochs=3, checkpoint_every=1, keep_checkpoints=0, sampler_decay=dict(delay=2, start=0.5),
                sampler=dict(step_type="flow_grpo_sde", step_params={"noise_level": 0.7}))
    train(tiny_config(tmp_path / "a", **base), model=fresh_model())
    train(tiny_config(tmp_path / "b", **{**base, "num_epochs": 1}), model=fresh_model())
    train(tiny_config(tmp_path / "b", **base, resume=True), model=fresh_model())
    # crash after epoch 1 was logged but before its checkpoint was written
    train(tiny_config(tmp_path / "c", **{**base, "num_epochs": 2}), model=fresh_model())
    shutil.rmtree(dict(list_checkpoints(tmp_path / "c" / "run"))[1])
    train(tiny_config(tmp_path / "c", **base, resume=True), model=fresh_model())

    expected = _final_state(tmp_path / "a" / "run")
    weights = [n for n in expected if not n.startswith(("old.", "sampler."))]
    assert any(not torch.equal(expected[f"sampler.{n}"], expected[n]) for n in weights)  # the sampler lags
    for name in ("b", "c"):
        run = tmp_path / name / "run"
        got = _final_state(run)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-8, msg=f"{name}: {key}")
        rows = read_metrics_csv(run / "metrics.csv")
        assert [r["epoch"] for r in rows] == [0, 1, 2] and [r["global_step"] for r in rows] == [2, 4, 6], name
