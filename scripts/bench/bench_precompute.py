#!/usr/bin/env python
"""bench_precompute: what precomputed conditioning (data.precomputed_dir, issue #17) costs and saves.

    python scripts/bench/bench_precompute.py [--size 1024] [--batch-sizes 1,4,8] [--steps 4] [--out results.jsonl]
    python scripts/bench/bench_precompute.py --tiny        # CPU smoke run with the tiny random models

Builds FLUX.2-klein-base-9B at full shape with random bf16 weights on the GPU (benchlib.full_shape_pipeline),
writes random size x size (target, input) pairs (bench_sft_step.write_data), then prints one JSON object per
result:
  precompute_cost   seconds per sample of the batched precompute (image decode + preprocessing, text encoder
                    on batches of prompts, VAE on same-size batches) for each batch size, after one warmup batch
                    (etchr_sft.precompute.precompute_cost)
  precompute_run    SFT/precompute.py's precompute() on the same data at the largest batch size (its meta.json:
                    samples/s as it really runs, shards written)
  train             the trainer's step time (median of its step_time_s after the warmup steps; batch 1, LoRA,
                    gradient checkpointing) without and with data.precomputed_dir, same pipeline, same data
  end_to_end        the per-sample saving of one epoch with the precompute's own cost added back, so the gain
                    is honest: eager step vs precomputed step + precompute s/sample
In the precomputed run the encoders of this in-memory pipeline stay where the bench built them (on the GPU:
no compute, only memory); loaded from disk, train_sft.py keeps them on the CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import REPO, full_shape_pipeline, load_script, make_tiny_models  # noqa: E402

sys.path.insert(0, str(REPO / "SFT"))


def train_steps(pipe, csv_path: Path, run_dir: Path, args, precomputed_dir: str = "") -> dict:
    """The real trainer on `pipe`; step times from its metrics.jsonl (LoRA removed again afterwards)."""
    from accelerate.utils import extract_model_from_parallel

    import train_sft
    from etchr_sft.config import load_sft_config

    cfg = load_sft_config(str(REPO / "configs" / "sft" / "klein9b_lora_r768.yaml"), overrides(args, csv_path, [
        f"train.run_dir={run_dir}", f"train.max_steps={args.warmup + args.steps}", "train.log_every=1",
        "train.checkpoint_every=1000000000", "train.save_final=false", "train.validate_every=0",
        "train.resume=never"] + ([f"data.precomputed_dir={precomputed_dir}"] if precomputed_dir else [])))
    out = train_sft.train(cfg, pipe=pipe)
    t = extract_model_from_parallel(out["transformer"], keep_fp32_wrapper=False)
    t.unload_lora()  # back to plain Linear layers for the next run
    t.disable_gradient_checkpointing()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "step_time_s" in r]
    times = [r["step_time_s"] for r in steps[args.warmup:]]
    return {"step_s": round(statistics.median(times), 4), "times": times, "first_loss": steps[0]["loss"],
            "peak_mem_gib": steps[-1].get("max_memory_allocated_gib")}


def overrides(args, csv_path: Path, extra: list[str]) -> list[str]:
    out = [f"data.csv={csv_path}", "model.pretrained_path=in-memory", f"data.max_pixels={args.size * args.size}",
           f"data.num_workers={args.num_workers}", f"lora.rank={args.rank}", f"lora.alpha={args.rank}", *extra]
    if args.tiny:
        out += ["model.dtype=fp32"]  # (mixed precision is off on a CPU anyway)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=768, help="LoRA rank of the timed training steps")
    ap.add_argument("--batch-sizes", default="1,4,8", help="precompute batch sizes timed")
    ap.add_argument("--rows", type=int, default=0, help="(target, input) pairs; 0 = 3 x the largest batch size")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    ap.add_argument("--num-workers", type=int, default=2, help="the trainer's dataloader workers")
    ap.add_argument("--tiny", action="store_true", help="CPU, fp32, the tiny random models (a smoke run)")
    ap.add_argument("--out", default=None, help="append one JSON object per result")
    a = ap.parse_args(argv)
    if a.tiny:
        a.size, a.rank = min(a.size, 64), min(a.rank, 4)
    sizes = [int(b) for b in a.batch_sizes.split(",") if b.strip()]
    n_rows = a.rows or 3 * max(sizes)
    cuda = torch.cuda.is_available() and not a.tiny
    if not cuda and not a.tiny:
        print("error: the 9B-shape benchmark needs a CUDA GPU; use --tiny on a CPU", file=sys.stderr)
        return 2
    import diffusers

    def emit(obj):
        print(json.dumps(obj), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(obj) + "\n")

    emit({"header": {"bench": "precompute", "card": torch.cuda.get_device_name() if cuda else "cpu",
                     "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "date": datetime.date.today().isoformat(), "size": a.size, "rows": n_rows, "lora_rank": a.rank,
                     "steps": a.steps, "warmup": a.warmup, "train_batch": 1, "tiny": a.tiny}})
    work = Path(tempfile.mkdtemp(prefix="bench_precompute_"))
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
            m.eval()
    emit({"built_s": round(time.time() - t0, 1)})
    write_data = load_script("scripts/bench/bench_sft_step.py", "etchr_bench_sft_step").write_data
    csv_path = write_data(work / "data", n_rows, a.size)

    from etchr_sft.data import read_csv
    from etchr_sft.precompute import precompute_cost

    rows = read_csv(str(csv_path))
    costs = {}
    for b in sizes:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        c = precompute_cost(pipe, rows, b, max_pixels=a.size * a.size)
        c = {k: round(v, 5) if isinstance(v, float) else v for k, v in c.items()}
        if cuda:
            c["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        costs[b] = c["seconds_per_sample"]
        emit({"precompute_cost": c})

    eager = train_steps(pipe, csv_path, work / "run_eager", a)
    emit({"train": "eager", **eager})
    from etchr_sft.config import load_sft_config

    pre_dir = work / "precomputed"
    cfg = load_sft_config(str(REPO / "configs" / "sft" / "klein9b_lora_r768.yaml"),
                          overrides(a, csv_path, [f"data.precomputed_dir={pre_dir}",
                                                  f"data.precompute_batch_size={max(sizes)}",
                                                  f"train.run_dir={work / 'run_pre'}"]))
    meta = load_script("SFT/precompute.py", "etchr_sft_precompute_script").precompute(cfg, pipe=pipe)
    emit({"precompute_run": {k: meta[k] for k in ("rows", "batch_size", "encoded_this_run", "seconds",
                                                    "encode_seconds_per_rank", "samples_per_s", "shards_total")}})
    pre = train_steps(pipe, csv_path, work / "run_pre", a, str(pre_dir))
    emit({"train": "precomputed", **pre})
    best = min(costs, key=costs.get)
    emit({"end_to_end": {
        "eager_step_s_per_sample": eager["step_s"], "precomputed_step_s_per_sample": pre["step_s"],
        "step_speedup": round(eager["step_s"] / pre["step_s"], 3),
        "precompute_s_per_sample": costs[best], "precompute_batch_size": best,
        "one_epoch_s_per_sample_with_precompute": round(pre["step_s"] + costs[best], 4),
        "saving_per_sample_one_epoch_s": round(eager["step_s"] - pre["step_s"] - costs[best], 4),
        "saving_per_sample_per_later_epoch_s": round(eager["step_s"] - pre["step_s"], 4),
        "first_loss_delta": abs(eager["first_loss"] - pre["first_loss"])}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
