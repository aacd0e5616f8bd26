"""Reward-hacking monitor: a hacked metrics stream is flagged, a clean one is not; the trainer hook."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from eval.monitor import HackingMonitor, corrected_score, quality_to_likert, replay_metrics

HELD_OUT = ["eval_shapes_quality_mean", "eval_shapes_geneval_mean"]


def stream(optimised, quality, verifier):
    return [{"epoch": 3 * i, "eval_reward_mean": o, "eval_shapes_quality_mean": q, "eval_shapes_geneval_mean": v}
            for i, (o, q, v) in enumerate(zip(optimised, quality, verifier))]


# saturation optimised: it rises while the verifier (never optimised) falls
HACKED = stream([0.20, 0.24, 0.29, 0.35], [0.86, 0.85, 0.84, 0.82], [0.61, 0.58, 0.52, 0.44])
# verifier optimised: reward and held-out quality move together (small noise)
CLEAN = stream([0.61, 0.63, 0.64, 0.66], [0.86, 0.865, 0.855, 0.862], [0.61, 0.63, 0.64, 0.66])


def test_hacked_stream_is_flagged_and_clean_stream_is_not(tmp_path, caplog):
    hacked = HackingMonitor(held_out=HELD_OUT, log_path=tmp_path / "hacked.jsonl")
    with caplog.at_level(logging.WARNING, logger="eval.monitor"):
        flags = [hacked.update(row["epoch"], row)["hacking_flag"] for row in HACKED]
    assert flags == [0.0, 1.0, 1.0, 1.0]  # saturation +0.04 while the verifier lost 0.03 at epoch 3
    assert hacked.flagged and "shapes_geneval -0.030" in hacked.alerts[0]["message"]
    assert "reward hacking suspected" in caplog.text
    assert len((tmp_path / "hacked.jsonl").read_text().splitlines()) == 4

    clean = HackingMonitor(held_out=HELD_OUT)
    assert [clean.update(row["epoch"], row)["hacking_flag"] for row in CLEAN] == [0.0] * 4
    assert not clean.flagged and clean.summary()["alerts"] == []


def test_gap_patience_thresholds_and_non_eval_rows():
    monitor = HackingMonitor(held_out=HELD_OUT, patience=2)
    assert monitor.update(0, {"reward_mean": 0.3}) == {}  # a training-only epoch: nothing to watch
    out = [monitor.update(row["epoch"], row) for row in HACKED]
    assert [o["hacking_flag"] for o in out] == [0.0, 0.0, 1.0, 1.0]  # two evaluations in a row
    assert out[-1]["hacking_gap_shapes_geneval"] == pytest.approx((0.35 - 0.20) - (0.44 - 0.61))
    lenient = HackingMonitor(held_out=HELD_OUT, drop={"eval_shapes_geneval_mean": 0.5, "eval_shapes_quality_mean": 0.5})
    assert not any(lenient.update(r["epoch"], r)["hacking_flag"] for r in HACKED)


def test_corrected_score_matches_gdro_formula():
    assert corrected_score(1.0, 5.0) == pytest.approx(2.2)  # r (u - 3) + 0.2
    assert corrected_score(0.5, 1.0) == pytest.approx(-0.8)
    assert quality_to_likert(np.array([0.0, 0.5, 1.0])).tolist() == [1.0, 3.0, 5.0]
    monitor = HackingMonitor(held_out=HELD_OUT)  # quality key found automatically
    out = monitor.update(0, HACKED[0])
    assert out["corrected_score"] == pytest.approx(0.20 * (1 + 4 * 0.86 - 3) + 0.2)


def test_replay_history_picks_held_out_columns():
    rows = [{"epoch": 0, "reward_mean": 0.2}, *HACKED, {"epoch": 20, "eval_strict_mean": 0.1, "eval_reward_mean": 0.4}]
    monitor = replay_metrics(rows)
    assert monitor.held_out == HELD_OUT  # strict/partial extras of the trained verifier are not held out
    assert monitor.flagged
    resumed = HackingMonitor(held_out=HELD_OUT, history=HACKED[:2])
    assert resumed.baseline["eval_reward_mean"] == 0.20  # baseline survives a resume


def test_trainer_calls_the_monitor(tmp_path):
    """A real (tiny) Flow-GRPO run on toy:test with the hackable saturation reward logs the monitor."""
    from align.config import load_config
    from align.flow_grpo import FlowGRPOConfig, train

    cfg = load_config(FlowGRPOConfig, None, [
        "model=toy:test", "reward=shapes_saturation", "monitor_rewards=[shapes_quality,shapes_geneval]",
        "group_size=2", "groups_per_epoch=2", "num_epochs=1", "eval_every=1", "sampler.num_steps=4",
        "sampler.eval_num_steps=2", "sampler.batch_size=4", "micro_batch_size=4", "prompts.eval_per_tag=1",
        "lora.rank=2", "checkpoint_every=0", "eval_grid_size=0", "quiet=true", f"output_dir={tmp_path}"])
    metrics = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]  # before epoch 0 and after training
    assert set(records[0]["values"]) == {"eval_reward_mean", "eval_shapes_quality_mean", "eval_shapes_geneval_mean"}
    assert "final_hacking_flag" in metrics and "corrected_score" in records[-1]
