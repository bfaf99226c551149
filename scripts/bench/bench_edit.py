#!/usr/bin/env python
"""bench_edit: edits with the reference protocol (40 steps, CFG 3.5), plain vs the editor's speed options.

    python scripts/bench/bench_edit.py [--steps 40] [--size 1024] [--repeats 2] [--out results.jsonl]
        [--variants plain,cfgbatch,attn,compile+cfgbatch+attn,fp8+compile+cfgbatch+attn,preset=fast]
    python scripts/bench/bench_edit.py --second-start --variants preset=fast [--compile-cache DIR]
    python scripts/bench/bench_edit.py --pipeline runs/nano/sft_pipeline --items-jsonl \\
        runs/nano/data/heldout/grpo.jsonl --items 8 --max-sequence-length 32 --variants plain,preset=fast_bf16
    python scripts/bench/bench_edit.py --tiny --steps 4 ...     # CPU smoke run on the tiny pipeline (tests)

The editor: by default FLUX.2-klein-base-9B at full shape with random weights in bf16 (configs from
scripts/make_tiny_models.py --full-shape; nothing downloaded); --pipeline DIR loads a diffusers pipeline
dir instead (the nano recipe's SFT editor: trained dynamics, at its own size); --tiny the tiny random
pipeline on CPU in fp32. Then, in one process on the same inputs:
  plain            a plain Flux2KleinPipeline call (the reference's path: two sequential CFG forwards)
  <options>        "+"-joined Evaluation editor switches applied by etchr_eval.editor.apply_speed_options:
                   compile (regional torch.compile, persistent kernel cache), cfgbatch (both CFG branches in
                   one batch-2 forward), attn / attn=<backend> (attn = the fastest of --attention, timed
                   first on one forward), fp8 (torchao float8 matmuls), taylorseer_iN[_wM] (step cache,
                   interval N, first M steps in full; M defaults to 4)
  preset=<name>    the switches of editor.preset=<name> (etchr_eval.config.EDITOR_PRESETS)
For each: seconds per edit (median, synchronised, VAE decode excluded), ratio to plain, warm-up seconds
(quantise apart), torch.compile counters (graphs, cache hits), achieved TFLOP/s and the fraction of a
bf16 matmul ceiling measured in the same run (9B shape only), peak memory, and fidelity against the
plain edit with the same seed: relative error of the final latents and PSNR of the decoded images
(mean and worst over --items). Results go to stdout and, one JSON per line, --out.

--second-start: for each variant, two fresh processes start the editor with the same compile cache
folder (a new empty one unless --compile-cache): the first start compiles (cold), the second loads the
cached kernels (warm). Each reports its start-up cost: options applied (quantise included) plus the
first edit minus a steady edit. scripts/bench/plot_frontier.py draws the speed-fidelity frontier from --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import REPO, dit_inputs, full_shape_pipeline, make_tiny_models, matmul_ceiling  # noqa: E402

sys.path.insert(0, str(REPO / "Evaluation"))

DEFAULT_VARIANTS = "plain,cfgbatch,attn,compile+cfgbatch+attn,fp8+compile+cfgbatch+attn"
PROMPT = "Imagine a new perspective of the original image that helps answer the question. Question: which object is left?"


def dit_forward_flops(pipe, size: int) -> float:
    """FLOPs of one DiT forward at the edit's token counts (512 text + target + reference)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.transformer(**dit_inputs(pipe.transformer, size))
    return float(counter.get_total_flops())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_seconds(pipe, size: int, backend: str, reps: int = 5) -> float:
    """Median seconds of one DiT forward at the edit's token counts with a diffusers attention backend."""
    t = pipe.transformer
    t.set_attention_backend(backend)
    inputs = dit_inputs(t, size)
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            torch.cuda.synchronize()
            s0 = time.time()
            t(**inputs)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.time() - s0)
    return statistics.median(times)


def uncompile(transformer) -> None:
    """Undo compile_repeated_blocks (nn.Module.compile keeps the compiled callable in one attribute)."""
    for module in transformer.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


def psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(1.0 / mse)


