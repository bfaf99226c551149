#!/usr/bin/env python
"""The nano recipe's helpers (scripts/nano/run.sh calls them; SFT and RL run through their entry points).

    python scripts/nano/nano.py prepare --out-dir runs/nano [--tiny] [--n-train 60000] [--sizes 5,6,7,8] ...
    python scripts/nano/nano.py eval --out-dir runs/nano --stage sft --sft-checkpoint runs/nano/sft/checkpoints/step-N
    python scripts/nano/nano.py eval --out-dir runs/nano --stage rl --rl-checkpoint runs/nano/rl/checkpoints/step-M
    python scripts/nano/nano.py eval --out-dir runs/nano --stage rl --pipe runs/nano/rl_pipeline
    python scripts/nano/nano.py report --out-dir runs/nano

prepare  = data, then model, in one process (sub-stage times in <out-dir>/prepare_times.json):
  data   prints the card, torch / diffusers / transformers versions and the date (env.json), writes the
         data (nano_data: train / held-out split by seed)
  model  the nano pipeline (nano_model: random DiT, small text encoder, a VAE trained on the training
         images and BatchNorm-calibrated)
eval     edits the held-out items with a pipeline and scores them (nano_score) -> <out-dir>/eval_<stage>.json;
         --sft-checkpoint first assembles the full-fine-tuning checkpoint into <out-dir>/sft_pipeline,
         --rl-checkpoint first merges the RL LoRA into it with RL/merge_lora.py (<out-dir>/rl_pipeline)
report   -> <out-dir>/results.json (held-out numbers after SFT and after RL, per-stage wall times from
         run.sh's stage_times.tsv, curve files, environment) and one summary line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RESULTS_SCHEMA = "etchr-nano-results/1"


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "cuda": cuda, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def cmd_data(a) -> int:
    import nano_data

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"[nano] {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, transformers "
          f"{env['transformers']}; {env['date']}" + ("; TINY CPU smoke mode" if a.tiny else ""), flush=True)
    _write_json(out / "env.json", {**env, "tiny": a.tiny})
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    info = nano_data.build(out / "data", n_train=a.n_train, n_heldout=a.n_heldout, n_rl=a.n_rl, seed=a.seed,
                           sizes=sizes, n_jigsaw_train=a.n_jigsaw_train, n_jigsaw_heldout=a.n_jigsaw_heldout,
                           workers=a.workers)
    print(f"[nano] data: {json.dumps(info['train'])} train, {json.dumps(info['heldout'])} held-out -> "
          f"{out / 'data'}", flush=True)
    return 0


def cmd_model(a) -> int:
    import nano_model

    out = Path(a.out_dir)
    images = sorted(str(p) for p in (out / "data" / "train" / "images").glob("*/*.png"))
    if not images:
        raise FileNotFoundError(f"{out / 'data' / 'train' / 'images'}: no training images (run `nano.py data` first)")
    dims = nano_model.TINY_DIMS if a.tiny else nano_model.NANO_DIMS
    overrides = {k: getattr(a, k) for k in ("hidden", "heads", "double_blocks", "single_blocks") if getattr(a, k)}
    if overrides:
        from dataclasses import replace

        dims = replace(dims, **overrides)
    pipe_dir = out / "model" / "flux2-klein-nano"
    nano_model.build(pipe_dir, dims, images, seed=a.seed, vae_steps=a.vae_steps, vae_time_s=a.vae_time_s,
                     vae_batch=a.vae_batch, vae_lr=a.vae_lr, vae_images=a.vae_images)
    check = vae_ceiling(pipe_dir, out / "data" / "heldout" / "grpo.jsonl")
    _write_json(out / "model" / "vae_check.json", check)
    print(f"[model] VAE round trip of the held-out targets (the editor's ceiling): {json.dumps(check)}", flush=True)
    return 0


def vae_ceiling(pipe_dir: Path, heldout_jsonl: Path, limit: int = 200) -> dict:
    """The held-out metrics of the targets themselves after a VAE encode + decode: what a perfect DiT could
    reach through this VAE (a maze exact rate below 1 means the VAE, not the editor, loses cells)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKLFlux2
    from PIL import Image

    import nano_model
    import nano_score

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKLFlux2.from_pretrained(pipe_dir / "vae").to(dev).eval()
    rows = nano_score.read_rows(heldout_jsonl, limit)
    per_item = []
    for row in rows:
        with Image.open(heldout_jsonl.parent / row["target_image"]) as im:
            target = im.convert("RGB")
        rec = Image.fromarray(nano_model.roundtrip(vae, np.asarray(target)[None], dev)[0])
        if "maze_map" in row:
            per_item.append({"family": "maze", "size": len(row["maze_map"]),
                             **nano_score.maze_metrics(rec, row["maze_map"], row["start"], row["goal"])})
        else:
            per_item.append({"family": "jigsaw", "psnr": nano_score.psnr(rec, target)})
    return nano_score.aggregate(per_item)


