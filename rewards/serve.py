"""`align serve`: registered rewards behind a batched, authenticated HTTP server (FastAPI + uvicorn).

    align serve --reward shapes_geneval --reward shapes_clip_score --port 8100
    # training config on another machine:  reward: {name: remote, url: http://HOST:8100, reward: shapes_geneval}

Endpoints (docs/serving.md):

- ``POST /v1/rewards/{name}/score``: body in the safetensors wire format (rewards/wire.py); answers
  ``{"reward", "scores", "extras", "batch_samples"}`` with NaN-safe floats. Bearer token required.
- ``GET /v1/rewards``: the served rewards with their raw ranges, modalities and batching limits.
- ``GET /health`` and ``GET /metrics`` (Prometheus text): open, as vLLM and Triton keep them, so
  load balancers and scrapers need no token.

Dynamic batching: each reward has one queue and one worker thread. The worker takes the oldest
request, then merges requests of the same kind (sample shape, and whether prompts / metadata /
group ids are given) until ``max_batch_size`` samples or ``max_wait_ms`` after the first, scores
the merged batch with one reward call and splits it back. A per-sample reward's score of a
sample does not depend on the other samples, so the answers equal scoring each request alone.
Group ids are renumbered per request, so group statistics (``weighted_sum`` with
``normalize: group``) stay within their request. Rewards that standardise over the whole batch
(``normalize: batch``) must be served with ``max_batch_size`` 1, or better composed on the client
from served members. Only per-sample extras (tensors [B]) are returned: they split exactly;
batch-level extras would describe the merged batch, not the request.

Protection: a bearer token (generated and printed if none is configured; ``insecure_no_auth``
only on loopback), a body-size limit checked on Content-Length and while reading, a declared-size
check before the tensor is allocated, a samples-per-request limit (413), a queue-depth limit
(503 + Retry-After), and a per-request timeout (504: the client scores those samples NaN). Bad
input is a 4xx naming the problem; a reward that raises on one request of a merged batch is
retried request by request, so only the culprit gets the error. Nothing on the network path
deserialises objects: tensors are raw bytes with a declared dtype and shape, the rest is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.requests import ClientDisconnect
from torch import Tensor

from rewards.base import Reward
from rewards.wire import WireError, decode_request, encode_floats, per_sample_extras

__all__ = ["ServeConfig", "create_app", "is_loopback", "resolve_token", "run_server", "TOKEN_ENV",
           "parse_reward_option", "add_arguments", "main"]

log = logging.getLogger("genalign.serve")

TOKEN_ENV = "GENALIGN_SERVE_TOKEN"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class ServeConfig:
    """Server limits. Sizes are in samples and bytes, times in seconds unless named _ms."""

    max_batch_size: int = 32  # samples per merged reward call (1: no merging)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_request_samples: int = 256  # samples in one request (413 above)
    max_body_bytes: int = 256 * 2**20  # request body (413 above); also bounds the declared tensor size
    request_timeout: float = 60.0  # queue wait + scoring, per request (504 after)
    max_queue: int = 4096  # requests waiting per reward (503 above)

    def __post_init__(self):
        if min(self.max_batch_size, self.max_request_samples, self.max_body_bytes, self.max_queue) < 1 \
                or self.max_wait_ms < 0 or self.request_timeout <= 0:
            raise ValueError(f"serve limits must be positive (max_wait_ms may be 0), got {self}")


# ----------------------------------------------------------------------------- metrics


@dataclass
class _Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1


class Metrics:
    """Counters, gauges and histograms rendered in the Prometheus text format (version 0.0.4)."""

    HELP = {
        "genalign_requests_total": ("counter", "Score requests answered, by reward and HTTP status."),
        "genalign_samples_total": ("counter", "Samples scored."),
        "genalign_batches_total": ("counter", "Reward calls (merged batches)."),
        "genalign_queue_depth": ("gauge", "Requests waiting to be batched."),
        "genalign_batch_samples": ("histogram", "Samples per reward call."),
        "genalign_request_seconds": ("histogram", "Request latency: body read to answer."),
        "genalign_reward_seconds": ("histogram", "Time in the reward call, per merged batch."),
    }

    def __init__(self, max_batch_size: int):
        self.lock = threading.Lock()  # updated from the event loop and the reward threads
        self.values: dict[tuple[str, tuple], float] = defaultdict(float)
        self.histograms: dict[tuple[str, tuple], _Histogram] = {}
        self.batch_buckets = tuple(sorted({2**k for k in range(int(math.log2(max(1, max_batch_size))) + 1)}
                                          | {max_batch_size}))

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self.lock:
            self.values[name, tuple(sorted(labels.items()))] += value

    def set(self, name: str, value: float, **labels) -> None:
        with self.lock:
            self.values[name, tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self.lock:
            if key not in self.histograms:
                buckets = self.batch_buckets if name == "genalign_batch_samples" else LATENCY_BUCKETS
                self.histograms[key] = _Histogram(buckets)
            self.histograms[key].observe(value)

    def render(self) -> str:
        with self.lock:
            return self._render()

    def _render(self) -> str:
        def fmt(labels) -> str:
            return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""

        lines = []
        for name, (kind, text) in self.HELP.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for (metric, labels), value in sorted(self.values.items()):
                if metric == name:
                    lines.append(f"{name}{fmt(labels)} {value:g}")
            for (metric, labels), hist in sorted(self.histograms.items(), key=lambda kv: kv[0]):
                if metric != name:
                    continue
                for bound, count in zip(hist.buckets, hist.counts):
                    lines.append(f"{name}_bucket{fmt(labels + (('le', f'{bound:g}'),))} {count}")
                lines.append(f"{name}_bucket{fmt(labels + (('le', '+Inf'),))} {hist.n}")
                lines += [f"{name}_sum{fmt(labels)} {hist.total:g}", f"{name}_count{fmt(labels)} {hist.n}"]
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- batching


class ScoringError(Exception):
    def __init__(self, status: int, problem: str, message: str):
        super().__init__(message)
        self.status, self.problem = status, problem


@dataclass
class _Pending:
    samples: Tensor  # [b, 3, (T,) H, W] float in [0, 1]
    prompts: list | None
    metadata: list | None
    group_ids: list | None
    future: asyncio.Future

    @property
    def size(self) -> int:
        return self.samples.shape[0]

    @property
    def kind(self) -> tuple:
        """Requests of the same kind can share a reward call."""
        return (tuple(self.samples.shape[1:]), self.prompts is None, self.metadata is None, self.group_ids is None)


def _merged_group_ids(items: list[_Pending]) -> list[int] | None:
    """Group ids of a merged batch, disjoint between requests (each request's ids are renumbered
    after the previous request's), so group statistics never mix requests. None if none were sent."""
    if items[0].group_ids is None or len(items) == 1:
        return items[0].group_ids
    merged, offset = [], 0
    for item in items:
        local = item.group_ids
        renumber = {g: offset + i for i, g in enumerate(dict.fromkeys(local))}
        merged += [renumber[g] for g in local]
        offset += len(renumber)
    return merged


class RewardBatcher:
    """One reward's queue, merging worker and scoring thread (rewards are called from one thread)."""

    def __init__(self, name: str, reward: Reward, cfg: ServeConfig, metrics: Metrics):
        self.name, self.reward, self.cfg, self.metrics = name, reward, cfg, metrics
        self.pending: deque[_Pending] = deque()
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"reward-{name}")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def score(self, samples, prompts, metadata, group_ids) -> dict:
        """Queue one request, wait for its share of a batch (or the timeout: ScoringError 504)."""
        if len(self.pending) >= self.cfg.max_queue:
            raise ScoringError(503, "queue_full", f"reward {self.name!r} has {len(self.pending)} requests waiting "
                                                  "(max_queue); retry later")
        item = _Pending(samples, prompts, metadata, group_ids, asyncio.get_running_loop().create_future())
        self.pending.append(item)
        self.metrics.set("genalign_queue_depth", len(self.pending), reward=self.name)
        self.wakeup.set()
        try:
            return await asyncio.wait_for(item.future, self.cfg.request_timeout)
        except asyncio.TimeoutError:
            raise ScoringError(504, "timeout", f"reward {self.name!r} did not answer within "
                                               f"{self.cfg.request_timeout:g} s ({len(self.pending)} requests "
                                               "waiting)") from None

    async def _next_batch(self) -> list[_Pending]:
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        loop = asyncio.get_running_loop()
        first = self.pending.popleft()
        batch, size = [first], first.size
        deadline = loop.time() + self.cfg.max_wait_ms / 1000
        while size < self.cfg.max_batch_size:
            for item in list(self.pending):
                if item.kind == first.kind and size + item.size <= self.cfg.max_batch_size:
                    self.pending.remove(item)
                    batch.append(item)
                    size += item.size
            left = deadline - loop.time()
            if size >= self.cfg.max_batch_size or left <= 0:
                break
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), left)
            except asyncio.TimeoutError:
                pass
        self.metrics.set("genalign_queue_depth", len(self.pending), reward=self.name)
        return [item for item in batch if not item.future.done()]  # timed-out requests are dropped

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            results = await loop.run_in_executor(self.executor, self._score_batch, batch)
            for item, result in zip(batch, results):
                if not item.future.done():
                    if isinstance(result, Exception):
                        item.future.set_exception(result)
                    else:
                        item.future.set_result(result)

    def _call(self, items: list[_Pending]) -> list[dict]:
        """One reward call on the merged items -> one answer per item."""
        samples = torch.cat([item.samples for item in items]) if len(items) > 1 else items[0].samples
        prompts = None if items[0].prompts is None else [p for item in items for p in item.prompts]
        kwargs: dict[str, Any] = {}
        if items[0].metadata is not None:
            kwargs["metadata"] = [m for item in items for m in item.metadata]
        group_ids = _merged_group_ids(items)
        if group_ids is not None:
            kwargs["group_ids"] = torch.tensor(group_ids)
        start = time.perf_counter()
        with torch.no_grad():
            out = self.reward(samples, prompts, **kwargs)
        self.metrics.observe("genalign_reward_seconds", time.perf_counter() - start, reward=self.name)
        self.metrics.observe("genalign_batch_samples", samples.shape[0], reward=self.name)
        self.metrics.inc("genalign_batches_total", reward=self.name)
        self.metrics.inc("genalign_samples_total", samples.shape[0], reward=self.name)
        scores, extras = out.scores.detach().float().cpu(), per_sample_extras(out.extras, samples.shape[0])
        answers, start = [], 0
        for item in items:
            part = slice(start, start + item.size)
            answers.append({"reward": self.name, "scores": encode_floats(scores[part]),
                            "extras": {k: encode_floats(v[part]) for k, v in extras.items()},
                            "batch_samples": samples.shape[0]})
            start += item.size
        return answers

    def _score_batch(self, items: list[_Pending]) -> list[dict | Exception]:
        """Runs in the reward's thread. A failing merged call is retried request by request, so
        only the request at fault gets the error (422 for input errors, 500 otherwise)."""
        try:
            return self._call(items)
        except Exception as err:  # noqa: BLE001: turned into an answer per request
            if len(items) > 1:
                return [answer for item in items for answer in self._score_batch([item])]
            if isinstance(err, (ValueError, TypeError)):
                return [ScoringError(422, "rejected_by_reward", f"reward {self.name!r} rejected the input: {err}")]
            log.exception("reward %s failed", self.name)
            return [ScoringError(500, "reward_failed", f"reward {self.name!r} failed: {type(err).__name__}: {err}")]


