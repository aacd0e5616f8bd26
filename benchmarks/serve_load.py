"""Load benchmark of `align serve`: N concurrent requests of K images from one client process against
one server process on 127.0.0.1, with server-side batching on and off.

    nice -n 10 python benchmarks/serve_load.py [--reward shapes_clip_score] [--requests 1000] [--samples 4]

Every request carries distinct ShapesWorld renders with their prompts; all N are sent at once
(asyncio + one pooled httpx client, no retries), and every answer is checked against its request:
the echoed X-Request-Id and the scores (equal to the reward scored locally on the same images, up
to float32 round-off of batched matmuls). Reports failures, mismatches, throughput (images/s) and
request latency p50/p99 (send to answer, so queueing under load is included), plus the server's
mean batch size from /metrics. "off" serves with --max-batch-size 1: every request scored alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from eval.shapes import prompts as shapes_prompts, render, scene_for_prompt  # noqa: E402
from rewards import build_reward  # noqa: E402
from rewards.wire import decode_floats, encode_request  # noqa: E402

TOKEN = "benchmark-token"


def make_requests(n: int, k: int) -> list[tuple[torch.Tensor, list[str]]]:
    """n requests of k distinct renders [k, 3, 64, 64] (uint8 / 255) with their prompts."""
    metas = shapes_prompts("test")
    out = []
    for i in range(n):
        chosen = [metas[(i * k + j) % len(metas)] for j in range(k)]
        images = np.stack([render(scene_for_prompt(m, rng=i * k + j)) for j, m in enumerate(chosen)])
        out.append((torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255,
                    [m["prompt"] for m in chosen]))
    return out


def start_server(reward: str, port: int, max_batch_size: int, max_wait_ms: float) -> subprocess.Popen:
    env = {**os.environ, "GENALIGN_SERVE_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--reward", reward, "--port", str(port),
                                "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
                                "--timeout", "900", "--max-queue", "100000", "--log-level", "warning"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


async def fire(url: str, bodies: list[bytes], connections: int) -> tuple[list, list[float], float]:
    """Send every body at once; (answers or exceptions, latencies in s, wall time in s)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    latencies = [0.0] * len(bodies)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900.0),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        async def one(i: int, body: bytes):
            start = time.perf_counter()
            response = await client.post(url, content=body, headers={"X-Request-Id": str(i)})
            latencies[i] = time.perf_counter() - start
            return response

        start = time.perf_counter()
        answers = await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)), return_exceptions=True)
        return answers, latencies, time.perf_counter() - start


def run_mode(args, label: str, max_batch_size: int, requests, expected: list[torch.Tensor]) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start_server(args.reward, port, max_batch_size, args.max_wait_ms)
    try:
        bodies = [encode_request(samples, prompts) for samples, prompts in requests]
        url = f"http://127.0.0.1:{port}/v1/rewards/{args.reward}/score"
        httpx.post(url, content=bodies[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)  # warm-up
        answers, latencies, wall = asyncio.run(fire(url, bodies, args.connections))
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.terminate()
        server.wait()
    failed = mismatched = 0
    worst = 0.0
    for i, answer in enumerate(answers):
        if isinstance(answer, BaseException) or answer.status_code != 200:
            failed += 1
            continue
        scores = decode_floats(answer.json()["scores"])
        error = float((scores - expected[i]).abs().max()) if scores.shape == expected[i].shape else float("inf")
        worst = max(worst, error)
        if answer.headers.get("X-Request-Id") != str(i) or error > 1e-5:
            mismatched += 1
    batch_sum = float(re.search(r"genalign_batch_samples_sum\S* (\S+)", metrics)[1])
    batch_count = float(re.search(r"genalign_batch_samples_count\S* (\S+)", metrics)[1])
    ms = np.array(latencies) * 1000
    return {"mode": label, "failed": failed, "mismatched": mismatched, "max_abs_error": worst,
            "images_per_s": len(requests) * args.samples / wall, "requests_per_s": len(requests) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": (batch_sum - args.samples) / max(1, batch_count - 1), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", default="shapes_clip_score", help="reward to serve (default shapes_clip_score)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=4, help="images per request (default 4)")
    parser.add_argument("--connections", type=int, default=1000, help="client connection pool size (default 1000)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="batching on: samples per reward call")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="batching on: max wait (default 5)")
    args = parser.parse_args()

    torch.manual_seed(0)
    print(f"rendering {args.requests} x {args.samples} images, scoring them locally ...", flush=True)
    requests = make_requests(args.requests, args.samples)
    reward = build_reward(args.reward)
    with torch.no_grad():
        expected = [reward(samples, prompts).scores for samples, prompts in requests]
    print(f"{args.requests} concurrent requests x {args.samples} images, reward {args.reward}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs", flush=True)
    header = "| batching | failed | mismatched | images/s | requests/s | p50 ms | p99 ms | mean batch | wall s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, size in ((f"on ({args.max_batch_size}, {args.max_wait_ms:g} ms)", args.max_batch_size), ("off", 1)):
        r = run_mode(args, label, size, requests, expected)
        print(f"| {r['mode']} | {r['failed']} | {r['mismatched']} | {r['images_per_s']:.0f} | "
              f"{r['requests_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} | "
              f"{r['wall_s']:.1f} |", flush=True)
        print(f"  (largest |remote - local| score difference {r['max_abs_error']:.2g})", flush=True)


if __name__ == "__main__":
    main()
