#!/usr/bin/env python
"""bench_sft_step: SFT training steps at 1024x1024, LoRA r768, batch 1: the reference-style loop against ours.

    python scripts/bench/bench_sft_step.py [--variants reference,ours_eager,ours_budget80] [--size 1024]
        [--steps 8] [--warmup 2] [--loss-steps 50] [--time-budget 480] [--out results.jsonl]
        [--define NAME=key=value,key=value ...]
    python scripts/bench/bench_sft_step.py --tiny          # CPU smoke run with the tiny random models

Builds FLUX.2-klein-base-9B at full shape with random bf16 weights on the GPU (benchlib.full_shape_pipeline;
nothing downloaded), writes random 1024x1024 (target, input) pairs in the SFT CSV format, then runs, in one
process on one card with the same data:
  reference   a plain diffusers + peft loop written like the reference recipe: batch 1, eager, pure
              bf16 (no autocast), peft LoRA r768/alpha 768 on the 144 reference layers, per-block
              gradient checkpointing, torch AdamW (default foreach), images read and encoded (VAE,
              text encoder) in the training loop. It visits the samples in the trainer's order and draws
              each sample's timestep and noise from the trainer's per-sample generator
              (etchr_sft.objective.sample_generator), with the trainer's loss weight and clipping, and the
              LoRA starts from the same seed: its losses are comparable step by step with ours.
  reference_repeat  the reference loop again: the noise floor of the loss comparison (run-to-run bf16
              kernel nondeterminism, e.g. attention backward atomics).
  ours*       the real trainer, SFT/train_sft.py's train(), on the same in-memory pipeline, with the
              config overrides of VARIANTS[name] (a dict; --define adds or replaces one), e.g.
              ours_budget80 = model.activation_budget_gib=76 (the budget of an 80 GB card, emulated on
              a larger one: the probe plans for 76 GiB of peak, whatever the card has).
For each: seconds per sample (median over the timed steps; CUDA-synchronised in the reference loop,
the trainer's own step_time_s for ours), samples/s, ratio vs reference, achieved TFLOP/s (DiT
forward + backward incl. the per-block checkpoint recomputation of the reference, counted once with
torch.utils.flop_counter: a variant that recomputes less does fewer FLOPs, so its TFLOP/s is "reference
work per second"), fraction of a bf16 matmul ceiling measured in the same run, peak memory
(torch.cuda.max_memory_allocated, reset per variant), the activation-checkpointing decision of ours
(blocks checkpointed, predicted and measured peak), and with --loss-steps N the first N losses and their
max / mean abs difference to the first reference run's (reference_repeat gives the noise floor).
One JSON line per variant as soon as it finishes; with --time-budget, variants that would start after that
many seconds are skipped (reported as skipped).
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

# name -> trainer config overrides (key -> value as on the command line). Eager variants first (compiling is
# permanent for the rest of the process). "best" as attention backend = the fastest of the --attention probe.
# Another helper's switch is one line here or one --define away, e.g. the ours_fp8 entries below.
BUDGET80 = {"model.activation_budget_gib": "76"}  # an 80 GB card's budget (76 GiB leaves room for the allocator)
# model.compile compiles the blocks that are not checkpointed (compiled under the checkpoint wrapper they got wrong
# gradients on an H200), so it goes with a budget / pinned blocks / no checkpointing; COMPILE_ALL (the trust
# switch) compiles the checkpointed blocks too: the wrong path, kept to re-measure it on a newer torch.
COMPILE = {"model.compile": "true"}
COMPILE_ALL = {"model.compile": "true", "model.compile_trust_backward": "true"}
VARIANTS: dict[str, dict] = {
    "ours_eager": {},
    "ours_fused": {"optim.fused": "true"},
    "ours_budget80": {**BUDGET80, "optim.fused": "true"},
    "ours_budget_auto": {"model.activation_budget_gib": "auto", "optim.fused": "true"},
    "ours_nockpt": {"model.gradient_checkpointing": "false", "optim.fused": "true"},
    "ours_compile_all": {**COMPILE_ALL, "optim.fused": "true"},
    "ours_budget80_compile": {**BUDGET80, **COMPILE, "optim.fused": "true"},
    "ours_budget_auto_compile": {"model.activation_budget_gib": "auto", **COMPILE, "optim.fused": "true"},
    "ours_budget80_compile_all_gb": {**BUDGET80, **COMPILE_ALL, "model.compile_fullgraph": "false",
                                     "optim.fused": "true"},
    "ours_budget80_compile_attn": {**BUDGET80, **COMPILE, "model.attention_backend": "best", "optim.fused": "true"},
    # model.fp8 (torchao float8 for the frozen LoRA base layers; refused without torchao / an fp8 GPU)
    "ours_fp8": {"model.fp8": "float8_rowwise", "optim.fused": "true"},
    "ours_fp8_tensorwise": {"model.fp8": "float8_tensorwise", "optim.fused": "true"},
    "ours_fp8_budget80": {**BUDGET80, "model.fp8": "float8_rowwise", "optim.fused": "true"},
    "ours_fp8_compile": {**BUDGET80, "model.fp8": "float8_rowwise", **COMPILE, "optim.fused": "true"},
}
# data.precomputed_dir=@precompute: run SFT/precompute.py on the bench's data with the in-memory pipeline first
# (its batched cost is reported), then train from those files with the encoders parked on the CPU.
PRECOMPUTE = "@precompute"
VARIANTS["ours_budget80_precomputed"] = {**VARIANTS["ours_budget80"], "data.precomputed_dir": PRECOMPUTE,
                                         "data.precompute_batch_size": "4"}
VARIANTS["ours_budget80_compile_precomputed"] = {**VARIANTS["ours_budget80_compile"], "data.precomputed_dir": PRECOMPUTE,
                                                 "data.precompute_batch_size": "4"}
REFERENCES = ("reference", "reference_repeat")


def parse_define(text: str) -> tuple[str, dict]:
    """'NAME=key=value,key=value' -> (NAME, {key: value}); the values as on the trainer's command line."""
    import re

    name, _, rest = text.partition("=")
    overrides = {}
    # split at commas that start the next key=value (a list value such as [1,1] keeps its commas)
    for item in filter(None, (x.strip() for x in re.split(r",(?=\s*[\w.]+=)", rest))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--define {text!r}: expected NAME=key=value[,key=value...]")
        overrides[key] = value
    if not name or name in REFERENCES:
        raise ValueError(f"--define {text!r}: needs a variant name other than {REFERENCES}")
    return name, overrides


def is_compiled(overrides: dict) -> bool:
    return str(overrides.get("model.compile", "false")).lower() == "true"


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


def total_steps(args) -> int:
    return max(args.warmup + args.steps, args.loss_steps)


def trainer_config(csv_path: Path, run_dir: Path, args, overrides: dict):
    """The trainer's config for this bench (klein9b_lora_r768.yaml + the bench's keys + `overrides`)."""
    from etchr_sft.config import load_sft_config

    base = [f"data.csv={csv_path}", f"train.run_dir={run_dir}", f"train.max_steps={total_steps(args)}",
            "train.log_every=1", "train.checkpoint_every=1000000000", "train.save_final=false",
            "train.validate_every=0", "train.resume=never", f"lora.rank={args.rank}", f"lora.alpha={args.rank}",
            f"data.max_pixels={args.size * args.size}", "model.pretrained_path=in-memory",
            f"data.num_workers={args.num_workers}"]
    cfg = load_sft_config(str(REPO / "configs" / "sft" / "klein9b_lora_r768.yaml"),
                          base + [f"{k}={v}" for k, v in overrides.items()])
    if args.tiny:
        cfg.model.dtype = "fp32"
    return cfg


def reference_loop(pipe, csv_path: Path, args, targets: list[str], flop_counter=None) -> dict:
    """The plain loop. Returns per-step seconds, the losses and the DiT FLOPs of one step. Samples, timesteps,
    noise, loss weights, clipping and the LoRA initialisation follow the trainer's config and generators, so
    that the losses compare with ours step by step; everything else is the reference's way."""
    import numpy as np
    from accelerate.utils import set_seed
    from diffusers import Flux2KleinPipeline as P
    from peft import LoraConfig
    from PIL import Image

    from etchr_sft.data import bucket_key, make_batches, read_csv
    from etchr_sft.objective import lookup, make_schedule, noisy_input, sample_generator, weighted_mse

    cfg = trainer_config(csv_path, Path(tempfile.mkdtemp()), args, {})
    rows = read_csv(cfg.data.csv, cfg.data.base_path)
    keys = [bucket_key(r, cfg.data.max_pixels, cfg.data.multiple_of, cfg.data.reference_resize) for r in rows]
    schedule = make_schedule()
    seed = cfg.train.seed
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    t = pipe.transformer
    t.requires_grad_(False)
    set_seed(seed)  # the trainer's LoRA initialisation
    t.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets, init_lora_weights="gaussian"),
                  adapter_name="reference")
    t.enable_gradient_checkpointing()
    t.train()
    params = [p for p in t.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    times, losses, flops, orders = [], [], None, {}

    def load(path: str) -> torch.Tensor:  # PIL -> (1, 3, H, W) in [-1, 1], in the loop like the reference
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)

    for step in range(total_steps(args)):
        epoch, k = divmod(step, len(rows))
        if epoch not in orders:
            orders[epoch] = make_batches(keys, 1, seed, epoch, cfg.data.aspect_buckets)
        index = orders[epoch][k][0]
        row = rows[index]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        target, ref_img = load(row.target), load(row.reference)
        with torch.no_grad():
            embeds, text_ids = pipe.encode_prompt(prompt=[row.prompt], device=device, max_sequence_length=512)
            x0 = pipe._encode_vae_image(target.to(device, pipe.vae.dtype), generator=None)
            ref = pipe._encode_vae_image(ref_img.to(device, pipe.vae.dtype), generator=None)
        x0_tok, x_ids = P._pack_latents(x0.float()), P._prepare_latent_ids(x0).to(device)
        ref_tok, ref_ids = P._pack_latents(ref), P._prepare_image_ids([ref]).to(device)
        g = sample_generator(seed, epoch, index)
        ti = torch.randint(0, len(schedule.sigmas), (1,), generator=g)
        eps = torch.randn(x0_tok.shape[1:], generator=g, dtype=torch.float32)[None].to(device)
        sigma, tt, w = lookup(schedule, ti, cfg.train.timestep_lookup)
        x_t, v_target = noisy_input(x0_tok, eps, sigma.float().to(device))

        def step_fn():
            # the timestep rounded as the trainer does it (float64 -> float32 -> model dtype)
            out = t(hidden_states=torch.cat([x_t, ref_tok], 1).to(dtype), timestep=tt.float().to(device).to(dtype),
                    guidance=None, encoder_hidden_states=embeds.to(dtype), txt_ids=text_ids,
                    img_ids=torch.cat([x_ids, ref_ids], 1), return_dict=False)[0][:, : x_t.shape[1]]
            loss = weighted_mse(out, v_target, w.float().to(device))
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
        if cfg.optim.grad_clip > 0:  # the trainer's clipping (the reference recipe has none; kept equal for the losses)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    t.unload_lora()  # back to plain Linear layers for the next variant
    t.disable_gradient_checkpointing()
    del opt, params
    return {"times": times, "losses": losses, "flops": flops}


