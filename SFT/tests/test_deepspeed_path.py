"""train_sft.py's DeepSpeed glue, checked without GPUs (the ZeRO-2 runs themselves need them).

- accelerate takes the DeepSpeed micro-batch size from a prepared DataLoader; SFT prepares none, so
  train_sft fills it (and the accumulation) from the config before accelerator.prepare;
- a LoRA checkpoint under DeepSpeed excludes the frozen base weights (and loads non-strictly);
- the metrics row carries peak CUDA memory only on CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

SFT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SFT_DIR))

import train_sft  # noqa: E402


class FakeAccelerator:
    def __init__(self, distributed_type: str):
        self.distributed_type = distributed_type
        self.plugin = SimpleNamespace(deepspeed_config={"train_micro_batch_size_per_gpu": "auto",
                                                        "gradient_accumulation_steps": 1})
        self.state = SimpleNamespace(deepspeed_plugin=self.plugin if distributed_type == "DEEPSPEED" else None)
        self.gradient_accumulation_steps = 1


def cfg(batch=2, accum=3):
    return SimpleNamespace(train=SimpleNamespace(batch_size=batch, grad_accum=accum))


def test_deepspeed_config_gets_the_micro_batch_and_accumulation():
    acc = FakeAccelerator("DEEPSPEED")
    train_sft._fill_deepspeed_config(acc, cfg())
    assert acc.plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}
    assert acc.gradient_accumulation_steps == 3
    ddp = FakeAccelerator("MULTI_GPU")
    train_sft._fill_deepspeed_config(ddp, cfg())
    assert ddp.plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"


def test_lora_checkpoint_under_deepspeed_excludes_frozen_weights():
    ds, ddp, lora = FakeAccelerator("DEEPSPEED"), FakeAccelerator("MULTI_GPU"), {"rank": 4}
    assert train_sft._deepspeed_lora_kwargs(ds, "save", lora) == {"exclude_frozen_parameters": True}
    assert train_sft._deepspeed_lora_kwargs(ds, "load", lora) == {"load_module_strict": False}
    assert train_sft._deepspeed_lora_kwargs(ds, "save", None) == {}  # full fine-tuning saves everything
    assert train_sft._deepspeed_lora_kwargs(ddp, "save", lora) == {}


def test_deepspeed_engine_accepts_those_keywords():
    import inspect

    import pytest

    DeepSpeedEngine = pytest.importorskip("deepspeed.runtime.engine").DeepSpeedEngine

    assert "exclude_frozen_parameters" in inspect.signature(DeepSpeedEngine.save_checkpoint).parameters
    assert "load_module_strict" in inspect.signature(DeepSpeedEngine.load_checkpoint).parameters


def test_peak_memory_only_on_cuda():
    assert train_sft._peak_memory(FakeAccelerator("NO"), torch.device("cpu")) == {}
