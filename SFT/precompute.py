#!/usr/bin/env python
"""Precompute SFT conditioning: text embeddings and target / reference latents to data.precomputed_dir.

    python SFT/precompute.py --config configs/sft/klein9b_lora_r768.yaml data.precomputed_dir=/data/pre
    torchrun --nproc_per_node 8 SFT/precompute.py --config ... data.precomputed_dir=...   # shards over ranks
    python SFT/train_sft.py --config ... data.precomputed_dir=/data/pre    # trains without the encoders

The same config as training: the stored tensors are exactly what train_sft.py would compute for each row
at that config (etchr_sft.precompute explains the keys and the layout). Batched: data.precompute_batch_size
prompts per text-encoder call, same-size images per VAE call. Resumable: a rerun keeps every finished
shard (files appear only complete) and encodes the rest. Exit 2 on a config or data problem.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from etchr_sft import runtime  # noqa: E402
from etchr_sft.config import ConfigError, load_sft_config, split_cli  # noqa: E402
from etchr_sft.data import BatchDataset, DataError, read_csv  # noqa: E402
from etchr_sft.model import DTYPES, load_pipeline  # noqa: E402
from etchr_sft.precompute import (EXIT_AFTER_ENV, FIELDS, FileHashes, encode_batch,  # noqa: E402
                                  model_fingerprint, plan, row_key, settings_of, write_index, write_shard)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    try:
        config_path, overrides = split_cli(argv)
        cfg = load_sft_config(config_path, overrides)
        if not cfg.data.precomputed_dir:
            raise ConfigError("data.precomputed_dir is empty: pass data.precomputed_dir=<folder> (where the shards go)")
        precompute(cfg)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def precompute(cfg, pipe=None) -> dict:
    """Encode every row of cfg.data.csv not yet in cfg.data.precomputed_dir; returns meta.json's content.
    `pipe`: an already built pipeline (scripts/bench/bench_precompute.py passes its in-memory one)."""
    from accelerate import PartialState

    if runtime.launched():
        runtime.die_with_parent()
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world, device = state.process_index, state.num_processes, state.device
    root = Path(cfg.data.precomputed_dir)
    shard_dir = root / "shards"
    if state.is_main_process:
        shard_dir.mkdir(parents=True, exist_ok=True)
        for tmp in shard_dir.glob(".*.tmp-*"):  # a killed run's half-written shard
            tmp.unlink()
    state.wait_for_everyone()

    # ================================================================ build
    t_start = time.time()
    if pipe is None:
        pipe = load_pipeline(cfg.model.pretrained_path, DTYPES[cfg.model.dtype])
    fingerprint = model_fingerprint(pipe)  # before moving: the trainer, which keeps them on the CPU, agrees
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    settings = settings_of(cfg, fingerprint)
    rows = read_csv(cfg.data.csv, cfg.data.base_path)
    index_path = root / "index.json"
    known = json.loads(index_path.read_text()).get("files") if index_path.is_file() else None
    hashes = FileHashes(known)
    keys = [row_key(r, settings, hashes) for r in rows]
    shards = plan(rows, keys, cfg, cfg.data.precompute_batch_size, cfg.data.precompute_shard_batches)
    mine = [s for n, s in enumerate(shards) if n % world == rank]
    todo = [s for s in mine if not (shard_dir / s["name"]).is_file()]
    n_todo = sum(len(s["keys"]) for s in todo)
    runtime.print0(f"[precompute] {len(rows)} rows, {sum(len(s['keys']) for s in shards)} distinct, {len(shards)} "
                   f"shards over {world} process(es); rank 0: {len(mine) - len(todo)} of {len(mine)} shards done, "
                   f"{n_todo} samples to encode in batches of {cfg.data.precompute_batch_size}")

    # ================================================================ loop
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)
    done_batches, encoded, t_encode = 0, 0, time.time()
    bar = runtime.progress(total=n_todo, desc="precompute", unit="sample")
    for s in todo:
        ds = BatchDataset(rows, s["batches"], max_pixels=cfg.data.max_pixels, multiple_of=cfg.data.multiple_of,
                          reference_resize=cfg.data.reference_resize)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.data.num_workers)
        tensors = {}
        for batch in loader:
            enc = encode_batch(pipe, batch, device, cfg.model.max_sequence_length)
            for j, i in enumerate(batch["index"].tolist()):
                for f in FIELDS:
                    tensors[f"{keys[i]}.{f}"] = enc[f][j].clone().contiguous()
            done_batches += 1
            encoded += len(batch["prompt"])
            bar.update(len(batch["prompt"]))
            if exit_after and done_batches >= exit_after:  # fault injection: die like a kill, mid-shard
                os._exit(3)
        write_shard(shard_dir / s["name"], tensors, settings)
    bar.close()
    seconds = time.time() - t_encode
    counts = torch.tensor([float(encoded), seconds], device=device)
    if world > 1:
        torch.distributed.all_reduce(counts)
    state.wait_for_everyone()
    meta = None
    if state.is_main_process:
        total_encoded, total_s = int(counts[0].item()), counts[1].item() / world
        stats = {"rows": len(rows), "world_size": world, "batch_size": cfg.data.precompute_batch_size,
                 "encoded_this_run": total_encoded, "seconds": round(time.time() - t_start, 3),
                 "encode_seconds_per_rank": round(total_s, 3),
                 "samples_per_s": round(total_encoded / total_s, 3) if total_s > 0 and total_encoded else None,
                 "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "git_sha": runtime.git_sha()}
        meta = write_index(root, shards, hashes, settings, stats)
        runtime.print0(f"[precompute] done: {total_encoded} samples encoded in {stats['seconds']} s "
                       f"({stats['samples_per_s']} samples/s over {world} process(es)); {meta['entries_total']} "
                       f"entries in {root}")
    state.wait_for_everyone()
    return meta


if __name__ == "__main__":
    sys.exit(main())
