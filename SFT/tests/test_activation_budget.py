"""Activation memory by budget (issue #17): partial gradient checkpointing computes the same losses and
gradients as all / none (fp32, CPU), the planner's golden choices, config checks, and the trainer's switch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

SFT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SFT_DIR))

from etchr_sft.model import (plan_checkpointing, probe_inputs, saved_activation_bytes,  # noqa: E402
                             set_checkpointed_blocks)
CONFIG = str(SFT_DIR.parent / "configs" / "sft" / "tiny_demo.yaml")


def args(tiny_models, csv, run_dir, *extra):
    return ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={csv}",
            f"train.run_dir={run_dir}", "data.max_pixels=6144", *extra]


def run_train(argv):
    import os
    import subprocess

    res = subprocess.run([sys.executable, str(SFT_DIR / "train_sft.py")] + argv, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=SFT_DIR.parent)
    return res


def _tiny_lora_transformer(tiny_models):
    from diffusers import Flux2Transformer2DModel

    from etchr_sft.model import add_lora, lora_target_names

    torch.manual_seed(0)
    t = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer", torch_dtype=torch.float32)
    t.requires_grad_(False)
    add_lora(t, 4, 4.0, lora_target_names(t, ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"], True))
    with torch.no_grad():  # lora_B starts at zero: give it values so every LoRA weight gets a gradient
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    t.train()
    return t


def _loss_grads_and_calls(t, inputs, n_double, n_single):
    """Loss, LoRA gradients and how often each block ran in one forward + backward."""
    set_checkpointed_blocks(t, n_double, n_single)
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    calls = [0] * len(blocks)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1)) for i, b in enumerate(blocks)]
    try:
        out = t(**inputs)[0]
        loss = out.square().mean()
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in t.named_parameters() if p.requires_grad}
    for p in t.parameters():
        p.grad = None
    return float(loss.detach()), grads, calls


def test_partial_checkpointing_gives_the_same_losses_and_gradients(tiny_models):
    """All, none and every partial choice agree to fp32 rounding; exactly the chosen blocks (the first n of
    each stack) run twice (the checkpoint's recomputation), the others once."""
    t = _tiny_lora_transformer(tiny_models)
    assert (len(t.transformer_blocks), len(t.single_transformer_blocks)) == (2, 2)
    inputs = probe_inputs(t, 2, 2 * 16, 8)
    ref_loss, ref_grads, calls = _loss_grads_and_calls(t, inputs, 2, 2)
    assert calls == [2, 2, 2, 2]
    assert any(g.abs().max() > 0 for g in ref_grads.values())
    for nd, ns, expect in [(0, 0, [1, 1, 1, 1]), (1, 0, [2, 1, 1, 1]), (0, 1, [1, 1, 2, 1]), (1, 2, [2, 1, 2, 2]),
                           (2, 1, [2, 2, 2, 1])]:
        loss, grads, calls = _loss_grads_and_calls(t, inputs, nd, ns)
        assert calls == expect, (nd, ns)
        assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-9)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7)
    assert set_checkpointed_blocks(t, 99, -3) == (2, 0)  # clamped to the stacks
    assert t._etchr_checkpointed == (2, 0)


def test_saved_activation_bytes_counts_what_a_plain_block_keeps(tiny_models):
    t = _tiny_lora_transformer(tiny_models)
    small = probe_inputs(t, 1, 32, 8)
    big = probe_inputs(t, 1, 128, 8)
    captured, sizes = {}, {}

    def capture(block, *a):
        captured.setdefault(id(block), a)
        return block(*a)

    for name, inputs in (("small", small), ("big", big)):
        captured.clear()
        t.enable_gradient_checkpointing(capture)
        with torch.enable_grad():
            t(**inputs)
        block = t.single_transformer_blocks[0]
        args_ = tuple(x.detach().requires_grad_(True) if i == 0 else x for i, x in enumerate(captured[id(block)]))
        sizes[name] = saved_activation_bytes(block, args_)
    assert sizes["small"] > 0
    assert sizes["big"] > 2 * sizes["small"]  # 3.4x the tokens (128 + 8 vs 32 + 8)


