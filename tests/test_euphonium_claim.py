"""eval.euphonium_claim: steps to the baseline's final outcome reward, paired differences, report files."""

from __future__ import annotations

import csv

import pytest

from eval.euphonium_claim import main, steps_to_reach, trailing_mean


def _run(path, rewards, held):
    path.mkdir(parents=True)
    keys = ["epoch", "reward_mean", "eval_reward_mean", "eval_strict_mean", "eval_direction_mean",
            "eval_shapes_quality_mean"]
    with (path / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        for epoch in range(len(rewards) + 1):
            row = {"epoch": epoch, "reward_mean": rewards[epoch] if epoch < len(rewards) else ""}
            if epoch in held:
                row |= {k: held[epoch] for k in keys[2:]}
            writer.writerow(row)
    return path


def test_trailing_mean_and_steps_to_reach():
    assert trailing_mean([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert steps_to_reach(trailing_mean([0.1, 0.5, 0.9], 1), 0.5) == 2
    assert steps_to_reach(trailing_mean([0.1, 0.2], 1), 0.5) is None


def test_a_twice_as_fast_run_is_a_2x_speed_up(tmp_path):
    base, fast = [], []
    for seed in range(3):
        b = [0.5 + 0.02 * e + 0.001 * seed for e in range(12)]  # reaches 0.72 at epoch 12
        f = [min(0.5 + 0.04 * e, 0.8) + 0.001 * seed for e in range(12)]  # reaches it at epoch 6-7
        base.append(_run(tmp_path / f"base_{seed}", b, {0: 0.5, 12: 0.55}))
        fast.append(_run(tmp_path / f"euph_{seed}", f, {0: 0.5, 12: 0.6}))
    out = tmp_path / "report"
    summary = main(["--baseline", *map(str, base), "--euphonium", *map(str, fast), "--smooth", "1",
                    "--out", str(out)])
    assert summary["steps"] == {"baseline": 12, "euphonium": 7}
    assert summary["speedup"] == pytest.approx(12 / 7)
    assert summary["baseline_gain"] > 0
    assert summary["paired_difference"] == pytest.approx([sum(min(0.5 + 0.04 * e, 0.8) - 0.5 - 0.02 * e
                                                              for e in range(12)) / 12] * 3)
    text = (out / "euphonium_claim.md").read_text()
    assert "speed-up 1.71x" in text and "| reward | 0.500" in text and (out / "euphonium_claim.png").stat().st_size > 0
