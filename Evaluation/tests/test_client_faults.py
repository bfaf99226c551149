"""MLLM client against fault servers on 127.0.0.1: a slow drip, a wrong key, an unknown model, 429/503 with
Retry-After, a request deadline; the start-up check's policy; and evaluate.py stopping before any edit.

The elapsed-time checks are behavioural bounds (a drip answer would take minutes; a Retry-After of an hour
is cut to the cap), not performance assertions: their slack is seconds."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import sys
import time

import pytest

from etchr_eval.client import EndpointError, MLLMClient, retry_after_s, server_message, user_message


ev = sys.modules["etchr_eval_tests_evalrun"]  # loaded by conftest.py


def _client(urls, model="double", **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return MLLMClient(urls, model, **kw)


def _ask(client, text="hello"):
    async def go():
        try:
            return await client.chat(user_message([], [text]), max_tokens=8)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _check(client):
    asyncio.run(client.check())


# ---------------------------------------------------------------------------------------- deadlines
def test_slow_drip_is_cut_at_the_attempt_deadline(make_double_server):
    srv = make_double_server(rules=[("hello", "drip")], drip_bytes_per_s=2.0)  # ~300 bytes: minutes at 2 B/s
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], timeout_s=1.0, max_retries=1))
    elapsed = time.monotonic() - t0
    assert not r.ok and r.error == "timeout after 1 s" and r.attempts == 2 and len(srv.requests) == 2
    assert elapsed < 1.0 * 2 + 3.0, elapsed  # two attempts of 1 s, not two drips of minutes


def test_request_deadline_caps_all_attempts(make_double_server):
    srv = make_double_server(rules=[("hello", "drip")])
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], timeout_s=1.0, max_retries=5, request_deadline_s=1.5))
    elapsed = time.monotonic() - t0
    # 1 s, then the 0.5 s left; no third attempt although 5 retries were allowed
    assert not r.ok and r.attempts == 2 and len(srv.requests) == 2, r
    assert r.error.startswith("timeout after 0.") and r.error.endswith("request deadline of 1.5 s reached"), r.error
    assert elapsed < 1.5 + 2.0, elapsed


# ---------------------------------------------------------------------------------------- server reasons
def test_unknown_model_records_the_servers_message(double_server):
    r = _ask(_client([double_server.base_url], model="no-such-model"))
    assert r.error == "HTTP 404: The model `no-such-model` does not exist.", r.error
    assert r.attempts == 1 and len(double_server.requests) == 1  # a 404 is not retried


@pytest.mark.parametrize("body,expected", [
    ({"object": "error", "message": "The model `X` does not exist.", "type": "NotFoundError", "code": 404},
     "The model `X` does not exist."),  # vLLM, as the SDK hands it over (no "error" key)
    ({"message": "bad\n  things", "type": "BadRequestError"}, "bad things"),  # one line
    ("Unauthorized", "Unauthorized"),  # vLLM's 401 {"error": "Unauthorized"} after the SDK unwraps it
    ({"error": {"message": "rate limited"}}, "rate limited"),
    ({"detail": [{"loc": ["body", "top_k"], "msg": "extra"}]}, '[{"loc": ["body", "top_k"], "msg": "extra"}]'),
    ("<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
])
def test_server_message(body, expected):
    assert server_message(body) == expected


# ---------------------------------------------------------------------------------------- Retry-After
def test_retry_after_is_honoured(make_double_server):
    srv = make_double_server(rules=[("hello", ["429:1", "503:1", "ok"])])
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], max_retries=3, backoff_s=0.01))
    assert r.ok and r.text == "ok" and r.attempts == 3
    assert time.monotonic() - t0 >= 2.0  # two waits of 1 s instead of backoffs of 0.01 s


def test_retry_after_is_capped(make_double_server):
    srv = make_double_server(rules=[("hello", ["429:3600", "ok"])])
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], retry_after_max_s=0.3))
    assert r.ok and r.attempts == 2
    assert time.monotonic() - t0 < 0.3 + 5.0  # the cap, not the hour


def test_429_without_retry_after_backs_off_and_reports(make_double_server):
    srv = make_double_server(rules=[("hello", "429")])
    r = _ask(_client([srv.base_url], max_retries=1))
    assert r.error == "HTTP 429: injected 429" and r.attempts == 2 and len(srv.requests) == 2


def test_retry_after_parsing():
    now = 1_700_000_000.0
    assert retry_after_s({"retry-after": "3"}, now) == 3.0
    assert retry_after_s({"retry-after": " 1.5 "}, now) == 1.5
    assert retry_after_s({"retry-after": "-4"}, now) == 0.0
    assert retry_after_s({"retry-after": email.utils.formatdate(now + 7, usegmt=True)}, now) == 7.0
    assert retry_after_s({"retry-after": email.utils.formatdate(now - 7, usegmt=True)}, now) == 0.0  # past
    for bad in ("soon", "nan", "inf", ""):
        assert retry_after_s({"retry-after": bad}, now) is None, bad
    assert retry_after_s({}, now) is None


# ---------------------------------------------------------------------------------------- start-up check
def test_check_fails_on_a_wrong_key_naming_the_status(make_double_server):
    srv = make_double_server(api_key="right-key")
    with pytest.raises(EndpointError) as err:
        _check(_client([srv.base_url]))  # no key: "EMPTY"
    first = str(err.value).splitlines()[0]
    assert srv.base_url in first and "HTTP 401: Unauthorized" in first and "$ETCHR_MLLM_API_KEY" in first, first
    _check(_client([srv.base_url], api_key="right-key"))


def test_check_fails_on_an_unknown_model_listing_the_served_names(make_double_server):
    srv = make_double_server(models=["served-a", "served-b"])
    with pytest.raises(EndpointError) as err:
        _check(_client([srv.base_url], model="wanted"))
    first = str(err.value).splitlines()[0]
    assert "'wanted'" in first and srv.base_url in first and "'served-a', 'served-b'" in first, first
    assert "mllm.model" in first and srv.requests == []  # nothing was asked of the model


def test_check_stops_on_a_wrong_model_on_any_endpoint(make_double_server):
    good, bad = make_double_server(), make_double_server(models=["other"])
    with pytest.raises(EndpointError) as err:
        _check(_client([good.base_url, bad.base_url], role="judge"))
    assert bad.base_url in str(err.value) and "judge.model 'double'" in str(err.value)
    assert good.base_url not in str(err.value)


def test_check_drops_an_unreachable_endpoint_of_several(make_double_server, dead_url, caplog):
    live, dead = make_double_server(), dead_url()
    c = _client([dead, live.base_url])
    with caplog.at_level(logging.WARNING, logger="etchr_eval.client"):
        _check(c)
    assert c.endpoints == [live.base_url] and list(c.dropped) == [dead]
    assert any(dead in rec.getMessage() and "dropped" in rec.getMessage() for rec in caplog.records)
    assert [e["id"] for e in c.served[live.base_url]][0] == "double"
    r = _ask(c)  # the dead endpoint costs no attempt any more
    assert r.ok and r.attempts == 1 and r.endpoint == live.base_url


def test_check_reachable_is_the_same_check(make_double_server):
    srv = make_double_server(models=["other"])
    with pytest.raises(EndpointError, match="it serves: 'other'"):
        asyncio.run(_client([srv.base_url]).check_reachable())


# ---------------------------------------------------------------------------------------- entry point
def test_evaluate_stops_before_any_edit_when_the_model_is_not_served(tiny_models, dl3dv_parquet, tmp_path,
                                                                      make_double_server):
    srv = make_double_server(models=["someone-else/model-7b"])
    run_dir = tmp_path / "run"
    res = ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, srv.base_url, "double"), timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "'someone-else/model-7b'" in res.stderr and "mllm.model 'double'" in res.stderr, res.stderr[-3000:]
    assert srv.requests == [] and srv.model_lists >= 1  # asked what is served, asked nothing else
    assert not [p for p in run_dir.rglob("*") if p.is_file() and ("edit_cache" in p.parts or
                                                                  p.name.startswith("results"))]