# ----------------------------------------------------------------------------- app


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(token_env: str = TOKEN_ENV, insecure_no_auth: bool = False, host: str = "127.0.0.1"):
    """(token or None, how it was chosen): from ``$token_env``, else freshly generated; None only
    with ``insecure_no_auth`` on a loopback host (refused elsewhere: anyone on the network could
    use the GPUs and read the rewards)."""
    if insecure_no_auth:
        if not is_loopback(host):
            raise ValueError(f"--insecure-no-auth is only allowed on loopback hosts (127.0.0.1, ::1), not {host!r}")
        return None, "no authentication (loopback only)"
    token = os.environ.get(token_env)
    if token:
        return token, f"token from ${token_env}"
    return secrets.token_urlsafe(32), "generated token"


def _problem(status: int, problem: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"problem": problem, "detail": detail}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refused (413) as soon as Content-Length or the bytes read pass ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise WireError(413, "payload_too_large", f"Content-Length {declared} exceeds the limit of {limit} bytes")
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise WireError(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise WireError(408, "body_timeout", f"body not received within {timeout:g} s") from None
    except ClientDisconnect:
        raise WireError(400, "client_disconnected", "the client closed the connection mid-body") from None
    return bytes(body)


def create_app(rewards: Mapping[str, Reward], cfg: ServeConfig | None = None, token: str | None = None) -> FastAPI:
    """The ASGI app serving ``rewards`` ({served name: Reward}); ``token=None`` disables auth."""
    cfg = cfg or ServeConfig()
    metrics = Metrics(cfg.max_batch_size)
    batchers: dict[str, RewardBatcher] = {}

    @asynccontextmanager
    async def lifespan(app):
        for name, reward in rewards.items():
            batchers[name] = RewardBatcher(name, reward, cfg, metrics)
            batchers[name].start()
        yield
        for batcher in batchers.values():
            await batcher.stop()

    app = FastAPI(title="genalign reward server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.metrics, app.state.batchers, app.state.config = metrics, batchers, cfg

    def unauthorized(request: Request) -> JSONResponse | None:
        if token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            detail = "missing bearer token: send 'Authorization: Bearer <token>' (the token `align serve` printed " \
                     f"or set in ${TOKEN_ENV})"
        elif not hmac.compare_digest(given.encode(), token.encode()):
            detail = "wrong bearer token"
        else:
            return None
        return _problem(401, "unauthorized", detail, {"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "rewards": sorted(rewards)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/rewards")
    async def describe(request: Request):
        if (denied := unauthorized(request)) is not None:
            return denied
        return {"rewards": {name: {"raw_range": encode_floats(r.raw_range), "modalities": list(r.modalities),
                                   "requires_prompts": r.requires_prompts, "higher_is_better": r.higher_is_better}
                            for name, r in rewards.items()},
                "limits": {"max_batch_size": cfg.max_batch_size, "max_wait_ms": cfg.max_wait_ms,
                           "max_request_samples": cfg.max_request_samples, "max_body_bytes": cfg.max_body_bytes,
                           "request_timeout": cfg.request_timeout}}

    @app.post("/v1/rewards/{name}/score")
    async def score(name: str, request: Request):
        start = time.perf_counter()
        label = name if name in rewards else "_unknown"
        response = await _score(name, request)
        metrics.inc("genalign_requests_total", reward=label, status=response.status_code)
        metrics.observe("genalign_request_seconds", time.perf_counter() - start, reward=label)
        if request_id := request.headers.get("x-request-id"):
            response.headers["X-Request-Id"] = request_id[:128]
        return response

    async def _score(name: str, request: Request) -> JSONResponse:
        if (denied := unauthorized(request)) is not None:
            return denied
        if name not in rewards:
            return _problem(404, "unknown_reward", f"reward {name!r} is not served here; served: {sorted(rewards)}")
        reward = rewards[name]
        try:
            body = await _read_body(request, cfg.max_body_bytes, cfg.request_timeout)
            samples, prompts, metadata, group_ids = await asyncio.to_thread(
                decode_request, body, max_samples=cfg.max_request_samples, max_bytes=cfg.max_body_bytes)
            try:
                await asyncio.to_thread(reward.validate, samples, prompts, metadata=metadata, group_ids=group_ids)
            except (ValueError, TypeError) as err:
                raise WireError(422, "invalid_input", str(err)) from None
            answer = await batchers[name].score(samples, prompts, metadata, group_ids)
        except (WireError, ScoringError) as err:
            headers = {"Retry-After": "1"} if err.status == 503 else None
            return _problem(err.status, err.problem, str(err), headers)
        except Exception as err:  # noqa: BLE001: a bug here must not take the worker down
            log.exception("scoring request for %s failed", name)
            return _problem(500, "internal_error", f"{type(err).__name__}: {err}")
        return JSONResponse(answer)

    return app


def run_server(rewards: Mapping[str, Reward], host: str = "127.0.0.1", port: int = 8100,
               cfg: ServeConfig | None = None, token: str | None = None, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn, one process, one event loop; scale with replicas)."""
    import uvicorn

    # idle keep-alive connections live longer here than in clients (httpx drops them after 5 s), so a
    # client never reuses a connection the server is closing
    uvicorn.run(create_app(rewards, cfg, token), host=host, port=port, log_level=log_level,
                timeout_keep_alive=75, timeout_graceful_shutdown=5)


# ----------------------------------------------------------------------------- command line


def parse_reward_option(text: str) -> dict:
    """``NAME``, ``NAME:WEIGHT`` or ``NAME:key=value,key=value`` -> a reward spec dict.

    NAME is a registered name or an import path ``pkg.module:attr``; values are YAML scalars or
    flow lists (``score_range=[1,5]``), so URLs with colons survive:
    ``remote:url=http://10.0.0.5:8100,reward=shapes_geneval``.
    """
    import yaml

    text = text.strip()
    match = re.match(r"^(?P<name>.+?):(?P<kwargs>[A-Za-z_]\w*=.*)$", text)
    if match:
        spec = {"type": match["name"]}  # "type" picks the reward, a name= argument labels it
        for pair in re.split(r",(?=[A-Za-z_]\w*=)", match["kwargs"]):
            key, _, value = pair.partition("=")
            try:
                spec[key] = yaml.safe_load(value) if value else ""
            except yaml.YAMLError:
                spec[key] = value
            if not isinstance(spec[key], (str, int, float, bool, list, type(None))):
                spec[key] = value  # e.g. "a: b" parsed as a mapping: keep the text
        return spec
    name, colon, weight = text.rpartition(":")
    if colon:
        try:
            return {"name": name, "weight": float(weight)}
        except ValueError:
            pass
    if not text:
        raise ValueError("--reward got an empty name")
    return {"name": text}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", action="append", required=True, metavar="NAME[:key=value,...]",
                        help="a reward to serve (repeatable): registered name or pkg.module:attr, with constructor "
                             "arguments, e.g. shapes_geneval:mode=strict; served under its name")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine "
                        "only; 0.0.0.0 to accept other machines)")
    parser.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    parser.add_argument("--token-env", default=TOKEN_ENV, help=f"environment variable holding the bearer token "
                        f"(default {TOKEN_ENV}); unset: a token is generated and printed")
    parser.add_argument("--insecure-no-auth", action="store_true", help="no token (refused unless --host is loopback)")
    defaults = ServeConfig()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help=f"samples per merged reward call (default {defaults.max_batch_size}; 1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help=f"how long a request waits for others to share its batch (default {defaults.max_wait_ms})")
    parser.add_argument("--max-request-samples", type=int, default=defaults.max_request_samples,
                        help=f"samples per request (default {defaults.max_request_samples}; 413 above)")
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20,
                        help=f"request body limit in MiB (default {defaults.max_body_bytes / 2**20:g}; 413 above)")
    parser.add_argument("--timeout", type=float, default=defaults.request_timeout,
                        help=f"seconds per request, queue wait included (default {defaults.request_timeout:g}; 504 "
                             "after, the client scores those samples NaN)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help=f"requests waiting per reward (default {defaults.max_queue}; 503 above)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(args: argparse.Namespace) -> None:
    """Build the rewards, print the token, serve until interrupted."""
    from rewards import build_reward

    cfg = ServeConfig(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                      max_request_samples=args.max_request_samples, max_body_bytes=int(args.max_body_mb * 2**20),
                      request_timeout=args.timeout, max_queue=args.max_queue)
    token, how = resolve_token(args.token_env, args.insecure_no_auth, args.host)
    rewards: dict[str, Reward] = {}
    for text in args.reward:
        reward = build_reward(parse_reward_option(text))
        if reward.name in rewards:
            raise ValueError(f"--reward {text!r}: a reward named {reward.name!r} is already served "
                             "(give it another name with name=...)")
        rewards[reward.name] = reward
    print(f"serving {', '.join(sorted(rewards))} on http://{args.host}:{args.port} ({how})", flush=True)
    if how == "generated token":
        print(f"token: {token}\n(clients: export {TOKEN_ENV}=<this token>; to choose the token, set "
              f"${args.token_env} before starting the server)", flush=True)
    run_server(rewards, args.host, args.port, cfg, token, args.log_level)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m rewards.serve", description="`align serve` without the "
                                      "rest of the CLI (lighter to start).")
    add_arguments(_parser)
    main(_parser.parse_args())
