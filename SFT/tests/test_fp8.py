"""model.fp8 (issue #17): which layers it converts (the frozen LoRA base layers with 16-aligned shapes, never
LoRA's A/B), and its refusals through the real entry point (no torchao / no CUDA / full fine-tuning: exit 2
before the run dir gets a config, i.e. before any weights are loaded). The fp8 numbers need an fp8 GPU:
the last test runs only there (bench_sft_step's ours_fp8 variants and --loss-steps measure the rest)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent
sys.path.insert(0, str(SFT_DIR))
sys.path.insert(0, str(REPO / "scripts"))

from etchr_sft.config import REFERENCE_LORA_TARGETS  # noqa: E402
from etchr_sft.fp8 import Fp8Unavailable, check_fp8, fp8_layer_names  # noqa: E402
from etchr_sft.model import add_lora, lora_target_names  # noqa: E402

CONFIG = str(REPO / "configs" / "sft" / "tiny_demo.yaml")
HAVE_TORCHAO = importlib.util.find_spec("torchao") is not None


def _tiny_transformer_with_lora(mlp_ratio: float = 2.75):
    """The tiny twin's transformer, with an MLP width (32 * 2.75 = 88) that is no multiple of 16, so some
    LoRA base layers (ff.linear_out 88->32, single to_out 32+88=120->32) are misaligned and others aligned."""
    from diffusers import Flux2Transformer2DModel
    from make_tiny_models import TINY_TRANSFORMER

    torch.manual_seed(0)
    t = Flux2Transformer2DModel(**{**TINY_TRANSFORMER, "mlp_ratio": mlp_ratio})
    t.requires_grad_(False)
    targets = lora_target_names(t, list(REFERENCE_LORA_TARGETS), True)
    add_lora(t, 4, 4.0, targets)
    return t, targets


def test_selection_is_the_aligned_frozen_base_layers_only():
    t, targets = _tiny_transformer_with_lora()
    names = fp8_layer_names(t)
    modules = dict(t.named_modules())
    # golden: the tiny twin's inner width is 32, its MLP 88 (not a multiple of 16)
    misaligned = {n for n in targets if n.endswith(("ff.linear_out", "ff_context.linear_out"))
                  or (n.startswith("single_transformer_blocks.") and n.endswith("attn.to_out"))}
    assert misaligned and len(misaligned) < len(targets)
    assert sorted(names) == sorted(f"{n}.base_layer" for n in targets if n not in misaligned)
    for n in names:
        m = modules[n]
        assert type(m) is torch.nn.Linear and not m.weight.requires_grad
        assert m.in_features % 16 == 0 and m.out_features % 16 == 0
        assert "lora_" not in n
    # nothing that trains is selected: every LoRA A/B weight keeps requiring grad and is outside the names
    trained = [n for n, p in t.named_parameters() if p.requires_grad]
    assert trained and all(("lora_A" in n or "lora_B" in n) for n in trained)
    assert not any(n.startswith(tuple(names)) for n in trained)


def test_selection_without_lora_is_empty():
    from diffusers import Flux2Transformer2DModel
    from make_tiny_models import TINY_TRANSFORMER

    assert fp8_layer_names(Flux2Transformer2DModel(**TINY_TRANSFORMER)) == []


def test_check_refuses_unknown_mode_and_full_fine_tuning():
    with pytest.raises(Fp8Unavailable, match="use one of none, float8_rowwise, float8_tensorwise"):
        check_fp8("int8")
    with pytest.raises(Fp8Unavailable, match="full fine-tuning"):
        check_fp8("float8_rowwise", lora_enabled=False)
    check_fp8("none", lora_enabled=False)  # the default never needs anything


def _expected_refusal() -> str | None:
    if not HAVE_TORCHAO:
        return "model.fp8=float8_rowwise needs torchao"
    if not torch.cuda.is_available():
        return "model.fp8=float8_rowwise needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return "needs compute capability >= 8.9"
    return None


def _run(tiny_models, sft_csv, run_dir, *extra):
    argv = ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}",
            f"train.run_dir={run_dir}", "data.max_pixels=6144", "train.max_steps=1", *extra]
    return subprocess.run([sys.executable, str(SFT_DIR / "train_sft.py")] + argv, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                                                WANDB_MODE="offline"), cwd=REPO)


@pytest.mark.skipif(_expected_refusal() is None, reason="this machine can run fp8 (the refusal cannot happen)")
@pytest.mark.parametrize("mode", ["float8_rowwise", "float8_tensorwise"])
def test_entry_point_refuses_where_fp8_cannot_run(tiny_models, sft_csv, tmp_path, mode):
    run_dir = tmp_path / "run"
    res = _run(tiny_models, sft_csv, run_dir, f"model.fp8={mode}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert _expected_refusal().replace("float8_rowwise", mode) in res.stderr
    assert "model.fp8=none" in res.stderr  # the message names the way out
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_entry_point_refuses_fp8_with_full_fine_tuning(tiny_models, sft_csv, tmp_path):
    res = _run(tiny_models, sft_csv, tmp_path / "run", "model.fp8=float8_rowwise", "lora.enabled=false")
    assert res.returncode == 2 and "full fine-tuning" in res.stderr, res.stderr[-2000:]


def test_entry_point_rejects_unknown_mode(tiny_models, sft_csv, tmp_path):
    res = _run(tiny_models, sft_csv, tmp_path / "run", "model.fp8=int8")
    assert res.returncode == 2 and "model.fp8='int8'" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif(_expected_refusal() is not None, reason="needs torchao and a CUDA GPU of compute capability >= 8.9")
@pytest.mark.parametrize("mode", ["float8_rowwise", "float8_tensorwise"])
def test_fp8_lora_step_close_to_bf16_on_gpu(mode):
    """On an fp8 GPU: the converted layers are torchao Float8Linear, LoRA A/B are plain Linear, and one
    forward + backward gives a loss within 5% and LoRA gradients at cosine > 0.95 of bf16's."""
    from make_tiny_models import TINY_TRANSFORMER
    from diffusers import Flux2Transformer2DModel

    from etchr_sft.fp8 import apply_fp8

    def build():
        torch.manual_seed(0)
        cfg = {**TINY_TRANSFORMER, "attention_head_dim": 64, "num_attention_heads": 4, "axes_dims_rope": (16, 16, 16, 16),
               "mlp_ratio": 3.0}
        t = Flux2Transformer2DModel(**cfg).to("cuda", torch.bfloat16)
        t.requires_grad_(False)
        add_lora(t, 16, 16.0, lora_target_names(t, list(REFERENCE_LORA_TARGETS), True))
        with torch.no_grad():
            for n, p in t.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        return t

    def step(t):
        g = torch.Generator(device="cpu").manual_seed(1)
        c = t.config
        kw = {"hidden_states": torch.randn(1, 256, c.in_channels, generator=g).cuda().bfloat16(),
              "img_ids": torch.zeros(1, 256, 4, dtype=torch.long, device="cuda"),
              "encoder_hidden_states": torch.randn(1, 64, c.joint_attention_dim, generator=g).cuda().bfloat16(),
              "txt_ids": torch.zeros(1, 64, 4, dtype=torch.long, device="cuda"),
              "timestep": torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16), "guidance": None,
              "return_dict": False}
        loss = t(**kw)[0].float().square().mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for n, p in t.named_parameters() if p.requires_grad])

    ref_loss, ref_grad = step(build())
    t = build()
    names = apply_fp8(t, mode)
    modules = dict(t.named_modules())
    assert names and all(type(modules[n]).__name__ == "Float8Linear" for n in names)
    assert all(type(m) is torch.nn.Linear for n, m in modules.items() if n.endswith(("lora_A.default", "lora_B.default")))
    loss, grad = step(t)
    assert abs(loss - ref_loss) <= 0.05 * abs(ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item() > 0.95


def test_undo_restores_plain_linear_layers_with_the_same_weights():
    """undo_fp8 (benchmarks reuse one model across variants): every layer named Float8Linear goes back to a
    plain Linear holding the very same Parameters.
    (torchao's class is stood in for by a Linear subclass of that name: the swap-back keys on the type name.)"""
    from etchr_sft.fp8 import undo_fp8

    class Float8Linear(torch.nn.Linear):
        def forward(self, x):  # a stand-in that computes something else, so a left-behind layer shows
            return super().forward(x) * 2

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
    for n in names:
        m = t.get_submodule(n)
        assert type(m) is torch.nn.Linear and m.weight is before[n]
    assert fp8_layer_names(t) == names


@pytest.mark.skipif(not HAVE_TORCHAO, reason="torchao is not installed (the GPU extra); the config needs it")
@pytest.mark.parametrize("mode", ["float8_rowwise", "float8_tensorwise"])
def test_float8_config_leaves_the_discarded_weight_gradient_in_high_precision(mode):
    """torchao's recipes form the frozen base's weight gradient in float8, whose matmul needs the token count to
    be a multiple of 16 (RL at 720^2, 4 x 4562 tokens, failed on an H200). float8_config keeps the recipe's
    forward and input-gradient casts and disables the weight-gradient ones; emulated here at 21 tokens."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.config import ScalingType

    from etchr_sft.fp8 import _RECIPES, float8_config

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
