"""Async judge client: the MLLM (Qwen3-VL-8B-Instruct behind vLLM) that scores rollouts for the rewards.

Requests spread over N OpenAI-compatible endpoints round-robin; a retry moves on to the next endpoint,
so one dead server costs one attempt, not the step. One semaphore bounds the requests in flight over
all endpoints; every attempt has a timeout; retries are bounded, with exponential backoff and jitter.
A request never raises: it returns the reply text, or None once the retries are spent, and the error is
recorded. None becomes a None reward ("no signal", DESIGN.md), never a 0.

The API key comes from the environment variable named by `judge.api_key_env` ("EMPTY" when unset,
which vLLM without --api-key accepts).

`drop_params` names sampling fields the server rejects, which are then left out of every request:
vLLM takes `top_k` (sent in the body via extra_body), but `transformers serve`, the CPU stand-in,
answers 422 to it, so CPU runs pass drop_params=["top_k"] (a deviation to record with the run).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import itertools
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx
import openai
from PIL import Image


class JudgeUnreachable(RuntimeError):
    """No judge endpoint answered; the message lists every endpoint and why."""


@dataclass
class JudgeReply:
    """One request's outcome: `text` on success, else None and `error` says why."""

    text: Optional[str]
    error: Optional[str] = None  # "HTTP 500: ...", "timeout after 30 s", "malformed reply: ...", ...
    attempts: int = 0
    latency_s: float = 0.0  # seconds, from entering the queue to the final answer (retries included)
    endpoint: str = ""  # the endpoint of the last attempt

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------
def png_data_uri(image: Image.Image) -> str:
    """PIL image -> "data:image/png;base64,..." (PNG is lossless: the judge sees the rollout exactly)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(image_uris: list[str], text: str) -> list[dict]:
    """One user turn: the images first (in the given order), then the text, as the reference sends it."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_uris]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class MalformedReply(ValueError):
    """A 200 answer that is not a chat completion with text."""


# Worth another attempt: the server (or the way to it) may recover; a 4xx other than 429 will not.
_RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
              openai.RateLimitError, openai.APIResponseValidationError, MalformedReply)


def describe_error(exc: BaseException, timeout_s: float) -> str:
    """A one-line, log-friendly description of a failed attempt."""
    if isinstance(exc, openai.APITimeoutError):
        return f"timeout after {timeout_s:g} s"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error: {type(cause).__name__}: {cause}"[:300]
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc.message)[:200]}"
    if isinstance(exc, (openai.APIResponseValidationError, MalformedReply)):
        return f"malformed reply: {str(exc)[:200]}"
    return f"malformed reply: {type(exc).__name__}: {str(exc)[:200]}"


