"""The nano FLUX.2-klein editor: make_tiny_models' builder at nano dimensions, with a VAE trained first.

    transformer   Flux2Transformer2DModel, random init (trained from scratch by SFT): hidden 384 = 6 heads
                  x 64, 4 double + 12 single blocks, ~40 M parameters (NANO_DIMS; --tiny: TINY_DIMS)
    vae           AutoencoderKLFlux2 (4 blocks, 8x, 2x2 patchify), trained here on the training images
                  (L1 + MSE + a small KL term, posterior samples), then its BatchNorm running statistics
                  set to those of the patchified latents of training images (the latent normalisation
                  of the pipeline: normalised latents ~ N(0, 1) per channel, the scale the DiT's noise has)
    text_encoder  a small random Qwen3 (27 layers, so that layers (9, 18, 27) exist as on Qwen3-8B); frozen
    tokenizer, scheduler, model_index.json   exactly make_tiny_models' (byte-level BPE, FLUX.2 scheduler)

The PROTOCOL.md section 0 invariants of make_tiny_models hold (rope axes sum to the head dim, in_channels
= 4 x latent channels, joint_attention_dim = 3 x text hidden, 4 VAE blocks, mlp_ratio 3, no guidance
embedding). `assemble` turns a full-fine-tuning SFT checkpoint (transformer/) into a pipeline dir
(CHECKPOINTS.md section 1) for RL and scoring.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import make_tiny_models as mtm  # noqa: E402


@dataclass(frozen=True)
class Dims:
    hidden: int  # transformer width = heads x head dim
    heads: int
    double_blocks: int
    single_blocks: int
    text_hidden: int  # Qwen3 width; joint_attention_dim = 3 x this
    latent_channels: int  # VAE latent channels; tokens have 4 x this
    vae_channels: tuple  # 4 VAE block widths
    vae_groups: int  # GroupNorm groups (divides every VAE width)
    timestep_channels: int


NANO_DIMS = Dims(hidden=384, heads=6, double_blocks=4, single_blocks=12, text_hidden=64, latent_channels=16,
                 vae_channels=(32, 64, 128, 128), vae_groups=8, timestep_channels=256)
TINY_DIMS = Dims(hidden=32, heads=2, double_blocks=1, single_blocks=1, text_hidden=16, latent_channels=4,
                 vae_channels=(8, 16, 16, 16), vae_groups=4, timestep_channels=32)


def transformer_config(d: Dims) -> dict:
    head = d.hidden // d.heads
    if head * d.heads != d.hidden or head % 8:
        raise ValueError(f"hidden {d.hidden} / heads {d.heads}: the head dim must be a whole multiple of 8 "
                         "(4 RoPE axes of even size)")
    return dict(patch_size=1, in_channels=4 * d.latent_channels, out_channels=None, num_layers=d.double_blocks,
                num_single_layers=d.single_blocks, attention_head_dim=head, num_attention_heads=d.heads,
                joint_attention_dim=len(mtm.TEXT_ENCODER_OUT_LAYERS) * d.text_hidden,
                timestep_guidance_channels=d.timestep_channels, mlp_ratio=3.0, axes_dims_rope=(head // 4,) * 4,
                rope_theta=2000, eps=1e-6, guidance_embeds=False)


def vae_config(d: Dims) -> dict:
    return dict(block_out_channels=tuple(d.vae_channels), latent_channels=d.latent_channels, layers_per_block=1,
                norm_num_groups=d.vae_groups, sample_size=128, batch_norm_eps=1e-4, patch_size=(2, 2))


def text_config(d: Dims, tokenizer):
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=mtm._vocab_size(tokenizer), hidden_size=d.text_hidden,
                      intermediate_size=2 * d.text_hidden, num_hidden_layers=max(mtm.TEXT_ENCODER_OUT_LAYERS),
                      num_attention_heads=2, num_key_value_heads=1, head_dim=d.text_hidden // 2,
                      max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return cfg


# ----------------------------------------------------------------------------------------------
# VAE training and latent calibration
# ----------------------------------------------------------------------------------------------
def load_images(paths: list, limit: int, seed: int = 0) -> dict:
    """Up to `limit` images of `paths` (a seeded sample) as uint8 arrays, grouped by (H, W)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(paths))[:limit] if len(paths) > limit else range(len(paths))
    by_size: dict = {}
    for i in pick:
        with Image.open(paths[i]) as im:
            arr = np.asarray(im.convert("RGB"))
        by_size.setdefault(arr.shape[:2], []).append(arr)
    return {k: np.stack(v) for k, v in by_size.items()}


