#!/usr/bin/env python
"""bench_edit: one 1024x1024 edit with the reference protocol (40 steps, CFG 3.5) on a GPU.

    python scripts/bench/bench_edit.py [--steps 40] [--size 1024] [--repeats 2] [--out results.jsonl]
        [--variants plain,cfgbatch,attn,compile+cfgbatch+attn,fp8+compile+cfgbatch+attn]

Builds FLUX.2-klein-base-9B at full shape with random weights in bf16 (configs from
scripts/make_tiny_models.py --full-shape; nothing downloaded), then times, in one process on one
card and the same inputs:
  plain            a plain Flux2KleinPipeline call (the reference's path: two sequential CFG forwards)
  <options>        the same pipeline with the Evaluation editor's speed options applied by
                   etchr_eval.editor.apply_speed_options: compile (regional torch.compile), cfgbatch
                   (both CFG branches in one batch-2 forward), attn / attn=<backend> (a diffusers
                   attention kernel; attn = the fastest of --attention, timed first on one forward),
                   fp8 (torchao float8 matmuls), taylorseer_iN (step cache)
For each: seconds per edit (median, CUDA-synchronised, VAE decode excluded), ratio to plain,
achieved TFLOP/s over the DiT forwards (FLOPs counted with torch.utils.flop_counter), fraction of a
bf16 matmul ceiling measured in the same run, peak memory, and fidelity against the eager bf16 edit
with the same seed: relative error of the final latents and PSNR of the decoded images.
Random weights make timings real; fidelity of approximate options is indicative only (trained
weights have smoother step-to-step dynamics). Results go to stdout and, one JSON per line, --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from benchlib import REPO, dit_inputs, full_shape_pipeline, matmul_ceiling  # noqa: E402

sys.path.insert(0, str(REPO / "Evaluation"))


def dit_forward_flops(pipe, size: int) -> float:
    """FLOPs of one DiT forward at the edit's token counts (512 text + target + reference)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.transformer(**dit_inputs(pipe.transformer, size))
    return float(counter.get_total_flops())


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    # Eager variants first: compilation is permanent for the rest of the process.
    # Variants: "+"-joined options: compile, cfgbatch, fp8, taylorseer_iN, attn (the fastest backend of
    # --attention) or attn=<backend>. fp8 variants come last (quantization replaces the weights).
    ap.add_argument("--variants", default="plain,cfgbatch,attn,compile+cfgbatch+attn,fp8+compile+cfgbatch+attn")
    ap.add_argument("--attention", default="native,_native_cudnn,_native_flash,_native_efficient",
                    help="diffusers attention backends to time on one forward ('' skips)")
    ap.add_argument("--out", default=None, help="append one JSON object per result")
    a = ap.parse_args(argv)
    import diffusers
    from PIL import Image

    from etchr_eval.editor import apply_speed_options

    header = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "diffusers": diffusers.__version__,
              "date": datetime.date.today().isoformat(), "steps": a.steps, "guidance": a.guidance,
              "size": a.size, "repeats": a.repeats}

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    emit({"header": header})
    ceiling = matmul_ceiling()
    emit({"matmul_ceiling_tflops": round(ceiling, 1)})
    t0 = time.time()
    pipe = full_shape_pipeline()
    emit({"built_s": round(time.time() - t0, 1), "transformer_params": sum(p.numel() for p in pipe.transformer.parameters())})
    flops = dit_forward_flops(pipe, a.size)
    emit({"dit_forward_tflop": round(flops / 1e12, 2)})
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray((torch.rand(a.size, a.size, 3, generator=g) * 255).byte().numpy())
    prompt = "Imagine a new perspective of the original image that helps answer the question. Question: which object is left?"

    def edit(steps: int):
        return pipe(image=image, prompt=prompt, height=a.size, width=a.size, num_inference_steps=steps,
                    guidance_scale=a.guidance, generator=torch.Generator(device="cuda").manual_seed(126),
                    output_type="latent").images

    def decode(lat):
        with torch.no_grad():
            img = pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]
        return (img.float().clamp(-1, 1) + 1) / 2

    # Attention kernels first: one DiT forward per diffusers backend (cheap), so "attn" in a variant
    # can mean the fastest one on this card.
    best_attn = "native"
    if a.attention:
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

    reference_latents = reference_image = plain_s = None
    quantized = False
    original_forward = pipe.transformer.forward
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        parts = set(variant.split("+"))
        want_compile, want_fp8 = "compile" in parts, "fp8" in parts
        cache = next((p for p in parts if p.startswith("taylorseer")), None)
        attn = best_attn if "attn" in parts else next((p[5:] for p in parts if p.startswith("attn=")), "native")
        opts = SimpleNamespace(compile=False, step_cache="taylorseer" if cache else "none",
                               step_cache_interval=int(cache.split("_i")[-1]) if cache else 2, step_cache_warmup=4,
                               cfg_batch="cfgbatch" in parts, attention_backend=attn,
                               quantize="fp8" if want_fp8 and not quantized else "none")
        try:
            if quantized and not want_fp8:
                raise RuntimeError("fp8 variants must come last (quantization replaces the weights)")
            uncompile(pipe.transformer)
            pipe.transformer.forward = original_forward
            pipe.transformer.set_attention_backend("native")
            apply_speed_options(pipe, opts)
            quantized = quantized or want_fp8
            if want_compile:
                torch._dynamo.reset()  # a fresh graph for this variant's kernels and weights
                pipe.transformer.compile_repeated_blocks(fullgraph=cache is None)
            torch.cuda.reset_peak_memory_stats()
            tw = time.time()
            edit(a.steps if want_compile else 2)  # warm-up; a full run when compiling, so every shape is seen
            torch.cuda.synchronize()
            warm_s = time.time() - tw
            times, lat = [], None
            for _ in range(a.repeats):
                torch.cuda.synchronize()
                s0 = time.time()
                lat = edit(a.steps)
                torch.cuda.synchronize()
                times.append(time.time() - s0)
            sec = statistics.median(times)
            img = decode(lat)
            if variant == "plain":
                reference_latents, reference_image, plain_s = lat.float(), img, sec
            rel = float((lat.float() - reference_latents).norm() / reference_latents.norm())
            forwards = 2 * a.steps  # nominal forwards of the protocol (cached steps skip some of them)
            emit({"variant": variant, "attention_backend": attn, "seconds": round(sec, 3),
                  "ratio_vs_plain": round(plain_s / sec, 3),
                  "warmup_s": round(warm_s, 1), "nominal_tflops": round(forwards * flops / sec / 1e12, 1),
                  "fraction_of_ceiling": round(forwards * flops / sec / 1e12 / ceiling, 3),
                  "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
                  "latent_rel_err": round(rel, 6), "psnr_db": round(psnr(img, reference_image), 2),
                  "bit_identical": bool(torch.equal(lat.float(), reference_latents)),
                  "finite": bool(torch.isfinite(lat).all()), "times": [round(t, 3) for t in times]})
        except Exception as exc:  # one failing option must not lose the others' numbers
            emit({"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        finally:
            if opts.step_cache != "none" and getattr(pipe.transformer, "is_cache_enabled", False):
                pipe.transformer.disable_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
