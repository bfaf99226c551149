"""train_sft.py: few-step LoRA and full runs, resume, 2-process DDP vs accumulation, the 144 targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pathlib import Path

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent

CONFIG = str(REPO / "configs" / "sft" / "tiny_demo.yaml")


def args(tiny_models, csv, run_dir, *extra):
    return ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={csv}",
            f"train.run_dir={run_dir}", "data.max_pixels=6144", *extra]


def run_train(argv, *, torchrun=0, env=None):
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1")
    cmd = [sys.executable]
    if torchrun:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", str(port)]
    res = subprocess.run(cmd + [str(SFT_DIR / "train_sft.py")] + argv, capture_output=True, text=True, timeout=600,
                         env=env, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]  # (a pinned / budget run also logs its checkpointing plan)


def test_lora_run_changes_only_lora(tiny_models, sft_csv, tmp_path):
    from diffusers import Flux2Transformer2DModel

    sys.path.insert(0, str(SFT_DIR))
    import train_sft

    from etchr_sft.config import load_sft_config

    cfg = load_sft_config(CONFIG, [f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}",
                                   f"train.run_dir={tmp_path}", "data.max_pixels=6144", "train.max_steps=3",
                                   "train.validate_every=3", "train.validation_items=2", "train.validation_steps=2"])
    out = train_sft.train(cfg)
    model = out["transformer"]
    base = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer")
    base_sd = base.state_dict()
    changed_lora, n_lora = 0, 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            n_lora += 1
            if "lora_B" in name:  # B starts at zero (peft's gaussian init), so any change shows training
                changed_lora += int(p.detach().abs().sum() > 0)
        else:
            key = name.replace(".base_layer", "")
            assert torch.equal(p.detach(), base_sd[key]), f"base parameter {key} changed"
    assert n_lora == 2 * 28 and changed_lora == 28
    ls = losses(tmp_path)
    assert len(ls) == 3 and all(map(lambda v: v == v and abs(v) < 1e6, ls))
    ck = tmp_path / "checkpoints" / "step-000003"
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["kind"] == "lora" and meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0 and meta["step"] == 3
    assert meta["config"]["train"]["max_steps"] == 3 and meta["schema_version"] == 1
    from safetensors import safe_open

    with safe_open(str(ck / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        md = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert md["transformer.lora_alpha"] == 8.0 and md["transformer.r"] == 4
    assert len(list((tmp_path / "validation" / "step-000003").glob("*.png"))) == 2
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"


def test_full_finetune_changes_base(tiny_models, sft_csv, tmp_path):
    from diffusers import Flux2Transformer2DModel

    run_train(args(tiny_models, sft_csv, tmp_path, "lora.enabled=false", "train.max_steps=2", "optim.lr=1e-3"))
    ck = tmp_path / "checkpoints" / "step-000002"
    assert json.loads((ck / "meta.json").read_text())["kind"] == "full"
    new = Flux2Transformer2DModel.from_pretrained(ck / "transformer").state_dict()
    old = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer").state_dict()
    changed = sum(not torch.equal(new[k], old[k]) for k in old)
    assert changed > 0.5 * len(old)
    assert all(v == v for v in losses(tmp_path))


def test_resume_reproduces_the_uninterrupted_run(tiny_models, sft_csv, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(args(tiny_models, sft_csv, full, "train.max_steps=10", "train.checkpoint_every=4"))
    run_train(args(tiny_models, sft_csv, part, "train.max_steps=4", "train.checkpoint_every=4"))
    res = run_train(args(tiny_models, sft_csv, part, "train.max_steps=10", "train.checkpoint_every=4"))
    assert "resumed from" in res.stdout and "at step 4" in res.stdout
    assert losses(part) == pytest.approx(losses(full), rel=1e-6, abs=1e-7)  # 10 steps cross an epoch (8 samples)
    from safetensors.torch import load_file

    a = load_file(full / "checkpoints" / "step-000010" / "pytorch_lora_weights.safetensors")
    b = load_file(part / "checkpoints" / "step-000010" / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_two_processes_equal_one_with_doubled_accumulation(tiny_models, sft_csv, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(args(tiny_models, sft_csv, one, "train.max_steps=3", "train.grad_accum=2"))
    res = run_train(args(tiny_models, sft_csv, two, "train.max_steps=3", "train.grad_accum=1"), torchrun=2)
    assert "2 process(es)" in res.stdout
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(one / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors")
    b = load_file(two / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_reference_lora_targets_are_144_layers_on_the_9b_shape(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from etchr_sft.config import REFERENCE_LORA_TARGETS
    from etchr_sft.model import lora_target_names

    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(tmp_path),
                    "--full-shape"], check=True, capture_output=True, timeout=300)
    cfg = Flux2Transformer2DModel.load_config(tmp_path / "flux2-klein-base-9b-shape" / "transformer")
    with init_empty_weights():
        t = Flux2Transformer2DModel.from_config(cfg)
    names = lora_target_names(t, REFERENCE_LORA_TARGETS, single_blocks_to_out=True)
    assert len(names) == 144  # PROTOCOL.md section 1
    mods = dict(t.named_modules())
    params = sum(768 * (mods[n].in_features + mods[n].out_features) for n in names)
    assert 2.0e9 < params < 2.2e9  # "2.09 B trainable params"
    assert len(lora_target_names(t, REFERENCE_LORA_TARGETS, single_blocks_to_out=False)) == 120  # RL's list


def test_batch_of_two_with_buckets_and_caches_match_uncached(tiny_models, sft_csv, tmp_path):
    """batch_size 2 runs on aspect buckets (the fixture has two sizes); cached text embeddings and
    reference latents give the same losses as recomputing them."""
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    run_train(args(tiny_models, sft_csv, plain, "train.batch_size=2", "train.max_steps=3"))
    run_train(args(tiny_models, sft_csv, cached, "train.batch_size=2", "train.max_steps=3",
                   "data.cache_text_embeddings=true", "data.cache_reference_latents=true"))
    assert losses(cached) == pytest.approx(losses(plain), rel=1e-5)
    assert len(list((cached / "cache" / "text").glob("*.pt"))) == 6  # 3 steps x 2 prompts, all distinct
    assert len(list((cached / "cache" / "reference").glob("*.pt"))) == 6
    assert "2 samples per optimizer step" in (run_train(args(tiny_models, sft_csv, tmp_path / "again",
                                                             "train.batch_size=2", "train.max_steps=1")).stdout)


def test_speed_switches_keep_the_losses(tiny_models, sft_csv, tmp_path):
    """model.compile (the blocks that are not checkpointed, forward + backward; here the second of each
    stack) and a fixed attention kernel compute the same training function: the same losses as the eager
    default (fp32, CPU); save_final=false leaves no checkpoint; the log names the switches."""
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    run_train(args(tiny_models, sft_csv, plain, "train.max_steps=3", "train.checkpoint_every=100"))
    res = run_train(args(tiny_models, sft_csv, fast, "train.max_steps=3", "train.checkpoint_every=100",
                         "model.compile=true", "model.checkpoint_blocks=[1,1]", "model.attention_backend=_native_math",
                         "optim.fused=true", "train.save_final=false"))
    assert len(losses(fast)) == 3 and losses(fast) == pytest.approx(losses(plain), rel=1e-4)
    assert "speed: attention=_native_math, compile (2 of 4 blocks; the checkpointed ones run eagerly)" in (
        res.stdout + res.stderr)
    assert [p.name for p in (plain / "checkpoints").glob("step-*")] == ["step-000003"]
    assert not (fast / "checkpoints").exists() or not list((fast / "checkpoints").glob("step-*"))


def test_compile_skips_the_checkpointed_blocks(tiny_models):
    """The rule behind model.compile (docs/PERFORMANCE.md, "Compiled backward"): a block under the checkpoint
    wrapper is never compiled (there the compiled backward gave wrong gradients), the others are; with
    compile_trust_backward every block is."""
    from diffusers import Flux2Transformer2DModel

    from etchr_sft.model import compile_blocks, set_checkpointed_blocks

    def compiled(t):
        return [b._compiled_call_impl is not None for b in [*t.transformer_blocks, *t.single_transformer_blocks]]

    t = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer")
    set_checkpointed_blocks(t, 1, 0)
    assert compile_blocks(t, fullgraph=True) == (3, 4)
    assert compiled(t) == [False, True, True, True]
    t = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer")
    set_checkpointed_blocks(t, 2, 2)
    assert compile_blocks(t, fullgraph=True, checkpointed_too=True) == (4, 4) and all(compiled(t))
    t = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer")  # checkpointing off: all
    assert compile_blocks(t, fullgraph=False) == (4, 4)
