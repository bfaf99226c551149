#!/usr/bin/env python
"""bench_sft_step: SFT training steps at 1024x1024, LoRA r768, gradient checkpointing, batch 1.

    python scripts/bench/bench_sft_step.py [--size 1024] [--steps 8] [--warmup 2] [--out results.jsonl]
    python scripts/bench/bench_sft_step.py --tiny          # CPU smoke run with the tiny random models

Builds FLUX.2-klein-base-9B at full shape with random bf16 weights on the GPU (benchlib.full_shape_pipeline;
nothing downloaded), writes a few random 1024x1024 (target, input) pairs in the SFT CSV format, then
times, in one process on one card with the same data:
  reference   a plain diffusers + peft loop written like the reference recipe: batch 1, eager, pure
              bf16 (no autocast), peft LoRA r768/alpha 768 on the 144 reference layers, per-block
              gradient checkpointing, torch AdamW (default foreach), images read and encoded (VAE,
              text encoder) in the training loop
  ours*       the real trainer, SFT/train_sft.py's train(), on the same in-memory pipeline, with the
              `model.compile`, `model.attention_backend` and `optim.fused` switches of each variant
For each: seconds per sample (median over the timed steps; CUDA-synchronised in the reference loop,
the trainer's own step_time_s for ours), samples/s, ratio vs reference, achieved TFLOP/s (DiT
forward + backward incl. the checkpoint recomputation, counted once with torch.utils.flop_counter),
fraction of a bf16 matmul ceiling measured in the same run, peak memory
(torch.cuda.max_memory_allocated, reset per variant), and the loss of the first step. The ours*
variants draw the same timestep and noise for the same sample, so their first losses agree up to
kernel rounding: the fidelity check of compile and the attention kernels (the reference loop draws
its own, so its loss is not comparable).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import REPO, dit_inputs, full_shape_pipeline, make_tiny_models, matmul_ceiling  # noqa: E402

sys.path.insert(0, str(REPO / "SFT"))

# name -> (model.compile, model.attention_backend, optim.fused); eager variants first (compiling is
# permanent for the rest of the process).
VARIANTS = {
    "ours_eager": (False, "native", False),
    "ours_fused": (False, "native", True),
    "ours_compile": (True, "native", True),
    "ours_compile_attn": (True, "best", True),  # the fastest backend of the --attention probe
}


def write_data(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """n random (target, input) PNG pairs of size x size and the SFT CSV naming them."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "sft_data.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["image", "edit_image", "prompt"])
        wr.writeheader()
        for i in range(n):
            for kind in ("target", "input"):
                arr = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(arr).save(root / f"{kind}_{i:03d}.png")
            wr.writerow({"image": f"target_{i:03d}.png", "edit_image": f"input_{i:03d}.png",
                         "prompt": f"Imagine a new perspective that helps answer question {i}: which object is left?"})
    return root / "sft_data.csv"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None


def attention_probe(pipe, size: int, backends: list[str], reps: int = 3) -> dict:
    """Median seconds of one DiT forward + backward (the training shapes, batch 1, gradients to the
    inputs only) per diffusers attention backend; a backend the card lacks is left out."""
    t = pipe.transformer
    inputs = dit_inputs(t, size, requires_grad=True)
    out = {}
    t.enable_gradient_checkpointing()  # as in training (and the 9B's activations would not fit otherwise)
    for backend in backends:
        try:
            t.set_attention_backend(backend)
            times = []
            for i in range(reps + 1):
                torch.cuda.synchronize()
                s0 = time.perf_counter()
                y = t(**inputs)[0]
                y.float().square().mean().backward()
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - s0)
            out[backend] = statistics.median(times)
        except Exception as exc:  # a kernel this card/torch lacks
            out[backend] = f"{type(exc).__name__}: {str(exc)[:200]}"
        inputs["hidden_states"].grad = None
    t.set_attention_backend("native")
    t.disable_gradient_checkpointing()
    return out