def _batch(by_size: dict, rng, batch: int):
    """A random batch from one size bucket (chosen in proportion to its count): float (B, 3, H, W) in [-1, 1]."""
    import torch

    keys = list(by_size)
    counts = np.array([len(by_size[k]) for k in keys], dtype=np.float64)
    arr = by_size[keys[rng.choice(len(keys), p=counts / counts.sum())]]
    idx = rng.integers(0, len(arr), size=min(batch, len(arr)))
    return torch.from_numpy(arr[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, by_size: dict, *, steps: int, time_limit_s: float, batch: int, lr: float, kl_weight: float,
              device, metrics_path: Path, seed: int = 0, log=print) -> dict:
    """Reconstruction training: loss = L1 + MSE + kl_weight * KL (per element), posterior samples.

    Stops at `steps` or after `time_limit_s` seconds (0 = no limit). One JSON line per 25 steps in
    metrics_path (step, loss, l1, kl, seconds). Returns {"steps", "seconds", "loss"}.
    """
    import torch

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    t0, step, last = time.time(), 0, {}
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with open(metrics_path, "w") as f:
        while step < steps and not (time_limit_s and time.time() - t0 >= time_limit_s):
            x = _batch(by_size, rng, batch).to(device)
            with autocast:
                post = vae.encode(x).latent_dist
                rec = vae.decode(post.sample()).sample
            rec = rec.float()
            l1 = (rec - x).abs().mean()
            kl = (0.5 * (post.mean.float() ** 2 + post.var.float() - 1.0 - post.logvar.float())).mean()
            loss = l1 + ((rec - x) ** 2).mean() + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 25 == 0 or step == 1:
                last = {"step": step, "loss": round(loss.item(), 5), "l1": round(l1.item(), 5),
                        "kl": round(kl.item(), 4), "seconds": round(time.time() - t0, 2)}
                f.write(json.dumps(last) + "\n")
                f.flush()
    seconds = time.time() - t0
    log(f"[vae] {step} steps in {seconds:.1f} s; last loss {last.get('loss')}, l1 {last.get('l1')}")
    vae.eval()
    return {"steps": step, "seconds": round(seconds, 2), "loss": last.get("loss")}


def calibrate_batchnorm(vae, by_size: dict, device, per_bucket: int = 256) -> dict:
    """Set vae.bn's running mean / variance to those of the patchified posterior means of the images
    (what Flux2KleinPipeline normalises with): normalised latents then have mean 0, variance 1 per channel."""
    import torch
    from diffusers import Flux2KleinPipeline

    feats = []
    with torch.no_grad():
        for arr in by_size.values():
            x = torch.from_numpy(arr[:per_bucket]).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
            z = Flux2KleinPipeline._patchify_latents(vae.encode(x).latent_dist.mode().float())
            feats.append(z.double().permute(1, 0, 2, 3).flatten(1))
        z = torch.cat(feats, dim=1)
        mean, var = z.mean(dim=1), z.var(dim=1, unbiased=False)
        vae.bn.running_mean.copy_(mean.to(vae.bn.running_mean))
        vae.bn.running_var.copy_(var.to(vae.bn.running_var))
    return {"latent_mean_abs": round(float(mean.abs().mean()), 4), "latent_var_mean": round(float(var.mean()), 4)}


def roundtrip(vae, arr: np.ndarray, device) -> np.ndarray:
    """uint8 (B, H, W, 3) images -> their VAE reconstructions (posterior mean), uint8, same shape."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1.0
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------------------------
# The pipeline dir
# ----------------------------------------------------------------------------------------------
def build(out: str | os.PathLike, dims: Dims, train_images: list, *, seed: int = 0, vae_steps: int = 2000,
          vae_time_s: float = 90.0, vae_batch: int = 32, vae_lr: float = 1e-3, vae_kl: float = 1e-6,
          vae_images: int = 4000, device: str = "auto", log=print) -> dict:
    """Write the nano pipeline to `out` (atomically: built in a temp dir, renamed). Returns its info
    (also in <out>/ETCHR_NANO_MODEL.json): dims, parameter counts, VAE training and calibration."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = mtm.build_tokenizer()
        tokenizer.save_pretrained(tmp / "tokenizer")
        FlowMatchEulerDiscreteScheduler(**mtm.SCHEDULER).save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(mtm.MODEL_INDEX, indent=2, sort_keys=True) + "\n")
        tcfg, vcfg, text_cfg = transformer_config(dims), vae_config(dims), text_config(dims, tokenizer)
        assert sum(tcfg["axes_dims_rope"]) == tcfg["attention_head_dim"]
        assert tcfg["in_channels"] == 4 * vcfg["latent_channels"]
        assert tcfg["joint_attention_dim"] == len(mtm.TEXT_ENCODER_OUT_LAYERS) * text_cfg.hidden_size
        assert len(vcfg["block_out_channels"]) == 4 and not tcfg["guidance_embeds"] and tcfg["mlp_ratio"] == 3.0

        torch.manual_seed(seed)
        transformer = Flux2Transformer2DModel(**tcfg)
        transformer.save_pretrained(tmp / "transformer")
        torch.manual_seed(seed + 2)
        text_encoder = Qwen3ForCausalLM(text_cfg)
        text_encoder.save_pretrained(tmp / "text_encoder")

        torch.manual_seed(seed + 1)
        vae = AutoencoderKLFlux2(**vcfg)
        by_size = load_images(train_images, vae_images, seed)
        vae_info = train_vae(vae, by_size, steps=vae_steps, time_limit_s=vae_time_s, batch=vae_batch, lr=vae_lr,
                             kl_weight=vae_kl, device=dev, metrics_path=out.parent / "vae_metrics.jsonl",
                             seed=seed, log=log)
        vae_info["calibration"] = calibrate_batchnorm(vae, by_size, dev)
        vae.to("cpu").save_pretrained(tmp / "vae")
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        info = {"generator": "scripts/nano/nano_model.py", "seed": seed, "dims": {**asdict(dims),
                "vae_channels": list(dims.vae_channels)},
                "parameters": {"transformer": count(transformer), "vae": count(vae),
                               "text_encoder": count(text_encoder)},
                "vae_training": vae_info, "device": str(dev)}
        (tmp / "ETCHR_NANO_MODEL.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"[model] {out}: transformer {info['parameters']['transformer'] / 1e6:.2f} M, VAE "
        f"{info['parameters']['vae'] / 1e6:.2f} M, text encoder {info['parameters']['text_encoder'] / 1e6:.2f} M "
        f"parameters")
    return info


