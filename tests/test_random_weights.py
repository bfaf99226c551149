"""make_tiny_models --random-weights: configs-only pipeline dirs get random bf16 weights that load.

The 9B shape itself (~34 GB) is only written on GPU machines (scripts/bench/bench_multi_gpu.py); here
the same function fills the tiny twin's configs, and the CLI rejects the flag without --full-shape.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import torch

from conftest import REPO, load_script


def test_random_weights_fill_a_configs_only_dir(tiny_models, tmp_path):
    from diffusers import Flux2KleinPipeline

    mt = load_script("make_tiny_models")
    pipe_dir = tmp_path / "pipe"
    shutil.copytree(tiny_models.flux, pipe_dir)
    for sub in ("transformer", "vae", "text_encoder"):  # keep config.json only, as --full-shape writes it
        for f in (pipe_dir / sub).iterdir():
            if f.name != "config.json":
                f.unlink()
    mt.write_random_weights(pipe_dir, "cpu", seed=0)
    from safetensors.torch import load_file

    for sub in ("transformer", "vae", "text_encoder"):
        (weights,) = (pipe_dir / sub).glob("*.safetensors")
        assert {t.dtype for t in load_file(weights).values() if t.is_floating_point()} == {torch.bfloat16}, sub
    pipe = Flux2KleinPipeline.from_pretrained(pipe_dir, dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert torch.equal(pipe.vae.bn.running_var, torch.ones_like(pipe.vae.bn.running_var))
    assert torch.count_nonzero(pipe.vae.bn.running_mean) == 0
    assert torch.get_default_dtype() == torch.float32  # restored


def test_random_weights_need_full_shape(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(tmp_path),
                          "--random-weights"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--full-shape" in res.stderr