def ours(pipe, csv_path: Path, run_dir: Path, args, overrides: dict) -> dict:
    """The real trainer on the same pipeline; step times and losses from its metrics.jsonl."""
    from accelerate.utils import extract_model_from_parallel

    import train_sft

    precompute_stats = None
    if overrides.get("data.precomputed_dir") == PRECOMPUTE:  # SFT/precompute.py first, then train from its files
        from precompute import precompute

        overrides = {**overrides, "data.precomputed_dir": str(run_dir.parent / f"{run_dir.name}_precomputed")}
        t0 = time.time()
        meta = precompute(trainer_config(csv_path, run_dir, args, overrides), pipe=pipe)
        meta = meta or {}
        precompute_stats = {"wall_s": round(time.time() - t0, 2), "rows": meta.get("rows"),
                            "batch_size": meta.get("batch_size"), "encode_s": meta.get("encode_seconds_per_rank"),
                            "samples_per_s": meta.get("samples_per_s")}
        if meta.get("samples_per_s"):
            precompute_stats["s_per_sample"] = round(1.0 / meta["samples_per_s"], 4)
        # the trainer keeps the encoders on the CPU with precomputed conditioning: free the card as a run would
        pipe.text_encoder.to("cpu")
        pipe.vae.to("cpu")
        free_memory()
    cfg = trainer_config(csv_path, run_dir, args, overrides)
    try:
        out = train_sft.train(cfg, pipe=pipe)
        extract_model_from_parallel(out["transformer"], keep_fp32_wrapper=False)
        compiled_blocks = compile_state(pipe.transformer)
    finally:  # also after a failure: the next variant starts from the plain model
        t = pipe.transformer
        from etchr_sft.fp8 import undo_fp8

        undo_fp8(t)  # model.fp8's float8 base layers back to plain Linear (unload_lora would keep them)
        if getattr(t, "peft_config", None):
            t.unload_lora()
        if t.gradient_checkpointing:
            t.disable_gradient_checkpointing()
        t.set_attention_backend("native")
        for block in _blocks(t):
            # Module.compile is permanent; a block compiled here may be checkpointed in the next variant's plan,
            # and a compiled block under the checkpoint wrapper trains on wrong gradients (PERFORMANCE.md)
            block._compiled_call_impl = None
        if precompute_stats is not None:
            device = t.device
            pipe.text_encoder.to(device)
            pipe.vae.to(device)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time_s" in r]
    plans = [r["activation_checkpointing"] for r in rows if "activation_checkpointing" in r]
    per_step = cfg.train.batch_size * cfg.train.grad_accum  # samples in one optimizer step (train.batch_size > 1)
    times = [r["step_time_s"] / per_step for r in steps[args.warmup:]]
    return {"times": times, "samples_per_step": per_step, "losses": [r["loss"] for r in steps],
            "activation_checkpointing": plans[-1] if plans else None, "compiled_blocks": compiled_blocks,
            **({"precompute": precompute_stats} if precompute_stats is not None else {})}


