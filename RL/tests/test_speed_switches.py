"""The RL speed switches (train.micro_batch, sampling.rollout_chunk, model.attention_backend,
model.compile): config validation, and the same numbers as the reference path on the tiny twin (fp32)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from etchr_rl.config import ATTENTION_BACKENDS, ConfigError, load_rl_config
from etchr_rl.model import add_lora, apply_speed_options, load_pipeline, lora_target_names
from etchr_rl.rollout import sample_group
from etchr_rl.sde import sigma_schedule

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
REQ = ["model.pretrained_path=/m", "data.jsonl=/d.jsonl"]


def _train_grpo():
    name = "etchr_rl_tests_train_grpo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RL_DIR / "train_grpo.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# ---------------------------------------------------------------------------------------------- config
def test_switch_defaults_are_the_reference_path():
    cfg = load_rl_config(None, REQ)
    assert cfg.train.micro_batch == 1 and cfg.sampling.rollout_chunk == 0
    assert cfg.model.compile is False and cfg.model.attention_backend == "native"


@pytest.mark.parametrize("overrides,needles", [
    (["train.micro_batch=0"], ["train.micro_batch"]),
    (["sampling.rollout_chunk=-1"], ["sampling.rollout_chunk"]),
    (["model.attention_backend=flash"], ["model.attention_backend", *ATTENTION_BACKENDS]),
    (["model.attention_backend=_native_flash", "model.dtype=fp32"], ["needs bf16", "_native_math"]),
    (["model.compile=sometimes"], ["model.compile"]),
    (["model.attention_backend=_native_cudnn"], ["crashed training", "native"]),
])
def test_switch_errors_name_the_key(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_rl_config(None, REQ + overrides)
    for needle in needles:
        assert needle in str(err.value)


def test_allowed_backends_exist_in_diffusers():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert set(ATTENTION_BACKENDS) <= {b.value for b in AttentionBackendName}


# ---------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny(tiny_models):
    from PIL import Image

    pipe = load_pipeline(str(tiny_models.flux), torch.float32)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    add_lora(transformer, 4, 8.0, lora_target_names(transformer, ["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    source = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    return pipe, transformer, source


def _group(pipe, transformer, source, *, group_size=3, steps=6, prompt_index=0, **kw):
    return sample_group(pipe, transformer, "Draw a red box around the cat.", source, group_size=group_size,
                        steps=steps, shift=3.0, eta=0.7, seed=7, step=0, prompt_index=prompt_index, rank=0,
                        same_init_noise=False, resize="keep_aspect", max_area=4096, size=64, **kw)


def test_rollout_chunks_give_the_whole_group_numbers(tiny):
    pipe, transformer, source = tiny
    whole = _group(pipe, transformer, source, group_size=5, steps=3)
    seen = []
    chunked = _group(pipe, transformer, source, group_size=5, steps=3, chunk=2,
                     on_chunk=lambda i, im: seen.append((i, len(im))))
    assert seen == [([0, 1], 2), ([2, 3], 2), ([4], 1)]  # scored chunk by chunk, in order
    one_by_one = _group(pipe, transformer, source, group_size=5, steps=3, chunk=2, batch_group=False)
    for other in (chunked, one_by_one):
        for key in ("states", "next_states", "means", "logps"):
            torch.testing.assert_close(getattr(other, key), getattr(whole, key), rtol=1e-5, atol=1e-5)
        assert len(other.images) == 5 and other.images[0].size == whole.images[0].size
    assert float((whole.states[0] - whole.states[1]).abs().max()) > 0  # per-sample noise: samples differ


def _train(tiny, groups, adv, micro, kl=0.0, **extra):
    """train_iteration with `micro`, from the same initial LoRA; (stats, grads per step, updated LoRA)."""
    from accelerate import Accelerator

    tg = _train_grpo()
    pipe, transformer, _ = tiny
    params = [p for p in transformer.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    cfg = load_rl_config(None, REQ + ["sampling.group_size=3", "sampling.steps=6", "train.grad_accum=2",
                                      f"train.micro_batch={micro}", f"optim.kl_coef={kl}", "optim.lr=1e-3",
                                      "optim.clip_range=0.5", *extra])
    grads = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            grads.append(torch.cat([p.grad.flatten() for p in params]).clone())
            return super().step(closure)

    opt = Recording(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    bar = type("Bar", (), {"update": lambda self, n: None})()
    transformer.train()
    try:
        stats = tg.train_iteration(cfg, Accelerator(cpu=True), transformer, transformer, opt, params, pipe, groups,
                                   adv, sigma_schedule(6, 3.0), 3, tg.Position(), 0, 0, torch.device("cpu"), bar)
        updated = torch.cat([p.detach().flatten() for p in params]).clone()
    finally:
        transformer.eval()
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
                p.grad = None
    return stats, grads, updated


@pytest.fixture(scope="module")
def two_groups(tiny):
    pipe, transformer, source = tiny
    groups = [_group(pipe, transformer, source, prompt_index=i) for i in range(2)]
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.4])
    return groups, adv


@pytest.mark.parametrize("micro,kl", [(4, 0.0), (5, 0.1)])
def test_micro_batches_give_the_batch_1_gradients(tiny, two_groups, micro, kl):
    """6 samples, accumulation 2 (a window spans both prompts), 3 transitions each: 4 and 5 divide neither
    the window (6) nor a group's share, so full, partial and group-split micro-batches all occur."""
    groups, adv = two_groups
    ref_stats, ref_grads, ref_w = _train(tiny, groups, adv, 1, kl)
    stats, grads, w = _train(tiny, groups, adv, micro, kl)
    assert len(grads) == len(ref_grads) == 3
    for g, r in zip(grads, ref_grads):
        assert float(r.norm()) > 0
        assert float((g - r).norm() / r.norm()) < 1e-5
    assert float((w - ref_w).norm() / ref_w.norm()) < 1e-6
    start = torch.cat([p.detach().flatten() for p in tiny[1].parameters() if p.requires_grad])
    assert float(((w - start) - (ref_w - start)).norm() / (ref_w - start).norm()) < 1e-4  # the update itself
    for key in ("loss", "ratio_mean", "clip_fraction", "grad_norm") + (("kl",) if kl else ()):
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-7), key
    assert abs(ref_stats["ratio_mean"] - 1) < 1e-3


