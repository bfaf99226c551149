#!/usr/bin/env python
"""Write a small parquet in the DL3DV-2k schema (question, candidates, answer, images) from procedural
scenes, for tests and the demo. Nothing downloaded; same seed -> same file content.

    python scripts/make_dl3dv_fixture.py --out fixtures/dl3dv.parquet --n 8 [--seed 0] [--size 128x96]
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60), "yellow": (230, 200, 40)}
SHAPES = ["box", "ball", "cone"]
IMAGE_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def scene(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[tuple[str, int]]]:
    """Coloured objects on a ground plane; returns the image and (name, x-centre) of each object."""
    img = Image.new("RGB", (width, height), (200, 220, 240))
    d = ImageDraw.Draw(img)
    d.rectangle([0, height * 2 // 3, width, height], fill=(150, 140, 120))
    objs = []
    xs = np.sort(rng.choice(np.arange(10, width - 30, 6), size=3, replace=False))
    for x, colour in zip(xs, rng.permutation(list(COLOURS))[:3]):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        y = int(height * 2 // 3 - rng.integers(10, 25))
        box = [int(x), y, int(x) + 20, y + 20]
        if shape == "box":
            d.rectangle(box, fill=COLOURS[colour])
        elif shape == "ball":
            d.ellipse(box, fill=COLOURS[colour])
        else:
            d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=COLOURS[colour])
        objs.append((f"{colour} {shape}", int(x)))
    return img, objs


def make(out: str, n: int = 8, seed: int = 0, size: tuple[int, int] = (128, 96)) -> str:
    rng = np.random.default_rng(seed)
    rows = {"question": [], "candidates": [], "answer": [], "images": []}
    for i in range(n):
        img, objs = scene(rng, *size)
        leftmost = min(objs, key=lambda o: o[1])[0]
        names = [o[0] for o in objs] + ["none of them"]
        order = rng.permutation(len(names))
        letters = "ABCD"
        options = [names[k] for k in order]
        rows["question"].append(f"In scene {i}, after walking around to the opposite side, which object is on "
                                "the right? ")
        rows["candidates"].append("; ".join(f"{letters[j]}: {o}" for j, o in enumerate(options)))
        rows["answer"].append(letters[options.index(leftmost)])
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        rows["images"].append([{"bytes": buf.getvalue(), "path": f"scene_{i:04d}.png"}])
    table = pa.table({"question": pa.array(rows["question"], pa.string()),
                      "candidates": pa.array(rows["candidates"], pa.string()),
                      "answer": pa.array(rows["answer"], pa.string()),
                      "images": pa.array(rows["images"], IMAGE_TYPE)})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", default="128x96", help="WxH of the scenes (>= 64 px each side)")
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.size.lower().split("x"))
    print(f"wrote {make(a.out, a.n, a.seed, (w, h))} ({a.n} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