@pytest.mark.parametrize("case, expect", [
    # (n_double, n_single, base, double, single, budget) -> (checkpointed [d, s], predicted peak)
    ((8, 24, 52.0, 1.5, 1.0, 76.0), ([8, 0], 76.0)),     # singles are cheaper: all 24 plain exactly fill 24 GiB
    ((8, 24, 52.0, 1.5, 1.0, 60.0), ([8, 16], 60.0)),    # room for 8 singles
    ((8, 24, 52.0, 1.0, 2.0, 70.0), ([0, 19], 70.0)),    # doubles cheaper: 8 doubles, then 5 singles
    ((8, 24, 52.0, 1.5, 1.0, 51.0), ([8, 24], 52.0)),    # the base alone exceeds the budget: all checkpointed
    ((8, 24, 36.4, 1.24, 1.24, 200.0), ([0, 0], 76.08)),  # a big card: nothing checkpointed
    ((8, 24, 52.0, 1.5, 1.5, 61.0), ([8, 18], 61.0)),    # equal sizes: 6 blocks; the planner prefers singles
    ((2, 2, 10.0, 3.0, 2.5, 15.4), ([2, 0], 15.0)),      # two singles (5.0) beat a double + nothing
    ((2, 2, 10.0, 3.0, 2.5, 13.1), ([2, 1], 12.5)),      # one block either way: the lower peak (a single) wins
    ((2, 2, 10.0, 2.5, 3.0, 13.1), ([1, 2], 12.5)),      # the same with the double the smaller one
    ((2, 2, 10.0, 3.0, 2.5, 10.0), ([2, 2], 10.0)),      # exactly the base: nothing fits
])
def test_plan_golden_values(case, expect):
    plan = plan_checkpointing(*case)
    assert (plan["checkpointed"], plan["predicted_peak_gib"]) == (expect[0], pytest.approx(expect[1], abs=1e-3))
    n_double, n_single = case[:2]
    assert [n_double - plan["checkpointed"][0], n_single - plan["checkpointed"][1]] == plan["plain"]


def test_config_keys_are_checked():
    from etchr_sft.config import ConfigError, load_sft_config

    base = ["model.pretrained_path=x", "data.csv=y"]
    cfg = load_sft_config(None, base + ["model.activation_budget_gib=auto", "model.checkpoint_blocks=[3,10]"])
    assert cfg.model.activation_budget_gib == "auto" and list(cfg.model.checkpoint_blocks) == [3, 10]
    assert load_sft_config(None, base + ["model.activation_budget_gib=76.5"]).model.activation_budget_gib == 76.5
    for bad, word in [("model.activation_budget_gib=lots", "activation_budget_gib"),
                      ("model.activation_budget_gib=-1", "activation_budget_gib"),
                      ("model.activation_budget_fraction=1.5", "activation_budget_fraction"),
                      ("model.checkpoint_blocks=[1]", "checkpoint_blocks"),
                      ("model.checkpoint_blocks=[1,-2]", "checkpoint_blocks")]:
        with pytest.raises(ConfigError, match=word):
            load_sft_config(None, base + [bad])


def test_budget_mode_refuses_on_cpu(tiny_models):
    from omegaconf import OmegaConf

    from etchr_sft.config import ConfigError, ModelConfig
    from etchr_sft.model import configure_checkpointing

    t = _tiny_lora_transformer(tiny_models)
    cfg = OmegaConf.structured(ModelConfig(pretrained_path="x", activation_budget_gib=70))
    with pytest.raises(ConfigError, match="CUDA.*checkpoint_blocks"):
        configure_checkpointing(t, cfg, batch=1, image_tokens=32, text_tokens=8, optimizer_state_bytes=0)
    cfg.activation_budget_gib = 0
    assert configure_checkpointing(t, cfg, batch=1, image_tokens=32, text_tokens=8,
                                   optimizer_state_bytes=0)["checkpointed"] == [2, 2]
    cfg.checkpoint_blocks = [1, 0]
    assert configure_checkpointing(t, cfg, batch=1, image_tokens=32, text_tokens=8,
                                   optimizer_state_bytes=0) == {"mode": "pinned", "checkpointed": [1, 0], "blocks": [2, 2]}