def test_micro_batch_groups_never_cross_a_prompt_or_window():
    tg = _train_grpo()
    window = [(0, 2, k, 2) for k in range(3)] + [(1, 0, k, 3) for k in range(3)]
    assert [len(b) for b in tg._micro_batches(window, 4)] == [3, 3]
    assert [len(b) for b in tg._micro_batches(window[:3] * 3, 4)] == [4, 4, 1]


def test_math_attention_backend_and_cuda_only_backends(tiny):
    pipe, transformer, source = tiny
    eager = _group(pipe, transformer, source, group_size=2, steps=3)
    apply_speed_options(transformer, attention_backend="_native_math")
    try:
        math_group = _group(pipe, transformer, source, group_size=2, steps=3)
    finally:
        transformer.set_attention_backend("native")
    torch.testing.assert_close(math_group.states, eager.states, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="runs on CUDA only"):
        apply_speed_options(transformer, attention_backend="_native_flash")


def test_compile_for_rollout_and_checkpointed_training(tiny_models):
    """Regional compile on a fresh copy: a rollout (no grad) and a micro-batched training step with gradient
    checkpointing run compiled and agree with eager (inductor rounds differently: loose tolerance)."""
    from accelerate import Accelerator
    from PIL import Image

    tg = _train_grpo()
    pipe = load_pipeline(str(tiny_models.flux), torch.float32)
    transformer = pipe.transformer
    transformer.requires_grad_(False)
    add_lora(transformer, 4, 8.0, lora_target_names(transformer, ["to_q", "to_k", "to_v", "to_out.0"]))
    transformer.enable_gradient_checkpointing()
    source = Image.new("RGB", (64, 64), (90, 30, 200))
    eager = _group(pipe, transformer, source, group_size=2, steps=3)
    apply_speed_options(transformer, compile=True)
    compiled = _group(pipe, transformer, source, group_size=2, steps=3)
    torch.testing.assert_close(compiled.logps, eager.logps, rtol=1e-4, atol=1e-4)
    params = [p for p in transformer.parameters() if p.requires_grad]
    cfg = load_rl_config(None, REQ + ["sampling.group_size=2", "sampling.steps=3", "train.grad_accum=2",
                                      "train.micro_batch=2", "model.compile=true", "optim.clip_range=0.5"])
    transformer.train()
    stats = tg.train_iteration(cfg, Accelerator(cpu=True), transformer, transformer,
                               torch.optim.AdamW(params, lr=1e-3), params, pipe, [compiled],
                               torch.tensor([1.0, -1.0]), sigma_schedule(3, 3.0), 1, tg.Position(), 0, 0,
                               torch.device("cpu"), type("Bar", (), {"update": lambda self, n: None})())
    assert stats["grad_norm"] > 0 and abs(stats["ratio_mean"] - 1) < 1e-3


