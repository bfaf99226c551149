"""Async OpenAI-compatible MLLM client over several endpoints (vLLM, transformers serve, any API).

Concurrency limit over all endpoints, bounded retries with exponential backoff (or the server's
Retry-After), round-robin endpoints (a retry moves to the next one). A request never raises: it returns
a `Reply` whose `error` says what went wrong, with the server's own reason ("HTTP 404: The model `X`
does not exist."), so a network failure becomes a failure record, never a silent wrong answer.

Deadlines, all in seconds of wall-clock time:
  connect_timeout_s   opening the TCP connection;
  timeout_s           one attempt in total, connect to last byte. It is enforced with asyncio.wait_for
                      around the attempt, because httpx's read timeout is per chunk: a server that
                      drips a byte every second would otherwise hold an attempt for ever;
  request_deadline_s  one request over all its attempts and waits (None: no cap beyond the attempts',
                      i.e. at most (max_retries + 1) * timeout_s plus the backoffs);
  retry_after_max_s   the longest Retry-After (429 / 503) that is honoured; a longer one is cut to this.

`check()` runs once at start and stops a misconfigured run before any edit (see its docstring).
"""

from __future__ import annotations

import asyncio
import base64
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

log = logging.getLogger("etchr_eval.client")


class EndpointError(RuntimeError):
    """The start-up check failed: a wrong model name or key, or no endpoint answering. The first line
    of the message says what and where; further lines list every endpoint's problem."""


@dataclass
class Reply:
    text: Optional[str]  # the message content; None on failure
    error: Optional[str] = None  # "HTTP 500: <server's message>", "timeout after 30 s", "malformed reply: ...", ...
    attempts: int = 0
    latency_s: float = 0.0
    endpoint: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def image_data_uri(image: Image.Image, fmt: str = "png", jpeg_quality: int = 75) -> str:
    """PIL image -> data URI. PNG is lossless; `jpeg` at quality 75 reproduces the reference (.jpg files)."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
        mime = "image/jpeg"
    elif fmt == "png":
        image.save(buf, format="PNG")
        mime = "image/png"
    else:
        raise ValueError(f"image format {fmt!r}: use png or jpeg")
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(image_uris: list[str], texts: list[str]) -> list[dict]:
    """One user turn: the images first, then each text as its own part (the reference's layout)."""
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in image_uris]
    content += [{"type": "text", "text": t} for t in texts]
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------
# Errors: what the server said, in one line
# ----------------------------------------------------------------------------------------------
class MalformedReply(ValueError):
    pass


class _AttemptTimeout(Exception):
    """Our wall-clock deadline on one attempt ran out (asyncio.wait_for)."""


_RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
              openai.RateLimitError, openai.APIResponseValidationError, MalformedReply, _AttemptTimeout)


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


def _describe(exc: BaseException, timeout_s: float, connect_timeout_s: float) -> str:
    if isinstance(exc, _AttemptTimeout):
        return f"timeout after {exc.args[0]:g} s"
    if isinstance(exc, openai.APITimeoutError):
        if isinstance(exc.__cause__, httpx.ConnectTimeout):
            return f"connect timeout after {connect_timeout_s:g} s"
        return f"timeout after {timeout_s:g} s"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error: {type(cause).__name__}: {cause}"[:300]
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {server_message(exc.body) or exc.message}"
    if isinstance(exc, MalformedReply):
        return str(exc)
    if isinstance(exc, openai.APIResponseValidationError):
        return f"malformed reply: {str(exc)[:200]}"
    return f"malformed reply: {type(exc).__name__}: {str(exc)[:200]}"


def _server_wait(exc: BaseException) -> Optional[float]:
    """The Retry-After of a 429 / 503 answer, if it has one."""
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503):
        return retry_after_s(exc.response.headers)
    return None


