"""Flow-GRPO on 2 gloo ranks (CPU) equals the single-process run on the same data.

Launches tests/distributed_flow_grpo.py once plainly and once under `accelerate launch` with
2 processes (~1 min on 2 cores: every process imports torch + diffusers). Groups span ranks in
that config, so this checks the gathered advantages, the global-sample-id bookkeeping, the loss
scaling under DDP's gradient averaging and the collective checkpointing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.checkpoint import list_checkpoints, load_checkpoint
from align.metrics import read_metrics_csv

SCRIPT = Path(__file__).with_name("distributed_flow_grpo.py")
REPO = SCRIPT.parents[1]


def _run(command: list[str], timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate launcher not on PATH")
def test_two_gloo_ranks_match_one_process(tmp_path):
    single, double = tmp_path / "p1", tmp_path / "p2"
    _run([sys.executable, str(SCRIPT), str(single)])
    _run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(double)])

    one, two = torch.load(single / "advantages.pt"), torch.load(double / "advantages.pt")
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    torch.testing.assert_close(two["finals"], one["finals"], rtol=0, atol=0)  # same noise per global sample
    torch.testing.assert_close(two["advantages"], one["advantages"], rtol=0, atol=0)
    assert torch.equal(two["keep"], one["keep"])
    assert two["metrics"] == pytest.approx(one["metrics"])

    rows_one = read_metrics_csv(single / "run" / "metrics.csv")
    rows_two = read_metrics_csv(double / "run" / "metrics.csv")
    # two training epochs, then the final evaluation's row (epoch 2, evaluation metrics only)
    assert [r["epoch"] for r in rows_two] == [0, 1, 2] and "reward_mean" not in rows_two[2]
    assert rows_two[2]["eval_reward_mean"] == pytest.approx(rows_one[2]["eval_reward_mean"], rel=1e-5, abs=1e-7)
    for a, b in zip(rows_one[:2], rows_two[:2]):
        assert b["first_update_ratio_error"] == 0.0 and a["first_update_ratio_error"] == 0.0
        for key in ("reward_mean", "reward_std", "eval_reward_mean", "kept_fraction", "trained_transitions"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    for (epoch_one, path_one), (epoch_two, path_two) in zip(list_checkpoints(single / "run"),
                                                            list_checkpoints(double / "run")):
        assert epoch_one == epoch_two
        weights_one, state_one, _ = load_checkpoint(path_one)
        weights_two, state_two, _ = load_checkpoint(path_two)
        assert len(state_two["rng"]) == 2  # every rank's RNG state
        for name in weights_one:  # float summation order differs (DDP all-reduce), nothing else
            torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-4, atol=1e-6, msg=name)