def reference_loop(pipe, rows: list[dict], root: Path, args, targets: list[str], flop_counter=None) -> dict:
    """The plain loop. Returns per-step seconds, first loss and the DiT FLOPs of one step."""
    import numpy as np
    from diffusers import Flux2KleinPipeline as P
    from peft import LoraConfig
    from PIL import Image

    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    t = pipe.transformer
    t.requires_grad_(False)
    t.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, init_lora_weights="gaussian"),
                  adapter_name="reference")
    t.enable_gradient_checkpointing()
    t.train()
    params = [p for p in t.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(42)
    times, first_loss, flops = [], None, None

    def load(path: str) -> torch.Tensor:  # PIL -> (1, 3, H, W) in [-1, 1], in the loop like the reference
        with Image.open(root / path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)

    for step in range(args.warmup + args.steps):
        row = rows[step % len(rows)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        target, ref_img = load(row["image"]), load(row["edit_image"])
        with torch.no_grad():
            embeds, text_ids = pipe.encode_prompt(prompt=[row["prompt"]], device=device, max_sequence_length=512)
            x0 = pipe._encode_vae_image(target.to(device, pipe.vae.dtype), generator=None)
            ref = pipe._encode_vae_image(ref_img.to(device, pipe.vae.dtype), generator=None)
        x0_tok, x_ids = P._pack_latents(x0), P._prepare_latent_ids(x0).to(device)
        ref_tok, ref_ids = P._pack_latents(ref), P._prepare_image_ids([ref]).to(device)
        sigma = torch.rand(1, generator=gen).item()
        eps = torch.randn(x0_tok.shape, generator=gen).to(device, x0_tok.dtype)
        x_t = (1 - sigma) * x0_tok + sigma * eps

        def step_fn():
            out = t(hidden_states=torch.cat([x_t, ref_tok], 1).to(dtype), timestep=torch.full((1,), sigma, device=device, dtype=dtype),
                    guidance=None, encoder_hidden_states=embeds.to(dtype), txt_ids=text_ids,
                    img_ids=torch.cat([x_ids, ref_ids], 1), return_dict=False)[0][:, : x_t.shape[1]]
            loss = torch.nn.functional.mse_loss(out.float(), (eps - x0_tok).float())
            loss.backward()
            return loss

        if step == 0 and flop_counter is not None:
            # Count FLOPs on an extra, untimed pass: a dispatch mode around checkpointed blocks keeps
            # their activations alive, so the peak memory is reset after it.
            with flop_counter:
                step_fn()
            flops = float(flop_counter.get_total_flops())
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        loss = step_fn()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first_loss = float(loss.detach())
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    t.unload_lora()  # back to plain Linear layers for the next variant
    t.disable_gradient_checkpointing()
    del opt, params
    return {"times": times, "first_loss": first_loss, "flops": flops}


def ours(pipe, csv_path: Path, run_dir: Path, args, compile_: bool, backend: str, fused: bool) -> dict:
    """The real trainer on the same pipeline; step times from its metrics.jsonl."""
    from accelerate.utils import extract_model_from_parallel

    import train_sft
    from etchr_sft.config import load_sft_config

    overrides = [f"data.csv={csv_path}", f"train.run_dir={run_dir}", f"train.max_steps={args.warmup + args.steps}",
                 "train.log_every=1", "train.checkpoint_every=1000000000", "train.save_final=false",
                 "train.validate_every=0", "train.resume=never", f"lora.rank={args.rank}", f"lora.alpha={args.rank}",
                 f"model.compile={str(compile_).lower()}", f"model.attention_backend={backend}",
                 f"optim.fused={str(fused).lower()}", f"data.max_pixels={args.size * args.size}",
                 "model.pretrained_path=in-memory", f"data.num_workers={args.num_workers}"]
    cfg = load_sft_config(str(REPO / "configs" / "sft" / "klein9b_lora_r768.yaml"), overrides)
    if args.tiny:
        cfg.model.dtype = "fp32"
    out = train_sft.train(cfg, pipe=pipe)
    t = extract_model_from_parallel(out["transformer"], keep_fp32_wrapper=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time_s" in r]
    times = [r["step_time_s"] for r in steps[args.warmup:]]
    t.unload_lora()
    t.disable_gradient_checkpointing()
    t.set_attention_backend("native")
    return {"times": times, "first_loss": steps[0]["loss"] if steps else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=768)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--num-workers", type=int, default=2, help="the trainer's dataloader workers")
    # Off by default: on H200 + torch 2.11 the cuDNN kernel's backward crashed the process
    # (CUBLAS_STATUS_EXECUTION_FAILED, then an illegal memory access for every later kernel).
    ap.add_argument("--attention", default="",
                    help="backends timed on one forward + backward first; 'attn' variants use the fastest")
    ap.add_argument("--variants", default="reference,ours_eager,ours_compile",
                    help=f"comma list from reference,{','.join(VARIANTS)}")
    ap.add_argument("--tiny", action="store_true", help="CPU, fp32, the tiny random models (a smoke run)")
    ap.add_argument("--out", default=None, help="append one JSON object per result")
    a = ap.parse_args(argv)
    if a.tiny:
        a.size, a.rank = min(a.size, 64), min(a.rank, 4)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v != "reference" and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}")
    import diffusers

    cuda = torch.cuda.is_available() and not a.tiny

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    emit({"header": {"card": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "date": datetime.date.today().isoformat(), "size": a.size,
                     "lora_rank": a.rank, "steps": a.steps, "warmup": a.warmup, "batch": 1,
                     "gradient_checkpointing": True, "tiny": a.tiny}})
    ceiling = matmul_ceiling() if cuda else None
    if ceiling:
        emit({"matmul_ceiling_tflops": round(ceiling, 1)})
    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    t0 = time.time()
    if a.tiny:
        from etchr_sft.model import load_pipeline

        tiny = work / "flux2-klein-tiny"
        make_tiny_models().write_flux2_klein(tiny, 0, False)
        pipe = load_pipeline(str(tiny), torch.float32)
    else:
        pipe = full_shape_pipeline(work)
        for m in (pipe.vae, pipe.text_encoder):
            m.requires_grad_(False)
    emit({"built_s": round(time.time() - t0, 1),
          "transformer_params": sum(p.numel() for p in pipe.transformer.parameters())})
    csv_path = write_data(work / "data", max(4, a.warmup + a.steps), a.size)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    from etchr_sft.config import REFERENCE_LORA_TARGETS
    from etchr_sft.model import lora_target_names

    targets = lora_target_names(pipe.transformer, list(REFERENCE_LORA_TARGETS), True)
    emit({"lora_layers": len(targets)})

    best = "native"
    if cuda and a.attention:
        probe = attention_probe(pipe, a.size, [b.strip() for b in a.attention.split(",") if b.strip()])
        timed = {k: v for k, v in probe.items() if isinstance(v, float)}
        best = min(timed, key=timed.get) if timed else "native"
        emit({"attention_fwd_bwd_s": {k: round(v, 4) if isinstance(v, float) else v for k, v in probe.items()},
              "best": best})
        free_memory()

    flops = None
    base = None  # reference seconds per sample
    compiled = False
    for name in variants:
        free_memory()
        try:
            if name == "reference":
                from torch.utils.flop_counter import FlopCounterMode

                res = reference_loop(pipe, rows, csv_path.parent, a, targets, FlopCounterMode(display=False))
                flops = res["flops"]
            else:
                compile_, backend, fused = VARIANTS[name]
                backend = best if backend == "best" else backend
                if compiled and not compile_:
                    raise RuntimeError("eager variants must come before compiled ones")
                if compile_:
                    torch._dynamo.reset()  # a fresh graph for this variant's kernels
                compiled = compiled or compile_
                res = ours(pipe, csv_path, work / f"run_{name}", a, compile_, backend, fused)
            sec = statistics.median(res["times"])
            base = sec if name == "reference" else base
            row = {"variant": name, "attention_backend": "native" if name == "reference" else backend,
                   "seconds_per_sample": round(sec, 4), "samples_per_s": round(1 / sec, 4),
                   "ratio_vs_reference": round(base / sec, 3) if base else None, "peak_mem_gib": peak_gib(),
                   "first_loss": res["first_loss"], "times": [round(x, 4) for x in res["times"]]}
            if flops:
                row["tflops"] = round(flops / sec / 1e12, 1)
                row["dit_train_tflop_per_sample"] = round(flops / 1e12, 1)
                if ceiling:
                    row["fraction_of_ceiling"] = round(flops / sec / 1e12 / ceiling, 3)
            emit(row)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            emit({"variant": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
