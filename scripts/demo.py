#!/usr/bin/env python
"""The embedded demo: everything runs on this machine's CPU with tiny RANDOM models, nothing downloaded.

    bash env_setup.sh && .venv/bin/python scripts/demo.py [--out demo_out]

Steps: build the tiny FLUX.2-klein and Qwen3-VL twins (scripts/make_tiny_models.py) and the embedded
procedural benchmark (scripts/build_benchmark.py: all 11 columns + SFT/GRPO training exports), start
the real local MLLM server (transformers serve on 127.0.0.1), edit one generated image through
diffusers' Flux2KleinPipeline and ask one question about original + edit, then run the whole chain
with the real entry scripts: SFT (prepare_data -> train_sft -> merge_lora) -> RL (prepare_data ->
train_grpo judged by the local server -> merge_lora) -> Edit-Verify-Reason evaluation of the
RL-merged editor on all 11 columns (tables, the 11-column table, HTML report); stop the server. The models are random: the edit is noise and the answer is gibberish; the point is
that every part of the real code path runs.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import os
import shutil
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

BANNER = "=" * 78
RANDOM_NOTE = ("NOTE: the editor and the MLLM in this demo have RANDOM weights (tiny twins built from configs).\n"
               "      Their edits are noise and their answers gibberish; the demo shows the code path runs.")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"etchr_scripts_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def generated_image(size: int = 128):
    """A small procedural scene: coloured shapes on a gradient (no downloads)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.6 + 0.3 * x, 0.7 + 0.2 * y, 0.9 - 0.3 * x * y], -1)
    img = Image.fromarray((base * 255).astype("uint8"))
    d = ImageDraw.Draw(img)
    d.rectangle([10, 70, 50, 110], fill=(200, 40, 40))
    d.ellipse([70, 20, 110, 60], fill=(40, 90, 200))
    d.polygon([(80, 110), (100, 75), (120, 110)], fill=(30, 160, 60))
    return img


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the step gets SIGKILL when the demo dies, even by SIGKILL (no step runs on orphaned)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_step(title: str, cmd: list[str]) -> None:
    """Run one entry script; it and everything it starts (own process group) end with this call."""
    import subprocess

    print(f"      $ {' '.join(str(c) for c in cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        rc = proc.wait()
    finally:  # normal end, failure, Ctrl-C or SIGTERM: the step's whole group goes (its leftovers too)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)
    print(f"      {title} done in {time.time() - t0:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output folder (models, data, runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--items", type=int, default=2, help="items per procedural family of the embedded benchmark")
    args = ap.parse_args(argv)
    # SIGTERM (a test's teardown, a scheduler) unwinds like Ctrl-C: the server and the running step stop.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t0 = time.time()
    print(BANNER, RANDOM_NOTE, BANNER, sep="\n", flush=True)

    # ---- 1. tiny models ------------------------------------------------------------------------
    print("[1/7] building tiny models ...", flush=True)
    dirs = _script("make_tiny_models").build(out / "tiny_models", seed=args.seed)
    flux_dir, qwen_dir = dirs["flux2-klein-tiny"], dirs["qwen3-vl-tiny"]

    # ---- 2. data -----------------------------------------------------------------------------------
    print(f"[2/7] building the embedded benchmark ({args.items} items per family, all 11 columns + training "
          "exports) ...", flush=True)
    bench = out / "benchmark"
    run_step("benchmark", [py, HERE / "build_benchmark.py", "--out", bench, "--n", args.items, "--seed", args.seed])

    # ---- 3. server ---------------------------------------------------------------------------------
    print("[3/7] starting transformers serve (tiny Qwen3-VL) on 127.0.0.1 ...", flush=True)
    srv_mod = _script("local_mllm_server")
    with srv_mod.LocalMLLMServer(qwen_dir, log_path=out / "server.log") as server:
        print(f"      up at {server.base_url} (pid {server.pid})", flush=True)
        endpoints = f"[{server.base_url}]"

        # ---- 4. one edit + one question, by hand ----------------------------------------------------
        import torch
        from diffusers import Flux2KleinPipeline
        from openai import OpenAI

        question = "Which shape is closest to the top-right corner? Answer with its colour."
        print("[4/7] one edit with Flux2KleinPipeline (4 steps, CFG 3.5) and one question about original + edit ...",
              flush=True)
        pipe = Flux2KleinPipeline.from_pretrained(flux_dir, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        image = generated_image()
        edit = pipe(image=image, prompt="Draw a red box for the question. " + question, height=128, width=128,
                    num_inference_steps=4, guidance_scale=3.5, generator=torch.Generator().manual_seed(126)).images[0]
        image.save(out / "original.png")
        edit.save(out / "edit.png")
        client = OpenAI(base_url=server.base_url, api_key=os.environ.get("ETCHR_MLLM_API_KEY", "EMPTY"), timeout=120)
        reply = client.chat.completions.create(
            model=server.model, max_tokens=24, temperature=0,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(image)}},
                {"type": "image_url", "image_url": {"url": data_uri(edit)}},
                {"type": "text", "text": question}]}])
        print(f"      question : {question}\n      edit     : {out / 'edit.png'}\n"
              f"      answer   : {reply.choices[0].message.content!r}", flush=True)

        # ---- 5. SFT: prepare -> train -> merge --------------------------------------------------------
        print("[5/7] SFT: prepare_data -> train_sft (LoRA, 4 steps) -> merge_lora ...", flush=True)
        sft_data, sft_run, sft_merged = out / "data" / "sft", out / "runs" / "sft", out / "models" / "sft-merged"
        run_step("SFT data", [py, REPO / "SFT" / "prepare_data.py", "--input", bench / "train" / "sft.parquet",
                              "--out", sft_data])
        run_step("SFT training", [py, REPO / "SFT" / "train_sft.py", "--config", REPO / "configs" / "sft" / "tiny_demo.yaml",
                                  f"model.pretrained_path={flux_dir}", f"data.csv={sft_data / 'sft_data.csv'}",
                                  f"train.run_dir={sft_run}"])
        shutil.rmtree(sft_merged, ignore_errors=True)  # merge_lora.py writes a fresh dir
        run_step("SFT merge", [py, REPO / "SFT" / "merge_lora.py", "--base", flux_dir, "--lora",
                               sft_run / "checkpoints" / "step-000004", "--out", sft_merged])

        # ---- 6. RL: prepare -> train (judged by the local server) -> merge ----------------------------
        print("[6/7] RL: prepare_data -> train_grpo (G=2, judge = the local server) -> merge_lora ...", flush=True)
        rl_data, rl_run, rl_merged = out / "data" / "rl", out / "runs" / "rl", out / "models" / "rl-merged"
        run_step("RL data", [py, REPO / "RL" / "prepare_data.py", "--input", bench / "train" / "grpo.parquet",
                             "--out", rl_data])
        run_step("RL training", [py, REPO / "RL" / "train_grpo.py", "--config", REPO / "configs" / "rl" / "tiny_demo.yaml",
                                 f"model.pretrained_path={sft_merged}", f"data.jsonl={rl_data / 'grpo.jsonl'}",
                                 f"train.run_dir={rl_run}", f"judge.endpoints={endpoints}",
                                 f"judge.model={server.model}"])
        shutil.rmtree(rl_merged, ignore_errors=True)
        run_step("RL merge", [py, REPO / "RL" / "merge_lora.py", "--base", sft_merged, "--lora",
                              rl_run / "checkpoints" / "step-000002", "--out", rl_merged])

        # ---- 7. Edit-Verify-Reason on all 11 columns -----------------------------------------------
        print("[7/7] Evaluation/evaluate.py: Edit-Verify-Reason + baseline on the 11 columns, RL-merged editor ...",
              flush=True)
        run_dir = out / "runs" / "eval"
        import json

        manifest = json.loads((bench / "manifest.json").read_text())
        task_paths = [f"tasks.{t}.path={bench / info['file']}" for t, info in manifest["tasks"].items()]
        run_step("evaluation", [py, REPO / "Evaluation" / "evaluate.py", "--config",
                                REPO / "configs" / "eval" / "embedded_benchmark.yaml", f"editor.pipe_path={rl_merged}",
                                f"mllm.model={server.model}", f"mllm.endpoints={endpoints}", f"run_dir={run_dir}",
                                # The random tiny judge never gives a CharXiv verdict, so every CharXiv item is a
                                # failure record; a real run would exit 3 on that, the demo reports it and goes on.
                                "max_failed_fraction=1.0", *task_paths])
    print(BANNER)
    print(f"chain    : {flux_dir} -> SFT {sft_merged} -> RL {rl_merged}")
    print(f"results  : {run_dir / 'results.jsonl'}")
    print(f"tables   : {run_dir / 'summary.md'}")
    print(f"report   : {run_dir / 'report.html'}  (open in a browser; works offline)")
    print(f"server stopped; demo took {time.time() - t0:.1f} s")
    print(RANDOM_NOTE)
    print(BANNER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
