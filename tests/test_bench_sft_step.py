"""scripts/bench/bench_sft_step.py --tiny: the benchmark's orchestration on CPU (the GPU figures are in
docs/PERFORMANCE.md; benchmarks never time anything in CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_sft_step_tiny_runs_reference_and_the_real_trainer(tmp_path):
    out = tmp_path / "results.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_sft_step.py"), "--tiny",
                          "--steps", "2", "--warmup", "1", "--num-workers", "0",
                          "--variants", "reference,ours_eager,ours_fused", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["header"]["tiny"] is True and rows[0]["header"]["lora_rank"] == 4
    assert next(r for r in rows if "lora_layers" in r)["lora_layers"] == 28  # the reference targets on the tiny model
    variants = {r["variant"]: r for r in rows if "variant" in r}
    assert set(variants) == {"reference", "ours_eager", "ours_fused"}
    for name, r in variants.items():
        assert "error" not in r, (name, r)
        assert len(r["times"]) == 2 and r["seconds_per_sample"] > 0
    assert variants["reference"]["ratio_vs_reference"] == 1.0
    # the same sample, timestep and noise: the trainer's variants start from the same loss
    assert abs(variants["ours_fused"]["first_loss"] - variants["ours_eager"]["first_loss"]) < 1e-5


def test_bench_sft_step_tiny_losses_compare_with_the_reference_and_variants_take_overrides(tmp_path):
    """--loss-steps: the reference loop visits the trainer's samples with the trainer's timesteps, noise,
    weights and LoRA seed, so on CPU in fp32 its losses equal ours step by step (also with partial
    checkpointing pinned through --define); a budget variant on CPU reports its error and the next still runs."""
    out = tmp_path / "results.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_sft_step.py"), "--tiny",
                          "--steps", "2", "--warmup", "1", "--loss-steps", "4", "--num-workers", "0",
                          "--define", "ours_pinned=model.checkpoint_blocks=[1,0],optim.fused=true",
                          "--variants", "reference,ours_budget80,ours_pinned", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    variants = {r["variant"]: r for r in rows if "variant" in r}
    assert "needs the transformer on a CUDA device" in variants["ours_budget80"]["error"]
    pinned, ref = variants["ours_pinned"], variants["reference"]
    assert pinned["overrides"] == {"model.checkpoint_blocks": "[1,0]", "optim.fused": "true"}
    assert pinned["activation_checkpointing"] == {"mode": "pinned", "checkpointed": [1, 0], "blocks": [2, 2]}
    assert len(ref["losses"]) == 4 and len(set(ref["losses"])) == 4 and pinned["loss_steps_compared"] == 4
    assert pinned["loss_max_abs_diff"] < 1e-4 * max(ref["losses"])
    assert rows[-1]["done_s"] > 0


def test_every_compiled_variant_passes_the_trainers_cuda_check():
    """The trainer refuses model.compile with every block checkpointed (it would compile nothing); each of the
    bench's compiled variants must get past that check on a GPU (else its H200 row is only the refusal)."""
    import importlib.util

    bench_dir = REPO / "scripts" / "bench"
    spec = importlib.util.spec_from_file_location("etchr_bench_sft_step_vars", bench_dir / "bench_sft_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(bench_dir))  # its benchlib
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(bench_dir))
    from etchr_sft.config import check_compiled_backward, load_sft_config

    compiled = {n: o for n, o in bench.VARIANTS.items() if bench.is_compiled(o)}
    assert len(compiled) >= 4
    for name, overrides in compiled.items():
        cfg = load_sft_config(None, ["model.pretrained_path=/m", "data.csv=/d.csv"] +
                              [f"{k}={v}" for k, v in overrides.items()  # bench-resolved values left out
                               if not str(v).startswith("@") and v != "best"])
        check_compiled_backward(cfg.model, "cuda")  # raises ConfigError if the variant would be refused


def test_a_compiled_variant_does_not_leave_compiled_blocks_to_the_next(tmp_path):
    """Module.compile is permanent: without the bench's reset a block compiled by one variant stays compiled
    when the next variant checkpoints it, the wrong-gradient path of PERFORMANCE.md's "Compiled backward"."""
    out = tmp_path / "results.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_sft_step.py"), "--tiny",
                          "--steps", "1", "--warmup", "1", "--num-workers", "0",
                          "--define", "c_plain=model.checkpoint_blocks=[0,0],model.compile=true",
                          "--define", "c_half=model.checkpoint_blocks=[1,1],model.compile=true",
                          "--variants", "c_plain,c_half", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    variants = {r["variant"]: r for r in map(json.loads, out.read_text().splitlines()) if "variant" in r}
    assert variants["c_plain"]["compiled_blocks"] == {"compiled": 4, "compiled_and_checkpointed": 0, "blocks": 4}
    assert variants["c_half"]["compiled_blocks"] == {"compiled": 2, "compiled_and_checkpointed": 0, "blocks": 4}


def test_bench_fp8_layer_refuses_without_an_fp8_gpu():
    """GPU-only: where fp8 cannot run it exits 2 naming what is missing, before building anything."""
    import importlib.util

    if _can_run_fp8():
        pytest.skip("this machine can run fp8")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_fp8_layer.py"), "--repeats", "1"],
                         capture_output=True, text=True, timeout=300)
    missing = "needs torchao" if importlib.util.find_spec("torchao") is None else "needs a CUDA GPU"
    assert res.returncode == 2 and missing in res.stderr and "model.fp8=none" in res.stderr, res.stderr[-2000:]


def _can_run_fp8() -> bool:
    import importlib.util

    import torch

    return (importlib.util.find_spec("torchao") is not None and torch.cuda.is_available()
            and torch.cuda.get_device_capability() >= (8, 9))