def assemble(base: str | os.PathLike, checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A pipeline dir from `base` (VAE, text encoder, tokenizer, scheduler) and the transformer/ of a
    full-fine-tuning SFT checkpoint, with meta.json naming both (CHECKPOINTS.md sections 1 and 3)."""
    base, checkpoint, out = Path(base), Path(checkpoint), Path(out)
    if not (base / "model_index.json").is_file():
        raise FileNotFoundError(f"{base}: not a pipeline dir (model_index.json missing)")
    if not (checkpoint / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no transformer/ (a full-fine-tuning SFT checkpoint has one; "
                                "is train_sft.py's lora.enabled false?)")
    ckpt_meta = json.loads((checkpoint / "meta.json").read_text()) if (checkpoint / "meta.json").is_file() else {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for item in base.iterdir():
            if item.name in ("transformer", "meta.json"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        shutil.copytree(checkpoint / "transformer", tmp / "transformer")
        meta = {"schema_version": 1, "tree": "sft", "kind": "merged_pipeline", "step": ckpt_meta.get("step"),
                "base_model": str(base), "lora": None, "parents": [ckpt_meta] if ckpt_meta else [],
                "config": {"full_checkpoint": str(checkpoint), "assembled_by": "scripts/nano/nano_model.py"},
                "git_sha": ckpt_meta.get("git_sha"), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "etchr_version": ckpt_meta.get("etchr_version", "0.1.0")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
