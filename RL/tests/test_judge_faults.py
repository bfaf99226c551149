"""Judge client against fault servers on 127.0.0.1: a slow drip, a wrong key, an unknown model, 429/503 with
Retry-After, a request deadline; the start-up check's policy; the config keys; and train_grpo.py stopping
at start when the judge does not serve the configured model.

The elapsed-time checks are behavioural bounds (a drip answer would take minutes; a Retry-After of an hour
is cut to the cap), not performance assertions: their slack is seconds."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etchr_rl.config import ConfigError, load_rl_config
from etchr_rl.judge import JudgeClient, JudgeEndpointError, JudgeUnreachable, retry_after_s, server_message, user_message

RL_DIR = Path(__file__).resolve().parents[1]


def _client(urls, model="double", **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return JudgeClient(urls, model, **kw)


def _ask(client, text="hello"):
    async def go():
        try:
            return await client.request(user_message([], text), max_tokens=4, temperature=0.0)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _check(client):
    asyncio.run(client.check())


# ---------------------------------------------------------------------------------------- deadlines
def test_slow_drip_is_cut_at_the_attempt_deadline(make_double_server):
    srv = make_double_server(rules=[("hello", "drip")], drip_bytes_per_s=2.0)  # ~300 bytes: minutes at 2 B/s
    c = _client([srv.base_url], timeout_s=1.0, max_retries=1)
    t0 = time.monotonic()
    r = _ask(c)
    elapsed = time.monotonic() - t0
    assert r.text is None and r.error == "timeout after 1 s" and r.attempts == 2 and len(srv.requests) == 2
    assert elapsed < 1.0 * 2 + 3.0, elapsed  # two attempts of 1 s, not two drips of minutes
    assert c.stats()["failures"] == 1 and "timeout after 1 s" in c.errors[0]


def test_request_deadline_caps_all_attempts(make_double_server):
    srv = make_double_server(rules=[("hello", "drip")])
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], timeout_s=1.0, max_retries=5, request_deadline_s=1.5))
    elapsed = time.monotonic() - t0
    # 1 s, then the 0.5 s left; no third attempt although 5 retries were allowed
    assert r.text is None and r.attempts == 2 and len(srv.requests) == 2, r
    assert r.error.startswith("timeout after 0.") and r.error.endswith("request deadline of 1.5 s reached"), r.error
    assert elapsed < 1.5 + 2.0, elapsed


# ---------------------------------------------------------------------------------------- server reasons
def test_unknown_model_records_the_servers_message(double_server):
    c = _client([double_server.base_url], model="no-such-model")
    r = _ask(c)
    assert r.error == "HTTP 404: The model `no-such-model` does not exist.", r.error
    assert r.attempts == 1 and len(double_server.requests) == 1  # a 404 is not retried
    assert "The model `no-such-model` does not exist." in c.errors[0]


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
    c = _client([srv.base_url], max_retries=3, backoff_s=0.01)
    t0 = time.monotonic()
    r = _ask(c)
    assert r.ok and r.text == "ok" and r.attempts == 3 and c.stats()["retries"] == 2
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
    assert retry_after_s({"retry-after": "-4"}, now) == 0.0
    assert retry_after_s({"retry-after": email.utils.formatdate(now + 7, usegmt=True)}, now) == 7.0
    assert retry_after_s({"retry-after": email.utils.formatdate(now - 7, usegmt=True)}, now) == 0.0  # past
    for bad in ("soon", "nan", "inf", ""):
        assert retry_after_s({"retry-after": bad}, now) is None, bad
    assert retry_after_s({}, now) is None


# ---------------------------------------------------------------------------------------- start-up check
def test_check_fails_on_a_wrong_key_naming_the_status(make_double_server):
    srv = make_double_server(api_key="right-key")
    with pytest.raises(JudgeEndpointError) as err:
        _check(_client([srv.base_url]))  # no key: "EMPTY"
    first = str(err.value).splitlines()[0]
    assert srv.base_url in first and "HTTP 401: Unauthorized" in first and "$ETCHR_JUDGE_API_KEY" in first, first
    _check(_client([srv.base_url], api_key="right-key"))


def test_check_fails_on_an_unknown_model_listing_the_served_names(make_double_server):
    srv = make_double_server(models=["served-a", "served-b"])
    with pytest.raises(JudgeUnreachable) as err:  # the former name still catches it (train_grpo.main)
        _check(_client([srv.base_url], model="wanted"))
    first = str(err.value).splitlines()[0]
    assert "judge.model 'wanted'" in first and srv.base_url in first and "'served-a', 'served-b'" in first, first
    assert srv.requests == []


def test_check_stops_on_a_wrong_model_on_any_endpoint(make_double_server):
    good, bad = make_double_server(), make_double_server(models=["other"])
    with pytest.raises(JudgeEndpointError) as err:
        _check(_client([good.base_url, bad.base_url]))
    assert bad.base_url in str(err.value) and good.base_url not in str(err.value)


def test_check_drops_an_unreachable_endpoint_of_several(make_double_server, dead_url, caplog):
    live, dead = make_double_server(), dead_url()
    c = _client([dead, live.base_url])
    with caplog.at_level(logging.WARNING, logger="etchr_rl.judge"):
        _check(c)
    assert c.endpoints == [live.base_url] and list(c.dropped) == [dead]
    assert any(dead in rec.getMessage() and "dropped" in rec.getMessage() for rec in caplog.records)
    assert [e["id"] for e in c.served[live.base_url]][0] == "double"
    r = _ask(c)  # the dead endpoint costs no attempt any more
    assert r.ok and r.attempts == 1 and r.endpoint == live.base_url


# ---------------------------------------------------------------------------------------- config
def test_config_keys_reach_the_client():
    base = ["model.pretrained_path=/m", "data.jsonl=/d.jsonl"]
    c = JudgeClient.from_config(load_rl_config(None, base).judge)
    assert (c.connect_timeout_s, c.request_deadline_s, c.retry_after_max_s) == (10.0, None, 60.0)
    cfg = load_rl_config(None, base + ["judge.connect_timeout_s=3", "judge.request_deadline_s=90",
                                       "judge.retry_after_max_s=5"])
    c = JudgeClient.from_config(cfg.judge)
    assert (c.connect_timeout_s, c.request_deadline_s, c.retry_after_max_s) == (3.0, 90.0, 5.0)
    for bad in ("judge.connect_timeout_s=0", "judge.request_deadline_s=-1", "judge.retry_after_max_s=-1"):
        with pytest.raises(ConfigError, match="connect_timeout_s > 0"):
            load_rl_config(None, base + [bad])


# ---------------------------------------------------------------------------------------- entry point
def test_train_grpo_stops_at_start_when_the_judge_model_is_not_served(tiny_models, tmp_path, make_double_server):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "src.png")
    data = tmp_path / "grpo.jsonl"
    data.write_text(json.dumps({"id": "a", "instruction": "Draw a red box for the question. What colour is it?",
                                "image": "src.png", "qa_list": [{"question": "What colour is it?",
                                                                 "answer": "grey"}]}) + "\n")
    srv = make_double_server(models=["someone-else/judge-8b"])
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, str(RL_DIR / "train_grpo.py"), "--config",
                          str(RL_DIR.parent / "configs" / "rl" / "tiny_demo.yaml"),
                          f"model.pretrained_path={tiny_models.flux}", f"data.jsonl={data}", f"train.run_dir={run_dir}",
                          f"judge.endpoints=[{srv.base_url}]", "reward.weights={guidance: 1.0}"],
                         capture_output=True, text=True, timeout=300, cwd=RL_DIR.parent,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "judge.model 'tiny_models/qwen3-vl-tiny' is not served" in res.stderr, res.stderr[-3000:]
    assert "'someone-else/judge-8b'" in res.stderr
    assert srv.requests == [] and srv.model_lists >= 1  # asked what is served, asked nothing else
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
