"""A real `align train` process killed with SIGKILL mid-run resumes to the run it would have been:
same epochs logged once each, same optimizer step count, same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from align.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from align.metrics import read_metrics_csv

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6
OVERRIDES = ["model=toy:test", "reward=shapes_saturation", "group_size=4", "groups_per_epoch=2",
             f"num_epochs={EPOCHS}", "sampler.num_steps=4", "sampler.batch_size=4", "micro_batch_size=4",
             "eval_every=0", "lora.rank=4", "checkpoint_every=1", "keep_checkpoints=0", "ema.update_interval=1",
             "quiet=true"]


def _command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "align", "train", str(REPO / "configs" / "shapes" / "flow_grpo.yaml"),
            *OVERRIDES, f"output_dir={run}", *extra]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    weights, state, _ = load_checkpoint(latest_checkpoint(run))
    return {**weights, **{f"ema.{k}": v for k, v in state["ema"]["shadow"].items()}}


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_command(full), env=_env(), check=True, timeout=300, capture_output=True)

    process = subprocess.Popen(_command(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        # wait until epoch 1 is checkpointed, then kill during a later epoch
        while not [e for e, _ in list_checkpoints(killed)] or max(e for e, _ in list_checkpoints(killed)) < 1:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint of epoch 1 appeared"
            time.sleep(0.05)
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    saved = [e for e, _ in list_checkpoints(killed)]
    assert max(saved) < EPOCHS - 1, "the kill came too late to test anything"

    subprocess.run(_command(killed, "--resume"), env=_env(), check=True, timeout=300, capture_output=True)
    rows = read_metrics_csv(killed / "metrics.csv")
    expected_rows = read_metrics_csv(full / "metrics.csv")
    assert [r["epoch"] for r in rows] == list(range(EPOCHS))  # no duplicated or missing epochs
    assert [r["global_step"] for r in rows] == [r["global_step"] for r in expected_rows]
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in expected_rows]
    expected = _weights(full)
    got = _weights(killed)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-8, msg=key)
