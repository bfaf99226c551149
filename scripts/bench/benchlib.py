"""What the GPU benchmarks share: loading repo scripts, the bf16 matmul ceiling, the FLUX.2-klein-base-9B
-shape pipeline with random weights, DiT forward inputs at an edit's token counts, and a fixed-latency
OpenAI-compatible stub endpoint. (scripts/bench/ is on sys.path when a benchmark runs as a script.)
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]


def load_script(path: str | Path, name: str):
    """Import a repo script (not a package module) by path, once per process."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_tiny_models():
    return load_script("scripts/make_tiny_models.py", "etchr_make_tiny_models")


def matmul_ceiling(n: int = 8192, reps: int = 20) -> float:
    """bf16 TFLOP/s of an n^3 matmul on this card (median of `reps`, CUDA events)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def build_pipeline(shapes: Path):
    """The pipeline of the configs in `shapes`, random bf16 weights, created directly on the GPU."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            transformer = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(shapes / "transformer"))
            vae = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(shapes / "vae"))
            text_encoder = Qwen3ForCausalLM(AutoConfig.from_pretrained(shapes / "text_encoder"))
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():  # BatchNorm stats of a real VAE are O(1); keep the latent scale sane
        vae.bn.running_var.fill_(1.0)
        vae.bn.running_mean.zero_()
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(shapes / "scheduler"), vae=vae,
                              text_encoder=text_encoder.eval(), tokenizer=AutoTokenizer.from_pretrained(shapes / "tokenizer"),
                              transformer=transformer.eval(), is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def full_shape_pipeline(work: Path | None = None):
    """FLUX.2-klein-base-9B at full shape (configs from make_tiny_models --full-shape, nothing
    downloaded) with random bf16 weights on the GPU."""
    shapes = Path(work or tempfile.mkdtemp()) / "flux2-klein-base-9b-shape"
    make_tiny_models().write_flux2_klein(shapes, 0, True)  # configs + tokenizer only
    return build_pipeline(shapes)


def dit_inputs(transformer, size: int, requires_grad: bool = False) -> dict:
    """Keyword inputs of one DiT forward at a size x size edit's token counts (512 text + target +
    reference tokens), batch 1, on the transformer's device and dtype."""
    n = (size // 16) ** 2
    dev, dt = transformer.device, transformer.dtype
    return {"hidden_states": torch.randn(1, 2 * n, transformer.config.in_channels, device=dev, dtype=dt,
                                         requires_grad=requires_grad),
            "img_ids": torch.zeros(1, 2 * n, 4, device=dev, dtype=torch.long),
            "encoder_hidden_states": torch.randn(1, 512, transformer.config.joint_attention_dim, device=dev, dtype=dt),
            "txt_ids": torch.zeros(1, 512, 4, device=dev, dtype=torch.long),
            "timestep": torch.full((1,), 0.5, device=dev, dtype=dt), "guidance": None, "return_dict": False}


class StubEndpoint:
    """An OpenAI-compatible endpoint in a thread: GET /v1/models lists "stub"; every chat completion
    answers reply(request body) after `latency` seconds."""

    def __init__(self, latency: float, reply: Callable[[dict], str]):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, body: dict):
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "stub", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                time.sleep(latency)
                self._send({"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": reply(body)}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True, name="stub-endpoint").start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def evr_reply(body: dict) -> str:
    """Edit-Verify-Reason stub answers: the verify (judge) prompt accepts, every question gets A."""
    return "\\boxed{1}" if "judge" in json.dumps(body) else "\\boxed{A}"