def cmd_prepare(a) -> int:
    """data, then model, in one process (one interpreter start fewer); sub-stage times -> prepare_times.json."""
    import time

    t0 = time.time()
    rc = cmd_data(a)
    t1 = time.time()
    rc = rc or cmd_model(a)
    _write_json(Path(a.out_dir) / "prepare_times.json",
                {"data_s": round(t1 - t0, 2), "model_s": round(time.time() - t1, 2)})
    return rc


def merge_rl(base: Path, lora: str, out: Path) -> Path:
    """RL/merge_lora.py, the real script, run in this process (its own CLI and checks)."""
    import runpy
    import shutil

    if out.exists():
        shutil.rmtree(out)  # merge_lora never overwrites; this dir is ours (<out-dir>/rl_pipeline)
    argv = sys.argv
    sys.argv = ["RL/merge_lora.py", "--base", str(base), "--lora", str(lora), "--out", str(out)]
    try:
        runpy.run_path(str(HERE.parent.parent / "RL" / "merge_lora.py"), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"RL/merge_lora.py failed (exit {exc.code})") from None
    finally:
        sys.argv = argv
    return out


def cmd_eval(a) -> int:
    import nano_model
    import nano_score

    out = Path(a.out_dir)
    pipe = Path(a.pipe) if a.pipe else None
    if a.sft_checkpoint:
        pipe = nano_model.assemble(out / "model" / "flux2-klein-nano", a.sft_checkpoint, out / "sft_pipeline")
        print(f"[nano] assembled {a.sft_checkpoint} -> {pipe}", flush=True)
    elif a.rl_checkpoint:
        pipe = merge_rl(out / "sft_pipeline", a.rl_checkpoint, out / "rl_pipeline")
    if pipe is None:
        print("error: give --pipe, --sft-checkpoint or --rl-checkpoint", file=sys.stderr)
        return 2
    nano_score.score(str(pipe), a.data or str(out / "data" / "heldout" / "grpo.jsonl"),
                     str(out / f"eval_{a.stage}.json"), steps=a.steps, guidance=a.guidance, limit=a.limit,
                     max_sequence_length=a.max_sequence_length, stage=a.stage)
    return 0


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _last_metric(path: Path, key: str):
    """(last step, last value of `key`) in a metrics.jsonl, or (None, None)."""
    step = value = None
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                step = row.get("step", step)
                value = row.get(key, value)
    return step, value


