"""scripts/make_tiny_models.py: layout, invariants, determinism, loading with Flux2KleinPipeline, 9B shape,
calibrated VAE latent statistics."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, load_script


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tiny_models, tmp_path):
    # A second build through the real CLI must match the fixture's in-process build byte for byte.
    out = tmp_path / "again"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(out),
                          "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RANDOM weights" in res.stdout
    a, b = _digest(tiny_models.root), _digest(out)
    assert a.keys() == b.keys() and len(a) > 15
    assert a == b


def test_other_seed_changes_weights_only(tiny_models, tmp_path):
    load_script("make_tiny_models").build(tmp_path, seed=1)
    a, b = _digest(tiny_models.root), _digest(tmp_path)
    changed = {k for k in a if a[k] != b[k]}
    assert "flux2-klein-tiny/transformer/diffusion_pytorch_model.safetensors" in changed
    assert "qwen3-vl-tiny/model.safetensors" in changed
    assert all(k.endswith((".safetensors", "ETCHR_TINY_MODEL.json")) for k in changed), changed


def test_pipeline_layout_matches_klein_base(tiny_models):
    root = tiny_models.flux
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (root / sub).is_dir(), sub
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["is_distilled"] is False
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    t = json.loads((root / "transformer" / "config.json").read_text())
    v = json.loads((root / "vae" / "config.json").read_text())
    te = json.loads((root / "text_encoder" / "config.json").read_text())
    # PROTOCOL.md section 0 invariants
    assert sum(t["axes_dims_rope"]) == t["attention_head_dim"]
    assert t["in_channels"] == 4 * v["latent_channels"]
    assert t["joint_attention_dim"] == 3 * te["hidden_size"]
    assert t["guidance_embeds"] is False and t["mlp_ratio"] == 3.0 and t["patch_size"] == 1
    assert len(v["block_out_channels"]) == 4 and list(v["patch_size"]) == [2, 2]
    assert te["num_hidden_layers"] >= 27  # text_encoder_out_layers (9, 18, 27) must exist


def test_tiny_pipeline_edits_an_image(tiny_models):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    assert pipe.config.is_distilled is False
    rng = np.random.RandomState(0)
    src = Image.fromarray((rng.rand(96, 128, 3) * 255).astype("uint8"))  # H=96, W=128 (>= 64 px)

    def edit(prompt, seed):
        return np.asarray(pipe(image=src, prompt=prompt, height=96, width=128, num_inference_steps=3,
                               guidance_scale=3.5, generator=torch.Generator().manual_seed(seed)).images[0])

    a = edit("Draw a red box around the cup. What colour is the cup?", 0)
    assert a.shape == (96, 128, 3)
    assert a.std() > 1.0  # not a constant image
    np.testing.assert_array_equal(a, edit("Draw a red box around the cup. What colour is the cup?", 0))
    assert not np.array_equal(a, edit("Draw a red box around the cup. What colour is the cup?", 1))
    assert not np.array_equal(a, edit("Draw the shortest path of the maze in blue.", 0))


def test_chat_template_matches_qwen3_with_thinking_off(tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models.flux / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok("héllo <|im_end|>")["input_ids"]
    assert tok.decode(ids) == "héllo <|im_end|>"  # byte-level: any text round-trips
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_full_shape_configs_have_9b_parameters(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from transformers import AutoConfig

    res = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), "--out", str(tmp_path),
                          "--full-shape"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    root = tmp_path / "flux2-klein-base-9b-shape"
    assert not list(root.rglob("*.safetensors"))  # configs only
    cfg = Flux2Transformer2DModel.load_config(root / "transformer")
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == 9_078_581_248  # PROTOCOL.md section 0
    te = AutoConfig.from_pretrained(root / "text_encoder")
    assert (te.hidden_size, te.num_hidden_layers) == (4096, 36)
    assert cfg["joint_attention_dim"] == 3 * te.hidden_size
    vl = AutoConfig.from_pretrained(tmp_path / "qwen3-vl-8b-shape")
    assert vl.text_config.hidden_size == 4096 and vl.vision_config.out_hidden_size == 4096


def test_vae_latents_of_fresh_images_have_unit_scale(tiny_models):
    """The VAE's BatchNorm statistics are calibrated on images: normalised latents of images the
    calibration never saw (procedural mazes and jigsaws, another seed's calibration set) are ~N(0, 1)
    per channel, and different images lie far apart relative to noise of variance 1."""
    import importlib

    from diffusers import Flux2KleinPipeline
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    mt = load_script("make_tiny_models")
    bb = load_script("build_benchmark")
    bb.load_procedural()
    maze = importlib.import_module("etchr_procedural.maze")
    jigsaw = importlib.import_module("etchr_procedural.jigsaw")
    pipe = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    bn = pipe.vae.bn
    # the stored statistics are those of the seed-0 calibration images (3 significant digits)
    mean, var = mt.latent_statistics(pipe.vae, mt.calibration_images(0))
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=6e-3, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=6e-3, atol=1e-8)
    assert float(bn.running_var.max()) < 0.2  # a random VAE's latents are small: not the O(1) defaults

    records = maze.generate(3, seed=11) + jigsaw.generate(3, seed=11)
    fresh = [im.resize((128, 128), Image.BICUBIC) for r in records for im in (r.image, r.target_image)]
    fresh += [im.resize((128, 128), Image.BICUBIC) for im in mt.calibration_images(12345, n=8)]
    proc = Flux2ImageProcessor(vae_scale_factor=16)
    with torch.no_grad():
        z = pipe._encode_vae_image(torch.cat([proc.preprocess(im, height=128, width=128) for im in fresh]), None)
    per_channel_var = z.var(dim=(0, 2, 3))
    per_channel_mean = z.mean(dim=(0, 2, 3))
    assert z.shape[1] == 16
    assert ((per_channel_var > 0.5) & (per_channel_var < 2.0)).all(), per_channel_var
    assert per_channel_mean.abs().max() < 0.4, per_channel_mean
    flat = z.flatten(1)
    dist = ((flat[:, None] - flat[None]) ** 2).mean(-1)
    off = dist[~torch.eye(len(flat), dtype=torch.bool)]
    assert off.min() > 0.3 and off.mean() > 1.0  # images are distinguishable at the noise scale
