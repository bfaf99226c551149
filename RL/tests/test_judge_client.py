"""Judge client under injected faults: HTTP 500 / 400, timeout, malformed body, garbage, refused connection;
round robin, concurrency limit, stats, API key, and reuse across event loops."""

from __future__ import annotations

import asyncio
import time

import pytest
from omegaconf import OmegaConf

from etchr_rl.config import load_rl_config
from etchr_rl.judge import JudgeClient, JudgeUnreachable, percentile, png_data_uri, user_message


def _client(urls, **kw):
    kw.setdefault("max_retries", 2)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return JudgeClient(urls, "double", **kw)


def _ask(client, text="hello", **sampling):
    async def go():
        try:
            return await client.request(user_message([], text), max_tokens=4, temperature=0.0, **sampling)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_success_and_stats(double_server):
    c = _client([double_server.base_url])
    r = _ask(c)
    assert r.ok and r.text == "1" and r.attempts == 1 and r.endpoint == double_server.base_url
    s = c.stats()
    assert (s["requests"], s["failures"], s["retries"], s["failure_rate"]) == (1, 0, 0, 0.0)
    assert 0 < s["latency_mean_s"] == s["latency_p95_s"] < 2
    c.reset_stats()
    assert c.stats()["requests"] == 0


@pytest.mark.parametrize("action,needle", [
    ("500", "HTTP 500: injected server error"), ("malformed", "no choices"), ("garbage", "malformed reply"), ("close", "connection error"),
])
def test_faults_are_retried_then_give_none(make_double_server, action, needle):
    srv = make_double_server(rules=[("hello", action)])
    c = _client([srv.base_url])
    r = _ask(c)
    assert r.text is None and needle in r.error, r.error
    assert r.attempts == 3 and len(srv.requests) == 3  # 1 try + 2 retries, each reached the server
    s = c.stats()
    assert (s["requests"], s["failures"], s["retries"]) == (1, 1, 2)
    assert len(c.errors) == 1 and needle in c.errors[0] and srv.base_url in c.errors[0]


def test_a_retry_can_succeed(make_double_server):
    srv = make_double_server(rules=[("hello", ["500", "0"])])
    c = _client([srv.base_url])
    r = _ask(c)
    assert r.ok and r.text == "0" and r.attempts == 2
    assert c.stats()["retries"] == 1 and c.stats()["failures"] == 0


def test_timeout(make_double_server):
    srv = make_double_server(rules=[("hello", "timeout")], timeout_sleep_s=2)
    t0 = time.monotonic()
    r = _ask(_client([srv.base_url], timeout_s=0.4, max_retries=1))
    assert r.text is None and r.error == "timeout after 0.4 s" and r.attempts == 2
    assert time.monotonic() - t0 < 1.8  # bounded: 2 attempts of 0.4 s plus a short backoff


def test_client_errors_are_not_retried(make_double_server):
    srv = make_double_server(rules=[("hello", "400")])
    r = _ask(_client([srv.base_url]))
    assert r.text is None and r.error == "HTTP 400: injected bad request" and r.attempts == 1 and len(srv.requests) == 1


def test_round_robin_and_failover(make_double_server, dead_url):
    a, b = make_double_server(default_answer="a"), make_double_server(default_answer="b")
    c = _client([a.base_url, b.base_url])

    async def many():
        try:
            return [await c.complete(user_message([], f"q{i}"), max_tokens=4, temperature=0) for i in range(4)]
        finally:
            await c.aclose()

    assert asyncio.run(many()) == ["a", "b", "a", "b"]
    # A retry moves to the next endpoint: the dead one costs one attempt.
    dead = dead_url()
    r = _ask(_client([dead, a.base_url]))
    assert r.ok and r.attempts == 2 and r.endpoint == a.base_url
    r2 = _ask(_client([dead], max_retries=1))
    assert r2.text is None and "connection error" in r2.error


