"""MLLM client under injected faults: HTTP 500, timeout, malformed body, garbage, refused connection."""

from __future__ import annotations

import asyncio
import time

import pytest

from etchr_eval.client import EndpointError, MLLMClient, user_message


def _ask(client, text="hello"):
    return asyncio.run(_ask_async(client, text))


async def _ask_async(client, text):
    try:
        return await client.chat(user_message([], [text]), max_tokens=8)
    finally:
        await client.aclose()


def _client(urls, **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return MLLMClient(urls, "double", **kw)


def test_success(double_server):
    r = _ask(_client([double_server.base_url]))
    assert r.ok and r.text == "\\boxed{A}" and r.attempts == 1


@pytest.mark.parametrize("action,needle", [
    ("500", "HTTP 500: injected server error"), ("malformed", "no choices"), ("garbage", "malformed reply"), ("close", "connection error"),
])
def test_faults_are_retried_then_reported(make_double_server, action, needle):
    srv = make_double_server(rules=[("hello", action)])
    r = _ask(_client([srv.base_url]))
    assert not r.ok and r.text is None
    assert needle in r.error, r.error
    assert r.attempts == 3 and len(srv.requests) == 3  # 1 try + 2 retries, each reached the server


def test_timeout(make_double_server):
    srv = make_double_server(rules=[("hello", "timeout")], timeout_sleep_s=3)
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], timeout_s=0.5, max_retries=1))
    assert not r.ok and r.error == "timeout after 0.5 s" and r.attempts == 2
    assert time.monotonic() - t0 < 2.5


def test_client_errors_are_not_retried(make_double_server):
    srv = make_double_server(rules=[("hello", "400")])
    r = _ask(_client([srv.base_url]))
    assert not r.ok and r.error == "HTTP 400: injected bad request" and r.attempts == 1 and len(srv.requests) == 1


def test_refused_endpoint_falls_over_to_a_live_one(double_server, dead_url):
    dead = dead_url()
    c = _client([dead, double_server.base_url])
    r = _ask(c)  # round robin starts on the dead one, the retry lands on the live one
    assert r.ok and r.attempts == 2 and r.endpoint == double_server.base_url
    r2 = _ask(_client([dead], max_retries=1))
    assert not r2.ok and "connection error" in r2.error


def test_unreachable_at_start_names_every_endpoint(dead_url):
    dead = [dead_url() for _ in range(2)]
    with pytest.raises(EndpointError) as err:
        asyncio.run(_client(dead).check_reachable())
    assert dead[0] in str(err.value) and dead[1] in str(err.value)


def test_concurrency_limit(make_double_server):
    srv = make_double_server(delay_s=0.2)
    c = _client([srv.base_url], concurrency=2)

    async def many():
        try:
            t0 = time.monotonic()
            rs = await asyncio.gather(*[c.chat(user_message([], [f"q{i}"]), max_tokens=4) for i in range(6)])
            return rs, time.monotonic() - t0
        finally:
            await c.aclose()

    rs, dt = asyncio.run(many())
    assert all(r.ok for r in rs)
    assert dt >= 0.55  # 6 requests, 2 at a time, 0.2 s each -> >= 0.6 s (scheduling slack)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekrit")
    assert MLLMClient(["http://x/v1"], "m", api_key_env="MY_KEY").api_key == "sekrit"
    monkeypatch.delenv("MY_KEY")
    assert MLLMClient(["http://x/v1"], "m", api_key_env="MY_KEY").api_key == "EMPTY"