def cmd_report(a) -> int:
    out = Path(a.out_dir)
    stages: dict = {}
    times = out / "stage_times.tsv"
    if not times.is_file():
        print(f"error: {times} missing (run.sh writes it)", file=sys.stderr)
        return 2
    for line in times.read_text().splitlines():
        if line.strip():
            name, seconds = line.split("\t")
            stages[name] = round(float(seconds), 1)
    ev = {s: _read_json(out / f"eval_{s}.json") for s in ("sft", "rl")}
    missing = [s for s, v in ev.items() if v is None]
    if missing:
        print(f"error: no held-out scores for {missing} ({', '.join(str(out / f'eval_{s}.json') for s in missing)})",
              file=sys.stderr)
        return 2
    heldout = {s: {k: v[k] for k in ("maze", "jigsaw") if k in v} | {"items": v["items"], "edit_s": v["edit_s"]}
               for s, v in ev.items()}
    sft_step, sft_loss = _last_metric(out / "sft" / "metrics.jsonl", "loss")
    rl_step, _ = _last_metric(out / "rl" / "metrics.jsonl", "iteration")
    model = _read_json(out / "model" / "flux2-klein-nano" / "ETCHR_NANO_MODEL.json") or {}
    total = round(sum(stages.values()), 1)
    budget_s = round(a.budget_min * 60, 1)
    result = {"schema": RESULTS_SCHEMA, "env": _read_json(out / "env.json"),
              "data": _read_json(out / "data" / "data.json"),
              "model": {"dims": model.get("dims"), "parameters": model.get("parameters"),
                        "vae_training": model.get("vae_training"),
                        "vae_ceiling": _read_json(out / "model" / "vae_check.json")},
              "prepare_s": _read_json(out / "prepare_times.json"),
              "stages_s": stages, "total_s": total, "budget_s": budget_s, "within_budget": total <= budget_s,
              "sft": {"steps": sft_step, "final_loss": sft_loss}, "rl": {"steps": rl_step},
              "heldout": heldout,
              "maze_exact": {"sft": heldout["sft"].get("maze", {}).get("exact"),
                             "rl": heldout["rl"].get("maze", {}).get("exact")},
              "curves": {"vae": "model/vae_metrics.jsonl", "sft": "sft/metrics.jsonl", "rl": "rl/metrics.jsonl"},
              "knobs": json.loads(a.knobs) if a.knobs else {}}
    me = result["maze_exact"]
    if me["sft"] is not None and me["rl"] is not None:
        me["rl_minus_sft"] = round(me["rl"] - me["sft"], 4)
        # Same items, same seeds in both evaluations: count the items RL fixed and the ones it broke.
        before = {r["id"]: r["exact"] for r in ev["sft"]["per_item"] if r["family"] == "maze"}
        after = {r["id"]: r["exact"] for r in ev["rl"]["per_item"] if r["family"] == "maze"}
        common = before.keys() & after.keys()
        me["rl_fixed"] = sum(after[i] and not before[i] for i in common)
        me["rl_broke"] = sum(before[i] and not after[i] for i in common)
    _write_json(out / "results.json", result)
    jig = ""
    if "jigsaw" in heldout["sft"]:
        jig = (f"; jigsaw PSNR SFT {heldout['sft']['jigsaw']['psnr_mean']:.2f} dB -> RL "
               f"{heldout['rl']['jigsaw']['psnr_mean']:.2f} dB")
    per = ", ".join(f"{k} {v:.0f}s" for k, v in stages.items())
    n = heldout["sft"].get("maze", {}).get("n")
    print(f"[nano] held-out maze path correctness: SFT {me['sft']:.3f} -> RL {me['rl']:.3f} (n={n}, RL fixed "
          f"{me.get('rl_fixed')} / broke {me.get('rl_broke')}; SFT {sft_step} "
          f"steps, RL {rl_step} iterations){jig}; stages: {per}; total {total:.0f}s of {budget_s:.0f}s budget"
          f"{'' if result['within_budget'] else ' (OVER BUDGET)'}; {out / 'results.json'}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    data_args = argparse.ArgumentParser(add_help=False)
    p = data_args
    p.add_argument("--n-train", type=int, default=60000, help="training mazes (before held-out copies are dropped)")
    p.add_argument("--n-heldout", type=int, default=200, help="held-out mazes")
    p.add_argument("--n-rl", type=int, default=4000, help="RL prompts (the first training items of each family)")
    p.add_argument("--n-jigsaw-train", type=int, default=0)
    p.add_argument("--n-jigsaw-heldout", type=int, default=0)
    p.add_argument("--sizes", default="5,6,7,8", help="maze sizes N (comma list)")
    p.add_argument("--workers", type=int, default=0, help="data processes (0 = min(16, CPUs))")
    model_args = argparse.ArgumentParser(add_help=False)
    p = model_args
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-time-s", type=float, default=90.0, help="VAE training wall-time cap (0 = none)")
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-images", type=int, default=4000, help="training images held in memory for the VAE")
    for k in ("hidden", "heads", "double-blocks", "single-blocks"):
        p.add_argument(f"--{k}", type=int, default=0, help="override the transformer dimension (0 = preset)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out-dir", required=True)
    common.add_argument("--tiny", action="store_true", help="CPU smoke dimensions (TINY_DIMS); recorded in env.json")
    common.add_argument("--seed", type=int, default=0)
    for name, parents, fn, text in (
            ("prepare", [common, data_args, model_args], cmd_prepare, "data, then model (one process)"),
            ("data", [common, data_args], cmd_data, "environment (env.json) and the train / held-out data"),
            ("model", [common, model_args], cmd_model,
             "the nano pipeline: random DiT and text encoder, trained + calibrated VAE")):
        sub.add_parser(name, parents=parents, help=text).set_defaults(fn=fn)
    p = sub.add_parser("eval", help="score held-out edits")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--stage", required=True, choices=["sft", "rl"])
    p.add_argument("--pipe", default=None, help="pipeline dir to score")
    p.add_argument("--sft-checkpoint", default=None,
                   help="full-fine-tuning SFT checkpoint: assembled into <out-dir>/sft_pipeline, then scored")
    p.add_argument("--rl-checkpoint", default=None,
                   help="RL LoRA checkpoint: merged into <out-dir>/sft_pipeline by RL/merge_lora.py "
                        "(-> <out-dir>/rl_pipeline), then scored")
    p.add_argument("--data", default=None, help="held-out JSONL (default <out-dir>/data/heldout/grpo.jsonl)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per edit")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1 = off)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N rows (0 = all)")
    p.add_argument("--max-sequence-length", type=int, default=32, help="text tokens (as in training)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("report", help="results.json + summary line")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--budget-min", type=float, default=20.0)
    p.add_argument("--knobs", default="", help="JSON of run.sh's settings, stored in results.json")
    p.set_defaults(fn=cmd_report)
    a = ap.parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
