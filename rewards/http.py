"""Judges served behind an OpenAI-compatible chat-completions API (vLLM, SGLang, ...), and the
HTTP transport every genalign client shares.

Heavy VLM judges run on their own GPUs behind ``POST {base_url}/chat/completions``; training
ranks only send requests. Three pieces:

- Transport (:class:`RetryPolicy`, :func:`request_with_retries`, :class:`LoopThread`): httpx
  async requests with a per-attempt timeout, an overall deadline, and retries with exponential
  backoff (and jitter) on connection errors, timeouts, HTTP 5xx and 429 (``Retry-After``
  honoured); a sync seam that runs coroutines on an event loop owned by a daemon thread, so one
  pooled ``httpx.AsyncClient`` serves every call. Also used by the ``remote`` reward
  (rewards/remote.py).
- :class:`ChatCompletionsClient`: async batched requests (a semaphore bounds how many are in
  flight). A request that still fails, or an answer without text, gives ``None``. Its sync seam
  ``client.generate(list_of_messages) -> list[str | None]`` is the only thing the reward needs,
  so any other backend (a local VLM, a test fake) can stand in for it as ``generate_fn``.
- "http_judge" (:class:`HttpJudgeReward`): formats one question per sample from a template
  holding ``{prompt}``, sends it with the image (or a few frames of a video) as base64 PNG
  ``image_url`` parts, and reads a number from the answer with :func:`parse_score`.

    reward = build_reward({"name": "http_judge", "base_url": "http://judge:8000/v1",
                           "model": "Qwen/Qwen2.5-VL-7B-Instruct", "score_range": [1, 5]})
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import httpx
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import IMAGE, VIDEO, Reward, RewardOutput, register_reward
from rewards.parsing import parse_score
from rewards.shapes import to_uint8_images

__all__ = ["ChatCompletionsClient", "HttpJudgeReward", "parse_score", "image_part", "RETRY_STATUSES",
           "RetryPolicy", "RequestFailed", "request_with_retries", "LoopThread"]

log = logging.getLogger(__name__)

Messages = list[dict]
GenerateFn = Callable[[Sequence[Messages]], list]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_TEMPLATE = (
    "Rate how well this image matches the description on a scale from 1 to 5, where 5 means every "
    "detail is depicted.\nDescription: {prompt}\n"
    'Think briefly, then answer with JSON: {"score": <1-5>}.'
)


# ----------------------------------------------------------------------------- transport


class RequestFailed(Exception):
    """A request that gave no usable answer: retries exhausted, deadline passed or not retryable.
    ``status`` is the last HTTP status (None for connection errors and timeouts)."""

    def __init__(self, reason: str, attempts: int, status: int | None = None):
        super().__init__(reason)
        self.reason, self.attempts, self.status = reason, attempts, status


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    max_retries: extra attempts after a retryable failure (connection error, timeout, or an
                 HTTP status in ``statuses``); other statuses are returned to the caller.
    backoff:     first delay in seconds, doubled per retry, times a random factor in [0.5, 1]
                 (jitter, so many ranks do not retry in lockstep), at most ``max_backoff``; a
                 ``Retry-After`` header (seconds) is honoured up to ``max_backoff``.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    statuses: frozenset = RETRY_STATUSES

    def __post_init__(self):
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"need max_retries >= 0, backoff >= 0 and max_backoff >= 0, got {self}")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


async def request_with_retries(client: httpx.AsyncClient, method: str, url: str, *, policy: RetryPolicy,
                               timeout: float, deadline: float | None = None,
                               limit: asyncio.Semaphore | None = None, stats: dict | None = None,
                               **request_args) -> httpx.Response:
    """One logical request: attempts until a response whose status is not retryable (returned,
    whatever it is: the caller reads it), or raises :class:`RequestFailed`.

    timeout:  seconds per attempt (connect + the whole answer), cut to what is left of
    deadline: an absolute ``time.monotonic()`` after which no attempt starts and none waits.
    limit:    held during each attempt (not during backoff), bounding requests in flight.
    stats:    if given, ``stats["retries"]`` is incremented per retried attempt.
    request_args go to ``client.request`` (content=, json=, headers=).
    """
    status, reason = None, "no attempt"
    for attempt in range(policy.max_retries + 1):
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left <= 0:
            reason = f"deadline passed ({reason})"
            break
        async with limit or _NO_LIMIT:
            try:
                # wait_for bounds the whole attempt; httpx's own timeout bounds each socket operation
                response = await asyncio.wait_for(client.request(method, url, timeout=left, **request_args), left)
            except (asyncio.TimeoutError, httpx.TimeoutException):
                status, reason, retry_after = None, f"timeout after {left:.3g} s", None
            except httpx.TransportError as err:  # refused, reset, closed mid-answer, garbled
                status, reason, retry_after = None, f"{type(err).__name__}: {err}", None
            else:
                if response.status_code not in policy.statuses:
                    return response
                status, reason, retry_after = response.status_code, f"HTTP {response.status_code}", \
                    _retry_after(response)
        if attempt == policy.max_retries:
            break
        pause = policy.delay(attempt, retry_after)
        if deadline is not None and time.monotonic() + pause >= deadline:
            reason = f"deadline passed ({reason})"
            break
        await asyncio.sleep(pause)
        if stats is not None:
            stats["retries"] = stats.get("retries", 0) + 1
    raise RequestFailed(reason, attempt + 1, status)


class _NoLimit:
    async def __aenter__(self):
        return None

    async def __aexit__(self, *exc):
        return False


_NO_LIMIT = _NoLimit()


class LoopThread:
    """An asyncio event loop running in a daemon thread. ``run(coroutine)`` blocks until it is done
    and returns its result; usable from sync code and from inside another running loop. Objects
    bound to a loop (an ``httpx.AsyncClient`` and its connection pool) live here across calls.
    Created lazily; a forked child process gets a fresh loop (threads do not survive a fork)."""

    def __init__(self, name: str):
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._loop, self._pid = asyncio.new_event_loop(), os.getpid()
                threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True).start()
            return self._loop

    def run(self, coroutine: Awaitable) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._ensure()).result()

    def __getstate__(self):  # copies (deepcopy, serialised to workers) start their own loop
        return {"name": self.name, "_loop": None, "_pid": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


# ----------------------------------------------------------------------------- client


class ChatCompletionsClient:
    """Client of ``POST {base_url}/chat/completions`` (the OpenAI chat API as vLLM/SGLang serve it).

    base_url:        e.g. ``http://127.0.0.1:8000/v1`` (a URL already ending in
                     ``/chat/completions`` is used as is).
    model:           the served model name sent in every request.
    timeout:         seconds per attempt (connect + wait for the whole answer).
    max_retries, backoff, max_backoff: :class:`RetryPolicy` (retries on connection errors,
                     timeouts, HTTP 5xx and 429; 400, 401, 404, ... are not retried).
    max_concurrency: requests in flight at once (also the connection pool's size).
    api_key:         sent as ``Authorization: Bearer``; ``api_key_env`` names an environment
                     variable to read it from instead (nothing is read unless configured).
    request_params:  merged into every request body (``max_tokens``, ``temperature``,
                     ``top_p``, server-specific keys); ``temperature`` defaults to 0.

    Failures are logged (warning) with their reason and come back as None.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_concurrency: int = 16,
        api_key: str | None = None,
        api_key_env: str | None = None,
        request_params: dict | None = None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if timeout <= 0 or max_retries < 0 or backoff < 0 or max_concurrency < 1:
            raise ValueError("need timeout > 0, max_retries >= 0, backoff >= 0 and max_concurrency >= 1")
        base_url = base_url.rstrip("/")
        self.url = base_url if base_url.endswith("/chat/completions") else base_url + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.policy = RetryPolicy(max_retries, backoff, max_backoff)
        self.max_concurrency = max_concurrency
        self.request_params = {"temperature": 0.0, **(request_params or {})}
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._loop = LoopThread("chat-completions")
        self._client: httpx.AsyncClient | None = None

    def new_http_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        return httpx.AsyncClient(limits=limits, headers=self.headers)

    async def _complete(self, client: httpx.AsyncClient, messages: Messages, limit: asyncio.Semaphore) -> str | None:
        body = {"model": self.model, "messages": messages, **self.request_params}
        try:
            response = await request_with_retries(client, "POST", self.url, json=body, policy=self.policy,
                                                  timeout=self.timeout, limit=limit)
            if response.status_code != 200:
                raise RequestFailed(f"HTTP {response.status_code}", 1, response.status_code)
            try:
                content = response.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise RequestFailed("malformed response (no choices[0].message.content)", 1) from None
        except RequestFailed as failure:
            log.warning("chat completion failed at %s: %s", self.url, failure)
            return None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else None

    async def agenerate(self, batch: Sequence[Messages], client: httpx.AsyncClient | None = None) -> list[str | None]:
        """Answers to each conversation, in order (None where the request failed). Without
        ``client``, a client for this call only (so it works in any event loop)."""
        if client is None:
            async with self.new_http_client() as client:
                return await self.agenerate(batch, client)
        limit = asyncio.Semaphore(self.max_concurrency)
        return list(await asyncio.gather(*(self._complete(client, m, limit) for m in batch)))

    def generate(self, batch: Sequence[Messages]) -> list[str | None]:
        """Sync seam: ``generate(list_of_messages) -> list[str | None]``; usable inside a running
        loop. Calls share one pooled connection pool (kept alive between training steps)."""
        if self._client is None:
            self._client = self.new_http_client()
        return self._loop.run(self.agenerate(batch, self._client))

    def __getstate__(self):
        return {**self.__dict__, "_client": None}


# ----------------------------------------------------------------------------- reward


def image_part(image: np.ndarray) -> dict:
    """(H, W, 3) uint8 -> an ``image_url`` content part holding a base64 PNG data URL."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def _frames(sample: Tensor, max_frames: int) -> Tensor:
    """[3, H, W] -> [1, 3, H, W]; [3, T, H, W] -> up to ``max_frames`` evenly spaced [F, 3, H, W]."""
    if sample.ndim == 3:
        return sample[None]
    index = torch.linspace(0, sample.shape[1] - 1, min(max_frames, sample.shape[1])).round().long()
    return sample[:, index].transpose(0, 1)


@register_reward("http_judge")
class HttpJudgeReward(Reward):
    """A judge behind an OpenAI-compatible chat endpoint, scoring each sample with a number.

    Per sample the user message holds the image (videos: ``max_frames`` evenly spaced frames)
    as PNG data URLs, then the question ``template`` with ``{prompt}`` replaced by the sample's
    prompt (plain replacement, so templates may contain JSON braces); an optional
    ``system_prompt`` goes first. The answer is parsed with :func:`parse_score`.

    Raw range: whatever the judge is asked for (``score_range``, e.g. ``[1, 5]``; parsed numbers
    outside it count as unparsable). Not differentiable. A failed request or an unparsable
    answer scores NaN; extras count them: "request_failures", "parse_failures", and keep the
    raw "answers" (list[str | None]).

    Endpoint arguments (``base_url``, ``model``, ``timeout``, ``max_retries``, ``backoff``,
    ``max_concurrency``, ``api_key``, ``api_key_env``, ``request_params``) go to
    :class:`ChatCompletionsClient`; or pass ``generate_fn(list_of_messages) -> list[str | None]``
    to use another backend.
    """

    name = "http_judge"
    differentiable = False
    modalities = (IMAGE, VIDEO)

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        template: str = DEFAULT_TEMPLATE,
        system_prompt: str | None = None,
        score_range: Sequence[float] | None = None,
        max_frames: int = 8,
        generate_fn: GenerateFn | None = None,
        **client_args,
    ):
        if (base_url is None) == (generate_fn is None):
            raise ValueError("http_judge needs exactly one of base_url (an OpenAI-compatible server) or generate_fn")
        if base_url is not None and not model:
            raise ValueError("http_judge: give model= (the name the server serves the judge under)")
        if generate_fn is not None and client_args:
            raise TypeError(f"http_judge: {sorted(client_args)} only apply with base_url")
        self.generate_fn = generate_fn or ChatCompletionsClient(base_url, model, **client_args).generate
        self.template = template
        self.system_prompt = system_prompt
        self.requires_prompts = "{prompt}" in template
        self.score_range = tuple(score_range) if score_range is not None else None
        self.raw_range = self.score_range or (-math.inf, math.inf)
        self.max_frames = max_frames

    def messages(self, sample: Tensor, prompt: str | None) -> Messages:
        """The conversation for one sample: [3, H, W] or [3, T, H, W] in [0, 1]."""
        images = to_uint8_images(_frames(sample, self.max_frames))  # (F, H, W, 3)
        question = self.template.replace("{prompt}", prompt or "")
        content = [image_part(image) for image in images] + [{"type": "text", "text": question}]
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": content}]

    def score(self, samples: Tensor, prompts: Sequence[str] | None, **kwargs) -> RewardOutput:
        batch = samples.shape[0]
        conversations = [self.messages(samples[i], prompts[i] if prompts else None) for i in range(batch)]
        answers = list(self.generate_fn(conversations))
        if len(answers) != batch:
            raise ValueError(f"{self.name}: generate_fn returned {len(answers)} answers for {batch} samples")
        scores = [parse_score(answer) for answer in answers]
        if self.score_range is not None:
            low, high = self.score_range
            scores = [s if s is not None and low <= s <= high else None for s in scores]
        request_failures = sum(answer is None for answer in answers)
        extras = {
            "request_failures": request_failures,
            "parse_failures": sum(s is None for s in scores) - request_failures,
            "answers": answers,
        }
        return RewardOutput(torch.tensor([math.nan if s is None else s for s in scores]), extras)
