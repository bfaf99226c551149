"""scripts/bench/bench_precompute.py --tiny: the benchmark's orchestration on CPU (precompute cost per batch
size, the real precompute, the trainer with and without data.precomputed_dir); nothing is timed in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_precompute_tiny_runs_both_trainer_paths(tmp_path):
    out = tmp_path / "results.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_precompute.py"), "--tiny",
                          "--batch-sizes", "1,2", "--rows", "4", "--steps", "1", "--warmup", "1", "--num-workers", "0",
                          "--out", str(out)], capture_output=True, text=True, timeout=500, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["header"]["tiny"] is True and rows[0]["header"]["rows"] == 4
    costs = [r["precompute_cost"] for r in rows if "precompute_cost" in r]
    assert [c["batch_size"] for c in costs] == [1, 2]
    assert [c["samples"] for c in costs] == [3, 2]  # one warmup batch left out of each
    assert all(c["seconds_per_sample"] > 0 for c in costs)
    run = next(r["precompute_run"] for r in rows if "precompute_run" in r)
    assert run["rows"] == 4 and run["encoded_this_run"] == 4 and run["batch_size"] == 2
    train = {r["train"]: r for r in rows if "train" in r}
    assert set(train) == {"eager", "precomputed"} and all(len(t["times"]) == 1 for t in train.values())
    e2e = next(r["end_to_end"] for r in rows if "end_to_end" in r)
    assert e2e["first_loss_delta"] < 1e-5  # same sample, timestep and noise: the precomputed path is exact
    assert e2e["precompute_batch_size"] in (1, 2)
