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
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchlib import REPO, StubEndpoint, build_pipeline, evr_reply, load_script, make_tiny_models

sys.path.insert(0, str(REPO / "Evaluation"))


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
    work = Path(tempfile.mkdtemp())
    shapes = work / "flux2-klein-base-9b-shape"
    make_tiny_models().write_flux2_klein(shapes, 0, True)  # configs only; the editor fingerprints this dir
    pipe = build_pipeline(shapes)
    data = load_script("scripts/make_dl3dv_fixture.py", "etchr_make_dl3dv_fixture").make(
        str(work / "d.parquet"), n=a.items, size=(a.size, a.size))
    task = get_task("dl3dv")
    items = task.load(data, None)
    stub = StubEndpoint(a.latency, evr_reply)
    url = stub.url
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
    stub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
