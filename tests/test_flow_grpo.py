"""Flow-GRPO end to end on the tiny random SD3 model: every variant trains, the first update's
ratio is exactly 1, checkpoints resume to the same weights, setup fallbacks behave on CPU."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from align.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from align.config import load_any_config, load_config
from align.flow_grpo import (
    FlowGRPOConfig,
    collect_rollouts,
    epoch_step_schedule,
    resolve_attention_backend,
    resolve_mixed_precision,
    resolve_variant_defaults,
    train,
)
from align.metrics import read_metrics_csv
from align.runtime import load_flow_model

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, **overrides) -> FlowGRPOConfig:
    """2 groups x 4 samples, 4 steps, LoRA rank 4 on the 16 px test model; a continuous reward
    (mean saturation) so that groups of a random model have reward differences."""
    data = dict(model="toy:test", reward="shapes_saturation", group_size=4, groups_per_epoch=2, num_epochs=1,
                lora=dict(rank=4), sampler=dict(num_steps=4, eval_num_steps=3, batch_size=4), micro_batch_size=4,
                output_dir=str(tmp_path / "run"), eval_every=0, quiet=True,
                prompts=dict(eval_num_prompts=2), ema=dict(update_interval=1))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return load_config(FlowGRPOConfig, data=data)


def fresh_model():
    from samplers.models.shapesworld import toy_components

    return toy_components("test", seed=0)


def trainable_state(model, lora: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.transformer.named_parameters() if not lora or "lora_" in n}


def initial_lora(cfg: FlowGRPOConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights `train` starts from (it seeds torch with cfg.seed, then adds the LoRA)."""
    model = fresh_model()
    torch.manual_seed(cfg.seed)
    model.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha, target_modules=cfg.lora.targets)
    return trainable_state(model, lora=True)


def assert_first_update_ratio_is_one(metrics: dict) -> None:
    # Before any optimizer step, re-scoring the stored transitions must give the sampling
    # log-probs bit for bit: ratio exactly 1, so approx_kl and clip fraction exactly 0.
    assert metrics["first_update_approx_kl"] == 0.0
    assert metrics["first_update_clip_fraction"] == 0.0
    assert metrics["first_update_ratio_error"] == 0.0


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("variant", ["flow_grpo", "fast", "dance"])
def test_one_epoch_of_each_variant_updates_every_lora_weight(tmp_path, variant):
    cfg = tiny_config(tmp_path, variant=variant, eval_every=1)
    model = fresh_model()
    before = initial_lora(cfg)
    metrics = train(cfg, model=model)

    after = trainable_state(model, lora=True)
    assert after.keys() == before.keys() and len(after) > 0
    # The last SD3 block is `context_pre_only`: its context-stream queries only produce outputs
    # that are discarded, so add_q_proj there gets an exactly-zero gradient and its zero-initialised
    # lora_B stays zero (true of SD3.5 too). Every other LoRA weight must move.
    last = len(model.transformer.transformer_blocks) - 1
    no_gradient = {f"transformer_blocks.{last}.attn.add_q_proj.lora_B.default.weight"}
    unchanged = {n for n in after if torch.equal(after[n], before[n])}
    assert unchanged == no_gradient, f"LoRA weights not updated: {sorted(unchanged - no_gradient)[:3]}"
    assert_first_update_ratio_is_one(metrics)
    assert metrics["optimizer_steps"] == cfg.updates_per_epoch
    assert math.isfinite(metrics["reward_mean"]) and math.isfinite(metrics["eval_reward_mean"])
    assert metrics["kept_fraction"] == 1.0 and math.isfinite(metrics["grad_norm"])
    if variant == "dance":
        assert metrics["kl"] == 0.0  # no KL: the reference forward is skipped
    else:
        assert metrics["kl"] > 0.0  # LoRA moved away from the base model during the epoch
    run = Path(cfg.output_dir)
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "final_ema" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "reward_curve.png").is_file()
    rows = read_metrics_csv(run / "metrics.csv")
    # epoch 0's row, then the final evaluation's row (the weights after 1 epoch)
    assert [r["epoch"] for r in rows] == [0, 1] and "reward_mean" not in rows[1]
    assert rows[1]["eval_reward_mean"] == pytest.approx(metrics["final_eval_reward_mean"])
    assert (run / "summary.md").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    name, saved = load_any_config(run / "config.yaml")
    assert name == "flow_grpo" and saved == resolve_variant_defaults(cfg)


