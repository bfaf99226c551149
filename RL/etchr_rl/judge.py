"""Async judge client: the MLLM (Qwen3-VL-8B-Instruct behind vLLM) that scores rollouts for the rewards.

Requests spread over N OpenAI-compatible endpoints round-robin; a retry moves on to the next endpoint,
so one dead server costs one attempt, not the step. One semaphore bounds the requests in flight over
all endpoints; retries are bounded, with exponential backoff and jitter, or the server's Retry-After.
A request never raises: it returns the reply text, or None once the retries are spent, and the error is
recorded with the server's own reason ("HTTP 404: The model `X` does not exist."). None becomes a None
reward ("no signal", DESIGN.md), never a 0.

Deadlines, all in seconds of wall-clock time:
  connect_timeout_s   opening the TCP connection;
  timeout_s           one attempt in total, connect to last byte, enforced with asyncio.wait_for around
                      the attempt (httpx's read timeout is per chunk: a server dripping a byte a second
                      would otherwise hold an attempt for ever);
  request_deadline_s  one request over all its attempts and waits (None: no cap beyond the attempts',
                      i.e. at most (max_retries + 1) * timeout_s plus the backoffs);
  retry_after_max_s   the longest Retry-After (429 / 503) that is honoured; a longer one is cut to this.

`check()` runs once before training and stops a misconfigured run (see its docstring).

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
import email.utils
import io
import itertools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx
import openai
from PIL import Image


log = logging.getLogger("etchr_rl.judge")


class JudgeEndpointError(RuntimeError):
    """The start-up check failed: a wrong model name or key, or no endpoint answering. The first line
    of the message says what and where; further lines list every endpoint's problem."""


JudgeUnreachable = JudgeEndpointError  # the former name (train_grpo.main catches it)


@dataclass
class JudgeReply:
    """One request's outcome: `text` on success, else None and `error` says why."""

    text: Optional[str]
    error: Optional[str] = None  # "HTTP 500: <server's message>", "timeout after 30 s", "malformed reply: ...", ...
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


class AttemptTimeout(Exception):
    """Our wall-clock deadline on one attempt ran out (asyncio.wait_for); args[0] = its seconds."""


# Worth another attempt: the server (or the way to it) may recover; a 4xx other than 429 will not.
_RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
              openai.RateLimitError, openai.APIResponseValidationError, MalformedReply, AttemptTimeout)


def server_message(body: Any) -> str:
    """The reason inside an error body, one line: OpenAI's {"error": {"message": ...}}, vLLM's flat
    {"object": "error", "message": ...}, vLLM's 401 {"error": "Unauthorized"}, FastAPI's {"detail": ...},
    or the raw text."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            msg = inner.get("message") or inner.get("detail")
            body = msg if msg else inner
        else:
            body = inner
        if isinstance(body, dict) and "detail" in body:
            body = body["detail"]
    if not isinstance(body, str):
        body = json.dumps(body, default=str) if body is not None else ""
    return " ".join(body.split())[:300]


def response_message(r: httpx.Response) -> str:
    """server_message of an httpx response (JSON or not)."""
    try:
        return server_message(r.json())
    except ValueError:
        return server_message(r.text)


def retry_after_s(headers: Any, now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date); None if absent or
    unreadable. `now` is the epoch time to count an HTTP-date from (default: the clock)."""
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def server_wait(exc: BaseException) -> Optional[float]:
    """The Retry-After of a 429 / 503 answer, if it has one."""
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503):
        return retry_after_s(exc.response.headers)
    return None


