#!/usr/bin/env python
"""Convert a FLUX.2-klein LoRA between diffusers naming and DiffSynth-Studio naming (CHECKPOINTS.md section 2).

    python scripts/convert_lora.py IN OUT --to diffusers|diffsynth [--alpha A]

IN is a .safetensors file or a checkpoint dir holding pytorch_lora_weights.safetensors; OUT is the
.safetensors file to write (atomically: a temp file renamed into place, nothing half-written).

The two namings and their alpha rules:

- diffusers (ours): `transformer.<module>.lora_A.weight` / `lora_B.weight`, alpha recorded in the header
  key `lora_adapter_metadata` (and in meta.json beside a checkpoint). `Flux2KleinPipeline.load_lora_weights`
  reads that header and applies W + (alpha / rank) * B @ A.
- DiffSynth-Studio: `<module>.lora_A.default.weight` / `lora_B.default.weight` (no `transformer.` prefix,
  peft's `.default` adapter infix; the module paths of its Flux2DiT are diffusers' own). DiffSynth trains
  with lora_alpha = lora_rank (its training scripts have no alpha option) and `pipe.load_lora` fuses
  W + 1.0 * B @ A; a legacy per-module `<module>.alpha` tensor makes it scale by alpha / rank.

So --to diffsynth bakes alpha / rank into lora_B (DiffSynth then fuses the same update at scale 1), and
--to diffusers keeps the tensors and writes alpha into the header. A file without a recorded alpha is
refused, never read as alpha = rank; --alpha supplies it. Both outputs record their alpha in the header,
so a converted file converts back, and loads in every tree's read_lora, without --alpha.

Only one rank and one alpha per file (the contract); unknown keys, mixed namings, and lora_A / lora_B
ranks that disagree are refused with the file and key named. Exit 0 done, 2 refused. This script reads
files only: it imports no tree package (DESIGN.md), torch and safetensors are all it needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

LORA_FILE = "pytorch_lora_weights.safetensors"
HEADER_KEY = "lora_adapter_metadata"  # what diffusers' save_lora_weights writes and load_lora_weights reads

# The linear layers of Flux2Transformer2DModel (= DiffSynth's Flux2DiT), block indices as N; a LoRA on
# anything else is not a FLUX.2-klein LoRA (tests/test_convert_lora.py checks this set against the model).
FLUX2_LINEARS = frozenset({
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear",
    "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
    *(f"transformer_blocks.N.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out")),
    "single_transformer_blocks.N.attn.to_qkv_mlp_proj", "single_transformer_blocks.N.attn.to_out",
})
_BLOCK_INDEX = re.compile(r"^((?:single_)?transformer_blocks)\.\d+\.")
_DIFFUSERS_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_DIFFSYNTH_KEY = re.compile(r"^(?P<module>(?!transformer\.).+)\.lora_(?P<ab>[AB])\.default\.weight$")
_DIFFSYNTH_ALPHA = re.compile(r"^(?P<module>(?!transformer\.).+)\.alpha$")
# peft options under which the update is not W + alpha / rank * B @ A (or not one alpha per file)
_UNSUPPORTED_CONFIG = ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")

DIFFSYNTH_ALPHA_RULE = ("DiffSynth-Studio trains LoRA with lora_alpha = lora_rank (its training scripts have no "
                        "alpha option) and pipe.load_lora fuses with scale 1, so a file it wrote has alpha = rank")


class ConversionError(ValueError):
    """A LoRA file this script refuses; the message names the file and what to do."""


def resolve_lora_path(path: str | os.PathLike) -> Path:
    """A LoRA file, or a checkpoint dir holding pytorch_lora_weights.safetensors (the rule of
    Evaluation's resolve_lora_path and the merge scripts)."""
    path = Path(path)
    if path.is_dir():
        inside = path / LORA_FILE
        if not inside.is_file():
            raise FileNotFoundError(f"{path}: a folder without {LORA_FILE}; give a LoRA checkpoint dir or a "
                                    ".safetensors file")
        return inside
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    return path


def module_pattern(module: str) -> str:
    """`transformer_blocks.3.attn.to_q` -> `transformer_blocks.N.attn.to_q` (the FLUX2_LINEARS form)."""
    return _BLOCK_INDEX.sub(r"\1.N.", module)


# ----------------------------------------------------------------------------------------------
# Reading: which naming, the layer pairs, and every record of alpha and rank
# ----------------------------------------------------------------------------------------------
def parse_keys(state: dict, path: Path) -> tuple[str, dict, dict]:
    """state dict -> (naming, {module: {"A": tensor, "B": tensor}}, {module: DiffSynth alpha tensor value})."""
    hits: dict[str, list[str]] = {"diffusers": [], "diffsynth": []}
    layers: dict[str, dict] = {}
    key_alphas: dict[str, float] = {}
    for key, value in state.items():
        m = _DIFFUSERS_KEY.match(key)
        naming = "diffusers"
        if m is None:
            m, naming = _DIFFSYNTH_KEY.match(key), "diffsynth"
        if m is None and _DIFFSYNTH_ALPHA.match(key):
            module = _DIFFSYNTH_ALPHA.match(key)["module"]
            if value.numel() != 1:
                raise ConversionError(f"{path}: key {key!r} holds {value.numel()} values; a DiffSynth alpha is a scalar")
            key_alphas[module] = float(value.reshape(-1)[0])
            hits["diffsynth"].append(key)
            continue
        if m is None:
            raise ConversionError(
                f"{path}: unknown key {key!r}; a FLUX.2 LoRA here has keys transformer.<module>.lora_A.weight / "
                f"lora_B.weight (diffusers naming) or <module>.lora_A.default.weight / lora_B.default.weight "
                f"(+ optional <module>.alpha) (DiffSynth naming)")
        hits[naming].append(key)
        layers.setdefault(m["module"], {})[m["ab"]] = value
    if hits["diffusers"] and hits["diffsynth"]:
        raise ConversionError(f"{path}: mixed namings: {hits['diffusers'][0]!r} is diffusers naming, "
                              f"{hits['diffsynth'][0]!r} is DiffSynth naming; a file uses one")
    if not layers:
        raise ConversionError(f"{path}: no lora_A / lora_B keys")
    for key in hits["diffusers"] + hits["diffsynth"]:
        module = (_DIFFUSERS_KEY.match(key) or _DIFFSYNTH_KEY.match(key) or _DIFFSYNTH_ALPHA.match(key))["module"]
        if module_pattern(module) not in FLUX2_LINEARS:
            parts = module.split(".")
            prefix = next((".".join(parts[:i]) + "." for i in range(1, len(parts))
                           if module_pattern(".".join(parts[i:])) in FLUX2_LINEARS), None)
            hint = (f"; without the prefix {prefix!r} it would be one (a DiffSynth-Studio run saves without "
                    f"it under --remove_prefix_in_ckpt pipe.dit.)" if prefix else
                    " (layers are e.g. transformer_blocks.0.attn.to_q, single_transformer_blocks.0.attn.to_out)")
            raise ConversionError(f"{path}: unknown key {key!r}: {module!r} is not a linear layer of "
                                  f"Flux2Transformer2DModel{hint}")
    for module in sorted(set(layers) | set(key_alphas)):
        if module not in layers:
            raise ConversionError(f"{path}: {module}.alpha has no lora_A / lora_B beside it")
        if set(layers[module]) != {"A", "B"}:
            lacking = "lora_B" if "A" in layers[module] else "lora_A"
            raise ConversionError(f"{path}: layer {module!r} has no {lacking} tensor")
    return ("diffusers" if hits["diffusers"] else "diffsynth"), layers, key_alphas


def layer_rank(layers: dict, path: Path) -> int:
    """The one rank of the file; lora_A (rank, in) and lora_B (out, rank) must agree per layer and across layers."""
    ranks: dict[int, list[str]] = {}
    for module, ab in sorted(layers.items()):
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise ConversionError(f"{path}: layer {module!r}: lora_A is {tuple(a.shape)}, lora_B is "
                                  f"{tuple(b.shape)}; both must be 2-D (linear layers)")
        if a.shape[0] != b.shape[1]:
            raise ConversionError(f"{path}: rank mismatch in layer {module!r}: lora_A is {tuple(a.shape)} (rank "
                                  f"{a.shape[0]}), lora_B is {tuple(b.shape)} (rank {b.shape[1]})")
        ranks.setdefault(int(a.shape[0]), []).append(module)
    if len(ranks) != 1:
        shown = ", ".join(f"rank {r}: {mods[0]}" + (f" (+{len(mods) - 1} more)" if len(mods) > 1 else "")
                          for r, mods in sorted(ranks.items()))
        raise ConversionError(f"{path}: several LoRA ranks ({shown}); one rank and one alpha per file")
    return next(iter(ranks))


def header_records(metadata: dict, path: Path) -> dict:
    """{"rank", "alpha"} from the header's lora_adapter_metadata (keys with or without diffusers'
    `transformer.` prefix); refuses peft options that change the update's scale."""
    if HEADER_KEY not in metadata:
        return {}
    try:
        md = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path}: header {HEADER_KEY} is not JSON ({exc})") from None
    md = {k.removeprefix("transformer."): v for k, v in md.items()}
    for option in _UNSUPPORTED_CONFIG:
        if md.get(option):
            raise ConversionError(f"{path}: header {HEADER_KEY} sets {option}={md[option]!r}; this converter "
                                  "handles the plain update W + alpha / rank * B @ A with one rank and one alpha")
    return {"rank": md.get("r"), "alpha": md.get("lora_alpha")}


