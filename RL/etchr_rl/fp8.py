"""fp8 matmuls for the frozen base under LoRA (issue #17; model.fp8, docs/PERFORMANCE.md): RL's copy.

model.fp8=float8_rowwise | float8_tensorwise swaps the frozen `base_layer` Linear of every peft LoRA layer
for torchao's float8 training Linear (torchao.float8.convert_to_float8_training with the recipe of that
name). Its forward and its input-gradient matmul run in float8 (e4m3, dynamic scales per row or per
tensor); the LoRA A/B matrices, everything outside the LoRA layers and the optimizer stay in bf16 / fp32.
torchao's autograd function (torchao/float8/float8_linear.py) also forms the weight-gradient matmul, which a
frozen base discards. In the recipe that matmul runs in float8, and torch._scaled_mm needs its inner dimension,
the batch's token count, to be a multiple of 16: RL at 720^2 (4 x 4562 tokens) failed there on an H200
(docs/PERFORMANCE.md, "Round three, second session"). So float8_config turns the weight-gradient casts off:
that discarded matmul runs in bf16 at any shape; the forward and input-gradient matmuls keep the recipe's float8.

Only base layers whose in and out features are multiples of 16 are converted (the fp8 matmul's alignment;
the same rule as Evaluation's editor). RL trains LoRA only.
(SFT keeps its own copy of this file: the trees share files, never code.) In RL the rollouts (no grad) run the
same float8 forward as training, so the log-probabilities of both come from one model.
"""

from __future__ import annotations

import torch

from .config import ConfigError

FP8_MODES = ("none", "float8_rowwise", "float8_tensorwise")
_RECIPES = {"float8_rowwise": "rowwise", "float8_tensorwise": "tensorwise"}


class Fp8Unavailable(ConfigError):
    """model.fp8 cannot run here (no torchao, no CUDA, a GPU without fp8 matmuls, or full fine-tuning)."""


def check_fp8(mode: str, *, lora_enabled: bool = True) -> None:
    """Refuse model.fp8=`mode` where it cannot run, before any weights are loaded. Raises Fp8Unavailable
    naming the key and what is missing; mode "none" always passes."""
    if mode not in FP8_MODES:
        raise Fp8Unavailable(f"model.fp8={mode!r}: use one of {', '.join(FP8_MODES)}")
    if mode == "none":
        return
    if not lora_enabled:
        raise Fp8Unavailable(f"model.fp8={mode} converts the frozen base layers under LoRA; with lora.enabled=false "
                             "(full fine-tuning) every weight trains and fp8 is not supported: use model.fp8=none")
    try:
        import torchao.float8  # noqa: F401
    except ImportError as exc:
        raise Fp8Unavailable(f"model.fp8={mode} needs torchao (pip install 'torchao>=0.17', matching the installed "
                             f"torch; or set model.fp8=none): {exc}") from None
    if not torch.cuda.is_available():
        raise Fp8Unavailable(f"model.fp8={mode} needs a CUDA GPU with fp8 matmuls (compute capability >= 8.9: Ada, "
                             "Hopper or newer); torch.cuda.is_available() is False here. Set model.fp8=none")
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        raise Fp8Unavailable(f"model.fp8={mode} needs compute capability >= 8.9 (Ada, Hopper or newer); "
                             f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}. Set model.fp8=none")


def fp8_layer_names(transformer) -> list[str]:
    """Full names of the Linear layers model.fp8 converts: the `base_layer` of each peft LoRA layer (the
    frozen base weight) whose in and out features are multiples of 16. LoRA's own lora_A / lora_B layers,
    Linear layers without LoRA and misaligned shapes are left alone."""
    from peft.tuners.lora import LoraLayer

    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = getattr(module, "base_layer", None)
        if (isinstance(base, torch.nn.Linear) and not base.weight.requires_grad
                and base.in_features % 16 == 0 and base.out_features % 16 == 0):
            names.append(f"{name}.base_layer")
    return names


def float8_config(mode: str, *, emulate: bool = False):
    """torchao's Float8LinearConfig for `mode` on a frozen base: the recipe's casts for the forward and the
    input-gradient matmuls, and none for the weight-gradient matmul (computed by torchao, discarded for a
    frozen weight), so that one runs in the input's precision at any token count. `emulate` = torchao's
    emulation (no float8 kernels; for CPU tests)."""
    import dataclasses

    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import CastConfig, ScalingType

    recipe = Float8LinearConfig.from_recipe_name(_RECIPES[mode])  # its __post_init__ fills the target dtypes
    return dataclasses.replace(
        recipe, emulate=emulate,
        cast_config_input_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED,
                                                     target_dtype=recipe.cast_config_input.target_dtype),
        cast_config_grad_output_for_grad_weight=CastConfig(scaling_type=ScalingType.DISABLED,
                                                           target_dtype=recipe.cast_config_grad_output.target_dtype))


def apply_fp8(transformer, mode: str) -> list[str]:
    """Convert the layers of fp8_layer_names to torchao float8 training Linear layers with the recipe of
    `mode` (after LoRA is attached, before gradient checkpointing's wrapper and torch.compile). Returns the
    converted names ([] for mode none). Call check_fp8 first: this raises Fp8Unavailable the same way."""
    if mode == "none":
        return []
    check_fp8(mode)
    from torchao.float8 import convert_to_float8_training

    names = fp8_layer_names(transformer)
    if not names:
        raise Fp8Unavailable(f"model.fp8={mode}: no LoRA base layer with in/out features divisible by 16 to convert")
    chosen = set(names)
    convert_to_float8_training(transformer, config=float8_config(mode),
                               module_filter_fn=lambda module, fqn: fqn in chosen)
    converted = [n for n, m in transformer.named_modules() if n in chosen and type(m).__name__ == "Float8Linear"]
    if len(converted) != len(names):
        raise Fp8Unavailable(f"model.fp8={mode}: torchao converted {len(converted)} of the {len(names)} selected "
                             "base layers")
    return converted


def undo_fp8(transformer) -> int:
    """Put a plain torch.nn.Linear back in place of every torchao Float8Linear (same weight and bias
    Parameters, nothing copied); returns how many. Benchmarks that train several variants on one in-memory
    model call it before unloading LoRA (peft's unload would otherwise leave the float8 layers behind)."""
    swaps = [(name, m) for name, m in transformer.named_modules() if type(m).__name__ == "Float8Linear"]
    for name, m in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = m.weight
        plain.bias = m.bias
        setattr(parent, child, plain)
    return len(swaps)