@pytest.mark.parametrize("variant", ["flow_grpo", "dance"])
def test_one_epoch_on_a_video_model(tmp_path, variant):
    """The same trainer on a Wan-family video model (4 frames of 16 px): SDE log-probs over video
    latents, LoRA on the Wan attention (the family's default targets), filmstrip sample grids."""
    cfg = tiny_config(tmp_path, model="toy_video:test", variant=variant, eval_every=1)
    assert cfg.lora.targets is None  # the model family's default LoRA targets
    model = load_flow_model("toy_video:test")
    torch.manual_seed(cfg.seed)
    reference = load_flow_model("toy_video:test")
    reference.add_lora(rank=cfg.lora.rank, alpha=cfg.lora.alpha)
    before = trainable_state(reference, lora=True)
    metrics = train(cfg, model=model)
    after = trainable_state(model, lora=True)
    assert after.keys() == before.keys() and any("attn1.to_q" in n for n in after)
    unchanged = {n for n in after if torch.equal(after[n], before[n])}
    assert not unchanged, f"LoRA weights not updated: {sorted(unchanged)[:3]}"
    assert_first_update_ratio_is_one(metrics)
    assert math.isfinite(metrics["reward_mean"]) and math.isfinite(metrics["eval_reward_mean"])
    grid = Path(cfg.output_dir) / "samples" / "epoch_0001.png"
    frames, _, width = model.video_size
    assert grid.is_file() and Image.open(grid).size[0] > frames * width  # filmstrips, not single frames


def test_full_fine_tune_with_kl_to_a_frozen_copy(tmp_path):
    cfg = tiny_config(tmp_path, lora=dict(rank=0), kl_beta=0.04, optimizer=dict(lr=1e-4))
    model = fresh_model()
    before = trainable_state(model, lora=False)
    metrics = train(cfg, model=model)
    after = trainable_state(model, lora=False)
    assert_first_update_ratio_is_one(metrics)
    # every weight moves except the last (context_pre_only) block's context query projection,
    # whose gradient is exactly zero (see the LoRA test; weight decay alone is below fp32 resolution)
    last = len(model.transformer.transformer_blocks) - 1
    no_gradient = {f"transformer_blocks.{last}.attn.add_q_proj.{p}" for p in ("weight", "bias")}
    unchanged = {n for n in after if torch.equal(after[n], before[n])}
    assert unchanged == no_gradient, sorted(unchanged - no_gradient)[:5]
    assert metrics["kl"] > 0.0
    assert (Path(cfg.output_dir) / "final" / "transformer").is_dir()


def test_gradient_checkpointing_gives_the_same_update(tmp_path):
    plain = fresh_model()
    train(tiny_config(tmp_path / "a"), model=plain)
    checkpointed = fresh_model()
    metrics = train(tiny_config(tmp_path / "b", gradient_checkpointing=True), model=checkpointed)
    assert_first_update_ratio_is_one(metrics)
    for (name, a), (_, b) in zip(trainable_state(plain, True).items(), trainable_state(checkpointed, True).items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_dance_shares_initial_noise_within_groups_and_fast_trains_only_its_window(tmp_path):
    from align.data import PromptDataset, load_prompt_items
    from rewards import build_reward

    cfg = resolve_variant_defaults(tiny_config(tmp_path, variant="dance"))
    model = fresh_model().eval()
    batch = PromptDataset(load_prompt_items("train"), seed=0).epoch_batch(0, 2, 4)
    types, params, candidates = epoch_step_schedule(cfg, 0)
    rollouts = collect_rollouts(model, build_reward("shapes_saturation"), batch, cfg, 0, types, params)
    noise = rollouts.trajectory.initial_noise  # [8, C, H, W]
    assert torch.equal(noise[0], noise[3]) and torch.equal(noise[4], noise[7])
    assert not torch.equal(noise[0], noise[4])
    assert set(types) == {"dance_sde"} and candidates == list(range(4))

    fast = resolve_variant_defaults(tiny_config(tmp_path, variant="fast", sampler=dict(num_steps=8), window_size=2))
    for epoch in range(5):
        types, _, trained = epoch_step_schedule(fast, epoch)
        window = [i for i, t in enumerate(types) if t != "ode"]
        assert window == trained and len(window) == 2 and max(window) < 4  # first half only
    assert resolve_variant_defaults(tiny_config(tmp_path)).clip_range == 1e-4 and fast.clip_range == 1e-5


def test_flow_grpo_trains_the_first_99_percent_of_steps(tmp_path):
    cfg = resolve_variant_defaults(tiny_config(tmp_path, sampler=dict(num_steps=10)))
    types, params, trained = epoch_step_schedule(cfg, 0)
    assert set(types) == {"flow_grpo_sde"} and params == {"noise_level": 0.7} and trained == list(range(9))


# ----------------------------------------------------------------------------- checkpoints / resume


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    weights, state, info = load_checkpoint(latest_checkpoint(run))
    return {**weights, **{f"ema.{k}": v for k, v in state["ema"]["shadow"].items()}}


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    base = dict(num_epochs=3, checkpoint_every=1, keep_checkpoints=0)
    # A: three epochs in one go
    train(tiny_config(tmp_path / "a", **base), model=fresh_model())
    # B: one epoch, stop, then resume for the remaining two
    train(tiny_config(tmp_path / "b", **{**base, "num_epochs": 1}), model=fresh_model())
    train(tiny_config(tmp_path / "b", **base, resume=True), model=fresh_model())
    # C: crash after epoch 1 was logged but before its checkpoint was written
    train(tiny_config(tmp_path / "c", **{**base, "num_epochs": 2}), model=fresh_model())
    import shutil

    shutil.rmtree(dict(list_checkpoints(tmp_path / "c" / "run"))[1])
    assert len(read_metrics_csv(tmp_path / "c" / "run" / "metrics.csv")) == 2
    train(tiny_config(tmp_path / "c", **base, resume=True), model=fresh_model())

    expected = _final_weights(tmp_path / "a" / "run")
    for name in ("b", "c"):
        run = tmp_path / name / "run"
        got = _final_weights(run)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-8, msg=f"{name}: {key}")
        rows = read_metrics_csv(run / "metrics.csv")
        assert [r["epoch"] for r in rows] == [0, 1, 2], name
        assert [r["global_step"] for r in rows] == [2, 4, 6], name
        assert [e for e, _ in list_checkpoints(run)] == [0, 1, 2], name
    rows_a = read_metrics_csv(tmp_path / "a" / "run" / "metrics.csv")
    rows_c = read_metrics_csv(tmp_path / "c" / "run" / "metrics.csv")
    assert [r["reward_mean"] for r in rows_a] == pytest.approx([r["reward_mean"] for r in rows_c], rel=1e-6)