def decide_alpha(path: Path, naming: str, rank: int, header: dict, key_alphas: dict, layers: dict,
                 alpha_arg: Optional[float]) -> tuple[float, str]:
    """The file's alpha and where it came from. Every record must agree with the others and with the
    tensors' rank; with no record, only --alpha supplies it."""
    meta_json = path.parent / "meta.json"
    meta = {}
    if meta_json.is_file():
        try:
            meta = json.loads(meta_json.read_text()).get("lora") or {}
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ConversionError(f"{meta_json}: not a meta.json object ({exc})") from None
    records = []  # (where, alpha)
    for where, rec in ((f"{path} (header {HEADER_KEY})", header), (f"{meta_json} (lora)", meta)):
        if rec.get("rank") is not None and int(rec["rank"]) != rank:  # alpha / wrong rank = wrong strength
            raise ConversionError(f"LoRA rank mismatch: {where} says rank {rec['rank']}, the lora_A tensors of "
                                  f"{path} have rank {rank}")
        if rec.get("alpha") is not None:
            records.append((where, float(rec["alpha"])))
    if key_alphas:
        missing = sorted(set(layers) - set(key_alphas))
        if missing:
            raise ConversionError(f"{path}: {len(key_alphas)} layers have a DiffSynth <module>.alpha key, "
                                  f"{missing[0]!r} (+{len(missing) - 1} more) has none; all or none")
        values = sorted(set(key_alphas.values()))
        if len(values) > 1:
            first = {v: next(m for m, a in sorted(key_alphas.items()) if a == v) for v in values[:2]}
            raise ConversionError(f"{path}: DiffSynth alpha keys disagree ({first[values[0]]}.alpha = "
                                  f"{values[0]:g}, {first[values[1]]}.alpha = {values[1]:g}); one alpha per file")
        records.append((f"{path} (<module>.alpha keys)", values[0]))
    for (where_a, a), (where_b, b) in zip(records, records[1:]):
        if a != b:
            raise ConversionError(f"LoRA alpha mismatch: {where_a} says alpha {a:g}, {where_b} says alpha {b:g}")
    if alpha_arg is not None:
        if records and records[0][1] != alpha_arg:
            raise ConversionError(f"--alpha {alpha_arg:g} disagrees with {records[0][0]}, which says alpha "
                                  f"{records[0][1]:g}; leave --alpha out, the file records its alpha")
        return float(alpha_arg), "--alpha"
    if records:
        return records[0][1], records[0][0]
    if naming == "diffsynth":
        raise ConversionError(
            f"{path}: LoRA alpha is not recorded (no {HEADER_KEY} header, no <module>.alpha keys, no lora.alpha "
            f"in {meta_json}). {DIFFSYNTH_ALPHA_RULE}: if DiffSynth-Studio trained it, pass --alpha {rank} "
            f"(its rank); an alpha is never guessed")
    raise ConversionError(f"{path}: LoRA alpha is not recorded (no {HEADER_KEY} header, no lora.alpha in "
                          f"{meta_json}); pass --alpha A (the lora_alpha it was trained with); an alpha is never guessed")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def build_output(layers: dict, rank: int, alpha: float, to: str, note: str) -> tuple[dict, dict, float]:
    """(state dict, header metadata, scale baked into lora_B) in the target naming."""
    import torch

    targets = sorted(layers)
    if to == "diffusers":
        state = {}
        for module in targets:
            state[f"transformer.{module}.lora_A.weight"] = layers[module]["A"].contiguous()
            state[f"transformer.{module}.lora_B.weight"] = layers[module]["B"].contiguous()
        # diffusers' loader takes the `transformer.`-prefixed keys as the LoraConfig of the transformer
        md = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
        baked = 1.0
    else:
        baked = alpha / rank
        state = {}
        for module in targets:
            b = layers[module]["B"]
            if baked != 1.0:  # DiffSynth fuses W + 1.0 * B @ A: the alpha / rank factor goes into the weights
                b = (b.to(torch.float32) * baked).to(b.dtype)
            state[f"{module}.lora_A.default.weight"] = layers[module]["A"].contiguous()
            state[f"{module}.lora_B.default.weight"] = b.contiguous()
        md = {"r": rank, "lora_alpha": float(rank), "target_modules": targets}  # alpha = rank once baked
    return state, {"format": "pt", HEADER_KEY: json.dumps(md, sort_keys=True), "etchr_conversion": note}, baked