def test_concurrency_limit(make_double_server):
    srv = make_double_server(delay_s=0.2)
    c = _client([srv.base_url], concurrency=2)

    async def many():
        try:
            return await asyncio.gather(*[c.complete(user_message([], f"q{i}"), max_tokens=4, temperature=0)
                                          for i in range(6)])
        finally:
            await c.aclose()

    t0 = time.monotonic()
    assert asyncio.run(many()) == ["1"] * 6
    assert srv.max_in_flight == 2 and time.monotonic() - t0 >= 0.55  # 3 waves of 0.2 s


def test_sampling_parameters_reach_the_server_and_drop_params(make_double_server):
    srv = make_double_server()
    _ask(_client([srv.base_url]), top_p=0.8, extra_body={"top_k": 20})
    body = srv.requests[-1]
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (4, 0.0, 0.8, 20)
    _ask(_client([srv.base_url], drop_params=["top_k"]), top_p=0.8, extra_body={"top_k": 20})
    assert "top_k" not in srv.requests[-1] and srv.requests[-1]["top_p"] == 0.8


def test_images_go_first_as_png_data_uris():
    from PIL import Image

    uri = png_data_uri(Image.new("RGB", (4, 4), (0, 0, 255)))
    assert uri.startswith("data:image/png;base64,")
    msg = user_message([uri, uri], "text")
    assert [p["type"] for p in msg[0]["content"]] == ["image_url", "image_url", "text"]


def test_api_key_from_environment(monkeypatch, double_server):
    monkeypatch.setenv("MY_JUDGE_KEY", "sekrit")
    c = JudgeClient([double_server.base_url], "m", api_key_env="MY_JUDGE_KEY", max_retries=0)
    assert c.api_key == "sekrit"
    _ask(c)
    assert double_server.requests[-1]["_authorization"] == "Bearer sekrit"
    monkeypatch.delenv("MY_JUDGE_KEY")
    assert JudgeClient(["http://x/v1"], "m", api_key_env="MY_JUDGE_KEY").api_key == "EMPTY"


def test_from_config(monkeypatch):
    monkeypatch.setenv("ETCHR_JUDGE_API_KEY", "k")
    cfg = load_rl_config(None, ["model.pretrained_path=/m", "data.jsonl=/d.jsonl",
                                "judge.endpoints=[http://a:1/v1/,http://b:2/v1]", "judge.concurrency=7"])
    c = JudgeClient.from_config(cfg.judge)
    assert c.endpoints == ["http://a:1/v1", "http://b:2/v1"] and c.concurrency == 7 and c.api_key == "k"
    assert (c.timeout_s, c.max_retries, c.model) == (120.0, 3, "Qwen/Qwen3-VL-8B-Instruct")
    assert c.drop_params == frozenset()
    # A judge section that has the key (the CPU setting for transformers serve).
    extended = OmegaConf.create({**OmegaConf.to_container(cfg.judge), "drop_params": ["top_k"]})
    assert JudgeClient.from_config(extended).drop_params == {"top_k"}
    with pytest.raises(ValueError, match="no endpoints"):
        JudgeClient([], "m")


def test_survives_one_event_loop_per_step(double_server):
    """The trainer may asyncio.run() every step: the client rebinds its pools and semaphore."""
    c = _client([double_server.base_url])
    for _ in range(2):
        assert asyncio.run(c.complete(user_message([], "q"), max_tokens=4, temperature=0)) == "1"
    assert c.stats()["failures"] == 0


def test_check_reachable(double_server, dead_url):
    asyncio.run(_client([dead_url(), double_server.base_url]).check_reachable())  # one live endpoint is enough
    dead = [dead_url(), dead_url()]
    with pytest.raises(JudgeUnreachable) as err:
        asyncio.run(_client(dead).check_reachable())
    assert dead[0] in str(err.value) and dead[1] in str(err.value)


def test_percentile():
    assert percentile([], 95) == 0.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert percentile([1.0, 2.0, 10.0], 50) == 2.0
