"""SFT config: reference defaults, strict loading, validation messages."""

from __future__ import annotations

import pytest

from etchr_sft.config import REFERENCE_LORA_TARGETS, ConfigError, load_sft_config, save_config

REQ = ["model.pretrained_path=/m", "data.csv=/d.csv"]


def test_reference_defaults():
    cfg = load_sft_config(None, REQ)
    assert (cfg.lora.rank, cfg.lora.alpha) == (768, 768)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule) == (1e-4, 0.01, "constant")
    assert cfg.train.batch_size == 1 and cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.data.max_pixels == 1048576 and cfg.data.reference_resize == "pipeline"
    assert len(REFERENCE_LORA_TARGETS) == 11 and cfg.lora.single_blocks_to_out
    # speed switches are off by default: the reference's eager path
    assert not cfg.model.compile and cfg.model.attention_backend == "native" and not cfg.optim.fused
    assert cfg.train.save_final


@pytest.mark.parametrize("overrides,needle", [
    (["lora.rnak=4"], "lora.rnak"),
    (["train.batch_size=two"], "train.batch_size"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["data.reference_resize=bicubic"], "data.reference_resize"),
    (["data.multiple_of=8"], "data.multiple_of"),
    (["train.timestep_lookup=fuzzy"], "train.timestep_lookup"),
    (["model.attention_backend=flash9"], "model.attention_backend"),
    (["model.attention_backend=_native_cudnn"], "crashed training"),
    (["optim.fused=maybe"], "optim.fused"),
])
def test_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_sft_config(None, REQ + overrides)
    assert needle in str(err.value)


def test_missing_required_values_are_listed():
    with pytest.raises(ConfigError, match=r"data\.csv, model\.pretrained_path"):
        load_sft_config(None, [])


def test_yaml_then_override_and_save(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("model:\n  pretrained_path: /m\ndata:\n  csv: /d.csv\ntrain:\n  max_steps: 7\n")
    cfg = load_sft_config(str(p), ["train.max_steps=9"])
    assert cfg.train.max_steps == 9
    assert "max_steps: 9" in save_config(cfg, tmp_path / "run").read_text()


def test_compile_with_every_block_checkpointed_is_refused_unless_trusted():
    """model.compile skips checkpointed blocks (compiled under the checkpoint wrapper they got wrong gradients
    on an H200, docs/PERFORMANCE.md): a config that checkpoints every block would compile nothing and is
    refused on any device with the reason and the ways out; a budget, pinned blocks, no checkpointing or
    model.compile_trust_backward pass."""
    from etchr_sft.config import check_compiled_backward

    on = load_sft_config(None, REQ + ["model.compile=true"])
    for device in ("cuda", "cpu"):
        with pytest.raises(ConfigError) as err:
            check_compiled_backward(on.model, device)
        msg = str(err.value)
        assert "compiles nothing" in msg and "wrong LoRA" in msg and "repro_compiled_backward.py" in msg
        assert "model.activation_budget_gib" in msg and "model.compile_trust_backward=true" in msg
    for extra in (["model.compile_trust_backward=true"], ["model.activation_budget_gib=76"],
                  ["model.activation_budget_gib=auto"], ["model.checkpoint_blocks=[8,24]"],
                  ["model.gradient_checkpointing=false"]):
        check_compiled_backward(load_sft_config(None, REQ + ["model.compile=true", *extra]).model, "cuda")
    check_compiled_backward(load_sft_config(None, REQ).model, "cuda")  # compile off: nothing to refuse


def test_trainer_refuses_compile_on_cuda_before_anything_is_written(tmp_path, monkeypatch):
    """The refusal happens in the trainer before the accelerator, the saved config or the weights: a CUDA
    machine (faked) with model.compile=true and every block checkpointed leaves nothing behind (the lock
    removes the dir it made)."""
    from pathlib import Path

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # as test_train.py imports it
    import train_sft

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = load_sft_config(None, REQ + ["model.compile=true", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="compiles nothing"):
        train_sft.train(cfg)
    assert not (tmp_path / "run").exists()  # the lock removed the empty run dir it had created
