#!/usr/bin/env python
"""bench_eval_e2e: N items through Edit-Verify-Reason against an endpoint with a fixed latency.

    python scripts/bench/bench_eval_e2e.py [--items 6] [--steps 10] [--latency 2.0] [--out results.jsonl]

Same process, same card, same 9B-shape random-weight editor (bf16), same items and seeds:
  reference  the reference's loop: per item, edit -> verify -> reason, one after another (plus the
             baseline request, so both sides do the same work)
  ours       Evaluation's run_task: the GPU edits the next item while earlier requests are in flight
and the edit-only time (the reference loop's edit seconds). Target: ours <= 1.1x edit-only.
The endpoint is a local stub answering after --latency seconds (verify: \\boxed{1}, reason:
\\boxed{A}), so the timing isolates the scheduling; it stands in for a vLLM server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Evaluation"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def stub_server(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
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
            text = "\\boxed{1}" if "judge" in json.dumps(body) else "\\boxed{A}"
            self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}]})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--latency", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import diffusers
    from openai import OpenAI

    from etchr_eval.client import MLLMClient, image_data_uri
    from etchr_eval.editor import Editor, item_seed
    from etchr_eval.extract import verify_verdict
    from etchr_eval.loop import LoopSettings, edit_prompt, reason_messages, run_task, verify_messages
    from etchr_eval.results import ResultStore
    from etchr_eval.tasks import get_task

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    emit({"header": {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat(),
                     "items": a.items, "steps": a.steps, "size": a.size, "latency_s": a.latency}})
    bench_edit = _load("bench_edit", Path(__file__).with_name("bench_edit.py"))
    work = Path(tempfile.mkdtemp())
    shapes = work / "flux2-klein-base-9b-shape"
    _load("make_tiny_models", REPO / "scripts" / "make_tiny_models.py").write_flux2_klein(shapes, 0, True)
    pipe = bench_edit.build_pipeline(shapes)
    data = _load("fx", REPO / "scripts" / "make_dl3dv_fixture.py").make(str(work / "d.parquet"), n=a.items,
                                                                          size=(a.size, a.size))
    task = get_task("dl3dv")
    items = task.load(data, None)
    srv = stub_server(a.latency)
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    cfg = SimpleNamespace(pipe_path=str(shapes), lora_path=None, lora_scale=1.0, lora_alpha=None, device="cuda",
                          dtype="bf16", steps=a.steps, guidance=3.5, seed=126, per_item_seed=True,
                          max_area=a.size * a.size, multiple_of=16, size_mode="keep_aspect", max_sequence_length=512,
                          compile=False, step_cache="none", step_cache_interval=2, step_cache_warmup=4)

    def editor(cache: str) -> Editor:
        e = Editor(cfg, work / cache)
        e._pipe = pipe  # the random-weight pipeline built above (nothing on disk to load)
        return e

    editor("warm").edit(items[0].image(), "warm up", 0)  # kernels, allocator

    # ---- reference-style loop: everything in sequence
    client = OpenAI(base_url=url, api_key="EMPTY")
    ed = editor("ref")
    t0, edit_s = time.time(), 0.0
    for it in items:
        img = it.image()
        e0 = time.time()
        out, _, _, _ = ed.edit(img, edit_prompt(task, it), item_seed(126, task.name, it.id))
        torch.cuda.synchronize()
        edit_s += time.time() - e0
        o, d = image_data_uri(img), image_data_uri(out)
        v = client.chat.completions.create(model="stub", messages=verify_messages(task, it, o, d), max_tokens=8)
        accepted = verify_verdict(v.choices[0].message.content)
        client.chat.completions.create(model="stub", messages=reason_messages(task, it, [o, d] if accepted else [o]),
                                       max_tokens=8)
        client.chat.completions.create(model="stub", messages=reason_messages(task, it, [o]), max_tokens=8)
    ref_s = time.time() - t0
    emit({"variant": "reference_sequential", "wall_s": round(ref_s, 2), "edit_only_s": round(edit_s, 2),
          "ratio_to_edit_only": round(ref_s / edit_s, 3)})

    # ---- ours: pipelined run_task
    async def ours():
        c = MLLMClient([url], "stub", concurrency=32, max_retries=0)
        try:
            return await run_task(task, items, editor("ours"), c, ResultStore(work / "run"),
                                  LoopSettings(run_dir=str(work / "run")))
        finally:
            await c.aclose()

    t0 = time.time()
    stats = asyncio.run(ours())
    ours_s = time.time() - t0
    emit({"variant": "ours_pipelined", "wall_s": round(ours_s, 2), "edit_only_s": round(edit_s, 2),
          "ratio_to_edit_only": round(ours_s / edit_s, 3), "speedup_vs_reference": round(ref_s / ours_s, 3),
          "tail_wait_s": round(stats.tail_wait_s, 2), "failed": stats.failed, "edits": stats.edits})
    srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
