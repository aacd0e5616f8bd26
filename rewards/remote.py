"""The ``remote`` reward: a reward served by `align serve` (rewards/serve.py) on another GPU or machine.

    reward: {name: remote, url: http://10.0.0.5:8100, reward: shapes_geneval, token_env: GENALIGN_SERVE_TOKEN}

Each call splits the batch into requests of at most ``request_samples`` samples, sends them
concurrently over one pooled async httpx client (rewards/http.py) in the safetensors wire format
(rewards/wire.py), and retries connection errors, 429 and 5xx with exponential backoff until
``max_retries`` or the call's ``deadline``. The server's 504 (its per-request timeout) is not
retried: the reward was too slow, a retry would queue behind the same backlog.

A sample whose score could not be had (retries exhausted, deadline passed, server timeout) is
NaN, never 0, and is counted: extras "remote_unscored" (count), "remote_failed" ([B] 0/1, so
trainers log its mean as reward_remote_failed), "remote_retries". Errors in what was sent (401
wrong token, 404 unknown reward, 4xx invalid input) raise: they are configuration mistakes, and
scoring every sample NaN would hide them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from typing import Sequence

import httpx
import torch
from torch import Tensor

from rewards.base import IMAGE, VIDEO, Reward, RewardOutput, register_reward
from rewards.http import LoopThread, RequestFailed, RetryPolicy, request_with_retries
from rewards.wire import decode_floats, encode_request

__all__ = ["RemoteReward", "RemoteRewardError"]

log = logging.getLogger(__name__)

# 504 is the server's own per-request timeout: not retried (see the module docstring)
REMOTE_RETRY_STATUSES = frozenset({429, 500, 502, 503})


class RemoteRewardError(RuntimeError):
    """The server refused the request (4xx): wrong token, unknown reward, invalid input."""


def _problem_of(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('problem', '')}: {body.get('detail', '')}".strip(": ")
    except (ValueError, AttributeError):
        return response.text[:300]


@register_reward("remote")
class RemoteReward(Reward):
    """A reward scored by an `align serve` server.

    url:             the server, e.g. ``http://10.0.0.5:8100`` (or a load balancer in front of
                     several replicas).
    reward:          the served reward's name (``GET /v1/rewards`` lists them).
    token_env:       environment variable holding the bearer token (default
                     GENALIGN_SERVE_TOKEN; unset: no token sent); ``token`` gives it directly.
    timeout:         seconds per attempt; ``deadline``: seconds for the whole call, retries
                     included, after which unfinished samples are NaN.
    max_retries, backoff, max_backoff: the retry policy (rewards.http.RetryPolicy).
    request_samples: samples per request (a batch is split into concurrent requests).
    max_connections: connection pool size (requests in flight at once).
    wire_dtype:      "U8" (pixels round(255 x), the default) or "F32" (exact floats, 4x the bytes).
    raw_range, modalities, requires_prompts: what the served reward declares (for
                     compositions and local validation; ``GET /v1/rewards`` shows them).

    Not differentiable. Scores and per-sample extras as the served reward computes them;
    ``totals`` counts samples, unscored samples and retries over the reward's lifetime.
    """

    differentiable = False

    def __init__(self, url: str, reward: str, token_env: str | None = "GENALIGN_SERVE_TOKEN",
                 token: str | None = None, timeout: float = 60.0, deadline: float = 300.0, max_retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 10.0, request_samples: int = 32,
                 max_connections: int = 16, wire_dtype: str = "U8",
                 raw_range: Sequence[float] = (-math.inf, math.inf), modalities: Sequence[str] = (IMAGE, VIDEO),
                 requires_prompts: bool = False):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url must start with http:// or https://, got {url!r}")
        if not reward or "/" in reward:
            raise ValueError(f"remote: reward= must name a served reward, got {reward!r}")
        if timeout <= 0 or deadline <= 0 or request_samples < 1 or max_connections < 1:
            raise ValueError("remote: need timeout > 0, deadline > 0, request_samples >= 1 and max_connections >= 1")
        if wire_dtype not in ("U8", "F32"):
            raise ValueError(f"remote: wire_dtype must be U8 or F32, got {wire_dtype!r}")
        self.url = url.rstrip("/")
        self.remote_name = reward
        self.endpoint = f"{self.url}/v1/rewards/{reward}/score"
        if token is None and token_env:
            token = os.environ.get(token_env)
        self.headers = {"Content-Type": "application/octet-stream"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.timeout, self.deadline = timeout, deadline
        self.policy = RetryPolicy(max_retries, backoff, max_backoff, REMOTE_RETRY_STATUSES)
        self.request_samples, self.max_connections, self.wire_dtype = request_samples, max_connections, wire_dtype
        self.raw_range, self.modalities, self.requires_prompts = tuple(raw_range), tuple(modalities), requires_prompts
        self._loop = LoopThread(f"remote-{reward}")
        self._client: httpx.AsyncClient | None = None
        self.totals = {"samples": 0, "unscored": 0, "retries": 0}  # over the reward's lifetime

    def new_http_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)
        return httpx.AsyncClient(limits=limits, headers=self.headers)

    async def _request(self, client: httpx.AsyncClient, body: bytes, deadline: float, stats: dict | None) -> dict:
        """One chunk: the server's answer, or RequestFailed (-> NaN), or RemoteRewardError (raised)."""
        request_id = uuid.uuid4().hex
        response = await request_with_retries(client, "POST", self.endpoint, content=body, policy=self.policy,
                                              timeout=self.timeout, deadline=deadline, stats=stats,
                                              headers={"X-Request-Id": request_id})
        if response.status_code == 504:
            raise RequestFailed(f"server timeout ({_problem_of(response)})", 1, 504)
        if response.status_code != 200:
            raise RemoteRewardError(f"{self.endpoint}: HTTP {response.status_code} {_problem_of(response)}")
        try:
            answer = response.json()
        except json.JSONDecodeError:
            raise RequestFailed("malformed answer (not JSON)", 1, 200) from None
        if response.headers.get("X-Request-Id", request_id) != request_id:
            raise RequestFailed("answer to another request (X-Request-Id mismatch)", 1, 200)
        return answer

    async def ascore(self, chunks: list[bytes], client: httpx.AsyncClient | None = None,
                     stats: dict | None = None) -> list:
        """One answer (dict) or RequestFailed per chunk (request body); RemoteRewardError propagates.
        ``stats["retries"]`` counts retried attempts."""
        if client is None:
            async with self.new_http_client() as client:
                return await self.ascore(chunks, client, stats)
        deadline = time.monotonic() + self.deadline
        tasks = [self._request(client, body, deadline, stats) for body in chunks]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, RequestFailed):
                raise result
        return results

    def score(self, samples: Tensor, prompts: Sequence[str] | None, metadata=None, group_ids=None,
              **kwargs) -> RewardOutput:
        batch, step = samples.shape[0], self.request_samples
        spans = [(start, min(start + step, batch)) for start in range(0, batch, step)]
        chunks = [encode_request(samples[a:b], None if prompts is None else prompts[a:b],
                                 None if metadata is None else list(metadata[a:b]),
                                 None if group_ids is None else group_ids[a:b], self.wire_dtype) for a, b in spans]
        if self._client is None:
            self._client = self.new_http_client()
        stats = {"retries": 0}
        results = self._loop.run(self.ascore(chunks, self._client, stats))

        scores = torch.full((batch,), math.nan)
        failed = torch.zeros(batch)
        extras: dict[str, Tensor] = {}
        for (a, b), result in zip(spans, results):
            if isinstance(result, RequestFailed):
                failed[a:b] = 1
                log.warning("remote reward %s: %d samples unscored (%s)", self.endpoint, b - a, result.reason)
                continue
            try:
                part = decode_floats(result["scores"])
                if part.shape[0] != b - a:
                    raise ValueError(f"{part.shape[0]} scores for {b - a} samples")
                scores[a:b] = part
                for key, values in result.get("extras", {}).items():
                    extras.setdefault(key, torch.full((batch,), math.nan))[a:b] = decode_floats(values)
            except (KeyError, TypeError, ValueError) as err:
                failed[a:b] = 1
                log.warning("remote reward %s: malformed answer (%s)", self.endpoint, err)
        extras.update(remote_failed=failed, remote_unscored=int(failed.sum()), remote_retries=stats["retries"])
        for key, value in (("samples", batch), ("unscored", int(failed.sum())), ("retries", stats["retries"])):
            self.totals[key] += value
        return RewardOutput(scores, extras)

    def __getstate__(self):
        return {**self.__dict__, "_client": None}