# ----------------------------------------------------------------------------------------------
# Client
# ----------------------------------------------------------------------------------------------
class MLLMClient:
    def __init__(self, endpoints: list[str], model: str, *, api_key: Optional[str] = None,
                 api_key_env: str = "ETCHR_MLLM_API_KEY", concurrency: int = 32, timeout_s: float = 300.0,
                 max_retries: int = 3, backoff_s: float = 1.0, connect_timeout_s: float = 10.0,
                 request_deadline_s: Optional[float] = None, retry_after_max_s: float = 60.0,
                 role: str = "mllm"):
        if not endpoints:
            raise ValueError("no endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.model = model
        self.api_key_env = api_key_env
        self.api_key = api_key or os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.request_deadline_s = request_deadline_s
        self.retry_after_max_s = retry_after_max_s
        self.role = role  # config section named in start-up errors ("mllm" or "judge")
        self.served: dict[str, list] = {}  # endpoint -> its /models entries (filled by check())
        self.dropped: dict[str, str] = {}  # endpoint -> why check() took it out of the rotation
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._rr = itertools.count()
        self._sem: Optional[asyncio.Semaphore] = None
        self.stats = {"requests": 0, "failures": 0, "retries": 0, "latency_s": 0.0}

    @classmethod
    def from_config(cls, m: Any, role: str = "mllm") -> "MLLMClient":
        """Build from an `mllm` or `judge` config section (MLLMConfig)."""
        return cls(list(m.endpoints), m.model, api_key_env=m.api_key_env, concurrency=m.concurrency,
                   timeout_s=m.timeout_s, max_retries=m.max_retries, backoff_s=m.backoff_s,
                   connect_timeout_s=m.connect_timeout_s, request_deadline_s=m.request_deadline_s,
                   retry_after_max_s=m.retry_after_max_s, role=role)

    def _timeout(self) -> httpx.Timeout:
        # connect bounds the TCP handshake, read the wait for the first (and every) byte; the attempt's
        # total is asyncio.wait_for's (timeout_s), which a slow drip cannot extend.
        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)

    def _client(self, endpoint: str) -> openai.AsyncOpenAI:
        if endpoint not in self._clients:
            self._clients[endpoint] = openai.AsyncOpenAI(base_url=endpoint, api_key=self.api_key,
                                                         timeout=self._timeout(), max_retries=0)
        return self._clients[endpoint]

    # --- start-up check ---------------------------------------------------------------------
    async def check(self) -> None:
        """GET /models on every endpoint (in parallel) before any work; raise EndpointError if the run
        cannot be right.

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
        async with httpx.AsyncClient(timeout=httpx.Timeout(budget, connect=min(self.connect_timeout_s, budget))) as http:
            probes = await asyncio.gather(*[self._probe(http, ep, budget) for ep in self.endpoints])
        wrong = [why for kind, why, _ in probes if kind == "config"]
        down = {ep: why for ep, (kind, why, _) in zip(self.endpoints, probes) if kind == "down"}
        if wrong:
            raise EndpointError("\n  also: ".join(wrong))
        if len(down) == len(self.endpoints):
            raise EndpointError(f"no {self.role.upper()} endpoint is reachable:\n  " + "\n  ".join(down.values()) +
                                "\nstart one (Evaluation/launch_vllm.sh, or scripts/local_mllm_server.py on CPU) "
                                f"or fix {self.role}.endpoints")
        for ep, why in down.items():
            log.warning("%s endpoint dropped for this run (unreachable at start): %s", self.role, why)
        self.dropped.update(down)
        self.served = {ep: entries for ep, (kind, _, entries) in zip(self.endpoints, probes) if kind == "ok"}
        self.endpoints = list(self.served)

    async def check_reachable(self) -> None:
        """The former name of check() (kept for callers)."""
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
            return "config", (f"{self.role} endpoint {ep} refused the API key: HTTP {r.status_code}: "
                              f"{response_message(r)} (set ${self.api_key_env} to the server's key)"), None
        if r.status_code >= 400:
            return "config", (f"{self.role} endpoint {ep}: GET /models answered HTTP {r.status_code}: "
                              f"{response_message(r)} (an OpenAI base URL ends in /v1)"), None
        try:
            entries = r.json()["data"]
            names = [e["id"] if isinstance(e, dict) else str(e) for e in entries]
        except (ValueError, KeyError, TypeError):
            return "config", (f"{self.role} endpoint {ep}: GET /models answered 200 but not a model list: "
                              f"{' '.join(r.text.split())[:120]!r}"), None
        if self.model not in names:
            return "config", (f"{self.role}.model {self.model!r} is not served by {ep}; it serves: "
                              f"{', '.join(repr(n) for n in names) or 'nothing'} (set {self.role}.model to one "
                              "of them)"), None
        return "ok", "", entries

    # --- requests ---------------------------------------------------------------------------
    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   **sampling: Any) -> Reply:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        start = time.monotonic()
        error = "not attempted"
        endpoint = ""
        attempt = 0
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
                    resp = await self._attempt(endpoint, budget, messages=messages, max_tokens=max_tokens,
                                               temperature=temperature, **sampling)
                    text = _content(resp)
                    self._account(start, ok=True, attempts=attempt)
                    return Reply(text=text, attempts=attempt, latency_s=time.monotonic() - start, endpoint=endpoint)
                except _RETRYABLE as exc:
                    error = _describe(exc, self.timeout_s, self.connect_timeout_s)
                    wait = _server_wait(exc)
                except openai.APIStatusError as exc:  # 4xx other than 429: retrying will not help
                    error = _describe(exc, self.timeout_s, self.connect_timeout_s)
                    break
                except (httpx.HTTPError, ValueError, TypeError, KeyError) as exc:
                    error = f"malformed reply: {type(exc).__name__}: {str(exc)[:200]}"
                if attempt <= self.max_retries:
                    if wait is not None:  # the server said when: honour it, up to the cap
                        delay = min(wait, self.retry_after_max_s)
                    else:
                        delay = self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                    if deadline is not None and time.monotonic() + delay >= deadline:
                        error += f"; request deadline of {self.request_deadline_s:g} s reached"
                        break
                    self.stats["retries"] += 1
                    await asyncio.sleep(delay)
        self._account(start, ok=False, attempts=attempt)
        return Reply(text=None, error=error, attempts=attempt, latency_s=time.monotonic() - start, endpoint=endpoint)

    async def _attempt(self, endpoint: str, budget: float, **kw: Any) -> Any:
        """One chat completion, ended after `budget` seconds whatever the server does."""
        try:
            return await asyncio.wait_for(self._client(endpoint).chat.completions.create(model=self.model, **kw),
                                          timeout=budget)
        except asyncio.TimeoutError:
            raise _AttemptTimeout(round(budget, 2)) from None

    def _account(self, start: float, ok: bool, attempts: int) -> None:
        self.stats["requests"] += 1
        self.stats["latency_s"] += time.monotonic() - start
        if not ok:
            self.stats["failures"] += 1

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()


def _content(resp: Any) -> str:
    """The first choice's text; a reply without one is malformed (retried, then a failure)."""
    choices = getattr(resp, "choices", None)
    if not choices:
        raise MalformedReply("malformed reply: no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        raise MalformedReply(f"malformed reply: message content is {type(content).__name__}")
    return content
