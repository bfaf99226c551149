"""LoRA files on disk (CHECKPOINTS.md section 2): save in diffusers naming with alpha, read ours or
DiffSynth-named files, fuse W + scale * alpha / rank * B @ A exactly.

Evaluation and SFT keep their own copies of the reader/fuser (the trees share files, never code); all
are tested against diffusers' own load_lora_weights + fuse_lora.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
_DIFFSYNTH = re.compile(r"\.lora_([AB])\.default\.weight$")


def save_lora(transformer, out_dir: str | Path, rank: int, alpha: float, targets: list[str]) -> Path:
    """Write the transformer's LoRA weights as out_dir/pytorch_lora_weights.safetensors, diffusers
    naming (`transformer.<module>.lora_A.weight`), alpha in the header metadata."""
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    Flux2KleinPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=state,
                                         transformer_lora_adapter_metadata=metadata, weight_name=LORA_FILE)
    return Path(out_dir) / LORA_FILE


def normalise_lora_keys(state: dict) -> dict:
    """DiffSynth naming -> diffusers naming; diffusers-named keys pass through."""
    out = {}
    for key, value in state.items():
        new = _DIFFSYNTH.sub(r".lora_\1.weight", key)
        out[new if new.startswith("transformer.") else "transformer." + new] = value
    return out


def read_lora(path: str | Path, alpha: Optional[float] = None) -> tuple[dict, float, int]:
    """(diffusers-named state dict, alpha, rank). Rank: the lora_A tensors' (a header or meta.json
    rank that disagrees is an error). Alpha: argument, else the file's metadata, else meta.json beside
    it, and the two records must agree; never guessed (a merge with a guessed alpha silently changes
    the model)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = normalise_lora_keys(state)
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"{path}: expected one LoRA rank, found {sorted(ranks) or 'no lora_A keys'}")
    rank = ranks.pop()
    header, meta_json = {}, path.parent / "meta.json"
    if "lora_adapter_metadata" in metadata:
        md = json.loads(metadata["lora_adapter_metadata"])  # diffusers prefixes keys with "transformer."
        header = {"alpha": md.get("lora_alpha", md.get("transformer.lora_alpha")),
                  "rank": md.get("r", md.get("transformer.r"))}
    recorded = (json.loads(meta_json.read_text()).get("lora") or {}) if meta_json.is_file() else {}
    where = {"header": f"{path} (header lora_adapter_metadata)", "meta": f"{meta_json} (lora)"}
    for name, rec in (("header", header), ("meta", recorded)):
        if rec.get("rank") is not None and int(rec["rank"]) != rank:  # alpha / wrong rank = wrong strength
            raise ValueError(f"LoRA rank mismatch: {where[name]} says rank {rec['rank']}, the lora_A tensors of "
                             f"{path} have rank {rank}")
    if header.get("alpha") is not None and recorded.get("alpha") is not None \
            and float(header["alpha"]) != float(recorded["alpha"]):
        raise ValueError(f"LoRA alpha mismatch: {where['header']} says alpha {float(header['alpha']):g}, "
                         f"{where['meta']} says alpha {float(recorded['alpha']):g}")
    if alpha is None:
        alpha = header.get("alpha") if header.get("alpha") is not None else recorded.get("alpha")
    if alpha is None:
        raise ValueError(f"{path}: LoRA alpha is not recorded (no lora_adapter_metadata in the header, no "
                         f"lora.alpha in {meta_json}); pass --alpha")
    return state, float(alpha), rank


def fuse_lora(transformer, state: dict, alpha: float, rank: int, scale: float = 1.0) -> int:
    """W += scale * alpha / rank * B @ A (computed in fp32) for every pair; returns the layer count."""
    modules = dict(transformer.named_modules())
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        m = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ValueError(f"unexpected LoRA key {key!r} (want transformer.<module>.lora_A/B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = value
    factor = scale * alpha / rank
    with torch.no_grad():
        for name, ab in pairs.items():
            if name not in modules or not hasattr(modules[name], "weight"):
                raise ValueError(f"LoRA targets {name!r}, which is not a layer of this transformer")
            if set(ab) != {"A", "B"}:
                raise ValueError(f"LoRA layer {name!r} lacks one of lora_A / lora_B")
            w = modules[name].weight
            delta = ab["B"].to(torch.float32) @ ab["A"].to(torch.float32)
            if delta.shape != w.shape:
                raise ValueError(f"LoRA {name}: B @ A is {tuple(delta.shape)}, weight is {tuple(w.shape)}")
            w.copy_((w.to(torch.float32) + factor * delta.to(w.device)).to(w.dtype))
    return len(pairs)