def _blocks(transformer) -> list:
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def compile_state(transformer) -> dict:
    """How many blocks ran compiled, and how many of those were checkpointed (0 unless compile_trust_backward)."""
    from etchr_sft.model import checkpointed_block_ids

    blocks = _blocks(transformer)
    ckpt = checkpointed_block_ids(transformer)
    compiled = [b for b in blocks if b._compiled_call_impl is not None]
    return {"compiled": len(compiled), "compiled_and_checkpointed": sum(id(b) in ckpt for b in compiled),
            "blocks": len(blocks)}


def loss_comparison(losses: list, ref: list | None, n: int) -> dict:
    """First-n losses and their max / mean abs (and max relative) difference to the reference's."""
    out = {"losses": [round(x, 6) for x in losses[:n]]}
    if ref:
        k = min(n, len(losses), len(ref))
        d = [abs(a - b) for a, b in zip(losses[:k], ref[:k])]
        out.update({"loss_steps_compared": k, "loss_max_abs_diff": max(d) if d else None,
                    "loss_mean_abs_diff": sum(d) / k if k else None,
                    "loss_max_rel_diff": max(x / max(abs(b), 1e-12) for x, b in zip(d, ref[:k])) if d else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=768)
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--loss-steps", type=int, default=0,
                    help="run at least N steps per variant and report the first N losses vs the reference's")
    ap.add_argument("--num-workers", type=int, default=2, help="the trainer's dataloader workers")
    # Off by default: on H200 + torch 2.11 the cuDNN kernel's backward crashed the process
    # (CUBLAS_STATUS_EXECUTION_FAILED, then an illegal memory access for every later kernel).
    ap.add_argument("--attention", default="",
                    help="backends timed on one forward + backward first; 'attn' variants use the fastest")
    ap.add_argument("--variants", default="reference,ours_eager,ours_budget80",
                    help=f"comma list from {','.join(REFERENCES)},{','.join(VARIANTS)} (and --define names)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=key=value,...",
                    help="add (or replace) a variant: trainer config overrides, e.g. "
                         "ours_fp8x=model.fp8=float8_rowwise,model.activation_budget_gib=76")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds; variants that would start later are skipped (reported); 0 = no limit")
    ap.add_argument("--tiny", action="store_true", help="CPU, fp32, the tiny random models (a smoke run)")
    ap.add_argument("--out", default=None, help="append one JSON object per result")
    a = ap.parse_args(argv)
    if a.tiny:
        a.size, a.rank = min(a.size, 64), min(a.rank, 4)
    try:
        for d in a.define:
            name, overrides = parse_define(d)
            VARIANTS[name] = overrides
    except ValueError as exc:
        ap.error(str(exc))
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in REFERENCES and v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}")
    import diffusers

    cuda = torch.cuda.is_available() and not a.tiny
    start = time.time()

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    emit({"header": {"bench": "bench_sft_step", "card": torch.cuda.get_device_name() if cuda else "cpu",
                     "card_total_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1) if cuda else None,
                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "date": datetime.date.today().isoformat(), "size": a.size, "lora_rank": a.rank, "steps": a.steps,
                     "warmup": a.warmup, "loss_steps": a.loss_steps, "batch": 1, "tiny": a.tiny,
                     "variants": {v: VARIANTS.get(v, "reference loop") for v in variants}}})
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
    # enough distinct samples for one epoch of the timed steps (capped: more steps cycle epochs, as the trainer)
    # (train.batch_size > 1 variants: that many samples per step, so that their batches are full ones)
    per_step = max([int(VARIANTS[v].get("train.batch_size", 1)) * int(VARIANTS[v].get("train.grad_accum", 1))
                    for v in variants if v in VARIANTS] + [1])
    csv_path = write_data(work / "data", max(4 * per_step, min(total_steps(a) * per_step, 24 * per_step)), a.size)
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
    ref_losses = None
    compiled = False
    n_loss = a.loss_steps or 1
    for name in variants:
        elapsed = time.time() - start
        if a.time_budget and elapsed > a.time_budget:
            emit({"variant": name, "error": f"skipped: {elapsed:.0f} s elapsed > --time-budget {a.time_budget:g}"})
            continue
        free_memory()
        try:
            overrides = {}
            if name in REFERENCES:
                from torch.utils.flop_counter import FlopCounterMode

                res = reference_loop(pipe, csv_path, a, targets, FlopCounterMode(display=False) if flops is None else None)
                flops = flops or res["flops"]
            else:
                overrides = {k: (best if k == "model.attention_backend" and v == "best" else v)
                             for k, v in VARIANTS[name].items()}
                if compiled and not is_compiled(overrides):
                    raise RuntimeError("eager variants must come before compiled ones")
                if is_compiled(overrides):
                    torch._dynamo.reset()  # a fresh graph for this variant's kernels
                compiled = compiled or is_compiled(overrides)
                res = ours(pipe, csv_path, work / f"run_{name}", a, overrides)
            sec = statistics.median(res["times"])
            base = sec if name == "reference" else base
            row = {"variant": name, "overrides": overrides,
                   "seconds_per_sample": round(sec, 4), "samples_per_s": round(1 / sec, 4),
                   "ratio_vs_reference": round(base / sec, 3) if base else None, "peak_mem_gib": peak_gib(),
                   "first_loss": res["losses"][0] if res["losses"] else None,
                   "times": [round(x, 4) for x in res["times"]], "elapsed_s": round(time.time() - start, 1)}
            if res.get("samples_per_step", 1) != 1:
                row["samples_per_step"] = res["samples_per_step"]  # "times" are per sample, the losses per optimizer step
            if res.get("activation_checkpointing") is not None:
                row["activation_checkpointing"] = res["activation_checkpointing"]
            if res.get("compiled_blocks", {}).get("compiled"):
                row["compiled_blocks"] = res["compiled_blocks"]
            pre = res.get("precompute")
            if pre:  # the honest end-to-end figure: the step plus the precompute's own batched cost per sample
                row["precompute"] = pre
                if pre.get("s_per_sample"):
                    e2e = sec + pre["s_per_sample"]
                    row["end_to_end_s_per_sample"] = round(e2e, 4)
                    row["end_to_end_ratio_vs_reference"] = round(base / e2e, 3) if base else None
            if a.loss_steps:
                row.update(loss_comparison(res["losses"], ref_losses, n_loss))
            if name == "reference":
                ref_losses = res["losses"]
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
    emit({"done_s": round(time.time() - start, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
