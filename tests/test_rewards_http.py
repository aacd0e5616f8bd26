"""http_judge and its chat-completions client, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward
from rewards.http import ChatCompletionsClient, parse_score


class _JudgeHandler(BaseHTTPRequestHandler):
    """Speaks POST /v1/chat/completions. What it does depends on the question's text:
    "slow" sleeps past the client timeout, "flaky" fails with 500 twice then answers,
    "busy" answers 429 once, "broken" always fails with 500, "bad" gets a 400,
    "garbage" gets an answer without a score; otherwise it answers {"score": len(prompt)}."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"][-1]["text"]
        prompt = text.split("Prompt: ")[-1]
        with state["lock"]:
            state["bodies"].append(body)
            state["paths"].add(self.path)
            state["attempts"][prompt] = attempt = state["attempts"].get(prompt, 0) + 1
            state["in_flight"] += 1
            state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            time.sleep(state["delay"])
            if prompt == "slow":
                time.sleep(1.0)
            status = {"broken": 500, "bad": 400}.get(prompt, 200)
            if prompt == "flaky" and attempt <= 2 or prompt == "busy" and attempt == 1:
                status = 500 if prompt == "flaky" else 429
            answer = "I cannot tell." if prompt == "garbage" else f'Looks fine.\n{{"score": {len(prompt)}}}'
            payload = {"id": "x", "object": "chat.completion", "model": body["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                    "finish_reason": "stop"}]}
            data = json.dumps(payload if status == 200 else {"error": "nope"}).encode()
        finally:
            # the request stops counting before the reply leaves: once the client has the reply
            # it may send the next request, which must not overlap this one in the count
            with state["lock"]:
                state["in_flight"] -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    server.daemon_threads = True
    server.state = {"lock": threading.Lock(), "bodies": [], "paths": set(), "attempts": {},
                    "in_flight": 0, "max_in_flight": 0, "delay": 0.0}
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def _judge(server, **kwargs):
    args = {"name": "http_judge", "base_url": _url(server), "model": "judge-7b", "template": "Prompt: {prompt}",
            "backoff": 0.01, "max_retries": 2, "timeout": 0.3, **kwargs}
    return build_reward(args)


def _decode_png(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix):])))


