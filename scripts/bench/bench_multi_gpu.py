#!/usr/bin/env python
"""bench_multi_gpu: 2-GPU scaling of SFT (DeepSpeed ZeRO-2, and DDP) and of data-parallel evaluation.

    python scripts/bench/bench_multi_gpu.py --out bench_mgpu            # a 2-GPU machine, ~8 minutes
    python scripts/bench/bench_multi_gpu.py --out /tmp/x --tiny         # CPU, tiny models, the same orchestration

Everything runs through the real entry points, as subprocesses, with N = 1 then 2:
  sft_zero2_nN  accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes N
                SFT/train_sft.py --config configs/sft/klein9b_lora_r768.yaml key=value ...
  sft_ddp_nN    the same with configs/accelerate/ddp.yaml (plain DDP), for comparison
  eval_nN       torchrun --nproc_per_node N Evaluation/evaluate.py --config configs/eval/dl3dv_reference.yaml ...
on FLUX.2-klein-base-9B at full shape with random bf16 weights, written to local disk first by
`scripts/make_tiny_models.py --full-shape --random-weights --device cuda` (the released layout, so
load_pipeline / Flux2KleinPipeline.from_pretrained read it: 9.1 B transformer, the full Qwen3-8B text
encoder whose 36 layers run for hidden states 9/18/27 as in the real pipeline, full VAE; ~34 GB).

SFT: 1024x1024 random images (CSV of SFT/prepare_data.py's format), LoRA r768 on the 144 reference
layers, per-block gradient checkpointing, batch 1 per GPU, --sft-warmup + --sft-steps optimizer steps;
per-step times come from the run's metrics.jsonl (step_time_s; warm-up steps skipped);
samples/s = N / mean step time; peak memory per rank from the metrics row (max_memory_allocated_gib)
and nvidia-smi. No run writes a checkpoint (train.save_final=false) except sft_zero2_n2, which saves
its final step to check the ZeRO-2 LoRA save path (frozen base weights excluded); its size and save
seconds are reported, then every run dir is deleted.

Evaluation: --eval-items 1024x1024 DL3DV-style items (scripts/make_dl3dv_fixture.py), --eval-steps
denoising steps with CFG 3.5, a local stub endpoint answering every request after --latency seconds
(verify \\boxed{1}, reason \\boxed{A}). Model load happens inside the first edit (the editor loads
lazily), so throughput is read from results.jsonl: per rank, items finished after its first item
divided by the time between its first and last finish (steady state: load, warm-up and the fixed
MLLM tail are excluded; both ends carry the same request latency), summed over ranks. The
summary's wall_s (load included) and wall minus the estimated load are reported too.

Scaling efficiency = throughput on 2 GPUs / (2 x throughput on 1 GPU), same card and config
(docs/DESIGN.md, Performance). Target >= 0.9.

Schedule (2 GPUs): write model; then the 1-GPU runs two at a time on separate cards (GPU0: sft_zero2_n1
then sft_ddp_n1; GPU1: eval_n1; --sequential runs them one by one: slower, but no neighbour on the
host; the 2-GPU runs share the host the same way); then sft_zero2_n2, eval_n2, sft_ddp_n2. If
sft_zero2_n1 does not fit one card (LoRA r768 = 2.09 B trainable parameters: ZeRO-2 keeps fp32
master weights, Adam moments and fp32 gradients, ~33 GB on one rank, beside the 18 GB transformer
and 16 GB text encoder), sft_zero2_n2 is also compared with sft_ddp_n1. A part whose estimated duration would cross --budget-s is skipped (reported). Each part
is a subprocess with a timeout: one failing part (an OOM, say) never loses the others' numbers.
Output: JSON lines on stdout and in OUT/results.jsonl, logs in OUT/logs/, a table at the end and
OUT/table.md.

--tiny: the tiny random models (scripts/make_tiny_models.py) on CPU, 2 processes on gloo. DeepSpeed
multi-process does not run on CPU (accelerate reports one process), so the ZeRO-2 parts are skipped
there with a note and DDP (configs/accelerate/ddp.yaml) stands in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import REPO, StubEndpoint, evr_reply, load_script, make_tiny_models

T0 = time.time()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # GPU machines have no network; every model is local


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "accelerate", "peft", "deepspeed"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def gpu_info() -> list[dict]:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        rows = [line.split(", ") for line in res.stdout.strip().splitlines() if line.strip()]
        return [{"index": int(r[0]), "name": r[1], "memory_total_mib": int(r[2]), "driver": r[3]} for r in rows]
    except Exception:
        return []


class MemPoller:
    """nvidia-smi memory.used of every GPU once a second (includes other processes' and CUDA contexts)."""

    def __init__(self, enabled: bool):
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = None
        if enabled and shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                res = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10)
                used = {int(a): int(b) for a, b in (line.split(", ") for line in res.stdout.strip().splitlines())}
                self.samples.append((time.time(), used))
            except Exception:
                pass
            self._stop.wait(1.0)

    def peak_gib(self, gpus: list[int], t0: float, t1: float) -> list[float] | None:
        vals = [s for t, s in self.samples if t0 <= t <= t1]
        if not vals:
            return None
        return [round(max(s.get(g, 0) for s in vals) / 1024, 2) for g in gpus]

    def stop(self):
        self._stop.set()