def parse_variant(variant: str, best_attn: str = "native", compile_cache: str | None = None) -> SimpleNamespace:
    """"compile+cfgbatch+taylorseer_i3" / "preset=fast" -> the editor.* switches apply_speed_options reads."""
    from etchr_eval.config import EDITOR_PRESETS

    opts = dict(compile=False, step_cache="none", step_cache_interval=2, step_cache_warmup=4, cfg_batch=False,
                attention_backend="native", quantize="none", compile_cache_dir=compile_cache, preset=None)
    if variant == "plain":
        return SimpleNamespace(**opts)
    for part in variant.split("+"):
        if part.startswith("preset="):
            name = part.split("=", 1)[1]
            if name not in EDITOR_PRESETS:
                raise ValueError(f"variant {variant!r}: unknown preset {name!r} (presets: {', '.join(EDITOR_PRESETS)})")
            opts.update(EDITOR_PRESETS[name], preset=name)
        elif part == "compile":
            opts["compile"] = True
        elif part == "cfgbatch":
            opts["cfg_batch"] = True
        elif part == "fp8":
            opts["quantize"] = "fp8"
        elif part == "attn":
            opts["attention_backend"] = best_attn
        elif part.startswith("attn="):
            opts["attention_backend"] = part[5:]
        elif part.startswith("taylorseer_i"):
            fields = part[len("taylorseer_i"):].split("_w")
            opts.update(step_cache="taylorseer", step_cache_interval=int(fields[0]),
                        step_cache_warmup=int(fields[1]) if len(fields) > 1 else 4)
        else:
            raise ValueError(f"variant {variant!r}: unknown part {part!r} (use compile, cfgbatch, fp8, attn, "
                             "attn=<backend>, taylorseer_iN[_wM], preset=<name>)")
    return SimpleNamespace(**opts)