def write_atomic(state: dict, metadata: dict, out: Path) -> None:
    """safetensors file at `out` via a temp file in the same folder renamed into place."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a colleague must be able to read a LoRA
        save_file(state, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_out_folder(out: Path, rank: int, alpha: float) -> None:
    """A meta.json beside OUT is read with it by every tree's read_lora; refuse a pair that disagrees."""
    meta_json = out.parent / "meta.json"
    if not meta_json.is_file():
        return
    try:
        rec = json.loads(meta_json.read_text()).get("lora") or {}
    except (json.JSONDecodeError, AttributeError):
        rec = {}
    if (rec.get("rank") is not None and int(rec["rank"]) != rank) or \
            (rec.get("alpha") is not None and float(rec["alpha"]) != alpha):
        raise ConversionError(f"{out}: {meta_json} beside it says rank {rec.get('rank')}, alpha {rec.get('alpha')}, "
                              f"the converted file has rank {rank}, alpha {alpha:g}; readers would refuse the pair: "
                              "write OUT to another folder")


def convert(src: str | os.PathLike, out: str | os.PathLike, to: str, alpha: Optional[float] = None) -> dict:
    """Read `src`, write `out` in naming `to`; returns what was done (also the line printed)."""
    from safetensors import safe_open

    if to not in ("diffusers", "diffsynth"):
        raise ConversionError(f"--to {to!r}: use diffusers or diffsynth")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ConversionError(f"--alpha {alpha}: must be a positive number")
    path = resolve_lora_path(src)
    out = Path(out)
    if out.is_dir() or out.suffix != ".safetensors":
        raise ConversionError(f"OUT {out}: give the .safetensors file to write, e.g. {out / 'lora.safetensors'}"
                              if out.is_dir() else f"OUT {out}: must end in .safetensors")
    if out.exists() and out.resolve() == path.resolve():
        raise ConversionError(f"OUT {out} is the input file; write the conversion to a new file")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    naming, layers, key_alphas = parse_keys(state, path)
    rank = layer_rank(layers, path)
    header = header_records(metadata, path)
    alpha, source = decide_alpha(path, naming, rank, header, key_alphas, layers, alpha)
    written_alpha = alpha if to == "diffusers" else float(rank)
    check_out_folder(out, rank, written_alpha)
    note = (f"scripts/convert_lora.py: {path.name} ({naming} naming, rank {rank}, alpha {alpha:g}) -> {to} naming"
            + (f", alpha / rank = {alpha / rank:g} baked into lora_B" if to == "diffsynth" else ""))
    out_state, out_md, baked = build_output(layers, rank, alpha, to, note)
    write_atomic(out_state, out_md, out)
    return {"in": str(path), "out": str(out), "from": naming, "to": to, "tensors": len(out_state),
            "layers": len(layers), "rank": rank, "alpha": alpha, "alpha_from": source, "scale": alpha / rank,
            "baked": baked, "written_alpha": written_alpha}