def test_resume_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(tmp_path):
    cfg = tiny_config(tmp_path, resume=True)
    train(cfg, model=fresh_model())  # nothing to resume from: a normal run
    assert [r["epoch"] for r in read_metrics_csv(Path(cfg.output_dir) / "metrics.csv")] == [0]
    metrics = train(cfg, model=fresh_model())  # already at num_epochs: nothing to do
    assert metrics["last_checkpoint_epoch"] == 0
    assert [r["epoch"] for r in read_metrics_csv(Path(cfg.output_dir) / "metrics.csv")] == [0]


def test_a_fresh_start_never_replaces_a_run_unless_told_to(tmp_path):
    from align.checkpoint import RunExistsError, list_checkpoints

    cfg = tiny_config(tmp_path)
    out = Path(cfg.output_dir)
    train(cfg, model=fresh_model())
    metrics_before, checkpoints_before = (out / "metrics.csv").read_text(), list_checkpoints(out)
    with pytest.raises(RunExistsError, match="already holds a run .*checkpoints up to epoch 0.*--resume.*--overwrite"):
        train(cfg, model=fresh_model())
    assert (out / "metrics.csv").read_text() == metrics_before and list_checkpoints(out) == checkpoints_before
    with pytest.raises(ValueError, match="exclude each other"):
        train(dataclasses.replace(cfg, resume=True, overwrite=True), model=fresh_model())
    (out / "notes.txt").write_text("from the old run")
    train(dataclasses.replace(cfg, overwrite=True), model=fresh_model())  # the old run's folder is deleted first
    assert not (out / "notes.txt").exists() and [r["epoch"] for r in read_metrics_csv(out / "metrics.csv")] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left aside


# ----------------------------------------------------------------------------- setup on CPU


def test_xformers_falls_back_to_sdpa_with_a_warning_on_cpu(monkeypatch):
    with pytest.warns(UserWarning, match="xformers.*SDPA"):
        assert resolve_attention_backend("xformers", cuda_available=False) == "sdpa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attention_backend("sdpa") == "sdpa"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real(name, *a))
    assert resolve_attention_backend("xformers", cuda_available=True) == "xformers"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    with pytest.warns(UserWarning, match="the xformers package"):
        assert resolve_attention_backend("xformers", cuda_available=True) == "sdpa"
    with pytest.raises(ValueError):
        resolve_attention_backend("flash")


def test_mixed_precision_is_fp32_on_cpu(tmp_path):
    for name in ("fp16", "bf16"):
        with pytest.warns(UserWarning, match="needs CUDA"):
            assert resolve_mixed_precision(name, cuda_available=False) == "no"
        assert resolve_mixed_precision(name, cuda_available=True) == name
    assert resolve_mixed_precision("no", cuda_available=False) == "no"
    if not torch.cuda.is_available():  # a whole run asked for bf16 and xformers trains in fp32 with SDPA
        model = fresh_model()
        with pytest.warns(UserWarning):
            metrics = train(tiny_config(tmp_path, mixed_precision="bf16", attention_backend="xformers"), model=model)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert_first_update_ratio_is_one(metrics)