# ----------------------------------------------------------------------------------------------
# The editor under test and its inputs
# ----------------------------------------------------------------------------------------------
def build(a):
    """-> (pipe, device, what): the 9B-shape random pipeline, a pipeline dir, or the tiny CPU one."""
    from diffusers import Flux2KleinPipeline

    if a.tiny:
        root = Path(a.work) / "tiny_models"
        flux = root / "flux2-klein-tiny"
        if not (flux / "model_index.json").is_file():
            make_tiny_models().build(root, seed=0)
        pipe = Flux2KleinPipeline.from_pretrained(flux, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe, "cpu", f"tiny random pipeline {flux} (CPU, fp32)"
    if not torch.cuda.is_available():
        raise SystemExit("bench_edit needs a CUDA GPU (use --tiny for the CPU smoke run)")
    if a.pipeline:
        pipe = Flux2KleinPipeline.from_pretrained(a.pipeline, dtype=torch.bfloat16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe, "cuda", f"pipeline dir {a.pipeline} (bf16)"
    return full_shape_pipeline(Path(a.work)), "cuda", "FLUX.2-klein-base-9B shape, random bf16 weights"


def inputs(a) -> list[tuple]:
    """[(image, prompt, width, height)]: --items-jsonl rows (source_image, instruction), else one random
    --size x --size image with a DL3DV-style prompt."""
    from PIL import Image

    if a.items_jsonl:
        path = Path(a.items_jsonl)
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            with Image.open(path.parent / row["source_image"]) as im:
                src = im.convert("RGB")
            out.append((src, row["instruction"], src.width // 16 * 16, src.height // 16 * 16))
            if len(out) >= a.items:
                break
        if not out:
            raise SystemExit(f"{path}: no rows")
        return out
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(a.size, a.size, 3, generator=g) * 255).byte().numpy())
    return [(image, PROMPT, a.size, a.size)]


def make_edit(pipe, device: str, a):
    from etchr_eval.editor import CFGBatch, negative_prompt

    state = {}

    def edit(item, steps: int):
        image, prompt, w, h = item
        extra, batcher = {}, pipe.transformer.forward if isinstance(pipe.transformer.forward, CFGBatch) else None
        if batcher is not None and a.guidance > 1:  # as Editor.edit arms it
            if "neg" not in state:
                state["neg"] = negative_prompt(pipe, device, a.max_sequence_length)
            batcher.negative = state["neg"]
            extra["negative_prompt_embeds"] = state["neg"][0]
        try:
            with torch.inference_mode():
                return pipe(image=image, prompt=prompt, height=h, width=w, num_inference_steps=steps,
                            guidance_scale=a.guidance, max_sequence_length=a.max_sequence_length,
                            generator=torch.Generator(device=device).manual_seed(126), output_type="latent",
                            **extra).images
        finally:
            if batcher is not None:
                batcher.negative = batcher.pending = None

    return edit


def decode(pipe, lat):
    with torch.no_grad():
        img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
    return (img.float().clamp(-1, 1) + 1) / 2


def reset_options(pipe, original_forward) -> None:
    uncompile(pipe.transformer)
    pipe.transformer.forward = original_forward
    pipe.transformer.set_attention_backend("native")
    if getattr(pipe.transformer, "is_cache_enabled", False):
        pipe.transformer.disable_cache()


def apply_timed(pipe, opts) -> tuple[float, float]:
    """apply_speed_options with the fp8 conversion timed apart: -> (quantize seconds, total seconds)."""
    from etchr_eval import editor as ed

    t0 = time.time()
    quantize_s = 0.0
    if opts.quantize == "fp8":
        ed.quantize_fp8(pipe.transformer)
        sync("cuda" if torch.cuda.is_available() else "cpu")
        quantize_s = time.time() - t0
    ed.apply_speed_options(pipe, SimpleNamespace(**{**vars(opts), "quantize": "none"}))
    return quantize_s, time.time() - t0


def counters_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


# ----------------------------------------------------------------------------------------------
# --start-child: one editor start in this process (what --second-start runs twice)
# ----------------------------------------------------------------------------------------------
def start_child(a) -> int:
    from etchr_eval.editor import compile_counters

    def stage(name, **kw):  # progress lines: a start stopped at its time limit still says how far it got
        print(json.dumps({"stage": name, "at_s": round(time.time() - t0, 2), **kw}), flush=True)

    t0 = time.time()
    pipe, device, what = build(a)
    built_s = time.time() - t0
    stage("built", built_s=round(built_s, 2))
    opts = parse_variant(a.variants, compile_cache=a.compile_cache)
    if opts.quantize == "fp8":
        from etchr_eval.editor import check_fp8

        check_fp8(device, opts.preset)
    item = inputs(a)[0]
    edit = make_edit(pipe, device, a)
    quantize_s, apply_s = apply_timed(pipe, opts)
    stage("options_applied", quantize_s=round(quantize_s, 2), apply_s=round(apply_s, 2))
    times = []
    for k in range(2):  # the first edit pays the compile (or the cache load); the second is steady
        sync(device)
        s0 = time.time()
        lat = edit(item, a.steps)
        sync(device)
        times.append(time.time() - s0)
        stage(f"edit_{k + 1}", edit_s=round(times[-1], 3))
    lat = lat.double()
    print(json.dumps({"start_child": a.variants, "editor": what, "built_s": round(built_s, 2),
                      "quantize_s": round(quantize_s, 2), "apply_s": round(apply_s, 2),
                      "first_edit_s": round(times[0], 3), "steady_edit_s": round(times[1], 3),
                      "warmup_s": round(apply_s + times[0] - times[1], 2), "compile": compile_counters(),
                      "compile_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                      # cold and warm starts must give the same edit (the same kernels, loaded instead of built)
                      "latent_sum": float(lat.sum()), "latent_norm": float(lat.norm())}), flush=True)
    return 0


def second_start(a, emit) -> int:
    passthrough = ["--steps", str(a.steps), "--guidance", str(a.guidance), "--size", str(a.size), "--work", a.work,
                   "--max-sequence-length", str(a.max_sequence_length)]
    passthrough += ["--tiny"] if a.tiny else []
    passthrough += ["--pipeline", a.pipeline] if a.pipeline else []
    passthrough += ["--items-jsonl", a.items_jsonl, "--items", "1"] if a.items_jsonl else []
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        cache = a.compile_cache or tempfile.mkdtemp(prefix="etchr_inductor_", dir=a.work)
        starts = {}
        for start in ("cold", "warm"):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--start-child", "--variants", variant,
                   "--compile-cache", cache, *passthrough]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout)
                stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:  # keep how far it got
                as_text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
                stdout, stderr, rc = as_text(exc.stdout), f"timed out after {a.child_timeout:.0f} s", None
            rows = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"start_child"')]
            if rc != 0 or not rows:
                progress = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"stage"')]
                emit({"variant": variant, "start": start, "progress": progress,
                      "error": f"exit {rc}: {stderr[-600:]}"})
                break
            starts[start] = rows[-1]
            emit({"variant": variant, "start": start, **rows[-1]})
        if len(starts) == 2:
            emit({"variant": variant, "second_start": {
                "cold_warmup_s": starts["cold"]["warmup_s"], "warm_warmup_s": starts["warm"]["warmup_s"],
                "warm_fxgraph_cache_hit": starts["warm"]["compile"]["fxgraph_cache_hit"],
                "warm_fxgraph_cache_miss": starts["warm"]["compile"]["fxgraph_cache_miss"],
                "same_edit": starts["cold"]["latent_norm"] == starts["warm"]["latent_norm"]
                and starts["cold"]["latent_sum"] == starts["warm"]["latent_sum"],
                "compile_cache_dir": cache}})
    return 0


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--size", type=int, default=1024, help="pixels per side of the random source image")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-sequence-length", type=int, default=512, help="text tokens (the nano editor: 32)")
    # Eager variants first: fp8 variants come last (quantization replaces the weights).
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma list; see above")
    ap.add_argument("--attention", default="native,_native_cudnn,_native_flash,_native_efficient",
                    help="diffusers attention backends to time on one forward ('' skips; 9B shape only)")
    ap.add_argument("--pipeline", default=None, help="a diffusers FLUX.2-klein pipeline dir instead of the 9B shape")
    ap.add_argument("--items-jsonl", default=None, help="rows with source_image + instruction (nano held-out JSONL)")
    ap.add_argument("--items", type=int, default=4, help="rows of --items-jsonl to edit")
    ap.add_argument("--tiny", action="store_true", help="the tiny random pipeline on CPU (smoke run)")
    ap.add_argument("--work", default=None, help="scratch folder (tiny models, configs, compile caches)")
    ap.add_argument("--compile-cache", default=None,
                    help="editor.compile_cache_dir for compiled variants (default: a new folder under --work)")
    ap.add_argument("--second-start", action="store_true", help="cold and warm start-up of each variant, "
                                                                "each in a fresh process")
    ap.add_argument("--child-timeout", type=float, default=540.0, help="seconds per --second-start process")
    ap.add_argument("--start-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="append one JSON object per result")
    a = ap.parse_args(argv)
    a.work = a.work or tempfile.mkdtemp(prefix="bench_edit_")
    os.makedirs(a.work, exist_ok=True)
    if a.tiny:
        a.attention = ""
    if a.start_child:
        return start_child(a)
    import diffusers

    from etchr_eval.editor import compile_counters

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    cuda = torch.cuda.is_available() and not a.tiny
    header = {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat(), "steps": a.steps,
              "guidance": a.guidance, "size": a.size, "repeats": a.repeats, "tiny": a.tiny, "pipeline": a.pipeline,
              "items_jsonl": a.items_jsonl, "second_start": a.second_start}
    try:
        import torchao

        header["torchao"] = torchao.__version__
    except ImportError:
        pass
    emit({"header": header})
    if a.second_start:
        return second_start(a, emit)
    nine_b = cuda and not a.pipeline
    ceiling = matmul_ceiling() if nine_b else None
    if ceiling:
        emit({"matmul_ceiling_tflops": round(ceiling, 1)})
    t0 = time.time()
    pipe, device, what = build(a)
    emit({"editor": what, "built_s": round(time.time() - t0, 1),
          "transformer_params": sum(p.numel() for p in pipe.transformer.parameters())})
    flops = dit_forward_flops(pipe, a.size) if nine_b else None
    if flops:
        emit({"dit_forward_tflop": round(flops / 1e12, 2)})
    items = inputs(a)
    edit = make_edit(pipe, device, a)
    compile_cache = a.compile_cache or os.path.join(a.work, "inductor_cache")

    # Attention kernels first: one DiT forward per diffusers backend (cheap), so "attn" in a variant
    # can mean the fastest one on this card.
    best_attn = "native"
    if a.attention and nine_b:
        per = {}
        for backend in [b.strip() for b in a.attention.split(",") if b.strip()]:
            try:
                per[backend] = forward_seconds(pipe, a.size, backend)
            except Exception as exc:  # a kernel this card/torch lacks
                emit({"attention_backend": backend, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        pipe.transformer.set_attention_backend("native")
        if per:
            best_attn = min(per, key=per.get)
            emit({"attention_forward_s": {k: round(v, 4) for k, v in per.items()}, "best": best_attn,
                  "forward_tflops": {k: round(flops / v / 1e12, 1) for k, v in per.items()}})

    reference = plain_s = None
    quantized = False
    original_forward = pipe.transformer.forward
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        try:
            opts = parse_variant(variant, best_attn, compile_cache)
            want_fp8 = opts.quantize == "fp8"
            if reference is None and variant != "plain":
                raise RuntimeError("the first variant must be plain (the fidelity reference)")
            if quantized and not want_fp8:
                raise RuntimeError("fp8 variants must come last (quantization replaces the weights)")
            if want_fp8:
                from etchr_eval.editor import check_fp8

                check_fp8(device, opts.preset)
            reset_options(pipe, original_forward)
            if opts.compile:
                torch._dynamo.reset()  # a fresh graph for this variant's kernels (the on-disk cache stays)
            if quantized:
                opts.quantize = "none"  # the weights already are fp8
            before = compile_counters()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            quantize_s, apply_s = apply_timed(pipe, opts)
            quantized = quantized or want_fp8
            sync(device)
            tw = time.time()
            edit(items[0], a.steps if opts.compile else min(a.steps, 2))  # compiling: a full run sees every shape
            sync(device)
            warm_s = time.time() - tw
            times, lats = [], []
            for _ in range(a.repeats):
                sync(device)
                s0 = time.time()
                lat = edit(items[0], a.steps)
                sync(device)
                times.append(time.time() - s0)
            lats = [lat] + [edit(item, a.steps) for item in items[1:]]
            sec = statistics.median(times)
            imgs = [decode(pipe, x) for x in lats]
            if variant == "plain":
                reference, plain_s = ([x.float() for x in lats], imgs), sec
            rels = [float((x.float() - r).norm() / r.norm()) for x, r in zip(lats, reference[0])]
            psnrs = [psnr(i, r) for i, r in zip(imgs, reference[1])]
            row = {"variant": variant, "switches": {k: v for k, v in vars(opts).items() if k != "compile_cache_dir"},
                   "seconds": round(sec, 4), "ratio_vs_plain": round(plain_s / sec, 3),
                   "warmup_s": round(warm_s + apply_s - (sec if opts.compile else 0.0), 1),
                   "quantize_s": round(quantize_s, 2), "compile": counters_delta(before, compile_counters()),
                   "latent_rel_err": round(statistics.mean(rels), 6), "latent_rel_err_max": round(max(rels), 6),
                   "psnr_db": round(statistics.mean(psnrs), 2), "psnr_db_min": round(min(psnrs), 2),
                   "items": len(items), "bit_identical": all(torch.equal(x.float(), r) for x, r in zip(lats, reference[0])),
                   "finite": all(bool(torch.isfinite(x).all()) for x in lats), "times": [round(t, 4) for t in times]}
            if cuda:
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            if flops:
                forwards = 2 * a.steps  # nominal forwards of the protocol (cached steps skip some of them)
                row.update(nominal_tflops=round(forwards * flops / sec / 1e12, 1),
                           fraction_of_ceiling=round(forwards * flops / sec / 1e12 / ceiling, 3))
            emit(row)
        except Exception as exc:  # one failing option must not lose the others' numbers
            emit({"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    reset_options(pipe, original_forward)
    return 0


if __name__ == "__main__":
    sys.exit(main())
