#!/usr/bin/env python
"""Write random-weight twins of the project's models, offline and deterministically.

    python scripts/make_tiny_models.py --out tiny_models [--seed 0]
    python scripts/make_tiny_models.py --out shapes_9b --full-shape
    python scripts/make_tiny_models.py --out shapes_9b --full-shape --random-weights [--device cuda]

Writes under --out:
  flux2-klein-tiny/   a FLUX.2-klein pipeline in the exact diffusers layout of FLUX.2-klein-base-9B
                      (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
                      is_distilled false) with the structural invariants of PROTOCOL.md section 0;
  qwen3-vl-tiny/      a Qwen3-VL in Hugging Face layout with its processor, servable by
                      `transformers serve`.
With --full-shape it writes configs only (no weights) at the real shapes instead:
  flux2-klein-base-9b-shape/ and qwen3-vl-8b-shape/, for GPU benchmarks that build the models from
  these configs with random weights.
With --full-shape --random-weights, flux2-klein-base-9b-shape/ also gets random bf16 weights (9.1 B
transformer, 8.2 B Qwen3-8B text encoder, VAE; ~34 GB of safetensors, built on --device: a GPU takes
about a minute, mostly disk writes), so the real entry points can load it like the released
checkpoint (multi-GPU benchmarks). The Qwen3-VL stays configs only.

The same seed gives byte-identical files (tested). The models are random: their edits are noise and
their answers are gibberish. Nothing is downloaded. The tiny VAE's BatchNorm statistics (the latent
normalisation) are measured on generated images, so normalised latents have unit scale as FLUX.2's do
and a trained tiny DiT's progress is visible (SFT/tests/test_learning.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
# FLUX.2-klein-base-9B (PROTOCOL.md section 0).
FULL_TRANSFORMER = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=24,
                        attention_head_dim=128, num_attention_heads=32, joint_attention_dim=12288,
                        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                        rope_theta=2000, eps=1e-6, guidance_embeds=False)
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=32, layers_per_block=2,
                norm_num_groups=32, sample_size=1024, batch_norm_eps=1e-4, patch_size=(2, 2))
# Qwen3-8B, the klein-9B text encoder.
FULL_TEXT_ENCODER = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# Qwen3-VL-8B-Instruct (the judge / answerer of the paper).
FULL_QWEN3_VL_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                          max_position_embeddings=262144, rms_norm_eps=1e-6,
                          rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                           "mrope_section": [24, 20, 20], "mrope_interleaved": True})
FULL_QWEN3_VL_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                            spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                            num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])

# Tiny twins: same structure and invariants, ~0.1-0.3 M parameters.
TINY_TEXT_HIDDEN = 16
TINY_TEXT_LAYERS = 27  # hidden_states has layers + 1 entries: (9, 18, 27) must index it, as for Qwen3-8B
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
TINY_VAE = dict(block_out_channels=(8, 16, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
                sample_size=64, batch_norm_eps=1e-4, patch_size=(2, 2))
TINY_TRANSFORMER = dict(patch_size=1, in_channels=4 * TINY_VAE["latent_channels"], out_channels=None,
                        num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=len(TEXT_ENCODER_OUT_LAYERS) * TINY_TEXT_HIDDEN,
                        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
                        rope_theta=2000, eps=1e-6, guidance_embeds=False)

# The FLUX.2 scheduler config (flow matching, resolution-dependent shift computed by the pipeline).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")

# ----------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with no merges (every byte is a token) + Qwen's special tokens.
# ----------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]

# Qwen3-style chat template: handles string or list content (text / image / video parts) and
# `enable_thinking=False` (what Flux2KleinPipeline passes), like the real Qwen3 / Qwen3-VL templates.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode map (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer():
    from transformers import Qwen2TokenizerFast

    vocab = {sym: i for i, sym in enumerate(_bytes_to_unicode()[b] for b in range(256))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, bos_token=None,
                             eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 131072
    return tok


def _vocab_size(tokenizer) -> int:
    return ((len(tokenizer) + 63) // 64) * 64  # padded, like real checkpoints


# ----------------------------------------------------------------------------------------------
# FLUX.2-klein pipeline
# ----------------------------------------------------------------------------------------------
MODEL_INDEX = {
    "_class_name": "Flux2KleinPipeline",
    "is_distilled": False,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def _qwen3_text_config(tokenizer, full: bool):
    from transformers import Qwen3Config

    if full:
        kw = dict(FULL_TEXT_ENCODER)
    else:
        kw = dict(vocab_size=_vocab_size(tokenizer), hidden_size=TINY_TEXT_HIDDEN, intermediate_size=32,
                  num_hidden_layers=TINY_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    cfg = Qwen3Config(**kw)
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return cfg


def write_flux2_klein(out: Path, seed: int, full: bool) -> Path:
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2, sort_keys=True) + "\n")

    text_cfg = _qwen3_text_config(tokenizer, full)
    tcfg, vcfg = (FULL_TRANSFORMER, FULL_VAE) if full else (TINY_TRANSFORMER, TINY_VAE)
    # PROTOCOL.md section 0 invariants; a twin that breaks them would not test the real code paths.
    assert sum(tcfg["axes_dims_rope"]) == tcfg["attention_head_dim"]
    assert tcfg["in_channels"] == 4 * vcfg["latent_channels"]
    assert tcfg["joint_attention_dim"] == len(TEXT_ENCODER_OUT_LAYERS) * text_cfg.hidden_size
    assert len(vcfg["block_out_channels"]) == 4 and not tcfg["guidance_embeds"] and tcfg["mlp_ratio"] == 3.0

    if full:  # configs only: benchmarks instantiate these with random weights on the GPU
        (out / "transformer").mkdir(exist_ok=True)
        (out / "vae").mkdir(exist_ok=True)
        (out / "text_encoder").mkdir(exist_ok=True)
        _write_json(out / "transformer" / "config.json", {"_class_name": "Flux2Transformer2DModel", **_jsonable(tcfg)})
        _write_json(out / "vae" / "config.json", {"_class_name": "AutoencoderKLFlux2", **_jsonable(vcfg)})
        text_cfg.save_pretrained(out / "text_encoder")
        return out

    torch.manual_seed(seed)
    Flux2Transformer2DModel(**tcfg).save_pretrained(out / "transformer")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**vcfg)
    calibrate_vae_batchnorm(vae, calibration_images(seed))
    vae.save_pretrained(out / "vae")
    torch.manual_seed(seed + 2)
    Qwen3ForCausalLM(text_cfg).save_pretrained(out / "text_encoder")
    return out


# ----------------------------------------------------------------------------------------------
# VAE latent normalisation
# ----------------------------------------------------------------------------------------------
# A random VAE's latents have variance ~0.01, so with BatchNorm statistics of O(1) every image lands
# within a small latent distance of every other (noise has variance 1) and no test could see a model
# learn. Like FLUX.2's, the twin's statistics are measured on images, so normalised latents are
# ~N(0, 1) per channel.
CALIBRATION_IMAGES = 48  # per seed; 64 x 64 and 96 x 128 px
CALIBRATION_DIGITS = 3  # significant digits kept: float32 round-off never reaches them (byte-identical files)


def calibration_images(seed: int, n: int = CALIBRATION_IMAGES):
    """n deterministic RGB images (PIL) of the kinds the tests feed: smooth colour fields, flat
    backgrounds with shapes and lines, grids of filled cells (mazes), uniform noise; alternating
    64 x 64 and 96 x 128 (H x W)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, 7])
    images = []
    for i in range(n):
        h, w = (64, 64) if i % 2 == 0 else (96, 128)
        kind = (i // 2) % 4  # each kind at both sizes
        if kind == 0:  # smooth field: low-resolution noise, bicubic upsampling
            low = (rng.random((int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3)) * 255).astype(np.uint8)
            img = Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC)
        elif kind == 1:  # flat background, shapes and lines
            img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
            d = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(2, 6))):
                x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
                x1, y1 = x0 + int(rng.integers(6, w // 2)), y0 + int(rng.integers(6, h // 2))
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
            for _ in range(int(rng.integers(0, 3))):
                pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)]
                d.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
        elif kind == 2:  # grid of cells from a small palette, grey lines (maze-like)
            cells = int(rng.integers(4, 9))
            palette = np.array([(255, 255, 255), (0, 0, 0), (0, 128, 0), (255, 0, 0), (0, 0, 255)], np.uint8)
            fills = palette[rng.choice(5, size=(cells, cells), p=[0.55, 0.3, 0.05, 0.05, 0.05])]
            img = Image.fromarray(fills, "RGB").resize((w, h), Image.NEAREST)
            d = ImageDraw.Draw(img)
            for k in range(cells + 1):
                d.line([(0, k * h // cells), (w, k * h // cells)], fill=(128, 128, 128), width=1)
                d.line([(k * w // cells, 0), (k * w // cells, h)], fill=(128, 128, 128), width=1)
        else:  # uniform noise
            img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8), "RGB")
        images.append(img)
    return images


def latent_statistics(vae, images) -> tuple:
    """Per-channel mean and variance (each (4 * latent_channels,), float64) of the patchified VAE
    posterior means of `images`, pooled over images and positions: what the pipeline normalises."""
    import numpy as np
    import torch
    from diffusers import Flux2KleinPipeline

    by_size: dict = {}
    for img in images:
        by_size.setdefault(img.size, []).append(np.asarray(img.convert("RGB"), dtype=np.float32))
    dtype = next(vae.parameters()).dtype
    feats = []
    with torch.no_grad():
        for arrays in by_size.values():  # one batch per size
            x = torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).to(dtype)
            z = Flux2KleinPipeline._patchify_latents(vae.encode(x).latent_dist.mode())
            feats.append(z.double().permute(1, 0, 2, 3).flatten(1))
    z = torch.cat(feats, dim=1)
    return z.mean(dim=1), z.var(dim=1, unbiased=False)


def _round_significant(x, digits: int):
    import torch

    scale = 10.0 ** (digits - 1 - torch.floor(torch.log10(x.abs().clamp_min(1e-30))))
    return torch.round(x * scale) / scale


def calibrate_vae_batchnorm(vae, images) -> None:
    """Set the VAE's BatchNorm running mean and variance (the latent normalisation
    (z - mean) / sqrt(var + eps)) to the statistics of `images`."""
    import torch

    mean, var = latent_statistics(vae.eval(), images)
    with torch.no_grad():
        vae.bn.running_mean.copy_(_round_significant(mean, CALIBRATION_DIGITS).to(vae.bn.running_mean.dtype))
        vae.bn.running_var.copy_(_round_significant(var, CALIBRATION_DIGITS).to(vae.bn.running_var.dtype))


# ----------------------------------------------------------------------------------------------
# Qwen3-VL
# ----------------------------------------------------------------------------------------------
def write_qwen3_vl(out: Path, seed: int, full: bool) -> Path:
    import torch
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if full:
        text, vision = dict(FULL_QWEN3_VL_TEXT), dict(FULL_QWEN3_VL_VISION)
        text["vocab_size"] = max(text["vocab_size"], _vocab_size(tokenizer))
    else:
        text = dict(vocab_size=_vocab_size(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
                    rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [2, 3, 3],
                                     "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=64,
                      deepstack_visual_indexes=[1])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    cfg.eos_token_id = ids["<|im_end|>"]
    cfg.pad_token_id = ids["<|endoftext|>"]

    # Small images keep the tiny model fast on CPU; the real processor allows up to 16M pixels.
    max_px = 16384 * 32 * 32 if full else 256 * 256
    image_processor = Qwen2VLImageProcessor(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                            temporal_patch_size=vision["temporal_patch_size"],
                                            size={"shortest_edge": 64 * 64, "longest_edge": max_px},
                                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                            temporal_patch_size=vision["temporal_patch_size"])
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    if full:
        cfg.save_pretrained(out)
        return out
    torch.manual_seed(seed + 3)
    model = Qwen3VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def write_random_weights(pipe_dir: str | os.PathLike, device: str = "cpu", seed: int = 0) -> Path:
    """Give a pipeline dir that has configs only (transformer/, vae/, text_encoder/ config.json) random
    bf16 weights in the diffusers / transformers layout, one model at a time, built directly on
    `device`. The VAE's BatchNorm statistics are set to mean 0, var 1 (a real VAE's are O(1))."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoConfig, Qwen3ForCausalLM

    pipe_dir = Path(pipe_dir)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for offset, sub in enumerate(("transformer", "vae", "text_encoder")):
            torch.manual_seed(seed + offset)
            with torch.device(device):
                if sub == "transformer":
                    model = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(pipe_dir / sub))
                elif sub == "vae":
                    model = AutoencoderKLFlux2.from_config(AutoencoderKLFlux2.load_config(pipe_dir / sub))
                    with torch.no_grad():
                        model.bn.running_mean.zero_()
                        model.bn.running_var.fill_(1.0)
                else:
                    model = Qwen3ForCausalLM(AutoConfig.from_pretrained(pipe_dir / sub))
            model.save_pretrained(pipe_dir / sub)
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        torch.set_default_dtype(old)
    return pipe_dir


def _umask() -> int:
    mask = os.umask(0o022)  # os.umask sets as it reads: put it straight back
    os.umask(mask)
    return mask


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build(out: str | os.PathLike, seed: int = 0, full_shape: bool = False, random_weights: bool = False,
          device: str = "cpu") -> dict[str, Path]:
    """Build both models under `out` (atomically: a temp dir renamed into place). Returns their dirs.
    `random_weights` (with full_shape): also write random bf16 weights of the FLUX.2 pipeline on `device`."""
    if random_weights and not full_shape:
        raise ValueError("random_weights needs full_shape (the tiny models always have weights)")
    out = Path(out)
    names = (("flux2-klein-base-9b-shape", "qwen3-vl-8b-shape") if full_shape else ("flux2-klein-tiny", "qwen3-vl-tiny"))
    out.mkdir(parents=True, exist_ok=True)
    result = {}
    for name, writer in zip(names, (write_flux2_klein, write_qwen3_vl)):
        final = out / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; shared model dirs must be readable
        try:
            writer(tmp, seed, full_shape)
            weights = random_weights and writer is write_flux2_klein
            if weights:
                write_random_weights(tmp, device, seed)
            info = {"generator": "scripts/make_tiny_models.py", "seed": seed, "full_shape": full_shape,
                    "note": "random weights: outputs are meaningless" if not full_shape or weights else "configs only"}
            if weights:
                info["random_weights"] = True
            (tmp / "ETCHR_TINY_MODEL.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        result[name] = final
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="weight seed (same seed -> byte-identical files)")
    ap.add_argument("--full-shape", action="store_true", help="real 9B-shape configs only, no weights")
    ap.add_argument("--random-weights", action="store_true",
                    help="with --full-shape: also write random bf16 weights of the 9B-shape FLUX.2 pipeline (~34 GB)")
    ap.add_argument("--device", default="cpu", help="where --random-weights builds the weights (cuda is fast)")
    args = ap.parse_args(argv)
    if args.random_weights and not args.full_shape:
        ap.error("--random-weights needs --full-shape")
    dirs = build(args.out, args.seed, args.full_shape, args.random_weights, args.device)
    for name, path in dirs.items():
        print(f"wrote {path}")
    if not args.full_shape:
        print("note: these models have RANDOM weights; their edits and answers are meaningless.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
