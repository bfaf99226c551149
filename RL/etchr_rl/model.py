"""FLUX.2-klein parts for GRPO: loading, LoRA targets, encoders, the DiT velocity, decoding.

The DiT sees [text | noisy target tokens | clean reference tokens] with RoPE ids text (0,0,0,l),
target (0,h,w,0), reference (10,h,w,0), built with the pipeline's own helpers (PROTOCOL.md 0).
(SFT keeps its own copy of the shared parts: the trees share files, never code.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
REFERENCE_AREA = 1024 * 1024


def load_pipeline(path: str, dtype: torch.dtype):
    from diffusers import Flux2KleinPipeline

    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers FLUX.2-klein pipeline dir (model_index.json missing)")
    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype)
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_target_names(transformer, suffixes: list[str]) -> list[str]:
    """Linear layers whose name ends with one of `suffixes` on a dot boundary (RL: 120 on the 9B)."""
    names = [n for n, m in transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and any(n == s or n.endswith("." + s) for s in suffixes)]
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {suffixes}")
    return names


def add_lora(transformer, rank: int, alpha: float, targets: list[str]):
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian")
    transformer.add_adapter(cfg)
    return cfg


def apply_speed_options(transformer, *, attention_backend: str = "native", compile: bool = False) -> None:
    """The RL speed switches (config model.attention_backend, model.compile); call after LoRA, gradient
    checkpointing and the move to the device.

    attention_backend: diffusers' attention dispatch ("native" leaves torch SDPA's own choice).
    compile: regional torch.compile of the repeated blocks (as Evaluation's editor), used by the rollout (no
    grad) and by training (grad, through gradient checkpointing). Graph breaks are allowed, so that peft's
    LoRA layers or checkpointing can never turn a run into an error. Shapes: dynamo's default (dynamic=None):
    the first shape compiles static; the first time another shape comes (another source aspect ratio with
    data.resize=keep_aspect, a rollout chunk or micro-batch remainder) it recompiles once with those dims
    dynamic, so a run holds a bounded number of graphs. (dynamic=False would compile one graph per distinct
    resolution and batch, reach dynamo's recompile limit on keep_aspect data and then run those shapes eager;
    padding to fixed sizes would change the numbers.) With center_crop and a micro_batch / rollout_chunk that
    divide the window / group, every shape is static.
    """
    from .config import check_attention_backend

    check_attention_backend(attention_backend, device_type=next(transformer.parameters()).device.type)
    if attention_backend != "native":
        transformer.set_attention_backend(attention_backend)
    if compile:
        transformer.compile_repeated_blocks(fullgraph=False)


def output_size(width: int, height: int, mode: str, max_area: int, size: int) -> tuple[int, int]:
    """(W, H) of the rollout: keep_aspect (area <= max_area, sides floored to 16, as Evaluation) or
    center_crop (the reference's size x size square)."""
    if mode == "center_crop":
        return size // 16 * 16, size // 16 * 16
    scale = min(1.0, math.sqrt(max_area / float(width * height)))
    return max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)


def prepare_source(image: Image.Image, mode: str) -> Image.Image:
    """center_crop mode: crop the source to its central square first (the reference's resize_mode='crop')."""
    if mode != "center_crop":
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


@torch.no_grad()
def encode_prompt(pipe, prompt: str, device, max_sequence_length: int = 512):
    """(embeds (1, 512, D), text_ids (1, 512, 4))."""
    return pipe.encode_prompt(prompt=[prompt], device=device, max_sequence_length=max_sequence_length)


@torch.no_grad()
def encode_reference(pipe, image: Image.Image, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The condition image exactly as Flux2KleinPipeline prepares it -> tokens (1, L, C), ids t=10."""
    from diffusers import Flux2KleinPipeline as P

    w, h = image.size
    if w * h > REFERENCE_AREA:
        image = pipe.image_processor._resize_to_target_area(image, REFERENCE_AREA)
        w, h = image.size
    w, h = w // 16 * 16, h // 16 * 16
    pixels = pipe.image_processor.preprocess(image, height=h, width=w, resize_mode="crop")
    latents = pipe._encode_vae_image(pixels.to(device=device, dtype=pipe.vae.dtype), generator=None)
    return P._pack_latents(latents), P._prepare_image_ids([latents]).to(device)


def latent_grid(pipe, width: int, height: int) -> tuple[int, int]:
    """(h, w) of the packed latent grid for an output of width x height pixels."""
    f = pipe.vae_scale_factor * 2
    return height // f, width // f


def target_ids(h: int, w: int, batch: int, device) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline as P

    return P._prepare_latent_ids(torch.empty(batch, 1, h, w)).to(device)


def velocity(transformer, x: torch.Tensor, x_ids: torch.Tensor, ref: torch.Tensor, ref_ids: torch.Tensor,
             sigma: torch.Tensor, embeds: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """(B, L, C) velocity of the target tokens; ref / embeds broadcast over the batch."""
    b = x.shape[0]
    dtype = next(transformer.parameters()).dtype
    hidden = torch.cat([x, ref.expand(b, -1, -1)], dim=1).to(dtype)
    ids = torch.cat([x_ids, ref_ids.expand(b, -1, -1)], dim=1)
    out = transformer(hidden_states=hidden, timestep=sigma.to(dtype).expand(b), guidance=None,
                      encoder_hidden_states=embeds.expand(b, -1, -1).to(dtype), txt_ids=text_ids.expand(b, -1, -1),
                      img_ids=ids, return_dict=False)[0]
    return out[:, : x.shape[1]].float()


@torch.no_grad()
def decode(pipe, tokens: torch.Tensor, h: int, w: int) -> list[Image.Image]:
    """Packed clean latents (B, h*w, C) -> PIL images, as the pipeline's own epilogue."""
    b = tokens.shape[0]
    ids = target_ids(h, w, b, tokens.device)
    latents = pipe._unpack_latents_with_ids(tokens, ids, h, w)
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device, latents.dtype)
    latents = pipe._unpatchify_latents(latents * std + mean)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")
