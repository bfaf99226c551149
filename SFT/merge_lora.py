#!/usr/bin/env python
"""Turn an SFT checkpoint into a full diffusers pipeline dir (CHECKPOINTS.md section 1): what RL and
Evaluation load.

    # LoRA: fuse it into the base transformer
    python SFT/merge_lora.py --base checkpoints/FLUX.2-klein-base-9B \
        --lora runs/sft/klein9b_lora_r768/checkpoints/step-050000 --out checkpoints/etchr-sft-merged
    # full fine-tuning: the checkpoint's transformer/ + the base's other components ("assemble")
    python SFT/merge_lora.py --checkpoint runs/sft/klein9b_full/checkpoints/step-050000 \
        --out checkpoints/etchr-sft-full [--base checkpoints/FLUX.2-klein-base-9B]

LoRA: W' = W + scale * (alpha / rank) * B @ A for every LoRA layer, computed in fp32 and stored in the
base transformer's dtype. The LoRA may be ours (diffusers naming, alpha recorded) or DiffSynth-named
(`transformer_blocks.0.attn.to_q.lora_A.default.weight`; give --alpha unless a meta.json records it).
No adapter remains in the saved model.

Full fine-tuning: a checkpoint dir holding transformer/ (meta.json kind "full") is detected by its
layout (--full insists on it). Its transformer/ is copied byte for byte (the trained weights, in the
dtype they were saved in), after checking that its architecture is the base transformer's. --base
defaults to the base_model its meta.json records.

Either way the components other than transformer/ are copied byte for byte from the base, and
meta.json records the lineage (base meta + checkpoint meta, step, checkpoint path).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from etchr_sft.checkpoint import meta, read_meta  # noqa: E402
from etchr_sft.lora import fuse_lora, read_lora  # noqa: E402
from etchr_sft.runtime import current_umask, honour_umask  # noqa: E402


def weights_dtype(component_dir: Path) -> torch.dtype:
    """The dtype the component's safetensors store (the merged model keeps it)."""
    from safetensors import safe_open

    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{component_dir}: no .safetensors weights")
    with safe_open(str(files[0]), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def is_full_checkpoint(path: str | Path) -> bool:
    """A full fine-tuning checkpoint dir: transformer/config.json inside (a LoRA one has a .safetensors)."""
    return Path(path, "transformer", "config.json").is_file()


def _check_base(base_dir: Path, out_dir: Path) -> None:
    if not (base_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{base_dir}: not a diffusers pipeline dir (model_index.json missing)")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new --out (merges never overwrite)")


def _write_pipeline(base_dir: Path, out_dir: Path, write_transformer: Callable[[Path], None], meta_obj: dict) -> Path:
    """out_dir = base_dir's components except transformer/ (byte-for-byte copies) + write_transformer(dir)
    + meta.json; built in a temporary dir beside out_dir and renamed when complete."""
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the merged pipeline is for everyone
    try:
        for item in base_dir.iterdir():
            if item.name in ("transformer", "meta.json"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        write_transformer(tmp / "transformer")
        (tmp / "meta.json").write_text(json.dumps(meta_obj, indent=2, sort_keys=True, default=str) + "\n")
        honour_umask(tmp)  # safetensors writes 0600, copied base files keep theirs
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def merge(base: str, lora: str, out: str, alpha=None, scale: float = 1.0) -> Path:
    from diffusers import Flux2Transformer2DModel

    base_dir, out_dir = Path(base), Path(out)
    _check_base(base_dir, out_dir)
    state, alpha, rank = read_lora(lora, alpha)
    dtype = weights_dtype(base_dir / "transformer")
    transformer = Flux2Transformer2DModel.from_pretrained(base_dir / "transformer", dtype=torch.float32)
    n = fuse_lora(transformer, state, alpha, rank, scale)
    transformer.to(dtype)
    lora_path = Path(lora)
    lora_meta = read_meta(lora_path if lora_path.is_dir() else lora_path.parent) or {"path": str(lora_path)}
    base_meta = read_meta(base_dir) or {"path": str(base_dir)}
    m = meta(kind="merged_pipeline", step=lora_meta.get("step"), base_model=str(base_dir),
             config={"lora": str(lora_path), "alpha": alpha, "rank": rank, "scale": scale, "fused_layers": n,
                     "dtype": str(dtype).replace("torch.", "")},
             parents=[base_meta, lora_meta])
    _write_pipeline(base_dir, out_dir, transformer.save_pretrained, m)
    print(f"merged {n} LoRA layers (alpha {alpha:g}, rank {rank}, scale {scale:g}) into {out_dir}")
    return out_dir


def _architecture(config_path: Path) -> dict:
    """A transformer config without diffusers' bookkeeping keys (_class_name stays)."""
    cfg = json.loads(config_path.read_text())
    return {k: v for k, v in cfg.items() if k == "_class_name" or not k.startswith("_")}


def assemble(checkpoint: str, out: str, base: Optional[str] = None) -> Path:
    """A pipeline dir from a full fine-tuning checkpoint: its transformer/ (byte-for-byte) + the base's
    other components. `base` defaults to the base_model recorded in the checkpoint's meta.json."""
    ckpt_dir, out_dir = Path(checkpoint), Path(out)
    if not is_full_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: not a full fine-tuning checkpoint (no transformer/config.json); "
                                "a LoRA checkpoint is merged with --lora")
    ckpt_meta = read_meta(ckpt_dir)
    if ckpt_meta is not None and ckpt_meta.get("kind") not in ("full", None):
        raise ValueError(f"{ckpt_dir}/meta.json: kind {ckpt_meta.get('kind')!r}, expected 'full'")
    if base is None:
        base = (ckpt_meta or {}).get("base_model")
        if not base:
            raise ValueError(f"{ckpt_dir}: meta.json records no base_model; pass --base")
    base_dir = Path(base)
    _check_base(base_dir, out_dir)
    src = ckpt_dir / "transformer"
    dtype = weights_dtype(src)  # fails clearly when the weights are missing
    got, want = _architecture(src / "config.json"), _architecture(base_dir / "transformer" / "config.json")
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise ValueError(f"{src}/config.json differs from {base_dir}/transformer/config.json in {diff}: "
                         "the checkpoint was trained from another model; pass the right --base")
    base_meta = read_meta(base_dir) or {"path": str(base_dir)}
    m = meta(kind="merged_pipeline", step=(ckpt_meta or {}).get("step"), base_model=str(base_dir),
             config={"checkpoint": str(ckpt_dir), "mode": "full", "dtype": str(dtype).replace("torch.", "")},
             parents=[base_meta, ckpt_meta or {"path": str(ckpt_dir)}])
    _write_pipeline(base_dir, out_dir, lambda dst: shutil.copytree(src, dst), m)
    print(f"assembled the full fine-tuning checkpoint {ckpt_dir} (step {m['step']}) with the components of "
          f"{base_dir} into {out_dir}")
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="base pipeline dir (for a full checkpoint: default from its meta.json)")
    ap.add_argument("--lora", "--checkpoint", dest="checkpoint", required=True,
                    help="checkpoint dir (LoRA or full fine-tuning) or LoRA .safetensors")
    ap.add_argument("--out", required=True, help="new pipeline dir")
    ap.add_argument("--full", action="store_true", help="insist on a full fine-tuning checkpoint (else detected)")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA only: for files that do not record alpha")
    ap.add_argument("--scale", type=float, default=None, help="LoRA only: extra multiplier (default 1 = as trained)")
    a = ap.parse_args(argv)
    try:
        if a.full or is_full_checkpoint(a.checkpoint):
            if a.alpha is not None or a.scale is not None:
                raise ValueError("--alpha and --scale apply to LoRA checkpoints, not to full fine-tuning")
            assemble(a.checkpoint, a.out, a.base)
        else:
            if a.base is None:
                raise ValueError("--base is required to merge a LoRA")
            merge(a.base, a.checkpoint, a.out, a.alpha, 1.0 if a.scale is None else a.scale)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
