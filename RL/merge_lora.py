#!/usr/bin/env python
"""Fuse a LoRA into a FLUX.2-klein pipeline: a full diffusers pipeline dir (CHECKPOINTS.md section 1).

    python RL/merge_lora.py --base checkpoints/etchr-sft-merged \
        --lora runs/rl/klein9b_grpo/checkpoints/step-001000 --out checkpoints/etchr-rl-merged

W' = W + scale * (alpha / rank) * B @ A for every LoRA layer, computed in fp32 and stored in the base
transformer's dtype. The LoRA may be ours (diffusers naming, alpha recorded) or DiffSynth-named
(`transformer_blocks.0.attn.to_q.lora_A.default.weight`; give --alpha unless a meta.json records it).
Only transformer/ is rewritten; the other components are copied byte for byte. No adapter remains in
the saved model. meta.json records the lineage (base meta + LoRA meta).
The alpha recorded with the RL LoRA (reference: rank 64, alpha 128) is applied: the reference's
merge dropped it and fused half the trained strength.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from etchr_rl.checkpoint import meta, read_meta  # noqa: E402
from etchr_rl.lora import fuse_lora, read_lora  # noqa: E402
from etchr_rl.runtime import current_umask, honour_umask  # noqa: E402


def weights_dtype(component_dir: Path) -> torch.dtype:
    """The dtype the component's safetensors store (the merged model keeps it)."""
    from safetensors import safe_open

    files = sorted(component_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{component_dir}: no .safetensors weights")
    with safe_open(str(files[0]), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def merge(base: str, lora: str, out: str, alpha=None, scale: float = 1.0) -> Path:
    from diffusers import Flux2Transformer2DModel

    base_dir, out_dir = Path(base), Path(out)
    if not (base_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{base_dir}: not a diffusers pipeline dir (model_index.json missing)")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new --out (merges never overwrite)")
    state, alpha, rank = read_lora(lora, alpha)
    dtype = weights_dtype(base_dir / "transformer")
    transformer = Flux2Transformer2DModel.from_pretrained(base_dir / "transformer", dtype=torch.float32)
    n = fuse_lora(transformer, state, alpha, rank, scale)
    transformer.to(dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent if out_dir.parent.exists() else None))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the merged pipeline is for everyone
    try:
        for item in base_dir.iterdir():
            if item.name in ("transformer", "meta.json"):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        transformer.save_pretrained(tmp / "transformer")
        lora_path = Path(lora)
        lora_meta = read_meta(lora_path if lora_path.is_dir() else lora_path.parent) or {"path": str(lora_path)}
        base_meta = read_meta(base_dir) or {"path": str(base_dir)}
        m = meta(kind="merged_pipeline", step=lora_meta.get("step"), base_model=str(base_dir),
                 config={"lora": str(lora_path), "alpha": alpha, "rank": rank, "scale": scale, "fused_layers": n,
                         "dtype": str(dtype).replace("torch.", "")},
                 parents=[base_meta, lora_meta])
        (tmp / "meta.json").write_text(json.dumps(m, indent=2, sort_keys=True, default=str) + "\n")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        honour_umask(tmp)  # safetensors writes 0600, copied base files keep theirs
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"merged {n} LoRA layers (alpha {alpha:g}, rank {rank}, scale {scale:g}) into {out_dir}")
    return out_dir


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="base pipeline dir")
    ap.add_argument("--lora", required=True, help="checkpoint dir or LoRA .safetensors")
    ap.add_argument("--out", required=True, help="new pipeline dir")
    ap.add_argument("--alpha", type=float, default=None, help="only for files that do not record alpha")
    ap.add_argument("--scale", type=float, default=1.0, help="extra multiplier (1 = as trained)")
    a = ap.parse_args(argv)
    try:
        merge(a.base, a.lora, a.out, a.alpha, a.scale)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
