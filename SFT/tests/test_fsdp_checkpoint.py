"""FSDP2 sharded training_state (etchr_sft.checkpoint, pickle-free) on CPU: a real fully_shard module on a
2-process gloo group (tests/drivers/fsdp_checkpoint.py under torchrun).

save -> load into a model with other values gives identical parameters and optimizer state, the same
next-step loss and the same parameters after it; each rank wrote its own safetensors shards plus one JSON
index; another world size or the other kind of fine-tuning is refused with the file named; the export
path (full_state_dict) gives rank 0 whole CPU tensors of the global shape.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import os
from pathlib import Path

import pytest

SFT_DIR = Path(__file__).resolve().parents[1]
DRIVER = SFT_DIR / "tests" / "drivers" / "fsdp_checkpoint.py"


def run_driver(mode: str, out: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), str(DRIVER), mode, str(out)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sharded_state_round_trip_on_two_gloo_ranks(mode, tmp_path):
    r = run_driver(mode, tmp_path)
    assert r["diff_before_load"] > 0.1  # the resumed model started elsewhere
    assert r["params_diff"] == 0.0 and r["optimizer_diff"] == 0.0
    assert r["resumed_loss4"] == r["loss4"] and r["after_step_diff"] == 0.0
    trained = ["2.bias", "2.weight"] if mode == "lora" else ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert r["optimizer_keys"] == sorted(f"{p}:{k}" for p in trained for k in ("exp_avg", "exp_avg_sq", "step"))

    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model-rank00000-of-00002.safetensors", "model-rank00001-of-00002.safetensors",
        "optimizer-rank00000-of-00002.safetensors", "optimizer-rank00001-of-00002.safetensors", "shards.json"]
    from safetensors.torch import load_file

    m0, m1 = (load_file(str(ckpt / f"model-rank0000{i}-of-00002.safetensors")) for i in (0, 1))
    assert sorted(m0) == trained  # LoRA: the frozen base is not in the training_state
    assert tuple(m0["2.weight"].shape) == (2, 7) and tuple(m1["2.weight"].shape) == (1, 7)  # local, uneven shards
    index = json.loads((ckpt / "shards.json").read_text())
    assert index["world_size"] == 2 and index["model"]["2.weight"]["shape"] == [3, 7]

    assert "shards.json: FSDP shards for 2 process(es), this run has 3" in r["refused_world"]
    assert "shards.json: written for" in r["refused_kind"]
    assert r["export_ok"] and r["export_keys"] == trained
    assert r["export_shapes"]["2.weight"] == [3, 7] and r["export_shapes"]["2.bias"] == [3]
