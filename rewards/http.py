"""Judges served behind an OpenAI-compatible chat-completions API (vLLM, SGLang, ...).

Heavy VLM judges run on their own GPUs behind ``POST {base_url}/chat/completions``; training
ranks only send requests. Two pieces:

- :class:`ChatCompletionsClient`: async batched requests (a semaphore bounds how many are in
  flight), a per-request timeout, retries with exponential backoff (and jitter) on connection
  errors, timeouts, HTTP 5xx and 429. A request that still fails, or an answer without text,
  gives ``None``. Its sync seam ``client.generate(list_of_messages) -> list[str | None]``
  is the only thing the reward needs, so any other backend (a local VLM, a test fake) can
  stand in for it as ``generate_fn``.
- "http_judge" (:class:`HttpJudgeReward`): formats one question per sample from a template
  holding ``{prompt}``, sends it with the image (or a few frames of a video) as base64 PNG
  ``image_url`` parts, and reads a number from the answer with :func:`parse_score`.

Uses only the standard library (urllib in a thread pool), so no HTTP package is required.

    reward = build_reward({"name": "http_judge", "base_url": "http://judge:8000/v1",
                           "model": "Qwen/Qwen2.5-VL-7B-Instruct", "score_range": [1, 5]})
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import logging
import math
import os
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewards.base import IMAGE, VIDEO, Reward, RewardOutput, register_reward
from rewards.parsing import parse_score
from rewards.shapes import to_uint8_images

__all__ = ["ChatCompletionsClient", "HttpJudgeReward", "parse_score", "image_part", "RETRY_STATUSES"]

log = logging.getLogger(__name__)

Messages = list[dict]
GenerateFn = Callable[[Sequence[Messages]], list]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_TEMPLATE = (
    "Rate how well this image matches the description on a scale from 1 to 5, where 5 means every "
    "detail is depicted.\nDescription: {prompt}\n"
    'Think briefly, then answer with JSON: {"score": <1-5>}.'
)


# ----------------------------------------------------------------------------- client


class _RequestFailed(Exception):
    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.retryable = retryable
        self.retry_after = retry_after


class ChatCompletionsClient:
    """Client of ``POST {base_url}/chat/completions`` (the OpenAI chat API as vLLM/SGLang serve it).

    base_url:        e.g. ``http://127.0.0.1:8000/v1`` (a URL already ending in
                     ``/chat/completions`` is used as is).
    model:           the served model name sent in every request.
    timeout:         seconds per attempt (connect + wait for the whole answer).
    max_retries:     extra attempts after a connection error, timeout, HTTP 5xx or 429; other
                     HTTP errors (400: bad request, 401, 404, ...) are not retried.
    backoff:         first retry delay in seconds, doubled per retry, times a random factor in
                     [0.5, 1] (jitter, so many ranks do not retry in lockstep), at most
                     ``max_backoff``; a 429/503 ``Retry-After`` header is honoured up to it.
    max_concurrency: requests in flight at once.
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
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_concurrency = max_concurrency
        self.request_params = {"temperature": 0.0, **(request_params or {})}
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    # -- one HTTP exchange (blocking; runs in a worker thread)
    def _post(self, body: bytes) -> str | None:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as err:
            retry_after = err.headers.get("Retry-After") if err.headers else None
            try:
                retry_after = float(retry_after) if retry_after is not None else None
            except ValueError:
                retry_after = None
            raise _RequestFailed(f"HTTP {err.code}", err.code in RETRY_STATUSES, retry_after) from None
        except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, garbled
            reason = getattr(err, "reason", err)
            raise _RequestFailed(f"{type(reason).__name__}: {reason}", retryable=True) from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _RequestFailed("malformed response (no choices[0].message.content)", retryable=False) from None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return content if isinstance(content, str) else None

    async def _complete(self, messages: Messages, pool: ThreadPoolExecutor, limit: asyncio.Semaphore) -> str | None:
        body = json.dumps({"model": self.model, "messages": messages, **self.request_params}).encode()
        loop = asyncio.get_running_loop()
        for attempt in range(self.max_retries + 1):
            async with limit:
                try:
                    # wait_for bounds the attempt even if the socket timeout does not fire.
                    return await asyncio.wait_for(loop.run_in_executor(pool, self._post, body), self.timeout + 1)
                except asyncio.TimeoutError:
                    failure = _RequestFailed("timeout", retryable=True)
                except _RequestFailed as err:
                    failure = err
            if not failure.retryable or attempt == self.max_retries:
                break
            delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
            if failure.retry_after is not None:
                delay = max(delay, failure.retry_after)
            await asyncio.sleep(min(delay, self.max_backoff))
        log.warning("chat completion failed after %d attempt(s) at %s: %s", attempt + 1, self.url, failure)
        return None

    async def agenerate(self, batch: Sequence[Messages]) -> list[str | None]:
        """Answers to each conversation, in order (None where the request failed)."""
        limit = asyncio.Semaphore(self.max_concurrency)
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="chat") as pool:
            return list(await asyncio.gather(*(self._complete(m, pool, limit) for m in batch)))

    def generate(self, batch: Sequence[Messages]) -> list[str | None]:
        """Sync seam: ``generate(list_of_messages) -> list[str | None]``; usable inside a running loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.agenerate(batch))
        with ThreadPoolExecutor(1) as runner:  # already in an event loop: run ours in a thread
            return runner.submit(asyncio.run, self.agenerate(batch)).result()


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