def reply_text(resp: Any) -> str:
    """The first choice's message text; anything else is a MalformedReply (retried, then a failure)."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedReply("no choices")
    content = getattr(getattr(choices[0], "message", None), "content", None)
    if not isinstance(content, str):
        raise MalformedReply(f"message content is {type(content).__name__}, not text")
    return content


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list; 0.0 for an empty one."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------
class JudgeClient:
    """Async chat completions over several endpoints; see the module docstring for the policy."""

    def __init__(self, endpoints: list[str], model: str, *, api_key: Optional[str] = None,
                 api_key_env: str = "ETCHR_JUDGE_API_KEY", concurrency: int = 64, timeout_s: float = 120.0,
                 max_retries: int = 3, backoff_s: float = 1.0, drop_params: Optional[list[str]] = None,
                 keep_errors: int = 100):
        endpoints = [str(e).rstrip("/") for e in endpoints]
        if not endpoints:
            raise ValueError("JudgeClient: no endpoints given (set judge.endpoints to a list of OpenAI base URLs)")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"JudgeClient: need concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0 "
                             f"(got {concurrency}, {max_retries}, {timeout_s}, {backoff_s})")
        self.endpoints = endpoints
        self.model = model
        self.api_key = api_key or os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.drop_params = frozenset(drop_params or ())
        self.errors: collections.deque[str] = collections.deque(maxlen=keep_errors)  # most recent failures
        self._rr = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._sem: Optional[asyncio.Semaphore] = None
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self.reset_stats()

    @classmethod
    def from_config(cls, judge_cfg: Any) -> "JudgeClient":
        """Build from the `judge` section of RLConfig (a DictConfig or the dataclass)."""
        return cls(list(judge_cfg.endpoints), judge_cfg.model, api_key_env=judge_cfg.api_key_env,
                   concurrency=judge_cfg.concurrency, timeout_s=judge_cfg.timeout_s,
                   max_retries=judge_cfg.max_retries, backoff_s=judge_cfg.backoff_s,
                   drop_params=list(getattr(judge_cfg, "drop_params", None) or []))

    # --- statistics -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Start a new window (the trainer logs one window per step)."""
        self._n_requests = self._n_failures = self._n_retries = 0
        self._latencies: list[float] = []

    def stats(self) -> dict[str, float]:
        """Counts and latency (seconds) of the requests finished since the last reset_stats()."""
        n = self._n_requests
        return {"requests": n, "failures": self._n_failures, "retries": self._n_retries,
                "failure_rate": self._n_failures / n if n else 0.0,
                "latency_mean_s": sum(self._latencies) / len(self._latencies) if self._latencies else 0.0,
                "latency_p95_s": percentile(self._latencies, 95)}

    # --- plumbing ---------------------------------------------------------------------------
    def _bind_loop(self) -> None:
        """Semaphore and HTTP clients belong to one event loop. The trainer may call asyncio.run() once
        per step, so on a new loop both are rebuilt (the old pools died with their loop)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._sem = asyncio.Semaphore(self.concurrency)
            self._clients = {}

    def _client(self, endpoint: str) -> openai.AsyncOpenAI:
        if endpoint not in self._clients:
            # max_retries=0: retries are ours, so that they move to the next endpoint.
            self._clients[endpoint] = openai.AsyncOpenAI(base_url=endpoint, api_key=self.api_key,
                                                         timeout=self.timeout_s, max_retries=0)
        return self._clients[endpoint]

    async def aclose(self) -> None:
        """Close the HTTP pools of the current loop (call before the loop ends)."""
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.close()

    async def check_reachable(self) -> None:
        """GET /models on every endpoint; raise JudgeUnreachable naming them if none answers.

        Called once before training, so a wrong URL fails in seconds instead of as a step of None rewards.
        """
        problems = []
        async with httpx.AsyncClient(timeout=min(self.timeout_s, 15.0)) as http:
            for ep in self.endpoints:
                try:
                    r = await http.get(ep + "/models", headers={"Authorization": f"Bearer {self.api_key}"})
                    if r.status_code >= 400:
                        problems.append(f"{ep}: HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    problems.append(f"{ep}: {type(exc).__name__}: {exc}")
        if len(problems) == len(self.endpoints):
            raise JudgeUnreachable("no judge endpoint is reachable:\n  " + "\n  ".join(problems) +
                                   "\nstart the judges (scripts/rl/serve_judge.sh, or scripts/local_mllm_server.py "
                                   "on CPU) or fix judge.endpoints")

    # --- requests ---------------------------------------------------------------------------
    async def request(self, messages: list[dict], *, max_tokens: int, temperature: float,
                      top_p: Optional[float] = None, extra_body: Optional[dict] = None) -> JudgeReply:
        """One chat completion with the retry policy; never raises for network or server faults."""
        self._bind_loop()
        sampling: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if top_p is not None:
            sampling["top_p"] = top_p
        body = {k: v for k, v in (extra_body or {}).items() if k not in self.drop_params}
        if body:
            sampling["extra_body"] = body  # e.g. top_k, which the OpenAI schema lacks
        sampling = {k: v for k, v in sampling.items() if k == "max_tokens" or k not in self.drop_params}
        start = time.monotonic()
        error, endpoint, attempt = "not attempted", "", 0
        async with self._sem:
            for attempt in range(1, self.max_retries + 2):
                endpoint = self.endpoints[next(self._rr) % len(self.endpoints)]
                try:
                    resp = await self._client(endpoint).chat.completions.create(
                        model=self.model, messages=messages, **sampling)
                    text = reply_text(resp)
                    return self._finish(JudgeReply(text=text, attempts=attempt, endpoint=endpoint), start)
                except _RETRYABLE as exc:
                    error = describe_error(exc, self.timeout_s)
                except openai.APIStatusError as exc:  # 4xx other than 429: the request itself is wrong
                    error = describe_error(exc, self.timeout_s)
                    break
                except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    error = describe_error(exc, self.timeout_s)  # a body the SDK could not parse
                if attempt <= self.max_retries:
                    self._n_retries += 1
                    # Exponential backoff with jitter, so that retries from a whole batch do not arrive together.
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
        return self._finish(JudgeReply(text=None, error=error, attempts=attempt, endpoint=endpoint), start)

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float,
                       top_p: Optional[float] = None, extra_body: Optional[dict] = None) -> Optional[str]:
        """The reply text, or None when every attempt failed (the error is in `errors`)."""
        reply = await self.request(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   extra_body=extra_body)
        return reply.text

    def _finish(self, reply: JudgeReply, start: float) -> JudgeReply:
        reply.latency_s = time.monotonic() - start
        self._n_requests += 1
        self._latencies.append(reply.latency_s)
        if not reply.ok:
            self._n_failures += 1
            self.errors.append(f"{reply.endpoint}: {reply.error} (after {reply.attempts} attempt(s))")
        return reply
