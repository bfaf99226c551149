"""The FLUX.2-klein parts SFT trains and feeds: loading, LoRA targets, encoders, the DiT forward.

The sequence fed to the DiT is [text 512 | noisy target tokens | clean reference tokens] with RoPE
ids text (0,0,0,l), target (0,h,w,0), reference (10,h,w,0) (PROTOCOL.md section 0); built with the
pipeline's own helpers so training sees exactly what inference sees.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def load_pipeline(path: str, dtype: torch.dtype):
    """The full pipeline (frozen VAE and text encoder, the transformer to train)."""
    from diffusers import Flux2KleinPipeline

    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: not a diffusers FLUX.2-klein pipeline dir (model_index.json missing)")
    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype)
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_target_names(transformer, suffixes: list[str], single_blocks_to_out: bool) -> list[str]:
    """Full module names of the Linear layers LoRA wraps: names ending in one of `suffixes` (on a dot
    boundary), plus `single_transformer_blocks.<i>.attn.to_out` when asked (the reference's 144 layers
    on the 9B; a bare `to_out` would also match the double blocks' ModuleList and break peft)."""
    names = []
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
        elif single_blocks_to_out and name.startswith("single_transformer_blocks.") and name.endswith(".attn.to_out"):
            names.append(name)
    if not names:
        raise ValueError(f"no Linear layer matches the LoRA targets {suffixes}")
    return names


def add_lora(transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0):
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     init_lora_weights="gaussian")
    transformer.add_adapter(cfg)
    return cfg


def apply_speed_options(transformer, model_cfg) -> list[str]:
    """The speed switches of `model:` (docs/PERFORMANCE.md): an attention kernel and regional
    torch.compile of the repeated blocks (after LoRA and gradient checkpointing are in place, so the
    compiled regions include the LoRA layers and run under the checkpoint wrapper). Returns what was
    applied, for the log."""
    applied = []
    if model_cfg.attention_backend != "native":
        transformer.set_attention_backend(model_cfg.attention_backend)
        applied.append(f"attention={model_cfg.attention_backend}")
    if model_cfg.compile:
        transformer.compile_repeated_blocks(fullgraph=True)
        applied.append("compile")
    return applied


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, max_sequence_length: int = 512):
    """(prompt_embeds (B, 512, joint_dim), text_ids (B, 512, 4)) with the frozen Qwen3 encoder."""
    return pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> normalised patchified latents (B, 4*z, H/16, W/16): VAE
    posterior mean, 2x2 patchify, BatchNorm running-stat normalisation (the pipeline's own code)."""
    vae = pipe.vae
    return pipe._encode_vae_image(images.to(device=vae.device, dtype=vae.dtype), generator=None)


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) -> tokens (B, h*w, C) and their RoPE ids (B, h*w, 4) with t = 0."""
    from diffusers import Flux2KleinPipeline as P

    return P._pack_latents(latents), P._prepare_latent_ids(latents).to(latents.device)


def pack_reference(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, h, w) reference latents -> tokens (B, h*w, C) and ids (B, h*w, 4) with t = 10."""
    from diffusers import Flux2KleinPipeline as P

    ids = P._prepare_image_ids([latents[:1]]).to(latents.device)  # one reference image per sample
    return P._pack_latents(latents), ids.expand(latents.shape[0], -1, -1)


def velocity(transformer, x_t: torch.Tensor, x_ids: torch.Tensor, ref: torch.Tensor, ref_ids: torch.Tensor,
             timestep: torch.Tensor, prompt_embeds: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """The DiT's velocity for the target tokens only (B, L_target, C); reference tokens are clean and
    share the timestep modulation."""
    dtype = next(transformer.parameters()).dtype
    hidden = torch.cat([x_t, ref], dim=1).to(dtype)
    out = transformer(hidden_states=hidden, timestep=timestep.to(dtype), guidance=None,
                      encoder_hidden_states=prompt_embeds.to(dtype), txt_ids=text_ids,
                      img_ids=torch.cat([x_ids, ref_ids], dim=1), return_dict=False)[0]
    return out[:, : x_t.shape[1]]


class TensorCache:
    """Optional on-disk cache of text embeddings / reference latents, keyed by content."""

    def __init__(self, root: Optional[str]):
        self.root = Path(root) if root else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:32]

    def get(self, key: str):
        if self.root is None:
            return None
        p = self.root / f"{key}.pt"
        return torch.load(p, map_location="cpu", weights_only=True) if p.is_file() else None

    def put(self, key: str, value) -> None:
        if self.root is None:
            return
        p = self.root / f"{key}.pt"
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        torch.save(value, tmp)
        os.replace(tmp, p)
