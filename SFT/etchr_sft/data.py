"""SFT data: the CSV of (target image, input image, prompt), sizing, aspect-ratio buckets, batches.

Sizing (PROTOCOL.md section 1): the target is downscaled (never up) to <= max_pixels, sides floored
to multiples of 16, centre-cropped. The reference (input) image goes through exactly what
Flux2KleinPipeline does at inference (area <= 1024^2, sides floored to 16, resize_mode="crop"), or,
with reference_resize=diffsynth, the reference recipe (~1 MP, sides rounded to 32, may upscale).

Batches are built from the whole dataset, identically on every rank, then dealt out round-robin:
N processes with accumulation A see the same samples per optimizer step as 1 process with N x A.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

from .images import ImageError, open_rgb8, oriented_size

REFERENCE_AREA = 1024 * 1024  # Flux2KleinPipeline caps condition images at this area


class DataError(ValueError):
    """A data problem naming the file and row."""


# ----------------------------------------------------------------------------------------------
# Sizes (pure)
# ----------------------------------------------------------------------------------------------
def target_size(width: int, height: int, max_pixels: int, multiple_of: int = 16) -> tuple[int, int]:
    """(W, H) of the training target: scaled down (never up) to area <= max_pixels, floored to /16."""
    scale = min(1.0, math.sqrt(max_pixels / float(width * height)))
    w = int(width * scale) // multiple_of * multiple_of
    h = int(height * scale) // multiple_of * multiple_of
    if w < multiple_of or h < multiple_of:
        raise DataError(f"image {width}x{height} is too small for {multiple_of}-pixel multiples")
    return w, h


def reference_size(width: int, height: int, mode: str = "pipeline") -> tuple[int, int]:
    """(W, H) the reference image is fed at: as Flux2KleinPipeline does, or as the DiffSynth recipe."""
    if mode == "pipeline":
        if width * height > REFERENCE_AREA:
            # Flux2ImageProcessor._resize_to_target_area: same aspect ratio, area = 1024^2
            scale = math.sqrt(REFERENCE_AREA / (width * height))
            width, height = int(width * scale), int(height * scale)
        return width // 16 * 16, height // 16 * 16
    if mode == "diffsynth":
        scale = math.sqrt(REFERENCE_AREA / (width * height))
        return max(32, round(width * scale / 32) * 32), max(32, round(height * scale / 32) * 32)
    raise ValueError(f"reference_resize {mode!r}: use pipeline or diffsynth")


# ----------------------------------------------------------------------------------------------
# The CSV
# ----------------------------------------------------------------------------------------------
@dataclass
class Row:
    target: str  # absolute path of the target (edited) image
    reference: str  # absolute path of the input image
    prompt: str
    size: tuple[int, int]  # target (W, H) as decoded by the image rule (EXIF orientation applied)
    ref_size: tuple[int, int]  # reference (W, H), likewise


def read_csv(csv_path: str, base_path: str = "") -> list[Row]:
    """Read the DiffSynth-style CSV (image = target, edit_image = input, prompt).

    Optional columns width, height, edit_width, edit_height (written by SFT/prepare_data.py: sizes after
    EXIF orientation, etchr_sft.images) spare opening every image to learn its size.
    """
    import pandas as pd

    if not os.path.isfile(csv_path):
        raise DataError(f"CSV not found: {csv_path}")
    df = pd.read_csv(csv_path, keep_default_na=False)
    missing = [c for c in ("image", "edit_image", "prompt") if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)} (need image, edit_image, prompt)")
    base = Path(base_path or os.path.dirname(os.path.abspath(csv_path)))
    sized = all(c in df.columns for c in ("width", "height", "edit_width", "edit_height"))
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        if not str(rec["prompt"]).strip():
            raise DataError(f"{csv_path} row {i}: empty prompt")
        tgt, ref = base / str(rec["image"]), base / str(rec["edit_image"])
        if sized:
            size = (int(rec["width"]), int(rec["height"]))
            ref_size = (int(rec["edit_width"]), int(rec["edit_height"]))
        else:
            try:  # sizes as the image rule gives them (EXIF orientation applied)
                with Image.open(tgt) as a, Image.open(ref) as b:
                    size, ref_size = oriented_size(a), oriented_size(b)
            except Exception as exc:  # PIL raises many types for damaged headers
                raise DataError(f"{csv_path} row {i}: cannot open image ({exc})") from None
        rows.append(Row(str(tgt), str(ref), str(rec["prompt"]), size, ref_size))
    if not rows:
        raise DataError(f"{csv_path}: no rows")
    return rows


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------
def bucket_key(row: Row, max_pixels: int, multiple_of: int, reference_resize: str) -> tuple[int, int, int, int]:
    return (*target_size(*row.size, max_pixels, multiple_of), *reference_size(*row.ref_size, reference_resize))


def largest_sample_tokens(keys: list) -> tuple[int, tuple]:
    """(image tokens, key) of the largest sample the keys can feed: target + reference tokens (16 px a
    token side: VAE /8, patchify /2). Batches hold one key each, so no batch has more per sample."""
    if not keys:
        raise DataError("no samples: the CSV has no rows to plan activation memory for")
    key = max(keys, key=lambda k: (k[0] * k[1] + k[2] * k[3], k))
    return (key[0] * key[1] + key[2] * key[3]) // 256, key


def make_batches(keys: list, batch_size: int, seed: int, epoch: int, buckets: bool = True) -> list[list[int]]:
    """Deterministic batches of sample indices, each of one bucket (one target and reference size).

    Shuffle with (seed, epoch); group by key in shuffled order; cut groups into batches (the last of
    a group may be smaller); shuffle the batch order. Without buckets batch_size must be 1.
    """
    if not buckets and batch_size != 1:
        raise ValueError("batch_size > 1 needs aspect-ratio buckets (data.aspect_buckets=true)")
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    order = torch.randperm(len(keys), generator=g).tolist()
    groups: dict = {}
    for i in order:
        groups.setdefault(keys[i], []).append(i)
    batches = [grp[k:k + batch_size] for grp in groups.values() for k in range(0, len(grp), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[p] for p in perm]


def shard(batches: list, rank: int, world: int) -> list:
    """Round-robin deal; every rank gets the same count (the remainder, < world batches, is dropped)."""
    n = len(batches) // world
    if n == 0:
        raise DataError(f"{len(batches)} batches cannot feed {world} processes; use more data or fewer GPUs")
    return batches[rank::world][:n]


class BatchDataset(torch.utils.data.Dataset):
    """Item k = the k-th batch of this rank, decoded and preprocessed (runs in dataloader workers)."""

    def __init__(self, rows: list[Row], batches: list[list[int]], *, max_pixels: int, multiple_of: int,
                 reference_resize: str):
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.rows, self.batches = rows, batches
        self.max_pixels, self.multiple_of, self.reference_resize = max_pixels, multiple_of, reference_resize
        self.processor = Flux2ImageProcessor(vae_scale_factor=16)

    def __len__(self) -> int:
        return len(self.batches)

    def _load(self, path: str, size: tuple[int, int], where: str) -> Image.Image:
        """8-bit RGB by the image rule (etchr_sft.images); its size must be the one the batch was planned for."""
        try:
            img = open_rgb8(path, f"{where}: {path}")
        except ImageError as exc:
            raise DataError(str(exc)) from None
        if img.size != tuple(size):
            raise DataError(f"{where}: {path} decodes to {img.width}x{img.height} (EXIF orientation applied) but the "
                            f"CSV says {size[0]}x{size[1]}; re-run SFT/prepare_data.py, which records decoded sizes")
        return img

    def __getitem__(self, k: int) -> dict:
        targets, refs, prompts = [], [], []
        for i in self.batches[k]:
            row = self.rows[i]
            tw, th = target_size(*row.size, self.max_pixels, self.multiple_of)
            rw, rh = reference_size(*row.ref_size, self.reference_resize)
            tgt = self._load(row.target, row.size, f"row {i}")
            ref = self._load(row.reference, row.ref_size, f"row {i}")
            if self.reference_resize == "pipeline" and ref.width * ref.height > REFERENCE_AREA:
                ref = self.processor._resize_to_target_area(ref, REFERENCE_AREA)  # the pipeline's first step
            # resize_mode="crop": cover-resize then centre crop, as the pipeline does for references
            targets.append(self.processor.preprocess(tgt, height=th, width=tw, resize_mode="crop")[0])
            refs.append(self.processor.preprocess(ref, height=rh, width=rw, resize_mode="crop")[0])
            prompts.append(row.prompt)
        return {"target": torch.stack(targets), "reference": torch.stack(refs), "prompt": prompts,
                "index": torch.tensor(self.batches[k])}
