"""read_lora's cross-check of a LoRA's records: rank from the tensors, header and meta.json alphas agree
(the same on-disk fixture as SFT's and RL's tests; each tree keeps its own copy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from etchr_eval.editor import read_lora


def write_lora(root: Path, *, tensor_rank=8, header_rank=8, header_alpha=16.0, meta_alpha=16.0, meta_rank=8) -> Path:
    """A two-layer LoRA file in diffusers naming with header metadata and a meta.json beside it."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    state = {}
    for mod, (i, o) in {"transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn.to_k": (16, 12)}.items():
        state[f"transformer.{mod}.lora_A.weight"] = torch.randn(tensor_rank, i, generator=g)
        state[f"transformer.{mod}.lora_B.weight"] = torch.randn(o, tensor_rank, generator=g)
    md = {"transformer.r": header_rank, "transformer.lora_alpha": header_alpha, "transformer.target_modules": ["to_q"]}
    save_file(state, str(root / "pytorch_lora_weights.safetensors"), metadata={"lora_adapter_metadata": json.dumps(md)})
    (root / "meta.json").write_text(json.dumps({"kind": "lora", "lora": {"rank": meta_rank, "alpha": meta_alpha}}))
    return root


def test_lora_rank_comes_from_the_tensors_and_alphas_must_agree(tmp_path):
    _, alpha, rank = read_lora(write_lora(tmp_path / "ok"))
    assert (alpha, rank) == (16.0, 8)
    with pytest.raises(ValueError, match=r"header lora_adapter_metadata\) says rank 4, the lora_A tensors .* rank 8"):
        read_lora(write_lora(tmp_path / "r", header_rank=4, meta_rank=4))  # would fuse at alpha/4: twice the strength
    with pytest.raises(ValueError, match=r"meta.json \(lora\) says rank 4"):
        read_lora(write_lora(tmp_path / "m", meta_rank=4))
    d = write_lora(tmp_path / "a", header_alpha=8.0)
    with pytest.raises(ValueError) as exc:
        read_lora(d)
    msg = str(exc.value)
    assert "alpha 8" in msg and "alpha 16" in msg and str(d / "pytorch_lora_weights.safetensors") in msg \
        and str(d / "meta.json") in msg
