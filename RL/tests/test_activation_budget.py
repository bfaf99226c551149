"""Activation memory by budget (issue #17), RL copy: partial gradient checkpointing gives the GRPO training
iteration the same losses and gradients as all / none (fp32, CPU), the planner's golden choices, the
planning shape, config checks and the CPU refusal of budget mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from etchr_rl.config import ConfigError, load_rl_config
from etchr_rl.model import (add_lora, configure_checkpointing, load_pipeline, lora_target_names,
                            plan_checkpointing, planning_image_tokens, set_checkpointed_blocks)
from etchr_rl.rollout import sample_group
from etchr_rl.sde import sigma_schedule

RL_DIR = Path(__file__).resolve().parents[1]
REQ = ["model.pretrained_path=/m", "data.jsonl=/d.jsonl"]


def _train_grpo():
    name = "etchr_rl_tests_train_grpo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, RL_DIR / "train_grpo.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    from PIL import Image

    pipe = load_pipeline(str(tiny_models.flux), torch.float32)
    t = pipe.transformer
    t.requires_grad_(False)
    torch.manual_seed(0)
    add_lora(t, 4, 8.0, lora_target_names(t, ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"]))
    with torch.no_grad():  # lora_B starts at zero: give it values so that every LoRA weight gets a gradient
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    source = Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy())
    group = sample_group(pipe, t, "Draw a red box around the cat.", source, group_size=2, steps=4, shift=3.0,
                         eta=0.7, seed=7, step=0, prompt_index=0, rank=0, same_init_noise=False,
                         resize="center_crop", max_area=64 * 64, size=64, max_sequence_length=16, batch_group=True,
                         chunk=0, on_chunk=None)
    return pipe, t, group


def _iteration(tiny, n_double, n_single):
    """One train_iteration (2 samples, accumulation 2, 3 transitions each, micro-batch 2) with the given
    blocks checkpointed; (loss stats, the gradient, how often each block ran)."""
    from accelerate import Accelerator

    tg = _train_grpo()
    pipe, t, group = tiny
    set_checkpointed_blocks(t, n_double, n_single)
    params = [p for p in t.parameters() if p.requires_grad]
    cfg = load_rl_config(None, REQ + ["sampling.group_size=2", "sampling.steps=4", "train.grad_accum=2",
                                      "train.micro_batch=2", "optim.clip_range=0.5", "model.max_sequence_length=16"])
    grads = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):  # record, never update: every call starts from the same LoRA
            grads.append(torch.cat([p.grad.flatten() for p in params]).clone())

    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    calls = [0] * len(blocks)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    t.train()
    try:
        stats = tg.train_iteration(cfg, Accelerator(cpu=True), t, t, Recording(params, lr=0.0), params, pipe, [group],
                                   torch.tensor([1.0, -0.7]), sigma_schedule(4, 3.0), 3, tg.Position(), 0, 0,
                                   torch.device("cpu"), type("Bar", (), {"update": lambda self, n: None})())
    finally:
        for h in hooks:
            h.remove()
        t.eval()
        for p in params:
            p.grad = None
    return stats, grads, calls


def test_partial_checkpointing_gives_the_same_training_numbers(tiny):
    ref_stats, ref_grads, calls = _iteration(tiny, 2, 2)
    forwards = calls[0]  # training forwards of the iteration (each block runs once per forward, +1 if recomputed)
    assert calls == [forwards] * 4 and forwards % 2 == 0
    assert len(ref_grads) == 1 and float(ref_grads[0].norm()) > 0
    for nd, ns in [(0, 0), (1, 0), (0, 2), (2, 1)]:
        stats, grads, calls = _iteration(tiny, nd, ns)
        once = forwards // 2
        assert calls == [once * (2 if i < nd else 1) for i in range(2)] + \
            [once * (2 if i < ns else 1) for i in range(2)], (nd, ns, calls)
        assert float((grads[0] - ref_grads[0]).norm() / ref_grads[0].norm()) < 1e-5
        for key in ("loss", "ratio_mean", "grad_norm"):
            assert stats[key] == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-8), key


@pytest.mark.parametrize("case, expect", [
    ((8, 24, 44.0, 2.5, 2.0, 76.0), ([8, 8], 76.0)),     # 16 singles x 2.0 = 32 GiB of room
    ((8, 24, 44.0, 1.5, 2.0, 60.0), ([0, 22], 60.0)),    # doubles cheaper: 8 x 1.5 = 12, then 2 singles
    ((8, 24, 80.0, 1.0, 1.0, 76.0), ([8, 24], 80.0)),    # over budget already: all checkpointed
])
def test_plan_golden_values(case, expect):
    plan = plan_checkpointing(*case)
    assert (plan["checkpointed"], plan["predicted_peak_gib"]) == (expect[0], pytest.approx(expect[1], abs=1e-3))


def test_planning_shape():
    assert planning_image_tokens("center_crop", 720 * 720, 720, 720 * 720) == 45 * 45 + 2025
    assert planning_image_tokens("keep_aspect", 720 * 720, 720, 4096 * 4096) == 2025 + 4096  # pipeline caps at 1024^2
    cfg = load_rl_config(None, REQ)
    assert cfg.model.activation_budget_gib == 0 and cfg.model.checkpoint_blocks is None
    assert cfg.model.activation_reference_pixels == 1024 * 1024


@pytest.mark.parametrize("bad", ["model.activation_budget_gib=lots", "model.activation_budget_gib=-3",
                                 "model.activation_budget_fraction=0", "model.checkpoint_blocks=[1,2,3]",
                                 "model.activation_reference_pixels=0"])
def test_config_errors_name_the_key(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0].split(".")[1]):
        load_rl_config(None, REQ + [bad])


def test_budget_mode_refuses_on_cpu_and_pinned_blocks_apply(tiny):
    _, t, _ = tiny
    cfg = load_rl_config(None, REQ + ["model.activation_budget_gib=auto"]).model
    with pytest.raises(ConfigError, match="CUDA.*checkpoint_blocks"):
        configure_checkpointing(t, cfg, batch=1, image_tokens=32, text_tokens=8, optimizer_state_bytes=0)
    cfg = load_rl_config(None, REQ + ["model.checkpoint_blocks=[0,1]"]).model
    assert configure_checkpointing(t, cfg, batch=1, image_tokens=32, text_tokens=8, optimizer_state_bytes=0) == \
        {"mode": "pinned", "checkpointed": [0, 1], "blocks": [2, 2]}
    assert t._etchr_checkpointed == (0, 1) and t.gradient_checkpointing
    cfg = load_rl_config(None, REQ + ["model.gradient_checkpointing=false"]).model
    assert configure_checkpointing(t, cfg, batch=1, image_tokens=32, text_tokens=8,
                                   optimizer_state_bytes=0)["checkpointed"] == [0, 0]
    assert not t.gradient_checkpointing


def test_bench_rl_group_tiny_partial_checkpointing_variant(tiny_models, tmp_path):
    """bench_rl_group --define: a pinned partial-checkpointing variant trains like the reference (fp32); a
    budget variant on CPU reports the refusal and the bench goes on."""
    import json
    import os
    import subprocess

    res = subprocess.run([sys.executable, str(RL_DIR.parent / "scripts" / "bench" / "bench_rl_group.py"), "--tiny",
                          "--tiny-models", str(tiny_models.root), "--group", "2", "--steps", "2",
                          "--trained-steps", "1", "--grad-accum", "2", "--micro-batch", "2", "--rollout-chunk", "1",
                          "--latency", "0.1", "--variants", "reference,ours_budget80,ours_pinned",
                          "--define", "ours_pinned=model.checkpoint_blocks=[1,0]"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2"),
                         cwd=RL_DIR.parent)
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    variants = {r["variant"]: r for r in rows if "variant" in r}
    assert res.returncode == 1 and rows[-1]["failed_variants"] == 1, res.stderr[-3000:]
    assert "needs the transformer on a CUDA device" in variants["ours_budget80"]["error"]
    pinned = variants["ours_pinned"]
    assert pinned["activation_checkpointing"] == {"mode": "pinned", "checkpointed": [1, 0], "blocks": [2, 2]}
    assert pinned["overrides"] == {"model.checkpoint_blocks": "[1,0]"}
    assert pinned["grad_rel_err"] < 1e-4 and pinned["logp_max_abs_diff"] < 1e-4
