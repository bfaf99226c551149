#!/usr/bin/env python
"""bench_sharded_resume: ZeRO-2 and FSDP2 SFT runs that are killed with SIGKILL mid-run and resumed,
compared with the same run uninterrupted; everything through scripts/sft/train.sh.

    python3 scripts/bench/bench_sharded_resume.py --out /tmp/shres              # 1 GPU, ~5 minutes on an H200
    python3 scripts/bench/bench_sharded_resume.py --out /tmp/shres --dry-run    # CPU: the plan and the commands

Cases (--cases): zero2_lora (ACCELERATE_CONFIG=configs/accelerate/deepspeed_zero2.yaml, LoRA),
fsdp_lora and fsdp_full (configs/accelerate/fsdp.yaml, fsdp_version 2). Model: the tiny random
FLUX.2-klein pipeline of scripts/make_tiny_models.py, built in --out (or --model PATH: any pipeline dir).
Data: --samples random 64x96 / 96x64 image pairs. Per case, two runs start together on the GPU(s):
  ref     --steps optimizer steps, a checkpoint every --checkpoint-every, never interrupted;
  killed  the same; when its metrics.jsonl reaches step --kill-at, its whole process group gets SIGKILL
          (a save may be in flight), then the same command runs again and resumes from the newest
          complete checkpoint to --steps.
One JSON line per case: steps/s (median step time of ref, its first two steps left out), peak GiB
(max_memory_allocated over ranks), checkpoint size (a training_state + export directory), save time
(the step after a checkpoint minus the median step: the trainer saves inside that step's time), the
step it resumed at, max |loss diff| over the steps after the resume, max |diff| of the exported final
weights (LoRA file or transformer/), and ok (loss diff <= --tol x |loss|, the export loads). bf16 mixed
precision on GPU is not bit-reproducible across processes, hence a tolerance. Exit 1 if a case is not ok.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "scripts" / "sft" / "train.sh"
CONFIG = REPO / "configs" / "sft" / "tiny_demo.yaml"
CASES = {"zero2_lora": ("configs/accelerate/deepspeed_zero2.yaml", True),
         "fsdp_lora": ("configs/accelerate/fsdp.yaml", True),
         "fsdp_full": ("configs/accelerate/fsdp.yaml", False)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root: Path, n: int) -> Path:
    import csv

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = ((96, 64), (64, 96))[i % 2]
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        tgt = src.copy()
        tgt[h // 4: h // 2, w // 4: w // 2] = (255, 0, 0)
        Image.fromarray(src).save(root / "images" / f"{i:03d}_in.png")
        Image.fromarray(tgt).save(root / "images" / f"{i:03d}_out.png")
        rows.append({"image": f"images/{i:03d}_out.png", "edit_image": f"images/{i:03d}_in.png",
                     "prompt": f"Mark the red square for question {i}."})
    path = root / "sft_data.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["image", "edit_image", "prompt"])
        wr.writeheader()
        wr.writerows(rows)
    return path


def train_argv(args, model: Path, csv: Path, run_dir: Path, lora: bool) -> list[str]:
    return ["--config", str(CONFIG), f"model.pretrained_path={model}", f"data.csv={csv}", f"train.run_dir={run_dir}",
            "data.max_pixels=6144", f"train.max_steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}",
            "train.keep_last=0", "train.validate_every=0", "train.log_every=1", "train.mixed_precision=bf16",
            "model.dtype=fp32", f"lora.enabled={str(lora).lower()}", "optim.lr=1.0e-4"]


def launch_env(args, accelerate_config: str, port: int, **extra) -> dict:
    env = dict(os.environ, NGPU=str(args.ngpu), NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), ACCELERATE_CONFIG=accelerate_config, PYTHON=args.python,
               HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["bash", str(TRAIN_SH), *argv], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # own group: SIGKILL reaches all


def rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a torn last line while the run writes
            continue
        if "loss" in r:
            out.append(r)
    return out


def wait(p: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise CaseFailed(f"{what}: still running after {timeout:.0f} s; log {log}")
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        own = [ln for ln in lines if ln.startswith("error:") or "Error:" in ln][:12]  # the trainer's own message first
        raise CaseFailed(f"{what}: exit {rc}; error lines of {log}:\n" + "\n".join(own)
                         + "\nlast lines:\n" + "\n".join(lines[-15:]))


class CaseFailed(RuntimeError):
    """A run of a case failed; the case is reported as not ok and the next case still runs."""


def export_tensors(ck: Path, lora: bool) -> dict:
    from safetensors.torch import load_file

    if lora:
        return load_file(str(ck / "pytorch_lora_weights.safetensors"))
    from diffusers import Flux2Transformer2DModel

    return {k: v.float() for k, v in Flux2Transformer2DModel.from_pretrained(str(ck / "transformer")).state_dict().items()}


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_case(args, name: str, model: Path, csv: Path) -> dict:
    accelerate_config, lora = CASES[name]
    root = args.out / name
    shutil.rmtree(root, ignore_errors=True)
    ref_dir, kill_dir = root / "ref", root / "killed"
    ref = start(train_argv(args, model, csv, ref_dir, lora), launch_env(args, accelerate_config, free_port()),
                root / "ref.log")
    killed = start(train_argv(args, model, csv, kill_dir, lora), launch_env(args, accelerate_config, free_port()),
                   root / "killed.log")
    t0 = time.time()
    while not any(r["step"] >= args.kill_at for r in rows(kill_dir)):
        late = time.time() - t0 > args.timeout
        if killed.poll() is not None or late:  # the case fails; stop both runs so the next case has the GPU
            for p in (ref, killed):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            if late:
                raise CaseFailed(f"{name}: step {args.kill_at} not reached in {args.timeout} s; log {root / 'killed.log'}")
            wait(killed, root / "killed.log", f"{name} run to kill", args.timeout)  # raises with its error lines
            raise CaseFailed(f"{name}: the run to kill ended before step {args.kill_at}; log {root / 'killed.log'}")
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    killed_at = max(r["step"] for r in rows(kill_dir))
    resumed = start(train_argv(args, model, csv, kill_dir, lora), launch_env(args, accelerate_config, free_port()),
                    root / "resumed.log")
    wait(resumed, root / "resumed.log", f"{name} resumed run", args.timeout)
    wait(ref, root / "ref.log", f"{name} uninterrupted run", args.timeout)

    log = (root / "resumed.log").read_text()
    resumed_at = int(log.split("resumed from ", 1)[1].split(" at step ", 1)[1].split()[0]) if "resumed from" in log else 0
    a, b = {r["step"]: r for r in rows(ref_dir)}, {r["step"]: r for r in rows(kill_dir)}
    after = [s for s in sorted(a) if s > resumed_at]
    loss_diff = max(abs(a[s]["loss"] - b[s]["loss"]) for s in after)
    rel = max(abs(a[s]["loss"] - b[s]["loss"]) / max(abs(a[s]["loss"]), 1e-12) for s in after)
    times = [a[s]["step_time_s"] for s in sorted(a)][2:]
    median = statistics.median(times)
    after_ck = a.get(args.checkpoint_every + 1, {}).get("step_time_s")
    final = f"step-{args.steps:06d}"
    ea = export_tensors(ref_dir / "checkpoints" / final, lora)
    eb = export_tensors(kill_dir / "checkpoints" / final, lora)
    export_diff = max(float((ea[k].float() - eb[k].float()).abs().max()) for k in ea) if set(ea) == set(eb) else None
    peak = [max(r.get("max_memory_allocated_gib") or [0]) for r in a.values()]
    first_ck = ref_dir / "checkpoints" / f"step-{args.checkpoint_every:06d}"
    return {"case": name, "accelerate_config": accelerate_config, "lora": lora, "ngpu": args.ngpu,
            "steps": args.steps, "steps_per_s": round(1.0 / median, 3), "peak_gib": max(peak),
            "checkpoint_bytes": du(first_ck) if first_ck.is_dir() else None,
            "training_state_files": sorted(p.name for p in (first_ck / "training_state").iterdir())
            if first_ck.is_dir() else None,
            "save_s": round(after_ck - median, 3) if after_ck is not None else None,
            "killed_at_step": killed_at, "resumed_at_step": resumed_at, "max_loss_diff": loss_diff,
            "max_rel_loss_diff": rel, "export_max_diff": export_diff, "export_tensors": len(ea),
            "ok": bool(resumed_at > 0 and rel <= args.tol and export_diff is not None)}


def dry_run(args, model: Path, csv: Path) -> int:
    """Print what would run: per case the train.sh environment and the exact launch command (train.sh DRY_RUN=1)."""
    for name in args.cases:
        accelerate_config, lora = CASES[name]
        argv = train_argv(args, model, csv, args.out / name / "ref", lora)
        res = subprocess.run(["bash", str(TRAIN_SH), *argv], cwd=REPO, capture_output=True, text=True,
                             env=launch_env(args, accelerate_config, 29500, DRY_RUN="1"))
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return res.returncode
        print(json.dumps({"case": name, "dry_run": True, "accelerate_config": accelerate_config, "lora": lora,
                          "kill_at_step": args.kill_at, "resume_from_step": args.kill_at // args.checkpoint_every
                          * args.checkpoint_every, "command": res.stdout.strip().splitlines()[-1]}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--model", type=Path, help="a FLUX.2-klein pipeline dir (default: build the tiny one in --out)")
    ap.add_argument("--ngpu", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--checkpoint-every", type=int, default=4)
    ap.add_argument("--kill-at", type=int, default=6, help="SIGKILL once this step is logged (after a checkpoint)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tol", type=float, default=2e-2, help="allowed relative loss difference after the resume")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--python", default=os.environ.get("PYTHON", sys.executable))
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the launch commands; run nothing")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        ap.error(f"unknown case(s) {bad}; valid: {', '.join(CASES)}")
    if not args.checkpoint_every < args.kill_at < args.steps:
        ap.error("need --checkpoint-every < --kill-at < --steps (the kill must come after a checkpoint)")
    args.out = args.out.resolve()
    model = args.model.resolve() if args.model else args.out / "models" / "flux2-klein-tiny"
    csv = args.out / "data" / "sft_data.csv"
    if args.dry_run:
        return dry_run(args, model, csv)
    import torch

    if not torch.cuda.is_available():
        print("error: bench_sharded_resume needs CUDA GPUs (ZeRO-2 and FSDP refuse to run without); "
              "--dry-run shows the plan on any machine", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model is None and not (model / "model_index.json").is_file():
        subprocess.run([args.python, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(args.out / "models")],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    csv = write_data(args.out / "data", args.samples)
    failed = 0
    for name in args.cases:
        try:
            result = run_case(args, name, model, csv)
        except CaseFailed as exc:
            result = {"case": name, "ok": False, "error": str(exc)}
        print(json.dumps(result), flush=True)
        failed += not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
