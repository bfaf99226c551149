"""SFT test fixtures: a small DiffSynth-style CSV of (target, input, prompt) with two aspect buckets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent


def write_sft_csv(root: Path, n: int = 8, seed: int = 0, sizes=((96, 64), (64, 96))) -> Path:
    """n pairs: input = coloured shapes, target = input + a red box; sizes alternate (two buckets)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(150, 255, 3)))
        d = ImageDraw.Draw(img)
        x, y = int(rng.integers(4, w - 24)), int(rng.integers(4, h - 24))
        d.ellipse([x, y, x + 16, y + 16], fill=tuple(int(c) for c in rng.integers(0, 120, 3)))
        tgt = img.copy()
        ImageDraw.Draw(tgt).rectangle([x - 2, y - 2, x + 18, y + 18], outline=(255, 0, 0), width=2)
        img.save(root / "images" / f"{i:03d}_input.png")
        tgt.save(root / "images" / f"{i:03d}_output.png")
        rows.append({"image": f"images/{i:03d}_output.png", "edit_image": f"images/{i:03d}_input.png",
                     "prompt": f"Draw a red box for the question. Where is the dark circle, item {i}?"})
    path = root / "sft_data.csv"
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["image", "edit_image", "prompt"])
        wr.writeheader()
        wr.writerows(rows)
    return path


@pytest.fixture(scope="session")
def sft_csv(tmp_path_factory) -> Path:
    return write_sft_csv(tmp_path_factory.mktemp("sftdata"))
