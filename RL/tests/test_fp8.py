"""model.fp8 in RL (issue #17; RL's own copy of etchr_rl/fp8.py): the converted layers are the frozen LoRA base
layers with 16-aligned shapes, never LoRA's A/B; train_grpo.py refuses (exit 2) where fp8 cannot run, before
the run dir, the judge or the weights are touched. The fp8 numbers need an fp8 GPU (bench_rl_group)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from etchr_rl.config import REFERENCE_LORA_TARGETS
from etchr_rl.fp8 import Fp8Unavailable, check_fp8, fp8_layer_names
from etchr_rl.model import add_lora, lora_target_names

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
CONFIG = str(REPO / "configs" / "rl" / "tiny_demo.yaml")
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None


def _tiny_transformer_with_lora():
    """The tiny twin's transformer with an MLP width of 32 * 2.75 = 88 (no multiple of 16): the double blocks'
    ff.linear_out (88 -> 32) is misaligned, the attention projections (32 -> 32) aligned."""
    sys.path.insert(0, str(REPO / "scripts"))
    from diffusers import Flux2Transformer2DModel
    from make_tiny_models import TINY_TRANSFORMER

    torch.manual_seed(0)
    t = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "mlp_ratio": 2.75})
    t.requires_grad_(False)
    targets = lora_target_names(t, list(REFERENCE_LORA_TARGETS))
    add_lora(t, 4, 8.0, targets)
    return t, targets


def test_selection_is_the_aligned_frozen_base_layers_only():
    t, targets = _tiny_transformer_with_lora()
    modules = dict(t.named_modules())
    misaligned = {n for n in targets if n.endswith(("ff.linear_out", "ff_context.linear_out"))}
    assert misaligned and len(misaligned) < len(targets)
    names = fp8_layer_names(t)
    assert sorted(names) == sorted(f"{n}.base_layer" for n in targets if n not in misaligned)
    assert all(type(modules[n]) is torch.nn.Linear and not modules[n].weight.requires_grad for n in names)
    assert not any("lora_A" in n or "lora_B" in n for n in names)


def test_check_refuses_unknown_mode():
    with pytest.raises(Fp8Unavailable, match="use one of none, float8_rowwise, float8_tensorwise"):
        check_fp8("fp8")
    check_fp8("none")


def _expected_refusal(mode: str) -> str | None:
    if not HAVE_TORCHAO:
        return f"model.fp8={mode} needs torchao"
    if not torch.cuda.is_available():
        return f"model.fp8={mode} needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return "needs compute capability >= 8.9"
    return None


def _run(tiny_models, tmp_path, *extra):
    argv = ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.jsonl={tmp_path / 'none.jsonl'}",
            f"train.run_dir={tmp_path / 'run'}", "judge.endpoints=[http://127.0.0.1:9/v1]", *extra]
    return subprocess.run([sys.executable, str(RL_DIR / "train_grpo.py")] + argv, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                                                WANDB_MODE="offline"), cwd=REPO)


@pytest.mark.skipif(_expected_refusal("x") is None, reason="this machine can run fp8 (the refusal cannot happen)")
@pytest.mark.parametrize("mode", ["float8_rowwise", "float8_tensorwise"])
def test_entry_point_refuses_where_fp8_cannot_run(tiny_models, tmp_path, mode):
    res = _run(tiny_models, tmp_path, f"model.fp8={mode}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert _expected_refusal(mode) in res.stderr and "model.fp8=none" in res.stderr, res.stderr[-2000:]
    # stopped before anything: no run dir config, and not the missing JSONL or the unreachable judge
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert "none.jsonl" not in res.stderr and "judge" not in res.stderr.lower()


def test_entry_point_rejects_unknown_mode(tiny_models, tmp_path):
    res = _run(tiny_models, tmp_path, "model.fp8=int8")
    assert res.returncode == 2 and "model.fp8='int8'" in res.stderr, res.stderr[-2000:]


def test_undo_restores_plain_linear_layers_with_the_same_weights():
    """undo_fp8 (bench_rl_group's fp8 variants): every layer named Float8Linear becomes a plain Linear holding
    the same Parameters (torchao's class stood in for by a Linear subclass of that name)."""
    from etchr_rl.fp8 import undo_fp8

    class Float8Linear(torch.nn.Linear):
        pass

    t, _ = _tiny_transformer_with_lora()
    names = fp8_layer_names(t)
    before = {n: t.get_submodule(n).weight for n in names}
    for n in names:
        parent, _, child = n.rpartition(".")
        old = t.get_submodule(n)
        new = Float8Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        setattr(t.get_submodule(parent), child, new)
    assert undo_fp8(t) == len(names) and undo_fp8(t) == 0
    assert all(type(t.get_submodule(n)) is torch.nn.Linear and t.get_submodule(n).weight is before[n] for n in names)


@pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao is not installed (the GPU extra); the config needs it")
@pytest.mark.parametrize("mode", ["float8_rowwise", "float8_tensorwise"])
def test_float8_config_leaves_the_discarded_weight_gradient_in_high_precision(mode):
    """torchao's recipes form the frozen base's weight gradient in float8, whose matmul needs the token count to
    be a multiple of 16 (RL at 720^2, 4 x 4562 tokens, failed on an H200). float8_config keeps the recipe's
    forward and input-gradient casts and disables the weight-gradient ones; emulated here at 21 tokens."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.config import ScalingType

    from etchr_rl.fp8 import _RECIPES, float8_config

    cfg, recipe = float8_config(mode, emulate=True), Float8LinearConfig.from_recipe_name(_RECIPES[mode])
    assert cfg.cast_config_input_for_grad_weight.scaling_type is ScalingType.DISABLED
    assert cfg.cast_config_grad_output_for_grad_weight.scaling_type is ScalingType.DISABLED
    for key in ("cast_config_input", "cast_config_weight", "cast_config_grad_output", "cast_config_weight_for_grad_input"):
        assert getattr(cfg, key) == getattr(recipe, key), key
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(32, 48))
    plain.requires_grad_(False)
    fp8 = torch.nn.Sequential(torch.nn.Linear(32, 48))
    fp8.load_state_dict(plain.state_dict())
    fp8.requires_grad_(False)
    convert_to_float8_training(fp8, config=cfg)
    assert type(fp8[0]).__name__ == "Float8Linear"
    x = torch.randn(3, 7, 32)  # 21 tokens
    grads = []
    for m in (plain, fp8):
        xi = x.clone().requires_grad_(True)
        m(xi).square().sum().backward()
        grads.append(xi.grad)
    assert fp8[0].weight.grad is None
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert 0 < rel < 0.15, rel  # float8 rounding, not a different function
