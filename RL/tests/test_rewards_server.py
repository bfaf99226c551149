"""Guidance and correctness rewards against the REAL local OpenAI-compatible server (transformers serve,
tiny random Qwen3-VL): the requests are accepted and every reward is a verdict, never None."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from etchr_rl.judge import JudgeClient
from etchr_rl.rewards import RewardInput, check_failures, compute_rewards

pytestmark = pytest.mark.server


def test_guidance_and_correctness_on_the_real_server(mllm_server):
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # noqa: E731
    xs = [RewardInput("Draw a red box for the question. What colour is the cup?", "What colour is the cup?", "red",
                      image(), image()),
          RewardInput("Draw the shortest path of the maze in blue. Give the moves.", "Give the moves.", "D,R",
                      image(), image())]
    # transformers serve rejects top_k (vLLM reads it): drop_params. A random model never stops, so the
    # 1024-token answer is shortened here; the protocol values are frozen by the snapshot tests.
    judge = JudgeClient([mllm_server.base_url], mllm_server.model, drop_params=["top_k"], timeout_s=300,
                        max_retries=1, backoff_s=0.5)
    cfg = SimpleNamespace(reward=SimpleNamespace(correctness_images="original_and_edited",
                                                 guidance_answer_max_tokens=16))
    extras: dict = {}

    async def go():
        try:
            await judge.check_reachable()
            return await compute_rewards(xs, ["guidance", "correctness"], judge, cfg, extras=extras)
        finally:
            await judge.aclose()

    out = asyncio.run(go())
    assert list(judge.errors) == []
    for name in ("guidance", "correctness"):
        assert len(out[name]) == 2 and all(v in (0.0, 1.0) for v in out[name]), out
    assert all(isinstance(r, str) and r for r in extras["guidance/response"])
    stats = judge.stats()
    assert stats["requests"] == 6 and stats["failures"] == 0 and stats["latency_p95_s"] > 0
    assert check_failures(out, 0.0) == 0.0