# ----------------------------------------------------------------------------- config and CLI


def test_shapes_yaml_loads_and_names_its_command():
    path = REPO / "configs" / "shapes" / "flow_grpo.yaml"
    assert path.read_text().splitlines()[0] == "# align train configs/shapes/flow_grpo.yaml"
    name, cfg = load_any_config(path)
    assert name == "flow_grpo" and isinstance(cfg, FlowGRPOConfig)
    assert cfg.model == "shapesworld" and cfg.reward == "shapes_geneval"
    # the YAML leaves variant-dependent fields null, so `variant=dance` gets DanceGRPO's settings
    assert (cfg.adv_std, cfg.kl_beta, cfg.clip_range) == (None, None, None)
    dance = resolve_variant_defaults(load_any_config(path, ["variant=dance"])[1])
    assert (dance.adv_std, dance.kl_beta, dance.share_initial_noise) == ("group", 0.0, True)
    flow = resolve_variant_defaults(cfg)
    assert (flow.adv_std, flow.kl_beta, flow.clip_range) == ("global", 0.04, 1e-4)
    explicit = resolve_variant_defaults(dataclasses.replace(cfg, variant="dance", kl_beta=0.01))
    assert explicit.kl_beta == 0.01  # an explicit value always wins


@pytest.mark.parametrize("bad", [dict(group_size=1), dict(variant="fast", window_size=6),
                                 dict(timestep_fraction=0.0), dict(variant="slow"),
                                 dict(antithetic_noise=True, group_size=3)])
def test_config_rejects_bad_values(bad):
    from align.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(FlowGRPOConfig, data=bad)


def test_cli_train_runs_the_yaml_with_overrides(tmp_path, capsys):
    from align.cli import main

    path = REPO / "configs" / "shapes" / "flow_grpo.yaml"
    overrides = ["model=toy:test", "reward=shapes_saturation", "group_size=2", "groups_per_epoch=2", "num_epochs=1",
                 "sampler.num_steps=2", "sampler.eval_num_steps=2", "micro_batch_size=4", "eval_every=0",
                 f"output_dir={tmp_path / 'cli'}", "lora.rank=2", "quiet=true"]
    assert main(["train", str(path), *overrides]) == 0
    assert (tmp_path / "cli" / "metrics.csv").is_file()
    assert main(["train", str(path), *overrides, "--resume"]) == 0  # finished run: resumes to nothing
    capsys.readouterr()
    assert main(["train", str(path), *overrides]) == 2  # a fresh start over that run is refused
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main(["train", str(path), *overrides, "--overwrite"]) == 0
    assert main(["train", str(REPO / "configs" / "shapes" / "sample.yaml")]) == 2
    assert "not a training algorithm" in capsys.readouterr().err
    assert main(["train", str(path), "num_epochs=abc"]) == 2


def test_recomputed_old_log_probs_make_the_first_ratio_exactly_one_for_any_batch_shapes(tmp_path):
    # sampling in batches of 8 but training in micro-batches of 4 and 3: the network sees other
    # batch shapes, which may change its float rounding (it does on some CPUs / every GPU)
    for micro in (4, 3):
        cfg = tiny_config(tmp_path / str(micro), sampler=dict(batch_size=8), micro_batch_size=micro,
                          recompute_old_log_probs=True, inner_epochs=2)
        metrics = train(cfg, model=fresh_model())
        assert_first_update_ratio_is_one(metrics)
        assert metrics["optimizer_steps"] == 4


def test_interrupt_between_update_phases_saves_the_last_finished_epoch(tmp_path):
    from rewards import build_reward

    base = build_reward("shapes_saturation")
    calls = []

    def interrupting_reward(samples, prompts, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 1's first rollout batch (2 batches of 4 per epoch)
            raise KeyboardInterrupt
        return base(samples, prompts, **kwargs)

    cfg = tiny_config(tmp_path / "b", num_epochs=2, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=fresh_model(), reward=interrupting_reward)
    assert [e for e, _ in list_checkpoints(cfg.output_dir)] == [0]  # saved at exit
    train(dataclasses.replace(cfg, resume=True), model=fresh_model())
    train(tiny_config(tmp_path / "a", num_epochs=2, checkpoint_every=0), model=fresh_model())
    expected = _final_weights(tmp_path / "a" / "run")
    got = _final_weights(Path(cfg.output_dir))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-8, msg=key)
    assert [r["epoch"] for r in read_metrics_csv(Path(cfg.output_dir) / "metrics.csv")] == [0, 1]