def run_logged(name: str, cmd: list[str], env: dict, log_dir: Path, timeout: float, watch=None) -> dict:
    """Run `cmd` in its own process group, output to log_dir/name.log; kill the group on timeout."""
    log = log_dir / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        timed_out = False
        try:
            p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    tail = log.read_text(errors="replace")[-3000:]
    return {"rc": p.returncode, "timed_out": timed_out, "wall_s": round(time.time() - t0, 1), "t0": t0,
            "t1": time.time(), "log": str(log), "tail": tail}


def error_hint(tail: str) -> str:
    for key in ("OutOfMemoryError", "CUDA out of memory", "Traceback", "Error", "error:"):
        i = tail.rfind(key)
        if i >= 0:
            return tail[max(0, i - 200): i + 600].strip()
    return tail[-800:].strip()


def dir_size_gib(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for fn in files:
            try:
                total += os.path.getsize(os.path.join(root, fn))
            except OSError:
                pass
    return round(total / 2 ** 30, 3)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def write_model(a, work: Path, emit) -> Path | None:
    if a.pipe:
        pipe = Path(a.pipe)
        ok = (pipe / "model_index.json").is_file()
        emit({"part": "write_model", "ok": ok, "given": str(pipe)})
        return pipe if ok else None
    mt = make_tiny_models()
    if a.tiny:
        dirs = mt.build(work / "models", 0, False)
        return dirs["flux2-klein-tiny"]
    pipe = work / "models" / "flux2-klein-base-9b-shape"
    marker = pipe / "ETCHR_TINY_MODEL.json"
    if marker.is_file() and json.loads(marker.read_text()).get("random_weights"):
        emit({"part": "write_model", "ok": True, "reused": str(pipe), "size_gib": dir_size_gib(pipe)})
        return pipe
    free = shutil.disk_usage(work).free / 2 ** 30
    if free < 40:
        emit({"part": "write_model", "ok": False, "error": f"{work}: {free:.0f} GiB free, the model needs ~34 GiB "
              "(use --work on a bigger local disk)"})
        return None
    cmd = [sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(work / "models"),
           "--full-shape", "--random-weights", "--device", "cuda"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(a.gpus[0]))
    r = run_logged("write_model", cmd, env, a.log_dir, a.write_timeout)
    ok = r["rc"] == 0 and marker.is_file()
    emit({"part": "write_model", "ok": ok, "wall_s": r["wall_s"], "size_gib": dir_size_gib(pipe) if ok else None,
          **({} if ok else {"error": error_hint(r["tail"]), "log": r["log"]})})
    return pipe if ok else None


def write_sft_data(root: Path, n: int, size: int) -> Path:
    """n (target, input, prompt) pairs of smooth random RGB images at size x size, in the CSV format
    of SFT/prepare_data.py (image = target, edit_image = input, prompt, sizes)."""
    import csv

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        names = []
        for kind in ("input", "output"):
            small = (rng.random((max(2, size // 32), max(2, size // 32), 3)) * 255).astype("uint8")
            img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
            name = f"images/{i:04d}_{kind}.png"
            img.save(root / name, compress_level=1)
            names.append(name)
        rows.append({"image": names[1], "edit_image": names[0], "width": size, "height": size, "edit_width": size,
                     "edit_height": size,
                     "prompt": f"Imagine a new perspective of the original image that helps answer the question. "
                               f"Question: in scene {i}, which object is to the left of the red chair?"})
    path = root / "sft_data.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------
def sft_part(a, name: str, accel: str, nproc: int, gpus: list[int], pipe: Path, csv: Path, save: bool,
             timeout: float, poller: MemPoller) -> dict:
    run_dir = a.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = "configs/sft/tiny_demo.yaml" if a.tiny else "configs/sft/klein9b_lora_r768.yaml"
    total = a.sft_warmup + a.sft_steps
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{accel}.yaml",
           "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(free_port()),
           "SFT/train_sft.py", "--config", cfg, f"model.pretrained_path={pipe}", f"data.csv={csv}",
           f"train.run_dir={run_dir}", f"train.max_steps={total}", "train.log_every=1",
           "train.checkpoint_every=1000000", "train.validate_every=0", f"train.save_final={str(save).lower()}",
           "train.resume=never", "wandb=false", f"data.num_workers={a.num_workers}", *a.sft_extra]
    if a.tiny:
        cmd += [f"data.max_pixels={a.size * a.size}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.omp_threads), TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    if not a.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    r = run_logged(name, cmd, env, a.log_dir, timeout)
    out = {"part": name, "kind": "sft", "accelerate_config": accel, "num_processes": nproc, "gpus": gpus,
           "rc": r["rc"], "timed_out": r["timed_out"], "process_wall_s": r["wall_s"], "log": r["log"]}
    rows = []
    mpath = run_dir / "metrics.jsonl"
    if mpath.is_file():
        rows = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
    timed = [row["step_time_s"] for row in rows if row["step"] > a.sft_warmup and "step_time_s" in row]
    for line in r["tail"].splitlines():
        if line.startswith("[sft]") and "trainable parameters" in line:
            out["setup"] = line.strip()
    if rows:
        out["launch_to_first_step_s"] = round(rows[0]["time"] - r["t0"], 1)
        out["steps_done"] = rows[-1]["step"]
        out["losses_finite"] = all(isinstance(row.get("loss"), (int, float)) for row in rows)
        if rows[-1].get("max_memory_allocated_gib") is not None:
            out["max_memory_allocated_gib"] = rows[-1]["max_memory_allocated_gib"]
    out["nvidia_smi_peak_gib"] = poller.peak_gib(gpus, r["t0"], r["t1"])
    if timed:
        mean = statistics.fmean(timed)
        out.update(timed_steps=len(timed), step_time_mean_s=round(mean, 4),
                   step_time_median_s=round(statistics.median(timed), 4),
                   step_time_min_max_s=[round(min(timed), 4), round(max(timed), 4)],
                   samples_per_s=round(nproc * 1 / mean, 4))
    if save and rows:
        ck = run_dir / "checkpoints"
        out["checkpoint_gib"] = dir_size_gib(ck) if ck.is_dir() else None
        out["checkpoint_files"] = sorted(str(p.relative_to(ck)) for p in ck.rglob("*") if p.is_file())[:40] \
            if ck.is_dir() else []
        out["save_and_exit_s"] = round(r["t1"] - rows[-1]["time"], 1)
    out["ok"] = bool(timed) and len(timed) == a.sft_steps and r["rc"] == 0
    if not out["ok"]:
        out["error"] = error_hint(r["tail"])
    if not a.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


def eval_part(a, name: str, nproc: int, gpus: list[int], pipe: Path, data: Path, url: str, timeout: float,
              poller: MemPoller) -> dict:
    run_dir = a.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = "configs/eval/tiny_demo.yaml" if a.tiny else "configs/eval/dl3dv_reference.yaml"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "Evaluation/evaluate.py", "--config", cfg, f"run_dir={run_dir}",
           f"tasks.dl3dv.path={data}", f"editor.pipe_path={pipe}", f"editor.steps={a.eval_steps}",
           f"editor.max_area={a.size * a.size}", f"mllm.endpoints=[{url}]", "mllm.model=stub",
           "mllm.concurrency=32", "mllm.max_retries=0", "report_html=false", *a.eval_extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.omp_threads), TOKENIZERS_PARALLELISM="false")
    if not a.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    r = run_logged(name, cmd, env, a.log_dir, timeout)
    out = {"part": name, "kind": "eval", "num_processes": nproc, "gpus": gpus, "items": a.eval_items,
           "steps": a.eval_steps, "size": a.size, "latency_s": a.latency, "rc": r["rc"], "timed_out": r["timed_out"],
           "process_wall_s": r["wall_s"], "log": r["log"]}
    rows = []
    for f in [run_dir / "results.jsonl", *sorted(run_dir.glob("results.rank*.jsonl"))]:
        if f.is_file():
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    uniq = {}
    for row in rows:  # rank files and the merged file hold the same rows
        uniq[row["id"]] = row
    rows = list(uniq.values())
    out["rows"] = len(rows)
    out["failed_rows"] = sum(row.get("status") != "ok" for row in rows)
    per_rank, load_est = [], []
    for rk in sorted({row.get("rank", 0) for row in rows}):
        rr = sorted((row for row in rows if row.get("rank", 0) == rk), key=lambda row: row["time"])
        secs = [row.get("edit_seconds") for row in rr if isinstance(row.get("edit_seconds"), (int, float))]
        if len(secs) >= 2:
            load_est.append(secs[0] - statistics.median(secs[1:]))
        if len(rr) >= 2 and rr[-1]["time"] > rr[0]["time"]:
            per_rank.append({"rank": rk, "items": len(rr), "steady_items_per_s":
                             round((len(rr) - 1) / (rr[-1]["time"] - rr[0]["time"]), 5),
                             "median_edit_s": round(statistics.median(secs[1:]), 3) if len(secs) >= 2 else None})
    out["per_rank"] = per_rank
    if per_rank and len(per_rank) == nproc:
        out["items_per_s"] = round(sum(p["steady_items_per_s"] for p in per_rank), 5)
    sj = run_dir / "summary.json"
    if sj.is_file():
        s = json.loads(sj.read_text())
        t = (s.get("tasks") or s).get("dl3dv", {})
        out["summary"] = {k: t.get(k) for k in ("wall_s", "edits_made", "edits_per_s", "edit_seconds", "tail_wait_s",
                                               "failures", "failed") if k in t}
        if load_est and t.get("wall_s"):
            loop = t["wall_s"] - max(load_est)
            out["wall_minus_load_s"] = round(loop, 2)
            out["items_per_s_wall_minus_load"] = round(len(rows) / loop, 5) if loop > 0 else None
    out["load_estimate_s"] = [round(x, 1) for x in load_est]
    out["nvidia_smi_peak_gib"] = poller.peak_gib(gpus, r["t0"], r["t1"])
    out["ok"] = r["rc"] == 0 and "items_per_s" in out and out["rows"] == a.eval_items and out["failed_rows"] == 0
    if not out["ok"]:
        out["error"] = error_hint(r["tail"])
    if not a.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (results.jsonl, table.md, logs/)")
    ap.add_argument("--work", default=None, help="scratch folder for the model, data and runs "
                    "(default /tmp/etchr_bench_mgpu[_tiny]); a model already written there is reused")
    ap.add_argument("--tiny", action="store_true", help="CPU, tiny models, DDP on gloo (ZeRO-2 skipped)")
    ap.add_argument("--pipe", default=None, help="use this FLUX.2-klein pipeline dir instead of writing one")
    ap.add_argument("--parts", default="sft_zero2,sft_ddp,eval", help="comma list of sft_zero2, sft_ddp, eval")
    ap.add_argument("--gpus", default="0,1", help="the two GPU indices")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; tiny: 64)")
    ap.add_argument("--sft-warmup", type=int, default=2, help="optimizer steps not timed")
    ap.add_argument("--sft-steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--eval-items", type=int, default=8, help="items (even: split over 2 ranks)")
    ap.add_argument("--eval-steps", type=int, default=10, help="denoising steps per edit (CFG 3.5)")
    ap.add_argument("--latency", type=float, default=1.0, help="stub endpoint seconds per request")
    ap.add_argument("--num-workers", type=int, default=2, help="SFT data.num_workers")
    ap.add_argument("--sequential", action="store_true", help="run the 1-GPU parts one by one, not side by side")
    ap.add_argument("--no-save-check", action="store_true", help="sft_zero2_n2 does not save its final step")
    ap.add_argument("--budget-s", type=float, default=480, help="skip parts that would end after this")
    ap.add_argument("--part-timeout-s", type=float, default=300)
    ap.add_argument("--write-timeout-s", dest="write_timeout", type=float, default=240)
    ap.add_argument("--keep-runs", action="store_true", help="keep run dirs (checkpoints!) under --work")
    ap.add_argument("--sft-extra", nargs="*", default=[], help="more key=value for train_sft.py")
    ap.add_argument("--eval-extra", nargs="*", default=[], help="more key=value for evaluate.py")
    a = ap.parse_args(argv)
    a.size = a.size or (64 if a.tiny else 1024)
    a.gpus = [int(g) for g in a.gpus.split(",")][:2]
    a.omp_threads = 1 if a.tiny else 4
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.log_dir = out / "logs"
    a.log_dir.mkdir(exist_ok=True)
    a.work = Path(a.work or ("/tmp/etchr_bench_mgpu_tiny" if a.tiny else "/tmp/etchr_bench_mgpu"))
    a.work.mkdir(parents=True, exist_ok=True)
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    results: list[dict] = []
    res_file = out / "results.jsonl"
    res_file.write_text("")
    lock = threading.Lock()

    def emit(obj):
        obj = {"t_s": round(time.time() - T0, 1), **obj}
        with lock:
            results.append(obj)
            print(json.dumps(obj), flush=True)
            with open(res_file, "a") as f:
                f.write(json.dumps(obj) + "\n")

    gpus = gpu_info()
    emit({"header": {"cards": [g["name"] for g in gpus] or ["cpu"], "gpus": gpus, **versions(),
                     "python": sys.version.split()[0], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                         timespec="seconds"), "tiny": a.tiny, "size": a.size, "sft_warmup": a.sft_warmup,
                     "sft_steps": a.sft_steps, "eval_items": a.eval_items, "eval_steps": a.eval_steps,
                     "latency_s": a.latency, "parts": sorted(parts), "work": str(a.work)}})
    if not a.tiny and len(gpus) < 2:
        emit({"warning": f"{len(gpus)} GPU(s) visible: the 2-GPU parts will fail"})
    poller = MemPoller(not a.tiny)
    estimates: dict[str, float] = {}  # part -> expected seconds (from the same kind's earlier run)

    def fits(name: str, default: float) -> bool:
        est = estimates.get(name, default)
        left = a.budget_s - (time.time() - T0)
        if est > left:
            emit({"part": name, "skipped": True, "reason": f"budget: ~{est:.0f} s needed, {left:.0f} s left"})
            return False
        return True

    def timeout_for() -> float:
        return max(30.0, min(a.part_timeout_s, a.budget_s + 45 - (time.time() - T0)))

    try:
        # ---- inputs
        t = time.time()
        pipe = write_model(a, a.work, emit)
        if pipe is None:
            emit({"fatal": "no model: nothing else can run"})
            return 1
        n_rows = 2 * (a.sft_warmup + a.sft_steps)
        csv = write_sft_data(a.work / "sft", n_rows, a.size) if parts & {"sft_zero2", "sft_ddp"} else None
        data = None
        if "eval" in parts:
            fx = load_script("scripts/make_dl3dv_fixture.py", "etchr_make_dl3dv_fixture")
            data = Path(fx.make(str(a.work / "dl3dv.parquet"), n=a.eval_items, size=(a.size, a.size)))
        stub = StubEndpoint(a.latency, evr_reply)
        url = stub.url
        emit({"part": "inputs", "sft_rows": n_rows, "eval_items": a.eval_items, "wall_s": round(time.time() - t, 1)})

        zero2 = "sft_zero2" in parts and not a.tiny
        if "sft_zero2" in parts and a.tiny:
            emit({"part": "sft_zero2", "skipped": True, "reason": "tiny/CPU: DeepSpeed multi-process does not run on "
                  "CPU (accelerate reports one process); DDP on gloo stands in"})
        ddp = "sft_ddp" in parts or ("sft_zero2" in parts and a.tiny)
        g0, g1 = a.gpus[0], a.gpus[1] if len(a.gpus) > 1 else a.gpus[0]

        def sft(name, accel, n, gs, save=False):
            if save and not a.tiny and shutil.disk_usage(a.work).free / 2 ** 30 < 60:
                save = False  # LoRA r768 under ZeRO-2: ~40 GiB of checkpoint (optimizer states in fp32)
                emit({"note": f"{name}: less than 60 GiB free under {a.work}: the save check is off"})
            if fits(name, 150 if n == 1 else 170):
                r = sft_part(a, name, accel, n, gs, pipe, csv, save, timeout_for(), poller)
                estimates.setdefault(name.replace("_n1", "_n2"), r["process_wall_s"] + 20)
                emit(r)

        def ev(name, n, gs):
            if fits(name, 150 if n == 1 else 110):
                r = eval_part(a, name, n, gs, pipe, data, url, timeout_for(), poller)
                estimates.setdefault(name.replace("_n1", "_n2"), r["process_wall_s"] * 0.75)
                emit(r)

        # ---- 1 GPU: two queues on two cards (or one after another)
        q0 = []
        if zero2:
            q0.append(lambda: sft("sft_zero2_n1", "deepspeed_zero2", 1, [g0]))
        if ddp:
            q0.append(lambda: sft("sft_ddp_n1", "ddp", 1, [g0]))
        q1 = [lambda: ev("eval_n1", 1, [g1])] if "eval" in parts else []

        def run_queue(q):
            for job in q:
                try:
                    job()
                except Exception as exc:  # a bench bug in one part must not lose the others
                    emit({"part_error": f"{type(exc).__name__}: {exc}"})

        if a.tiny or a.sequential:
            run_queue(q0 + q1)
        else:
            th = threading.Thread(target=run_queue, args=(q1,))
            th.start()
            run_queue(q0)
            th.join()
        # ---- 2 GPUs
        q2 = []
        if zero2:
            q2.append(lambda: sft("sft_zero2_n2", "deepspeed_zero2", 2, a.gpus, save=not a.no_save_check))
        if "eval" in parts:
            q2.append(lambda: ev("eval_n2", 2, a.gpus))
        if ddp:
            q2.append(lambda: sft("sft_ddp_n2", "ddp", 2, a.gpus))
        run_queue(q2)
        stub.close()
    finally:
        poller.stop()
        summarize(results, emit, out, a)
    return 0


def summarize(results: list[dict], emit, out: Path, a) -> None:
    by = {r["part"]: r for r in results if "part" in r and not r.get("skipped")}

    def thr(name, key):
        r = by.get(name)
        return r.get(key) if r and r.get("ok") else None

    lines = []
    for base, n2, key, unit in (("sft_zero2_n1", "sft_zero2_n2", "samples_per_s", "samples/s"),
                                ("sft_ddp_n1", "sft_ddp_n2", "samples_per_s", "samples/s"),
                                ("sft_ddp_n1", "sft_zero2_n2", "samples_per_s", "samples/s"),
                                ("eval_n1", "eval_n2", "items_per_s", "items/s")):
        x1, x2 = thr(base, key), thr(n2, key)
        if base == "sft_ddp_n1" and n2 == "sft_zero2_n2" and (thr("sft_zero2_n1", key) is not None
                                                             or "sft_zero2_n2" not in by):
            continue  # cross-config baseline only when ZeRO-2 has no 1-GPU number (e.g. OOM on 80 GB)
        if x1 is None and x2 is None:
            continue
        eff = round(x2 / (2 * x1), 3) if x1 and x2 else None
        emit({"scaling": f"{n2} vs {base}", "unit": unit, "n1": x1, "n2": x2, "efficiency": eff,
              "target_met": None if eff is None else eff >= 0.9})
        lines.append((f"{n2} / (2 x {base})", unit, x1, x2, eff))
    hdr = next((r["header"] for r in results if "header" in r), {})
    table = [f"# bench_multi_gpu ({'tiny, CPU' if a.tiny else ', '.join(hdr.get('cards', []))}; torch "
             f"{hdr.get('torch')}, diffusers {hdr.get('diffusers')}, deepspeed {hdr.get('deepspeed')}; "
             f"{hdr.get('date')})", "",
             "| part | ok | throughput | step / item s | peak GiB per rank | load / first step s | process s | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "part" not in r or r["part"] in ("inputs",):
            continue
        if r.get("skipped"):
            table.append(f"| {r['part']} | skipped | | | | | | {r.get('reason', '')} |")
            continue
        if r.get("kind") == "sft":
            thr_s = f"{r.get('samples_per_s')} samples/s" if r.get("samples_per_s") else ""
            step = r.get("step_time_median_s", "")
            peak = r.get("max_memory_allocated_gib") or r.get("nvidia_smi_peak_gib") or ""
            first = r.get("launch_to_first_step_s", "")
            note = (f"checkpoint {r.get('checkpoint_gib')} GiB, save+exit {r.get('save_and_exit_s')} s"
                    if "checkpoint_gib" in r else "")
        elif r.get("kind") == "eval":
            thr_s = f"{r.get('items_per_s')} items/s" if r.get("items_per_s") else ""
            step = ", ".join(str(p.get("median_edit_s")) for p in r.get("per_rank", []))
            peak = r.get("nvidia_smi_peak_gib") or ""
            first = ", ".join(map(str, r.get("load_estimate_s", [])))
            note = f"wall-load: {r.get('items_per_s_wall_minus_load')} items/s"
        else:
            thr_s = step = peak = first = ""
            note = f"{r.get('size_gib', '')} GiB" if r.get("part") == "write_model" else ""
        if not r.get("ok") and r.get("error"):
            note += " ERROR: " + r["error"].splitlines()[-1][:160].replace("|", "/")
        table.append(f"| {r['part']} | {r.get('ok')} | {thr_s} | {step} | {peak} | {first} | "
                     f"{r.get('process_wall_s', r.get('wall_s', ''))} | {note} |")
    table += ["", "| scaling | unit | 1 GPU | 2 GPUs | efficiency (target >= 0.9) |", "|---|---|---|---|---|"]
    table += [f"| {n} | {u} | {x1} | {x2} | {e} |" for n, u, x1, x2, e in lines]
    table.append(f"\ntotal {time.time() - T0:.0f} s")
    text = "\n".join(table) + "\n"
    (out / "table.md").write_text(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
