"""Async OpenAI-compatible MLLM client over several endpoints (vLLM, transformers serve, any API).

Concurrency limit over all endpoints, per-request timeout, bounded retries with exponential backoff,
round-robin endpoints (a retry moves to the next one). A request never raises: it returns a `Reply`
whose `error` says what went wrong, so a network failure becomes a failure record, never a silent
wrong answer.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import httpx
import openai
from PIL import Image


class EndpointError(RuntimeError):
    """No endpoint answered at start-up; the message lists each endpoint and why."""


@dataclass
class Reply:
    text: Optional[str]  # the message content; None on failure
    error: Optional[str] = None  # "HTTP 500 ...", "timeout after 30 s", "malformed reply: ...", ...
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


_RETRYABLE = (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
              openai.RateLimitError, openai.APIResponseValidationError)


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"timeout after {timeout_s:g} s"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error: {type(cause).__name__}: {cause}"[:300]
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc.message)[:200]}"
    if isinstance(exc, openai.APIResponseValidationError):
        return f"malformed reply: {str(exc)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class MLLMClient:
    def __init__(self, endpoints: list[str], model: str, *, api_key: Optional[str] = None,
                 api_key_env: str = "ETCHR_MLLM_API_KEY", concurrency: int = 32, timeout_s: float = 300.0,
                 max_retries: int = 3, backoff_s: float = 1.0):
        if not endpoints:
            raise ValueError("no endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.model = model
        self.api_key = api_key or os.environ.get(api_key_env) or "EMPTY"
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._rr = itertools.count()
        self._sem: Optional[asyncio.Semaphore] = None
        self.stats = {"requests": 0, "failures": 0, "retries": 0, "latency_s": 0.0}

    def _client(self, endpoint: str) -> openai.AsyncOpenAI:
        if endpoint not in self._clients:
            self._clients[endpoint] = openai.AsyncOpenAI(base_url=endpoint, api_key=self.api_key,
                                                         timeout=self.timeout_s, max_retries=0)
        return self._clients[endpoint]

    async def check_reachable(self) -> None:
        """GET /models on every endpoint; raise EndpointError naming those that do not answer."""
        problems = []
        async with httpx.AsyncClient(timeout=min(self.timeout_s, 15.0)) as http:
            for ep in self.endpoints:
                try:
                    r = await http.get(ep + "/models", headers={"Authorization": f"Bearer {self.api_key}"})
                    if r.status_code >= 500:
                        problems.append(f"{ep}: HTTP {r.status_code}")
                except httpx.HTTPError as exc:
                    problems.append(f"{ep}: {type(exc).__name__}: {exc}")
        if len(problems) == len(self.endpoints):
            raise EndpointError("no MLLM endpoint is reachable:\n  " + "\n  ".join(problems) +
                                "\nstart one (Evaluation/launch_vllm.sh, or scripts/local_mllm_server.py on CPU) "
                                "or fix mllm.endpoints")

    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   **sampling: Any) -> Reply:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        start = time.monotonic()
        error = "not attempted"
        endpoint = ""
        attempt = 0
        async with self._sem:
            for attempt in range(1, self.max_retries + 2):
                endpoint = self.endpoints[next(self._rr) % len(self.endpoints)]
                try:
                    resp = await self._client(endpoint).chat.completions.create(
                        model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                        **sampling)
                    text = _content(resp)
                    self._account(start, ok=True, attempts=attempt)
                    return Reply(text=text, attempts=attempt, latency_s=time.monotonic() - start, endpoint=endpoint)
                except _RETRYABLE + (MalformedReply,) as exc:
                    error = _describe(exc, self.timeout_s) if not isinstance(exc, MalformedReply) else str(exc)
                except openai.APIStatusError as exc:  # 4xx other than 429: retrying will not help
                    error = _describe(exc, self.timeout_s)
                    break
                except (httpx.HTTPError, ValueError, TypeError, KeyError) as exc:
                    error = f"malformed reply: {type(exc).__name__}: {str(exc)[:200]}"
                if attempt <= self.max_retries:
                    self.stats["retries"] += 1
                    await asyncio.sleep(self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random() / 2))
        self._account(start, ok=False, attempts=attempt)
        return Reply(text=None, error=error, attempts=attempt, latency_s=time.monotonic() - start, endpoint=endpoint)

    def _account(self, start: float, ok: bool, attempts: int) -> None:
        self.stats["requests"] += 1
        self.stats["latency_s"] += time.monotonic() - start
        if not ok:
            self.stats["failures"] += 1

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()


class MalformedReply(ValueError):
    pass


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