@pytest.mark.parametrize("text, expected", [
    ('{"score": 4}', 4.0),
    ('Reasoning...\n```json\n{"score": 3.5, "notes": {"a": 1}}\n```', 3.5),
    ('{"score": "2"}', 2.0),
    ("so the answer is \\boxed{ 5 }", 5.0),
    ("Final Score: 2", 2.0),
    ("**Final score:** 4/5", 4.0),
    ("final score = -1.5", -1.5),
    ("  3 ", 3.0),
    ("4.", 4.0),
    ("I see 3 cats, a good image", None),
    ('{"rating": 4}', None),
    ('{"score": true}', None),
    ("", None),
    (None, None),
    ("nan", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_request_body_and_scores(judge_server):
    reward = _judge(judge_server, system_prompt="You are a strict judge.", request_params={"max_tokens": 64})
    samples = torch.rand(2, 3, 8, 12)
    out = reward(samples, ["a cat", "two red dogs"])
    assert out.scores.tolist() == [5.0, 12.0] and out.nan_count == 0
    assert out.extras["request_failures"] == 0 and out.extras["parse_failures"] == 0

    state = judge_server.state
    assert state["paths"] == {"/v1/chat/completions"}
    body = next(b for b in state["bodies"] if b["messages"][-1]["content"][-1]["text"] == "Prompt: a cat")
    assert body["model"] == "judge-7b" and body["max_tokens"] == 64 and body["temperature"] == 0.0
    system, user = body["messages"]
    assert system == {"role": "system", "content": "You are a strict judge."}
    assert user["role"] == "user"
    image_part, text_part = user["content"]
    assert text_part == {"type": "text", "text": "Prompt: a cat"}
    assert image_part["type"] == "image_url"
    image = _decode_png(image_part["image_url"]["url"])
    assert image.size == (12, 8) and image.mode == "RGB"
    expected = (samples[0] * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(torch.from_numpy(np.array(image)), expected)


def test_video_sends_evenly_spaced_frames(judge_server):
    reward = _judge(judge_server, max_frames=3)
    out = reward(torch.rand(1, 3, 7, 8, 8), ["clip"])
    assert out.scores.tolist() == [4.0]
    parts = judge_server.state["bodies"][0]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url"] * 3 + ["text"]


def test_concurrency_is_bounded_and_used(judge_server):
    judge_server.state["delay"] = 0.15
    client = ChatCompletionsClient(_url(judge_server), "m", max_concurrency=3, timeout=5)
    batch = [[{"role": "user", "content": [{"type": "text", "text": f"Prompt: p{i}"}]}] for i in range(9)]
    answers = client.generate(batch)
    assert [parse_score(a) for a in answers] == [2.0] * 9
    assert judge_server.state["max_in_flight"] == 3  # in parallel, never above the limit


def test_timeout_retries_then_nan(judge_server):
    reward = _judge(judge_server, max_retries=1, timeout=0.2)
    start = time.perf_counter()
    out = reward(torch.rand(2, 3, 4, 4), ["slow", "ok"])
    assert time.perf_counter() - start < 3
    assert torch.isnan(out.scores[0]) and out.scores[1] == 2.0
    assert out.nan_count == 1 and out.extras["request_failures"] == 1
    assert judge_server.state["attempts"]["slow"] == 2


def test_retries_on_500_and_429_then_success(judge_server):
    out = _judge(judge_server)(torch.rand(2, 3, 4, 4), ["flaky", "busy"])
    assert out.scores.tolist() == [5.0, 4.0]
    assert judge_server.state["attempts"] == {"flaky": 3, "busy": 2}


def test_permanent_failures_are_nan_and_counted(judge_server):
    out = _judge(judge_server)(torch.rand(4, 3, 4, 4), ["broken", "bad", "garbage", "fine"])
    assert torch.isnan(out.scores[:3]).all() and out.scores[3] == 4.0
    assert out.nan_count == 3
    assert out.extras["request_failures"] == 2 and out.extras["parse_failures"] == 1
    assert out.extras["answers"][:2] == [None, None]
    attempts = judge_server.state["attempts"]
    assert attempts["broken"] == 3 and attempts["bad"] == 1  # 400 is not retried


def test_score_range_rejects_out_of_range_numbers(judge_server):
    out = _judge(judge_server, score_range=[1, 5])(torch.rand(2, 3, 4, 4), ["abc", "too long"])
    assert out.scores[0] == 3.0 and torch.isnan(out.scores[1])
    assert out.extras["parse_failures"] == 1


def test_connection_refused_is_none():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ChatCompletionsClient(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.01, timeout=1)
    assert client.generate([[{"role": "user", "content": "hi"}]]) == [None]


def test_generate_inside_a_running_event_loop(judge_server):
    client = ChatCompletionsClient(_url(judge_server), "m", timeout=5)

    async def caller():
        return client.generate([[{"role": "user", "content": [{"type": "text", "text": "Prompt: x"}]}]])

    assert [parse_score(a) for a in asyncio.run(caller())] == [1.0]


def test_generate_fn_seam_and_config_errors():
    seen = []

    def fake(batch):
        seen.extend(batch)
        return ["\\boxed{3}", None, "no idea"]

    reward = build_reward({"name": "http_judge", "generate_fn": fake, "template": "Rate it."})
    assert not reward.requires_prompts  # no {prompt} in the template
    out = reward(torch.rand(3, 3, 4, 4))
    assert out.scores[0] == 3.0 and out.nan_count == 2
    assert out.extras["request_failures"] == 1 and out.extras["parse_failures"] == 1
    assert seen[0][-1]["content"][-1]["text"] == "Rate it."

    with pytest.raises(ValueError, match="exactly one of base_url"):
        build_reward("http_judge")
    with pytest.raises(ValueError, match="model="):
        build_reward({"name": "http_judge", "base_url": "http://127.0.0.1:1/v1"})
    with pytest.raises(ValueError, match="http://"):
        build_reward({"name": "http_judge", "base_url": "127.0.0.1:1", "model": "m"})


def test_align_score_with_http_judge_config(judge_server, tmp_path):
    from align.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    prompts = ["a cat", "broken"]
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(folder / f"{i}.png")
    (folder / "samples.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "prompt": p}) + "\n"
                                                  for i, p in enumerate(prompts)))
    config = tmp_path / "judge.yaml"
    config.write_text(f"reward:\n  name: http_judge\n  base_url: {_url(judge_server)}\n  model: judge-7b\n"
                      "  template: 'Prompt: {prompt}'\n  max_retries: 0\n")
    assert main(["score", str(folder), "--reward-config", str(config), "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["score"] for r in rows] == [5.0, None]  # the failed request is NaN (null), not 0
    assert all(r["error"] is None for r in rows)
