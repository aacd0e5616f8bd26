"""A reward server killed mid-batch (SIGKILL) and restarted while Flow-GRPO trains on the `remote`
reward: the client's retries recover, every epoch completes with every sample scored."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
TOKEN = "fault-test-token"


def slow_saturation(samples, prompts=None, **kwargs):
    """Mean HSV saturation, 0.3 s per call (a window to kill the server in); touches
    $SERVE_TEST_MARKER when a call starts. Served from a subprocess by import path."""
    from rewards.shapes import SaturationReward

    if os.environ.get("SERVE_TEST_MARKER"):
        Path(os.environ["SERVE_TEST_MARKER"]).touch()
    time.sleep(0.3)
    return SaturationReward()(samples).scores


def start_server(port: int, marker: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENALIGN_SERVE_TOKEN": TOKEN, "SERVE_TEST_MARKER": str(marker),
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", "tests.test_serve_faults:slow_saturation",
                                "--port", str(port), "--max-wait-ms", "20", "--log-level", "warning"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log.open("a"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("reward server did not start within 60 s")


def test_server_killed_mid_batch_and_restarted_training_completes(tmp_path, monkeypatch):
    from align.config import load_config
    from align.flow_grpo import FlowGRPOConfig, train
    from align.metrics import read_metrics_csv
    from rewards import build_reward
    from samplers.models.shapesworld import toy_components

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    marker = tmp_path / "scoring_started"
    log = tmp_path / "server.log"
    servers = [start_server(port, marker, log)]
    events = []

    def kill_mid_batch_then_restart():
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        servers[0].kill()  # SIGKILL while the reward call sleeps: the request in flight is cut
        servers[0].wait()
        events.append("killed")
        time.sleep(0.5)  # the client meets refused connections meanwhile
        marker.unlink()
        servers.append(start_server(port, marker, log))
        events.append("restarted")

    killer = threading.Thread(target=kill_mid_batch_then_restart, daemon=True)
    killer.start()
    monkeypatch.setenv("GENALIGN_SERVE_TOKEN", TOKEN)
    reward = {"name": "remote", "url": f"http://127.0.0.1:{port}", "reward": "slow_saturation", "timeout": 30,
              "deadline": 90, "max_retries": 100, "backoff": 0.2, "max_backoff": 1.0, "request_samples": 2}
    cfg = load_config(FlowGRPOConfig, data=dict(
        model="toy:test", reward=reward, group_size=4, groups_per_epoch=2, num_epochs=2, lora=dict(rank=4),
        sampler=dict(num_steps=4, eval_num_steps=3, batch_size=4), micro_batch_size=4,
        output_dir=str(tmp_path / "run"), eval_every=0, quiet=True, prompts=dict(eval_num_prompts=2),
        monitor_rewards=[]))
    try:
        remote = build_reward(reward)
        metrics = train(cfg, model=toy_components("test", seed=0), reward=remote)
        killer.join(60)
        assert events == ["killed", "restarted"]
        assert servers[0].returncode == -9
        rows = read_metrics_csv(Path(cfg.output_dir) / "metrics.csv")
        epochs = [r for r in rows if "reward_mean" in r]
        assert [r["epoch"] for r in epochs] == [0, 1]  # no lost epoch
        for row in epochs:
            assert math.isfinite(row["reward_mean"]) and row["reward_remote_failed"] == 0.0  # every sample scored
        assert remote.totals["retries"] >= 1 and remote.totals["unscored"] == 0  # cut, retried, recovered
        assert metrics["reward_remote_failed"] == 0.0 and math.isfinite(metrics["reward_mean"]), sorted(metrics)
        served = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'genalign_requests_total{reward="slow_saturation",status="200"}' in served  # the restarted server
    finally:
        for server in servers:
            server.kill()
            server.wait()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