def describe(r: dict) -> str:
    how = (f"alpha {r['alpha']:g} in header {HEADER_KEY}: load_lora_weights applies alpha / rank = {r['scale']:g}"
           if r["to"] == "diffusers" else
           f"alpha / rank = {r['scale']:g} baked into lora_B (header records alpha = rank = {r['rank']}): "
           f"DiffSynth's pipe.load_lora(alpha=1) fuses W + {r['scale']:g} * B @ A")
    return (f"converted {r['in']} ({r['from']} naming) -> {r['out']} ({r['to']} naming): {r['tensors']} tensors, "
            f"{r['layers']} layers, rank {r['rank']}, alpha {r['alpha']:g} (from {r['alpha_from']}), "
            f"scale {r['scale']:g}; {how}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="IN", help="LoRA .safetensors file or checkpoint dir")
    ap.add_argument("out", metavar="OUT", help=".safetensors file to write")
    ap.add_argument("--to", required=True, choices=("diffusers", "diffsynth"), help="naming of OUT")
    ap.add_argument("--alpha", type=float, default=None,
                    help="LoRA alpha of IN when the file does not record it (a DiffSynth-trained file: its rank)")
    args = ap.parse_args(argv)
    try:
        report = convert(args.src, args.out, args.to, args.alpha)
    except (ConversionError, FileNotFoundError) as exc:
        print(f"convert_lora: error: {exc}", file=sys.stderr)
        return 2
    print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
