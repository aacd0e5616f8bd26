"""The small shared pieces of the trainers: prompt sharding, EMA, checkpoints, metrics logging."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from align.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from align.data import PromptDataset, derive_seed, shard_range
from align.ema import EMA
from align.metrics import MetricsLogger, TrainingProgress, read_metrics_csv

ITEMS = [{"prompt": f"prompt {i}"} for i in range(10)]


# ----------------------------------------------------------------------------- data


def test_epoch_prompts_are_deterministic_and_cover_every_prompt_equally():
    data = PromptDataset(ITEMS, seed=3)
    assert data.epoch_prompts(4, 3) == PromptDataset(ITEMS, seed=3).epoch_prompts(4, 3)
    assert data.epoch_prompts(0, 3) != PromptDataset(ITEMS, seed=4).epoch_prompts(0, 3)
    # 5 epochs of 4 groups = two full passes over the 10 prompts
    seen = [i for epoch in range(5) for i in data.epoch_prompts(epoch, 4)]
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert all(len(set(data.epoch_prompts(e, 4))) == 4 for e in range(5))  # no repeat within an epoch
    assert len(data.epoch_prompts(0, 25)) == 25  # more groups than prompts: several passes


@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("num_processes", [1, 2, 3])
def test_rank_shards_partition_the_global_batch_with_global_group_ids(num_processes, spread):
    data = PromptDataset(ITEMS, seed=0)
    groups, k = 3, 4  # 12 samples: with 2 ranks whole groups need not align, with 3 they never do
    full = data.epoch_batch(7, groups, k)
    assert full.group_ids.tolist() == [g for g in range(groups) for _ in range(k)]
    shards = [data.epoch_batch(7, groups, k, num_processes, r, spread_groups=spread) for r in range(num_processes)]
    ids = torch.cat([s.sample_ids for s in shards])
    assert sorted(ids.tolist()) == list(range(groups * k)) and all(len(s) == 12 // num_processes for s in shards)
    for shard in shards:  # every sample keeps its global group and its group's prompt
        assert shard.group_ids.tolist() == [int(s) // k for s in shard.sample_ids]
        assert shard.prompts == [full.prompts[int(s)] for s in shard.sample_ids]
    if num_processes == 3 and not spread:
        assert shards[0].group_ids.tolist() == [0, 0, 0, 0] and shards[1].group_ids.tolist() == [1, 1, 1, 1]
    if num_processes == 2 and not spread:
        assert shards[0].group_ids.tolist() == [0, 0, 0, 0, 1, 1] and shards[1].group_ids.tolist()[0] == 1


def test_uneven_split_is_a_clear_error():
    with pytest.raises(ValueError, match="split evenly"):
        PromptDataset(ITEMS).epoch_batch(0, 3, 3, num_processes=2)
    assert shard_range(8, 2, 1) == (4, 8)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    assert len({derive_seed(0, e, p) for e in range(50) for p in range(4)}) == 200
    torch.Generator().manual_seed(derive_seed(2**40, 5))  # in range for torch


# ----------------------------------------------------------------------------- EMA


def test_ema_update_interval_decay_warmup_and_swap():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9, update_interval=2)
    with torch.no_grad():
        p.fill_(1.0)
    assert not ema.update(1)  # not a multiple of the interval
    assert ema.update(2)  # first update: warm-up decay min(1/10, 0.9) = 0.1
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 0.9))
    assert ema.current_decay() == pytest.approx(2 / 11)
    no_warmup = EMA([("w", torch.nn.Parameter(torch.zeros(1)))], decay=0.5, warmup=False)
    no_warmup.parameters["w"].data.fill_(4.0)
    no_warmup.update(1)
    assert float(no_warmup.shadow["w"]) == 2.0
    with ema.swapped():
        torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    torch.testing.assert_close(p.detach(), torch.ones(3))
    state = ema.state_dict()
    other = EMA([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.9, update_interval=2)
    other.load_state_dict(state)
    assert other.num_updates == 1 and torch.equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(ValueError, match="does not match"):
        EMA([("v", torch.nn.Parameter(torch.zeros(3)))]).load_state_dict(state)
    with pytest.raises(ValueError):
        EMA([("w", p)], decay=1.0)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_atomic_and_prunes(tmp_path):
    weights = {"a": torch.randn(3, 2), "b": torch.arange(4.0)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": [rng_state()], "ema": None}
    for epoch in range(3):
        save_checkpoint(tmp_path, epoch, weights, state, info={"global_step": 10 * epoch},
                        export=lambda d: (d / "extra.txt").write_text("x"), keep_last=2)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [1, 2]
    (tmp_path / "checkpoints" / ".tmp-epoch_000009-1").mkdir()  # a crashed write: ignored
    (tmp_path / "checkpoints" / "epoch_000008").mkdir()  # no trainer_state.json: incomplete, ignored
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "epoch_000002" and (latest / "extra.txt").is_file()
    loaded, loaded_state, info = load_checkpoint(latest)
    assert info["epoch"] == 2 and info["global_step"] == 20
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    fresh.load_state_dict(loaded_state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # re-saving an epoch replaces it, no leftovers
    save_checkpoint(tmp_path, 2, {"a": torch.zeros(1)}, state)
    assert torch.equal(load_checkpoint(latest)[0]["a"], torch.zeros(1))
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".old")]
    # a failing export leaves no checkpoint behind
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 5, weights, state, export=lambda d: (_ for _ in ()).throw(RuntimeError("disk")))
    assert latest_checkpoint(tmp_path).name == "epoch_000002"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-epoch_000005")]


def test_output_dir_rule_fresh_resume_overwrite(tmp_path, monkeypatch):
    from align.checkpoint import RunExistsError, clear_output_dir, existing_run, prepare_output_dir

    run = tmp_path / "run"
    assert prepare_output_dir(run) is None and not run.exists()  # nothing there: a fresh start
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")  # a run that died before its first epoch is no run
    (run / "metrics.csv").write_text("epoch\n")
    assert existing_run(run) is None and prepare_output_dir(run) is None
    save_checkpoint(run, 3, {"w": torch.zeros(2)}, {})
    (run / "metrics.csv").write_text("epoch,reward_mean\n0,0.5\n4,0.6\n")
    assert existing_run(run) == "checkpoints up to epoch 3, metrics.csv up to epoch 4"
    with pytest.raises(RunExistsError, match="--resume"):
        prepare_output_dir(run)
    assert prepare_output_dir(run, resume=True) == checkpoint_dir(run, 3)
    assert prepare_output_dir(run, overwrite=True, is_main=False) is None and run.exists()  # only rank 0 deletes
    assert prepare_output_dir(run, overwrite=True) is None and not run.exists()
    assert os.listdir(tmp_path) == []  # the folder moved aside is gone too
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="refusing"):
        clear_output_dir(".")  # never the working directory
    assert tmp_path.exists()


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ----------------------------------------------------------------------------- metrics


def test_metrics_csv_grows_columns_and_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    for epoch in range(4):
        extra = {"eval_reward_mean": 0.5} if epoch % 2 == 0 else {}
        logger.log(epoch, {"reward_mean": 0.1 * epoch, "reward_std": 0.01, "kl": torch.tensor(1e-3), **extra})
    logger.close()
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert "eval_reward_mean" not in rows[1] and rows[2]["eval_reward_mean"] == 0.5
    assert rows[3]["kl"] == pytest.approx(1e-3) and (tmp_path / "reward_curve.png").stat().st_size > 1000
    # resume from the checkpoint of epoch 1: rows 2 and 3 are dropped, then re-logged once
    resumed = MetricsLogger(tmp_path, keep_through_epoch=1, tensorboard=False, plot_every=0)
    assert [r["epoch"] for r in read_metrics_csv(tmp_path / "metrics.csv")] == [0, 1]
    resumed.log(2, {"reward_mean": 9.0})
    resumed.log(2, {"reward_mean": 8.0})  # the same epoch again replaces its row
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[2]["reward_mean"] == 8.0
    # a fresh run in the same folder starts a new CSV; NaN survives the round trip
    fresh = MetricsLogger(tmp_path, tensorboard=False, plot_every=0)
    fresh.log(0, {"kl": math.nan})
    assert math.isnan(read_metrics_csv(tmp_path / "metrics.csv")[0]["kl"])
    assert not MetricsLogger(tmp_path / "off", enabled=False).csv_path.parent.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_progress_prints_a_summary_with_eta(capsys):
    with TrainingProgress(3, start_epoch=1) as progress:
        progress.advance(1, "reward 0.5")
    err = capsys.readouterr().err
    assert "epoch 2/3 reward 0.5" in err and "eta" in err
    with TrainingProgress(3, enabled=False) as progress:
        progress.advance(0, "nothing")
    assert capsys.readouterr().err == ""


def test_tensorboard_is_used_when_importable(tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeWriter:
        def __init__(self, log_dir, purge_step=None):
            calls.append(("init", Path(log_dir).name, purge_step))

        def add_scalar(self, key, value, step):
            calls.append((key, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    logger = MetricsLogger(tmp_path, keep_through_epoch=4, plot_every=0)
    logger.log(5, {"reward_mean": 0.25, "note": "text is not a scalar"})
    logger.close()
    assert calls == [("init", "tensorboard", 5), ("reward_mean", 0.25, 5), ("close",)]


def test_held_out_summary_compares_first_and_last_evaluation(tmp_path):
    from align.metrics import held_out_summary, write_summary

    rows = [{"epoch": 0, "eval_strict_mean": 0.4, "eval_num_samples": 8, "reward_mean": 0.1},
            {"epoch": 1, "reward_mean": 0.2},
            {"epoch": 2, "eval_strict_mean": 0.55, "eval_num_samples": 8}]
    assert held_out_summary(rows) == [("strict_mean", 0.4, 0.55)]
    assert held_out_summary(rows[:2]) == []
    path = write_summary(rows, tmp_path / "summary.md", "demo", echo=False)
    assert "| strict_mean | 0.400 | 0.550 | +0.150 |" in path.read_text()
