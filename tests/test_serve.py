"""`align serve` (rewards/serve.py) and the `remote` reward (rewards/remote.py), over real HTTP on
127.0.0.1: uvicorn servers in threads, httpx clients. Faults with a killed server process and a
training run: tests/test_serve_faults.py."""

from __future__ import annotations

import asyncio
import json
import math
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from safetensors.torch import save as save_safetensors

from eval.shapes import prompts as shapes_prompts, render, scene_for_prompt
from rewards import FunctionReward, build_reward
from rewards.remote import RemoteRewardError
from rewards.serve import ServeConfig, create_app, parse_reward_option, resolve_token
from rewards.wire import decode_floats, encode_floats, encode_request

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class ThreadServer:
    """A real uvicorn server on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def scenes(n: int, split: str = "test", seed: int = 0) -> tuple[torch.Tensor, list[str], list[dict]]:
    """n ShapesWorld renders [n, 3, 64, 64] (uint8 / 255, so the U8 wire is exact), prompts, metadata."""
    metas = [m for m in shapes_prompts(split)][seed: seed + n]
    images = np.stack([render(scene_for_prompt(m, rng=seed + i)) for i, m in enumerate(metas)])
    # contiguous NCHW, as the server decodes them: conv kernels (so round-off) depend on the memory format
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255
    return samples, [m["prompt"] for m in metas], metas


def _slow(samples, prompts=None, **kwargs):
    time.sleep(1.0)
    return samples.mean(dim=(1, 2, 3))


class _Flaky:
    """Fails (RuntimeError -> HTTP 500) on its first call, then scores the mean pixel."""

    def __init__(self):
        self.calls = 0

    def __call__(self, samples, prompts=None, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("transient failure")
        return samples.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def served():
    """Local reward instances (warmed up) and a server serving the same instances."""
    rewards = {name: build_reward(name) for name in ("shapes_geneval", "shapes_clip_score", "artifact_classifier",
                                                     "shapes_saturation")}
    rewards["flaky"] = FunctionReward(_Flaky(), "flaky")
    samples, prompts, _ = scenes(2)
    for reward in rewards.values():
        if reward.name != "flaky":
            reward(samples, prompts)  # weights load on first use
    cfg = ServeConfig(max_batch_size=16, max_wait_ms=100, max_request_samples=16, max_body_bytes=4 * 2**20,
                      request_timeout=30)
    server = ThreadServer(create_app(rewards, cfg, token=TOKEN))
    yield server, rewards
    server.stop()


def remote(server, reward: str, **kwargs):
    return build_reward({"name": "remote", "url": server.url, "reward": reward, "token": TOKEN, "backoff": 0.05,
                         **kwargs})


def post(server, reward: str, body: bytes, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/rewards/{reward}/score", content=body, headers=headers, timeout=30)


def assert_still_serving(server) -> None:
    samples, prompts, _ = scenes(1)
    response = post(server, "shapes_saturation", encode_request(samples, prompts))
    assert response.status_code == 200 and len(response.json()["scores"]) == 1


# ----------------------------------------------------------------------------- parity and batching


@pytest.mark.parametrize("name, extra", [("shapes_geneval", "partial"), ("shapes_clip_score", "cosine"),
                                         ("artifact_classifier", "p_artifact")])
def test_remote_scores_equal_local_scores_and_merged_batches_equal_requests_alone(served, name, extra):
    server, rewards = served
    samples, prompts, metas = scenes(7, seed=3)
    # 4 requests of 2, 2, 2, 1 samples sent at once: the server merges them (max_wait 100 ms)
    out = remote(server, name, request_samples=2)(samples, prompts, metadata=metas)
    alone = [rewards[name](samples[a:a + 2], prompts[a:a + 2], metadata=metas[a:a + 2]) for a in range(0, 7, 2)]
    expected = torch.cat([o.scores for o in alone])
    # The verifier is exact; network rewards agree up to float32 round-off: batched matmuls of
    # another batch size round differently (locally too: batches of 2 vs 7 differ by <= 4e-7).
    tolerance = 0.0 if name == "shapes_geneval" else 1e-6
    assert torch.allclose(out.scores, expected, rtol=0, atol=tolerance), (out.scores - expected)
    assert torch.allclose(out.extras[extra], torch.cat([o.extras[extra].float() for o in alone]), rtol=0,
                          atol=tolerance)
    assert out.extras["remote_unscored"] == 0 and out.extras["remote_failed"].sum() == 0
    whole = rewards[name](samples, prompts, metadata=metas)
    assert torch.allclose(out.scores, whole.scores, atol=1e-6, equal_nan=True)
    if name == "shapes_geneval":
        assert out.scores.max() == 1  # renders of the prompts: the verifier's partial credit is 1
    metrics = httpx.get(f"{server.url}/metrics").text
    merged = re.search(rf'genalign_batch_samples_sum{{reward="{name}"}} (\S+)', metrics)
    batches = re.search(rf'genalign_batches_total{{reward="{name}"}} (\S+)', metrics)
    assert float(batches[1]) < float(merged[1]) / 2, "requests were not merged"


def test_group_ids_stay_within_each_request_when_batches_merge():
    grouped = build_reward({"type": "weighted_sum", "normalize": "group",
                            "rewards": ["shapes_saturation", "shapes_quality"]})
    server = ThreadServer(create_app({"grouped": grouped}, ServeConfig(max_wait_ms=300), token=None))
    try:
        samples = torch.rand(6, 3, 16, 16).mul(255).round() / 255
        group_ids = torch.tensor([0, 0, 1, 0, 1, 1])  # two requests of 3 with overlapping ids
        out = build_reward({"name": "remote", "url": server.url, "reward": "grouped", "request_samples": 3})(
            samples, None, group_ids=group_ids)
        alone = torch.cat([grouped(samples[:3], group_ids=group_ids[:3]).scores,
                           grouped(samples[3:], group_ids=group_ids[3:]).scores])
        assert torch.allclose(out.scores, alone, atol=1e-6), (out.scores, alone)
        assert 'genalign_batches_total{reward="grouped"} 1' in httpx.get(f"{server.url}/metrics").text  # merged
        assert not torch.allclose(out.scores, grouped(samples, group_ids=group_ids).scores, atol=1e-3)
    finally:
        server.stop()


def test_nan_scores_survive_the_wire():
    values = torch.tensor([1.5, math.nan, math.inf, -math.inf, -0.0])
    encoded = encode_floats(values)
    assert json.loads(json.dumps(encoded, allow_nan=False)) == encoded
    assert torch.equal(decode_floats(encoded).isnan(), values.isnan())
    assert decode_floats(encoded)[[0, 2, 3]].tolist() == [1.5, math.inf, -math.inf]


def test_missing_metadata_is_nan_remotely_too(served):
    server, _ = served
    samples, _, _ = scenes(2)
    out = remote(server, "shapes_geneval")(samples, ["a photo of a red circle", "not a ShapesWorld prompt"])
    assert not torch.isnan(out.scores[0]) and torch.isnan(out.scores[1]) and out.nan_count == 1
    assert out.extras["remote_unscored"] == 0  # scored by the reward as NaN, not lost on the way


def test_videos_and_float32_samples_round_trip(served):
    server, rewards = served
    videos = torch.rand(3, 3, 4, 16, 16)  # [B, 3, T, H, W], not on the uint8 grid
    exact = remote(server, "shapes_saturation", wire_dtype="F32")(videos)
    assert torch.equal(exact.scores, rewards["shapes_saturation"](videos).scores)
    quantised = remote(server, "shapes_saturation")(videos)  # U8: round(255 x) on the wire
    assert torch.equal(quantised.scores, rewards["shapes_saturation"]((videos * 255).round() / 255).scores)


def test_server_500_is_retried_and_recovers(served):
    server, rewards = served
    samples = torch.rand(2, 3, 8, 8)
    out = remote(server, "flaky")(samples, None)
    assert out.nan_count == 0 and out.extras["remote_retries"] == 1
    assert rewards["flaky"].fn.calls == 2


# ----------------------------------------------------------------------------- bad input


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def _with_prompt_bytes(prompt: bytes) -> bytes:
    """A request whose prompt is ``prompt`` verbatim inside the (JSON-in-JSON) header."""
    header = (b'{"__metadata__":{"genalign":"{\\"prompts\\": [\\"' + prompt + b'\\"]}"},'
              b'"samples":{"dtype":"U8","shape":[1,3,2,2],"data_offsets":[0,12]}}')
    return len(header).to_bytes(8, "little") + header + bytes(12)


def _bad_bodies():
    good = encode_request(torch.rand(2, 3, 8, 8), ["a", "b"])
    meta = {"genalign": json.dumps({"prompts": None})}
    return {
        "truncated": (good[:-10], "shapes_saturation", 400, "truncated_body"),
        "truncated header": (good[:20], "shapes_saturation", 400, "truncated_body"),
        "not safetensors": (b"\x80\x04\x95garbage", "shapes_saturation", 400, "truncated_body"),
        "wrong dtype": (save_safetensors({"samples": torch.zeros(1, 3, 4, 4, dtype=torch.int32)}, metadata=meta),
                        "shapes_saturation", 422, "wrong_dtype"),
        "float64": (save_safetensors({"samples": torch.zeros(1, 3, 4, 4, dtype=torch.float64)}, metadata=meta),
                    "shapes_saturation", 422, "wrong_dtype"),
        "empty batch": (encode_request(torch.zeros(0, 3, 8, 8)), "shapes_saturation", 422, "empty_batch"),
        "huge declared shape": (_raw_safetensors({"samples": {"dtype": "F32", "shape": [16, 3, 100000, 100000],
                                                              "data_offsets": [0, 16]}}, bytes(16)),
                                "shapes_saturation", 413, "payload_too_large"),
        "too many samples": (encode_request(torch.rand(17, 3, 4, 4)), "shapes_saturation", 413, "batch_too_large"),
        "not an image": (encode_request(torch.rand(2, 4, 8, 8)), "shapes_saturation", 422, "wrong_shape"),
        "non-UTF-8 prompt": (_with_prompt_bytes(b"caf\xe9 \xff"), "shapes_saturation", 400, "not_utf8"),
        "lone surrogate prompt": (_with_prompt_bytes(b"\\\\ud800"), "shapes_saturation", 422, "not_utf8"),
        "prompt count": (encode_request(torch.rand(2, 3, 8, 8), ["only one"]), "shapes_saturation", 422,
                         "wrong_prompts"),
        "video to an image reward": (encode_request(torch.rand(1, 3, 2, 64, 64), ["a photo of a circle"]),
                                     "shapes_geneval", 422, "invalid_input"),
        "unknown reward": (good, "no_such_reward", 404, "unknown_reward"),
    }


@pytest.mark.parametrize("case", list(_bad_bodies()))
def test_bad_input_is_a_named_4xx_and_the_server_keeps_serving(served, case):
    server, _ = served
    body, reward, status, problem = _bad_bodies()[case]
    response = post(server, reward, body)
    assert response.status_code == status, response.text
    assert response.json()["problem"] == problem and response.json()["detail"]
    assert_still_serving(server)


def test_content_length_over_the_limit_is_refused_before_the_body_is_read(served):
    server, _ = served
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/rewards/shapes_saturation/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\nContent-Length: 1000000000000\r\n\r\n")
        answer = b""  # answered without one byte of the announced terabyte sent
        while not answer.endswith(b"}"):
            chunk = sock.recv(4096)
            assert chunk, answer
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413") and "payload_too_large" in answer
    assert_still_serving(server)


# ----------------------------------------------------------------------------- auth, timeout, metrics


def test_token_is_required_and_wrong_tokens_get_a_clear_401(served):
    server, _ = served
    body = encode_request(torch.rand(1, 3, 8, 8))
    missing = post(server, "shapes_saturation", body, headers={})
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = post(server, "shapes_saturation", body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "wrong bearer token"
    assert httpx.get(f"{server.url}/v1/rewards").status_code == 401
    with pytest.raises(RemoteRewardError, match="HTTP 401 unauthorized: wrong bearer token"):
        build_reward({"name": "remote", "url": server.url, "reward": "shapes_saturation", "token": "nope"})(
            torch.rand(1, 3, 8, 8))
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"  # open, for load balancers
    listing = httpx.get(f"{server.url}/v1/rewards", headers=AUTH).json()
    assert listing["rewards"]["shapes_geneval"]["modalities"] == ["image"]
    assert listing["rewards"]["shapes_saturation"]["raw_range"] == [0.0, 1.0]


def test_token_resolution(monkeypatch):
    monkeypatch.delenv("GENALIGN_SERVE_TOKEN", raising=False)
    token, how = resolve_token()
    assert how == "generated token" and len(token) >= 32
    monkeypatch.setenv("GENALIGN_SERVE_TOKEN", "abc")
    assert resolve_token() == ("abc", "token from $GENALIGN_SERVE_TOKEN")
    assert resolve_token(insecure_no_auth=True, host="::1")[0] is None
    with pytest.raises(ValueError, match="only allowed on loopback"):
        resolve_token(insecure_no_auth=True, host="0.0.0.0")


def test_slow_reward_times_out_to_nan_not_a_hang():
    slow = FunctionReward(_slow, "slow")
    server = ThreadServer(create_app({"slow": slow}, ServeConfig(request_timeout=0.3, max_wait_ms=0), token=None))
    try:
        start = time.monotonic()
        out = build_reward({"name": "remote", "url": server.url, "reward": "slow", "request_samples": 2})(
            torch.rand(4, 3, 8, 8))
        assert time.monotonic() - start < 3
        assert out.nan_count == 4 and out.extras["remote_unscored"] == 4
        assert out.extras["remote_failed"].tolist() == [1, 1, 1, 1] and out.extras["remote_retries"] == 0
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'genalign_requests_total{reward="slow",status="504"} 2' in metrics  # not retried
    finally:
        server.stop()


def test_a_full_queue_is_503_with_retry_after():
    slow = FunctionReward(_slow, "slow")
    server = ThreadServer(create_app({"slow": slow}, ServeConfig(max_queue=1, max_wait_ms=0), token=None))
    try:
        body = encode_request(torch.rand(1, 3, 8, 8))
        url = f"{server.url}/v1/rewards/slow/score"

        async def three_at_once():
            async with httpx.AsyncClient(timeout=30) as client:
                first = asyncio.ensure_future(client.post(url, content=body))
                await asyncio.sleep(0.3)  # the first is being scored, the queue is empty
                second = asyncio.ensure_future(client.post(url, content=body))
                await asyncio.sleep(0.3)  # the second waits in the queue: it is full
                third = await client.post(url, content=body)
                return await first, await second, third

        first, second, third = asyncio.run(three_at_once())
        assert first.status_code == second.status_code == 200
        assert third.status_code == 503 and third.headers["Retry-After"] == "1"
        assert third.json()["problem"] == "queue_full"
    finally:
        server.stop()


def test_metrics_are_prometheus_text(served):
    server, _ = served
    assert_still_serving(server)
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name, kind in [("genalign_requests_total", "counter"), ("genalign_queue_depth", "gauge"),
                       ("genalign_batch_samples", "histogram"), ("genalign_request_seconds", "histogram")]:
        assert f"# TYPE {name} {kind}" in text
    assert re.search(r'genalign_requests_total\{reward="shapes_saturation",status="200"\} \d+', text)
    assert 'genalign_request_seconds_bucket{reward="shapes_saturation",le="+Inf"}' in text
    for line in text.splitlines():  # every sample line: name{labels} number
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? -?[0-9.e+-]+', line), line


def test_no_pickle_on_the_network_path():
    for module in ("rewards/serve.py", "rewards/remote.py", "rewards/wire.py", "rewards/http.py"):
        source = (REPO / module).read_text().lower()
        for word in ("pickle", "torch.load", "marshal", "eval(", "exec("):
            assert word not in source, f"{module} mentions {word!r}"


# ----------------------------------------------------------------------------- command line


def test_reward_option_syntax():
    assert parse_reward_option("shapes_geneval") == {"name": "shapes_geneval"}
    assert parse_reward_option("shapes_geneval:2") == {"name": "shapes_geneval", "weight": 2.0}
    assert parse_reward_option("remote:url=http://10.0.0.5:8100,reward=pickscore,timeout=5") == \
        {"type": "remote", "url": "http://10.0.0.5:8100", "reward": "pickscore", "timeout": 5}
    assert parse_reward_option("pkg.mod:attr:score_range=[1,5],name=judge") == \
        {"type": "pkg.mod:attr", "score_range": [1, 5], "name": "judge"}


def test_align_serve_parses_and_align_score_uses_a_remote_reward(served, tmp_path, monkeypatch):
    from align.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--reward", "shapes_geneval:mode=strict", "--port", "0",
                                      "--max-batch-size", "8", "--insecure-no-auth"])
    assert args.reward == ["shapes_geneval:mode=strict"] and args.max_batch_size == 8 and args.insecure_no_auth

    server, rewards = served
    samples, prompts, _ = scenes(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((samples[i] * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    (folder / "samples.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "prompt": p}) + "\n"
                                                  for i, p in enumerate(prompts)))
    monkeypatch.setenv("GENALIGN_SERVE_TOKEN", TOKEN)
    out = tmp_path / "s.jsonl"
    assert main(["score", str(folder), "--reward", f"remote:url={server.url},reward=shapes_geneval",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == rewards["shapes_geneval"](samples, prompts).scores.tolist()
