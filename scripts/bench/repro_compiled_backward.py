#!/usr/bin/env python
"""Diagnose the compiled backward's CUBLAS_STATUS_EXECUTION_FAILED (issue #17, docs/PERFORMANCE.md).

bench_sft_step's `model.compile=true` variant failed at the first step of SFT at 9B / 1024^2 (LoRA r768,
per-block gradient checkpointing, regional compile). This script rebuilds that step at the smallest scale
that keeps the shapes: FLUX.2-klein-base-9B blocks at full width (inner 4096 = 32 heads x 128, MLP 12288,
text 12288), by default one double-stream and one single-stream block, random bf16 weights on the GPU,
peft LoRA r768 / alpha 768 on the reference's layers (SFT's lora_target_names), 512 text tokens + target
+ reference image tokens. Each case runs in its own subprocess under CUDA_LAUNCH_BLOCKING=1 (a CUDA
failure poisons the context, and the sweep must go on): an eager forward + backward gives the reference
LoRA gradients, then the same step with the case's compile settings; one JSON line per case on stdout
(ok, the failing phase and the error / traceback tail, max abs and relative gradient difference vs eager,
loss difference, seconds, peak GiB). A case that runs but whose gradients differ from eager's by more than
--grad-rtol (default 0.05 of eager's largest gradient) is not ok: phase "gradients". On an H200 with torch
2.11 compile_ckpt_1024 and compile_ckpt_512 failed that way (docs/PERFORMANCE.md, "Compiled backward"); a
torch on which they pass is one where model.compile_trust_backward=true can be set.

    python3 scripts/bench/repro_compiled_backward.py                      # the diagnose sweep (H200, < 8 min)
    python3 scripts/bench/repro_compiled_backward.py --sweep workarounds  # candidate workarounds at 1024^2
    python3 scripts/bench/repro_compiled_backward.py --list               # the cases of every sweep
    python3 scripts/bench/repro_compiled_backward.py --cases compile_ckpt_1024,eager_ckpt_1024 --double 8 --single 24
    python3 scripts/bench/repro_compiled_backward.py --tiny --cases compile_ckpt_512 --backend aot_eager   # CPU

Options: --out FILE also appends the JSON lines there; --budget-s stops starting cases once that much
time has gone (default 320 s); --case-timeout-s per case (default 150 s): at most 470 s in all. --keep-code
DIR: inductor's cache and generated code (TORCHINDUCTOR_CACHE_DIR, shared by the cases) for reading the
failing kernel. Cases run bf16 autocast around the step on CUDA as accelerate's mixed_precision=bf16 did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TEXT_TOKENS = 512


def _case(name, size, *, ckpt=True, compile="regional", fullgraph=True, mode=None, inductor=None, env=None,
          reduced_precision_reduction=None, preferred_blas=None, autocast=True, cudnn_sdp=None, note=""):
    """autocast: bf16 autocast around the forward on CUDA (the backward replays its casts), as accelerate's mixed_precision=bf16 (SFT's
    default train.mixed_precision) ran the failing step; False = plain bf16 weights only."""
    return {"name": name, "size": size, "ckpt": ckpt, "compile": compile, "fullgraph": fullgraph, "mode": mode,
            "autocast": autocast,
            "inductor": inductor or {}, "env": env or {}, "reduced_precision_reduction": reduced_precision_reduction,
            "preferred_blas": preferred_blas, "cudnn_sdp": cudnn_sdp, "note": note}


# Cases in the order they run (the most telling first, so a --budget-s cut loses the least).
SWEEPS = {
    "diagnose": [
        _case("eager_ckpt_1024", 1024, compile="none", note="sanity: the eager step at the failing shape"),
        _case("compile_ckpt_1024", 1024, note="the failing configuration (bench_sft_step model.compile=true)"),
        _case("compile_ckpt_512", 512, note="smallest shape"),
        _case("compile_ckpt_768", 768),
        _case("compile_ckpt_1024_no_autocast", 1024, autocast=False, note="autocast's part (accelerate bf16)"),
        _case("compile_nockpt_1024", 1024, ckpt=False, note="checkpointing's part: compiled without the wrapper"),
        _case("compile_nockpt_512", 512, ckpt=False),
        _case("compile_ckpt_1024_no_lt_addmm", 1024, env={"DISABLE_ADDMM_CUDA_LT": "1"},
              note="addmm without the cuBLASLt bias epilogue"),
        _case("compile_ckpt_1024_no_bf16_reduction", 1024, reduced_precision_reduction=False,
              note="torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction=False"),
    ],
    "workarounds": [
        _case("compile_ckpt_1024_graph_breaks", 1024, fullgraph=False,
              note="regional compile as RL's (fullgraph=False); H200 2026-12-03: as wrong as fullgraph, r768 and r64"),
        _case("compile_nockpt_1024_no_cudnn", 1024, ckpt=False, cudnn_sdp=False,
              note="no checkpointing, SDPA's cuDNN kernel off (its backward crashed compile_nockpt_1024)"),
        _case("compile_nockpt_1024_graph_breaks_no_cudnn", 1024, ckpt=False, fullgraph=False, cudnn_sdp=False),
        _case("compile_ckpt_1024_no_lt_addmm", 1024, env={"DISABLE_ADDMM_CUDA_LT": "1"}),
        _case("compile_ckpt_1024_cublas_lib", 1024, preferred_blas="cublas",
              note="torch.backends.cuda.preferred_blas_library('cublas')"),
        _case("compile_ckpt_1024_cublaslt_lib", 1024, preferred_blas="cublaslt"),
        _case("compile_ckpt_1024_no_bf16_reduction", 1024, reduced_precision_reduction=False),
        _case("compile_ckpt_1024_plain_inductor", 1024,
              inductor={"max_autotune": False, "max_autotune_gemm": False, "triton.cudagraphs": False}),
        _case("compile_ckpt_1024_emulate_casts", 1024, inductor={"emulate_precision_casts": True}),
        _case("compile_ckpt_1024_max_autotune_no_cg", 1024, mode="max-autotune-no-cudagraphs",
              note="slow to compile (GEMM autotuning): last"),
    ],
}


def all_cases() -> dict:
    out = {}
    for cases in SWEEPS.values():
        for c in cases:
            out.setdefault(c["name"], c)
    return out


# ================================================================================ one case (child process)
def _set_inductor(key: str, value) -> None:
    import torch._inductor.config as cfg

    *path, last = key.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    if not hasattr(obj, last):
        raise KeyError(f"torch._inductor.config has no {key}")
    setattr(obj, last, value)


def build(args, device: str):
    """The transformer (args.double double + args.single single blocks at 9B width, or the tiny twin's
    width with --tiny), peft LoRA on the reference targets, LoRA B non-zero so every LoRA weight gets a
    gradient. bf16 on CUDA, fp32 on CPU."""
    import torch
    from diffusers import Flux2Transformer2DModel

    sys.path.insert(0, str(REPO / "SFT"))
    sys.path.insert(0, str(REPO / "scripts"))
    from etchr_sft.config import REFERENCE_LORA_TARGETS
    from etchr_sft.model import add_lora, lora_target_names
    from make_tiny_models import FULL_TRANSFORMER, TINY_TRANSFORMER

    shape = dict(TINY_TRANSFORMER if args.tiny else FULL_TRANSFORMER)
    shape.update(num_layers=args.double, num_single_layers=args.single)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            t = Flux2Transformer2DModel(**shape)
    finally:
        torch.set_default_dtype(old)
    t.requires_grad_(False)
    rank = args.rank if not args.tiny else min(args.rank, 8)
    add_lora(t, rank, float(rank), lora_target_names(t, list(REFERENCE_LORA_TARGETS), True))
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    t.to(device)
    t.train()
    return t


def inputs(t, size: int, device: str) -> dict:
    """512 text tokens + target + reference image tokens of a size x size edit (batch 1), seeded."""
    import torch

    n = (size // 16) ** 2
    g = torch.Generator(device="cpu").manual_seed(1)
    dt = next(t.parameters()).dtype
    c = t.config
    return {"hidden_states": torch.randn(1, 2 * n, c.in_channels, generator=g).to(device, dt),
            "img_ids": torch.zeros(1, 2 * n, 4, dtype=torch.long, device=device),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, c.joint_attention_dim, generator=g).to(device, dt),
            "txt_ids": torch.zeros(1, TEXT_TOKENS, 4, dtype=torch.long, device=device),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dt), "guidance": None, "return_dict": False}


def step(t, kw, phase: list, autocast: bool) -> tuple[float, dict]:
    """Forward + backward; returns (loss, {LoRA param name: grad}). `phase` names where a failure happened."""
    import contextlib

    import torch

    for p in t.parameters():
        p.grad = None
    phase[0] = phase[0].split("_")[0] + "_forward"
    cuda = kw["hidden_states"].is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16) if autocast and cuda else contextlib.nullcontext():
        loss = t(**kw)[0].float().square().mean()
    if kw["hidden_states"].is_cuda:
        torch.cuda.synchronize()
    phase[0] = phase[0].split("_")[0] + "_backward"
    loss.backward()
    if kw["hidden_states"].is_cuda:
        torch.cuda.synchronize()
    return loss.item(), {n: p.grad.detach().clone() for n, p in t.named_parameters() if p.requires_grad}


def run_case(case: dict, args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    size = case["size"] // 8 if args.tiny else case["size"]  # tiny: 64..128 px -> 16..64 image tokens
    rec = {"case": case["name"], "size": case["size"], "tokens": TEXT_TOKENS + 2 * (size // 16) ** 2,
           "ckpt": case["ckpt"], "autocast": case["autocast"] and device == "cuda", "compile": case["compile"],
           "fullgraph": case["fullgraph"], "mode": case["mode"],
           "inductor": case["inductor"], "env": case["env"], "backend": args.backend,
           "reduced_precision_reduction": case["reduced_precision_reduction"],
           "preferred_blas": case["preferred_blas"], "cudnn_sdp": case["cudnn_sdp"], "blocks": [args.double, args.single],
           "lora_rank": args.rank if not args.tiny else min(args.rank, 8), "device": device,
           "tiny": bool(args.tiny), "torch": torch.__version__,
           "cuda_launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING")}
    if device == "cuda":
        rec["gpu"] = torch.cuda.get_device_name()
    phase = ["setup"]
    t0 = time.time()
    try:
        for key, value in case["inductor"].items():
            _set_inductor(key, value)
        if case["reduced_precision_reduction"] is not None:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = case["reduced_precision_reduction"]
        if case["cudnn_sdp"] is not None:
            torch.backends.cuda.enable_cudnn_sdp(case["cudnn_sdp"])
        if case["preferred_blas"]:
            torch.backends.cuda.preferred_blas_library(case["preferred_blas"])
        phase[0] = "build"
        t = build(args, device)
        if case["ckpt"]:
            t.enable_gradient_checkpointing()
        kw = inputs(t, size, device)
        phase[0] = "eager_forward"
        ref_loss, ref = step(t, kw, phase, case["autocast"])
        rec["eager_s"] = round(time.time() - t0, 2)
        if case["compile"] != "none":
            phase[0] = "compile_setup"
            opts = {"fullgraph": case["fullgraph"], "backend": args.backend}
            if case["mode"]:
                opts["mode"] = case["mode"]
            t.compile_repeated_blocks(**opts)
            t1 = time.time()
            phase[0] = "compiled_forward"
            loss, got = step(t, kw, phase, case["autocast"])
            rec["compiled_first_step_s"] = round(time.time() - t1, 2)
            t2 = time.time()
            phase[0] = "compiled_forward"
            loss, got = step(t, kw, phase, case["autocast"])  # second step: the compiled graphs without compilation
            rec["compiled_step_s"] = round(time.time() - t2, 3)
            diffs = [(got[n].float() - ref[n].float()).abs().max().item() for n in ref]
            scale = max(ref[n].float().abs().max().item() for n in ref)
            rec.update(loss_eager=ref_loss, loss_compiled=loss, loss_rel_diff=abs(loss - ref_loss) / abs(ref_loss),
                       grad_max_abs_diff=max(diffs), grad_max_abs=scale, grad_rel_diff=max(diffs) / scale,
                       grads=len(ref), grad_rtol=args.grad_rtol)
            if not rec["grad_rel_diff"] <= args.grad_rtol:  # ran, but trained on wrong gradients: a failure
                rec.update(ok=False, phase="gradients",
                           error=f"compiled LoRA gradients differ from eager: max abs diff {max(diffs):.3g} = "
                                 f"{rec['grad_rel_diff']:.3g} x eager's largest gradient (> --grad-rtol "
                                 f"{args.grad_rtol:g})")
                return _finish(rec, t0, device)
        else:
            rec.update(loss_eager=ref_loss, grads=len(ref))
        rec["ok"] = True
    except Exception as exc:  # the failure is the measurement: record it, exit 0 so the parent reads the line
        rec.update(ok=False, phase=phase[0], error=f"{type(exc).__name__}: {str(exc)[:1500]}",
                   traceback=traceback.format_exc()[-4000:])
    return _finish(rec, t0, device)


def _finish(rec: dict, t0: float, device: str) -> dict:
    rec["seconds"] = round(time.time() - t0, 2)
    if device == "cuda":
        try:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        except Exception:  # a poisoned CUDA context cannot answer; the error above says why
            pass
    return rec


# ================================================================================ the sweep (parent)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default="diagnose", choices=sorted(SWEEPS))
    ap.add_argument("--cases", default="", help="comma-separated case names (any sweep's); overrides --sweep")
    ap.add_argument("--list", action="store_true", help="print every sweep's cases and exit")
    ap.add_argument("--double", type=int, default=1, help="double-stream blocks (9B: 8)")
    ap.add_argument("--single", type=int, default=1, help="single-stream blocks (9B: 24)")
    ap.add_argument("--rank", type=int, default=768, help="LoRA rank (alpha = rank, as the reference)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (CPU test: aot_eager)")
    ap.add_argument("--tiny", action="store_true", help="the tiny twin's widths on the CPU (tests)")
    ap.add_argument("--budget-s", type=float, default=320.0, help="start no case after this many seconds (0 = no limit)")
    ap.add_argument("--case-timeout-s", type=float, default=150.0)
    ap.add_argument("--grad-rtol", type=float, default=0.05,
                    help="largest compiled-vs-eager LoRA gradient difference, as a fraction of eager's largest "
                         "gradient, that still counts as ok (bf16 rounding stays well below 0.05)")
    ap.add_argument("--out", default="", help="also append the JSON lines to this file")
    ap.add_argument("--keep-code", default="", help="TORCHINDUCTOR_CACHE_DIR for the cases (default: a temp dir)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:  # one case, in this process; the parent reads the last stdout line
        print(json.dumps(run_case(json.loads(args.child), args)), flush=True)
        return 0

    known = all_cases()
    if args.list:
        for sweep, cases in SWEEPS.items():
            for c in cases:
                print(f"{sweep:12s} {c['name']:40s} {c['note']}")
        return 0
    if args.cases:
        unknown = [n for n in args.cases.split(",") if n not in known]
        if unknown:
            print(f"error: unknown case(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
        cases = [known[n] for n in args.cases.split(",")]
    else:
        cases = SWEEPS[args.sweep]
    code_dir = args.keep_code or tempfile.mkdtemp(prefix="repro_compiled_backward_")
    start = time.time()
    failed = 0
    for case in cases:
        if args.budget_s > 0 and time.time() - start > args.budget_s:
            rec = {"case": case["name"], "ok": None, "skipped": f"--budget-s {args.budget_s:g} s reached"}
        else:
            rec = _spawn(case, args, code_dir)
        failed += rec.get("ok") is False
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    print(json.dumps({"summary": True, "cases": len(cases), "failed": failed, "seconds": round(time.time() - start, 1),
                      "inductor_code": code_dir}), flush=True)
    return 0


def _spawn(case: dict, args, code_dir: str) -> dict:
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", TORCHINDUCTOR_CACHE_DIR=code_dir, **case["env"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(case), "--double", str(args.double),
           "--single", str(args.single), "--rank", str(args.rank), "--backend", args.backend,
           "--grad-rtol", str(args.grad_rtol)]
    if args.tiny:
        cmd.append("--tiny")
    t0 = time.time()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:] if isinstance(exc.stderr, bytes) else (exc.stderr or "")[-2000:]
        return {"case": case["name"], "ok": False, "phase": "timeout",
                "error": f"no result within --case-timeout-s {args.case_timeout_s:g} s",
                "stderr_tail": tail if isinstance(tail, str) else tail.decode(errors="replace")}
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if lines:
        rec = json.loads(lines[-1])
    else:  # the process died (abort, segfault, killed): what it printed is the evidence
        rec = {"case": case["name"], "ok": False, "phase": "process died",
               "error": f"exit status {res.returncode} without a result line"}
    rec["returncode"] = res.returncode
    if rec.get("ok") is False:
        rec["stderr_tail"] = res.stderr[-3000:]
    rec["wall_s"] = round(time.time() - t0, 1)
    return rec


if __name__ == "__main__":
    sys.exit(main())