def test_trainer_partial_checkpointing_keeps_the_losses(tiny_models, sft_csv, tmp_path):
    """train_sft.py with model.checkpoint_blocks pinned: the same losses as checkpointing none (the tiny
    config) and all; the decision is in metrics.jsonl; budget mode on CPU stops with a clear error."""
    runs = {}
    for name, extra in (("none", []), ("all", ["model.gradient_checkpointing=true"]),
                        ("partial", ["model.checkpoint_blocks=[1,1]"])):
        runs[name] = tmp_path / name
        res = run_train(args(tiny_models, sft_csv, runs[name], "train.max_steps=3", "train.save_final=false",
                             "train.validate_every=0", *extra))
        assert res.returncode == 0, res.stderr[-3000:]
    rows = {k: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for k, d in runs.items()}
    assert rows["partial"][0]["activation_checkpointing"] == {"mode": "pinned", "checkpointed": [1, 1], "blocks": [2, 2]}
    assert not any("activation_checkpointing" in r for k in ("none", "all") for r in rows[k])  # defaults: no extra row
    loss = {k: [r["loss"] for r in v if "loss" in r] for k, v in rows.items()}
    assert len(loss["none"]) == 3
    assert loss["partial"] == pytest.approx(loss["none"], rel=1e-5) and loss["all"] == pytest.approx(loss["none"], rel=1e-5)
    res = run_train(args(tiny_models, sft_csv, tmp_path / "budget", "train.max_steps=1",
                         "model.activation_budget_gib=auto"))
    assert res.returncode == 2 and "needs the transformer on a CUDA device" in res.stderr, res.stderr[-2000:]


def test_largest_sample_tokens_golden():
    from etchr_sft.data import DataError, largest_sample_tokens

    # (target W, H, reference W, H): 96*64 + 96*64 = 12288 px = 48 tokens; 80*64 + 128*96 = 17408 px = 68
    assert largest_sample_tokens([(96, 64, 96, 64), (80, 64, 128, 96)]) == (68, (80, 64, 128, 96))
    assert largest_sample_tokens([(512, 512, 512, 512)])[0] == 2048  # 1024 + 1024 tokens at 512^2
    with pytest.raises(DataError, match="no samples"):
        largest_sample_tokens([])


def test_trainer_plans_memory_for_the_datas_largest_sample(tiny_models, tmp_path, monkeypatch):
    """The budget probe is fed the CSV's largest bucket (target + reference tokens) at the full batch, not
    max_pixels plus a 1024^2 reference: on an H200 the latter checkpointed 22 of 32 blocks at 512^2,
    batch 4, where 50 of 76 GiB were used (docs/PERFORMANCE.md, "Scaling note")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_tests_conftest", SFT_DIR / "tests" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)  # the repository root has its own conftest module
    write_sft_csv = fixtures.write_sft_csv
    monkeypatch.syspath_prepend(str(SFT_DIR))
    import train_sft

    from etchr_sft.config import load_sft_config

    csv = write_sft_csv(tmp_path / "data", n=4, sizes=((96, 64), (128, 96)))
    seen = {}

    class Planned(Exception):
        pass

    def record(transformer, model_cfg, **kw):
        seen.update(kw)
        raise Planned

    monkeypatch.setattr(train_sft, "configure_checkpointing", record)
    cfg = load_sft_config(CONFIG, [f"model.pretrained_path={tiny_models.flux}", f"data.csv={csv}",
                                   f"train.run_dir={tmp_path / 'run'}", "data.max_pixels=6144",
                                   "train.batch_size=2", "model.max_sequence_length=16"])
    with pytest.raises(Planned):
        train_sft.train(cfg)
    # 128x96 targets scale to 80x64 under max_pixels=6144 and keep their 128x96 reference: 68 tokens
    assert seen["image_tokens"] == 68 and seen["batch"] == 2 and seen["text_tokens"] == 16
