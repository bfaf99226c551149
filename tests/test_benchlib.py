"""scripts/bench/benchlib.py: the pieces the GPU benchmarks share that run without a GPU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))

import benchlib  # noqa: E402


def test_stub_endpoint_answers_after_its_latency():
    stub = benchlib.StubEndpoint(0.3, benchlib.evr_reply)
    try:
        assert httpx.get(f"{stub.url}/models").json()["data"][0]["id"] == "stub"

        def ask(text: str) -> tuple[str, float]:
            t0 = time.time()
            r = httpx.post(f"{stub.url}/chat/completions", timeout=10,
                           json={"model": "stub", "messages": [{"role": "user", "content": text}]})
            return r.json()["choices"][0]["message"]["content"], time.time() - t0

        verdict, waited = ask("You are a judge: does the edit help?")
        assert verdict == "\\boxed{1}" and waited >= 0.3
        assert ask("Which object is left? A or B")[0] == "\\boxed{A}"
    finally:
        stub.close()


def test_load_script_imports_once_by_name():
    mod = benchlib.make_tiny_models()
    assert hasattr(mod, "write_flux2_klein") and benchlib.make_tiny_models() is mod