def test_checkpointed_blocks_train_eagerly_under_compile(tiny_models):
    """A compiled block under the checkpoint wrapper trained on wrong LoRA gradients on an H200 (docs/
    PERFORMANCE.md, "Compiled backward"): with gradient a checkpointed block runs its eager forward (its
    compiled graph is not called) while a plain block runs compiled; without gradient (the rollout) both
    run compiled."""
    from etchr_rl.model import probe_inputs, set_checkpointed_blocks

    from diffusers import Flux2Transformer2DModel

    t = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer")
    t.requires_grad_(False)
    add_lora(t, 4, 8.0, lora_target_names(t, ["to_q", "to_k", "to_v", "to_out.0"]))
    set_checkpointed_blocks(t, 1, 0)  # the first double block checkpointed, the other three plain
    apply_speed_options(t, compile=True)
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):
        inner = b._compiled_call_impl

        def counted(*a, _i=i, _inner=inner, **k):
            calls[_i] += 1
            return _inner(*a, **k)

        b._compiled_call_impl = counted
    kw = probe_inputs(t, 1, 32, 8)
    t.train()
    t(**kw)[0].float().square().mean().backward()
    assert calls == [0, 1, 1, 1]
    with torch.no_grad():
        t(**kw)
    assert calls == [1, 2, 2, 2]


# ---------------------------------------------------------------------------------------------- bench
def test_bench_rl_group_tiny_smoke(tiny_models, tmp_path):
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_rl_group.py"), "--tiny",
                          "--tiny-models", str(tiny_models.root), "--group", "2", "--steps", "2",
                          "--trained-steps", "1", "--grad-accum", "2", "--micro-batch", "2", "--rollout-chunk", "1",
                          "--latency", "0.2", "--variants", "reference,ours_attn", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert rows == [json.loads(x) for x in out.read_text().splitlines()]
    variants = {r["variant"]: r for r in rows if "variant" in r}
    assert set(variants) == {"reference", "ours_attn"}
    for name, r in variants.items():
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["rollout_s"] > 0 and r["train_s"] > 0 and r["reward_s"] >= 0
        assert r["ratio_vs_reference"] > 0 and r["rewards_valid"] == 1.0
    ours = variants["ours_attn"]
    assert ours["micro_batch_sizes"] == [2] and ours["attention_backend"] == "_native_math"
    # fp32: batching, chunks, micro-batches and the math backend change only the rounding
    assert ours["logp_max_abs_diff"] < 1e-4 and ours["grad_rel_err"] < 1e-4
    # LoRA B starts non-zero (--lora-b-std), so the gradient compared includes lora_A's (0 with peft's B = 0)
    assert all(r["lora_A_grad_share"] > 1e-3 for r in variants.values())
    assert ours["grad_rel_err_lora_A"] < 1e-4
    probe = next(r for r in rows if "attention_probe" in r)["attention_probe"]
    assert set(probe) == {"native", "_native_math"} and "error" not in probe["_native_math"]
