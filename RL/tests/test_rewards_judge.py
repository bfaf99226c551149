"""Judge rewards against the test double: verdicts, None on every kind of fault, the abort threshold,
and the exact requests (images per family in both modes, prompt texts, sampling) frozen as snapshots.

Regenerate the snapshots after an intended protocol change with ETCHR_UPDATE_SNAPSHOTS=1 and review the diff.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from etchr_rl.judge import JudgeClient
from etchr_rl.prompts import load_prompt
from etchr_rl.rewards import (RewardConfigError, RewardFailure, RewardInput, check_failures, compute_rewards,
                              compute_rewards_sync)

SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
PREFIX = {"box": "Draw a red box for the question. ", "maze": "Draw the shortest path of the maze in blue. ",
          "jigsaw": "Draw the original image after restoring this jigsaw puzzle task. ",
          "3d": "Imagine a new perspective of the original image that helps answer the question. "}
ANSWER_NEEDLE = "Answer the question shortly"  # only in the guidance round-1 prompt
JUDGE_NEEDLE = "You are an expert at evaluating correctness"  # only in the guidance round-2 prompt


def cfg(mode="original_and_edited"):
    return SimpleNamespace(reward=SimpleNamespace(correctness_images=mode))


def inputs(families=("box", "maze", "jigsaw", "3d")) -> list[RewardInput]:
    """One rollout per family; original and edit are distinct solid colours (tells them apart in requests)."""
    out = []
    for k, fam in enumerate(families):
        q = f"Question {fam}: what is shown? {{not a field}}"  # braces in data must not break str.format
        out.append(RewardInput(instruction=PREFIX[fam] + q, question=q, answer=f"answer-{fam}",
                               original=Image.new("RGB", (8, 8), (10 * k, 0, 0)),
                               edited=Image.new("RGB", (8, 8), (0, 10 * k + 5, 0)), meta={}))
    return out


def judge(srv_or_urls, **kw) -> JudgeClient:
    urls = srv_or_urls if isinstance(srv_or_urls, list) else [srv_or_urls.base_url]
    kw.setdefault("max_retries", 1)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 2.0)
    return JudgeClient(urls, "Qwen/Qwen3-VL-8B-Instruct", **kw)


def run(xs, names, client, config=None):
    return compute_rewards_sync(xs, names, client, config if config is not None else cfg())


# ----------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------
def test_guidance_two_rounds_and_verdicts(make_double_server):
    srv = make_double_server(rules=[(ANSWER_NEEDLE, "The answer is B."),
                                    ("answer-box", "1"), ("answer-maze", " 1\n"), ("answer-jigsaw", "0"),
                                    ("answer-3d", "yes")])
    extras: dict = {}
    xs = inputs()
    client = judge(srv)
    out = asyncio.run(compute_rewards(xs, ["guidance"], client, cfg(), extras=extras))
    assert out == {"guidance": [1.0, 1.0, 0.0, 0.0]}
    assert extras["guidance/response"] == ["The answer is B."] * 4
    assert len(srv.requests) == 8 and client.stats()["requests"] == 8


def test_correctness_verdicts_by_family(make_double_server):
    srv = make_double_server(rules=[("marked with a red box", "1"), ("valid maze path", "0"),
                                    ("correct restoration", "1"), ("novel perspective", "maybe")])
    assert run(inputs(), ["correctness"], judge(srv)) == {"correctness": [1.0, 0.0, 1.0, 0.0]}


def test_both_rewards_run_concurrently(make_double_server):
    srv = make_double_server(delay_s=0.3)
    import time

    t0 = time.monotonic()
    out = run(inputs(), ["guidance", "correctness"], judge(srv, concurrency=64))
    # 12 requests of 0.3 s: sequential would take 3.6 s; the two guidance rounds chain (2 x 0.3 s).
    assert out == {"guidance": [1.0] * 4, "correctness": [1.0] * 4}
    assert time.monotonic() - t0 < 2.4 and srv.max_in_flight >= 4


# ----------------------------------------------------------------------------------------------
# Faults -> None, never 0
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("action", ["500", "malformed", "garbage", "close", "timeout"])
def test_a_failed_request_gives_none(make_double_server, action):
    # The maze row's correctness request and the box row's guidance round 2 fail; everything else answers "1".
    srv = make_double_server(rules=[("valid maze path", action), ("answer-box", action)], timeout_sleep_s=1.5)
    client = judge(srv, timeout_s=0.4)
    out = run(inputs(), ["guidance", "correctness"], client)
    assert out["correctness"] == [1.0, None, 1.0, 1.0]
    assert out["guidance"] == [None, 1.0, 1.0, 1.0]
    assert client.stats()["failures"] == 2 and len(client.errors) == 2


def test_guidance_round_one_failure_skips_round_two(make_double_server):
    srv = make_double_server(rules=[(ANSWER_NEEDLE + "", "500")])
    out = run(inputs(("box",)), ["guidance"], judge(srv, max_retries=0))
    assert out == {"guidance": [None]}
    assert len(srv.requests) == 1  # no verdict is asked for a missing answer


def test_refused_connection_gives_none_and_aborts(dead_url):
    client = judge([dead_url()], max_retries=1)
    out = run(inputs(), ["guidance", "correctness"], client)
    assert out == {"guidance": [None] * 4, "correctness": [None] * 4}
    with pytest.raises(RewardFailure) as err:
        check_failures(out, 0.2, judge=client)
    assert "100.0%" in str(err.value) and "connection error" in str(err.value)


def test_abort_threshold_on_a_partly_failing_judge(make_double_server):
    # 2 of 8 rewards fail (25 %): fine at max_failure_rate 0.25, an abort at 0.2.
    srv = make_double_server(rules=[("valid maze path", "500"), ("novel perspective", "500")])
    out = run(inputs(), ["guidance", "correctness"], judge(srv, max_retries=0))
    assert out["correctness"] == [1.0, None, 1.0, None]
    assert check_failures(out, 0.25) == 0.25
    with pytest.raises(RewardFailure):
        check_failures(out, 0.2)


def test_unroutable_instruction_raises_before_any_request(double_server):
    x = inputs(("box",))[0]
    x.instruction = "Describe the image."
    with pytest.raises(RewardConfigError, match="Describe the image"):
        run([x], ["correctness"], judge(double_server))
    assert double_server.requests == []


# ----------------------------------------------------------------------------------------------
# Snapshots of the exact requests
# ----------------------------------------------------------------------------------------------
def normalise(requests: list[dict]) -> list[dict]:
    out = []
    for req in requests:
        req = {k: v for k, v in req.items() if not k.startswith("_")}
        out.append(json.loads(URI.sub("<png image>", json.dumps(req, sort_keys=True))))
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


CASES = {
    "guidance": (["guidance"], "original_and_edited"),
    "correctness_original_and_edited": (["correctness"], "original_and_edited"),
    "correctness_edited_only": (["correctness"], "edited_only"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_request_snapshot(case, make_double_server):
    names, mode = CASES[case]
    srv = make_double_server(rules=[(ANSWER_NEEDLE, "The answer is B.")])
    run(inputs(), names, judge(srv), cfg(mode))
    got = normalise(srv.requests)
    path = SNAPSHOTS / f"{case}.json"
    if os.environ.get("ETCHR_UPDATE_SNAPSHOTS") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), f"missing snapshot {path}; run with ETCHR_UPDATE_SNAPSHOTS=1"
    assert got == json.loads(path.read_text())


def _parts(req):
    content = req["messages"][0]["content"]
    images = [c for c in content if c["type"] == "image_url"]
    texts = [c["text"] for c in content if c["type"] == "text"]
    assert content[: len(images)] == images  # images first, then the text
    assert len(req["messages"]) == 1 and req["messages"][0]["role"] == "user" and len(texts) == 1
    return images, texts[0]


def _family(text):
    for fam in PREFIX:
        if f"Question {fam}:" in text or f"answer-{fam}" in text:
            return fam
    return next(f for f, needle in [("maze", "valid maze path"), ("jigsaw", "correct restoration")] if needle in text)


def test_snapshots_say_what_the_protocol_says():
    """Hand-checked facts of the frozen files, so that a regenerated snapshot cannot drift silently."""
    load = lambda case: json.loads((SNAPSHOTS / f"{case}.json").read_text())  # noqa: E731
    guidance = load("guidance")
    assert len(guidance) == 8
    for req in guidance:
        assert req["model"] == "Qwen/Qwen3-VL-8B-Instruct"
        images, text = _parts(req)
        fam = _family(text)
        q = f"Question {fam}: what is shown? {{not a field}}"
        if ANSWER_NEEDLE in text:
            assert len(images) == 2 and images[0]["image_url"]["url"] == "<png image>"
            assert text == load_prompt("reward_guidance_answer_v1").format(question=q)
            assert (req["temperature"], req["top_p"], req["top_k"], req["max_tokens"]) == (0.7, 0.8, 20, 1024)
        else:
            assert images == []
            assert text == load_prompt("reward_guidance_judge_v1").format(question=q, gt_answer=f"answer-{fam}",
                                                                          response="The answer is B.")
            assert (req["temperature"], req["max_tokens"]) == (0, 4) and "top_p" not in req and "top_k" not in req
    expected_images = {"original_and_edited": {"box": 2, "maze": 1, "jigsaw": 2, "3d": 2},
                       "edited_only": {"box": 1, "maze": 1, "jigsaw": 1, "3d": 1}}
    for mode, counts in expected_images.items():
        reqs = load(f"correctness_{mode}")
        assert len(reqs) == 4
        seen = {}
        for req in reqs:
            images, text = _parts(req)
            fam = _family(text)
            q = f"Question {fam}: what is shown? {{not a field}}"
            assert text == load_prompt(f"reward_correct_{fam}_v1").format(question=q)
            assert (req["temperature"], req["max_tokens"]) == (0.7, 4) and "top_p" not in req
            seen[fam] = len(images)
        assert seen == counts, mode


def test_correctness_sends_original_then_edited(make_double_server):
    """Order matters: the prompts call the edit 'the second image'."""
    from etchr_rl.judge import png_data_uri

    srv = make_double_server()
    xs = inputs(("jigsaw",))
    run(xs, ["correctness"], judge(srv))
    urls = [c["image_url"]["url"] for c in srv.requests[0]["messages"][0]["content"] if c["type"] == "image_url"]
    assert urls == [png_data_uri(xs[0].original), png_data_uri(xs[0].edited)]


def test_guidance_answer_length_override_for_cpu_runs(make_double_server):
    srv = make_double_server()
    config = SimpleNamespace(reward=SimpleNamespace(correctness_images="original_and_edited",
                                                    guidance_answer_max_tokens=16))
    run(inputs(("box",)), ["guidance"], judge(srv), config)
    assert sorted(r["max_tokens"] for r in srv.requests) == [4, 16]  # round 2 keeps the protocol's 4