def describe_error(exc: BaseException, timeout_s: float, connect_timeout_s: Optional[float] = None) -> str:
    """A one-line, log-friendly description of a failed attempt (with the server's reason for a status)."""
    if isinstance(exc, AttemptTimeout):
        return f"timeout after {exc.args[0]:g} s"
    if isinstance(exc, openai.APITimeoutError):
        if connect_timeout_s is not None and isinstance(exc.__cause__, httpx.ConnectTimeout):
            return f"connect timeout after {connect_timeout_s:g} s"
        return f"timeout after {timeout_s:g} s"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error: {type(cause).__name__}: {cause}"[:300]
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {server_message(exc.body) or exc.message}"
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
                 keep_errors: int = 100, connect_timeout_s: float = 10.0, request_deadline_s: Optional[float] = None,
                 retry_after_max_s: float = 60.0):
        endpoints = [str(e).rstrip("/") for e in endpoints]
        if not endpoints:
            raise ValueError("JudgeClient: no endpoints given (set judge.endpoints to a list of OpenAI base URLs)")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"JudgeClient: need concurrency >= 1, max_retries >= 0, timeout_s > 0, backoff_s >= 0 "
                             f"(got {concurrency}, {max_retries}, {timeout_s}, {backoff_s})")
        if connect_timeout_s <= 0 or retry_after_max_s < 0 or (request_deadline_s is not None and request_deadline_s <= 0):
            raise ValueError(f"JudgeClient: need connect_timeout_s > 0, retry_after_max_s >= 0, request_deadline_s > 0 "
                             f"or None (got {connect_timeout_s}, {retry_after_max_s}, {request_deadline_s})")
        self.endpoints = endpoints
        self.model = model
        self.api_key_env = api_key_env
        self.api_key = api_key or os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = int(concurrency)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = min(float(connect_timeout_s), self.timeout_s)
        self.request_deadline_s = None if request_deadline_s is None else float(request_deadline_s)
        self.retry_after_max_s = float(retry_after_max_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.drop_params = frozenset(drop_params or ())
        self.served: dict[str, list] = {}  # endpoint -> its /models entries (filled by check())
        self.dropped: dict[str, str] = {}  # endpoint -> why check() took it out of the rotation
        self.errors: collections.deque[str] = collections.deque(maxlen=keep_errors)  # most recent failures
        self._rr = itertools.count()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._sem: Optional[asyncio.Semaphore] = None
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self.reset_stats()
        self.load_totals(None)

    @classmethod
    def from_config(cls, judge_cfg: Any) -> "JudgeClient":
        """Build from the `judge` section of RLConfig (a DictConfig or the dataclass)."""
        return cls(list(judge_cfg.endpoints), judge_cfg.model, api_key_env=judge_cfg.api_key_env,
                   concurrency=judge_cfg.concurrency, timeout_s=judge_cfg.timeout_s,
                   max_retries=judge_cfg.max_retries, backoff_s=judge_cfg.backoff_s,
                   drop_params=list(getattr(judge_cfg, "drop_params", None) or []),
                   connect_timeout_s=judge_cfg.connect_timeout_s, request_deadline_s=judge_cfg.request_deadline_s,
                   retry_after_max_s=judge_cfg.retry_after_max_s)

    # --- statistics -------------------------------------------------------------------------
    # Two sets of counters: a window (stats(), cleared by reset_stats(); the trainer clears it at the start of
    # every iteration, so judge/* rows are that iteration's) and run totals (totals(), never cleared; saved
    # with each checkpoint and restored by load_totals(), so judge/total_* continue across a resume).
    TOTAL_KEYS = ("requests", "failures", "retries")

    def reset_stats(self) -> None:
        """Start a new window (the trainer opens one per iteration); the run totals are kept."""
        self._n_requests = self._n_failures = self._n_retries = 0
        self._latencies: list[float] = []

    def stats(self) -> dict[str, float]:
        """Counts and latency (seconds) of the requests finished since the last reset_stats()."""
        n = self._n_requests
        return {"requests": n, "failures": self._n_failures, "retries": self._n_retries,
                "failure_rate": self._n_failures / n if n else 0.0,
                "latency_mean_s": sum(self._latencies) / len(self._latencies) if self._latencies else 0.0,
                "latency_p50_s": percentile(self._latencies, 50), "latency_p95_s": percentile(self._latencies, 95),
                "latency_max_s": max(self._latencies, default=0.0)}

    def totals(self) -> dict[str, int]:
        """Requests, failures and retries since the run began (resumed attempts included after load_totals)."""
        return {k: int(self._totals[k]) for k in self.TOTAL_KEYS}

    def load_totals(self, saved: Optional[dict]) -> None:
        """Continue the run totals from a checkpoint's saved totals() (None or {}: start from 0)."""
        saved = saved or {}
        bad = [k for k in saved if k not in self.TOTAL_KEYS or not isinstance(saved[k], int) or saved[k] < 0]
        if bad:
            raise ValueError(f"judge totals {saved!r}: unknown or invalid key(s) {bad}; expected non-negative "
                             f"integers for {list(self.TOTAL_KEYS)}")
        self._totals = {k: int(saved.get(k, 0)) for k in self.TOTAL_KEYS}

    def total_stats(self) -> dict[str, float]:
        """totals() plus the run's failure rate, named total_* for the metrics row."""
        t = self.totals()
        return {**{f"total_{k}": v for k, v in t.items()},
                "total_failure_rate": t["failures"] / t["requests"] if t["requests"] else 0.0}

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
            # max_retries=0: retries are ours, so that they move to the next endpoint. connect bounds the
            # handshake, read the wait for the first (and every) byte; the attempt's total is wait_for's.
            self._clients[endpoint] = openai.AsyncOpenAI(
                base_url=endpoint, api_key=self.api_key, max_retries=0,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s))
        return self._clients[endpoint]

    async def aclose(self) -> None:
        """Close the HTTP pools of the current loop (call before the loop ends)."""
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.close()

    async def check(self) -> None:
        """GET /models on every endpoint (in parallel) before training; raise JudgeEndpointError if the run
        cannot be right, so a wrong URL, key or model name fails in seconds instead of as steps of None rewards.

        Policy:
          - a configuration error on ANY endpoint stops the run: the model name is not among the served
            ones (the error lists them), 401/403 (wrong or missing key: status and server message),
            another 4xx (e.g. a base URL without /v1), or a 200 that is not a model list;
          - unreachable (refused, timeout, 5xx) on EVERY endpoint stops the run, naming each;
          - unreachable on SOME endpoints: a warning, and those endpoints are dropped from the rotation
            for this run (`self.dropped` says why), so no request spends an attempt on them.
        On success `self.served` maps each live endpoint to its /models entries.
        """
        budget = min(self.timeout_s, 15.0)
        timeout = httpx.Timeout(budget, connect=min(self.connect_timeout_s, budget))
        async with httpx.AsyncClient(timeout=timeout) as http:
            probes = await asyncio.gather(*[self._probe(http, ep, budget) for ep in self.endpoints])
        wrong = [why for kind, why, _ in probes if kind == "config"]
        down = {ep: why for ep, (kind, why, _) in zip(self.endpoints, probes) if kind == "down"}
        if wrong:
            raise JudgeEndpointError("\n  also: ".join(wrong))
        if len(down) == len(self.endpoints):
            raise JudgeEndpointError("no judge endpoint is reachable:\n  " + "\n  ".join(down.values()) +
                                     "\nstart the judges (scripts/rl/serve_judge.sh, or scripts/local_mllm_server.py "
                                     "on CPU) or fix judge.endpoints")
        for why in down.values():
            log.warning("judge endpoint dropped for this run (unreachable at start): %s", why)
        self.dropped.update(down)
        self.served = {ep: entries for ep, (kind, _, entries) in zip(self.endpoints, probes) if kind == "ok"}
        self.endpoints = list(self.served)

    async def check_reachable(self) -> None:
        """The former name of check() (train_grpo.py calls it)."""
        await self.check()

    async def _probe(self, http: httpx.AsyncClient, ep: str, budget: float) -> tuple[str, str, Optional[list]]:
        """("ok", "", entries) | ("down", why, None) | ("config", why, None) for one endpoint."""
        try:
            r = await asyncio.wait_for(http.get(ep + "/models", headers={"Authorization": f"Bearer {self.api_key}"}),
                                       timeout=budget)
        except (httpx.HTTPError, asyncio.TimeoutError) as exc:
            what = f"timeout after {budget:g} s" if isinstance(exc, (asyncio.TimeoutError, httpx.TimeoutException)) \
                else f"{type(exc).__name__}: {exc}"
            return "down", f"{ep}: {what}", None
        if r.status_code >= 500:
            return "down", f"{ep}: HTTP {r.status_code}: {response_message(r)}", None
        if r.status_code in (401, 403):
            return "config", (f"judge endpoint {ep} refused the API key: HTTP {r.status_code}: "
                              f"{response_message(r)} (set ${self.api_key_env} to the server's key)"), None
        if r.status_code >= 400:
            return "config", (f"judge endpoint {ep}: GET /models answered HTTP {r.status_code}: "
                              f"{response_message(r)} (an OpenAI base URL ends in /v1)"), None
        try:
            entries = r.json()["data"]
            names = [e["id"] if isinstance(e, dict) else str(e) for e in entries]
        except (ValueError, KeyError, TypeError):
            return "config", (f"judge endpoint {ep}: GET /models answered 200 but not a model list: "
                              f"{' '.join(r.text.split())[:120]!r}"), None
        if self.model not in names:
            return "config", (f"judge.model {self.model!r} is not served by {ep}; it serves: "
                              f"{', '.join(repr(n) for n in names) or 'nothing'} (set judge.model to one of them)"), None
        return "ok", "", entries

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
            # The request deadline counts from the first attempt, not from the queue.
            deadline = None if self.request_deadline_s is None else time.monotonic() + self.request_deadline_s
            for attempt in range(1, self.max_retries + 2):
                budget = self.timeout_s if deadline is None else min(self.timeout_s, deadline - time.monotonic())
                if budget <= 0:
                    attempt -= 1
                    error += f"; request deadline of {self.request_deadline_s:g} s reached"
                    break
                endpoint = self.endpoints[next(self._rr) % len(self.endpoints)]
                wait = None
                try:
                    resp = await self._attempt(endpoint, budget, messages, sampling)
                    text = reply_text(resp)
                    return self._finish(JudgeReply(text=text, attempts=attempt, endpoint=endpoint), start)
                except _RETRYABLE as exc:
                    error = describe_error(exc, self.timeout_s, self.connect_timeout_s)
                    wait = server_wait(exc)
                except openai.APIStatusError as exc:  # 4xx other than 429: the request itself is wrong
                    error = describe_error(exc, self.timeout_s, self.connect_timeout_s)
                    break
                except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    error = describe_error(exc, self.timeout_s)  # a body the SDK could not parse
                if attempt <= self.max_retries:
                    if wait is not None:  # the server said when: honour it, up to the cap
                        delay = min(wait, self.retry_after_max_s)
                    else:  # exponential backoff with jitter, so that a whole batch's retries do not arrive together
                        delay = self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random() / 2)
                    if deadline is not None and time.monotonic() + delay >= deadline:
                        error += f"; request deadline of {self.request_deadline_s:g} s reached"
                        break
                    self._n_retries += 1
                    self._totals["retries"] += 1
                    await asyncio.sleep(delay)
        return self._finish(JudgeReply(text=None, error=error, attempts=attempt, endpoint=endpoint), start)

    async def _attempt(self, endpoint: str, budget: float, messages: list[dict], sampling: dict) -> Any:
        """One chat completion, ended after `budget` seconds whatever the server does."""
        try:
            return await asyncio.wait_for(
                self._client(endpoint).chat.completions.create(model=self.model, messages=messages, **sampling),
                timeout=budget)
        except asyncio.TimeoutError:
            raise AttemptTimeout(round(budget, 2)) from None

    async def complete(self, messages: list[dict], *, max_tokens: int, temperature: float,
                       top_p: Optional[float] = None, extra_body: Optional[dict] = None) -> Optional[str]:
        """The reply text, or None when every attempt failed (the error is in `errors`)."""
        reply = await self.request(messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                   extra_body=extra_body)
        return reply.text

    def _finish(self, reply: JudgeReply, start: float) -> JudgeReply:
        reply.latency_s = time.monotonic() - start
        self._n_requests += 1
        self._totals["requests"] += 1
        self._latencies.append(reply.latency_s)
        if not reply.ok:
            self._n_failures += 1
            self._totals["failures"] += 1
            self.errors.append(f"{reply.endpoint}: {reply.error} (after {reply.attempts} attempt(s))")
        return reply
