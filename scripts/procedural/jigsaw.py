"""Jigsaw generator (DATA.md section 4.2; the Spatial-SSRL / ETCHR GRPO convention).

A procedural "natural-ish" source image (smooth sinusoid field + thick strokes + rings, so that
content continues across tile borders) is cut into a 2x2 grid (512x512 canvas) or into 3 side-by-side
strips (768x512 canvas). Tiles are T[0..n-1] in row-major original order; display slot k shows
T[perm[k]] (perm != identity) with a 2 px blue border and its label k. The answer lists, for every
original position p in row-major order (TL, TR, BL, BR or L, M, R), the label of the tile that belongs
there: ans[p] = perm.index(p), joined by "-" (the ETCHR case: labels 0..3, answer "0-2-3-1").
The target edit is the clean original. A sample is kept only if it is a genuine puzzle: of all
arrangements, the original has the lowest seam cost, and the runner-up costs at least 1.15x as much.

Eval file written by `export_eval` (the paper's COCO-Jigsaw set is not public; our schema):

    coco_jigsaw.parquet  id: string, question: string, answer: string ("1-2-0"), image: list<Image>,
                         layout: string ("2x2" | "1x3")
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .export import image_cell, write_table
from .record import Record

JIGSAW_PREFIX = "Draw the original image after restoring this jigsaw puzzle task. "  # verbatim (GRPO-10K rows)
# layout -> (grid rows, grid cols, canvas (W, H))
LAYOUTS = {"2x2": (2, 2, (512, 512)), "1x3": (1, 3, (768, 512))}
BORDER, BORDER_PX = (0, 0, 255), 2  # blue, like the ETCHR case figure
LABEL_XY, LABEL_STROKE = (8, 6), 2
MIN_RATIO = 1.15  # runner-up seam cost / identity seam cost
_STREAM = 3

QUESTIONS = {  # verbatim GRPO-10K qa_list questions
    "2x2": ("The image has been divided into 4 shuffled patches labeled 0, 1, 2, and 3. Based on visual clues "
            "such as continuity, alignment, and context, answer the correct arrangement of the patches to restore "
            "the original image, where the format is 'TopLeft-TopRight-BottomLeft-BottomRight'."),
    "1x3": ("The image has been divided into 3 shuffled horizontal strips labeled 0, 1, and 2. Based on visual "
            "clues such as continuity, alignment, and context, answer the correct arrangement of the strips to "
            "restore the original image, where the format is 'Left-Middle-Right'."),
}


# ----------------------------------------------------------------------------------------------
# Source image
# ----------------------------------------------------------------------------------------------
def source_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour field with ~6 thick polylines and ~5 rings crossing tile borders (DATA.md 4.2)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    x, y = x / width, y / height
    phi = rng.uniform(0, 2 * np.pi, 3)
    alpha = rng.uniform(0, np.pi)
    field = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * x + phi[0]),
                      0.5 + 0.5 * np.sin(2 * np.pi * 1.1 * y + phi[1]),
                      0.5 + 0.5 * np.sin(4 * np.pi * (x * np.cos(alpha) + y * np.sin(alpha)) + phi[2])], axis=-1)
    img = Image.fromarray(np.round(field * 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    stroke_w = max(2, round(width / 80))
    for _ in range(int(rng.integers(5, 8))):
        k = int(rng.integers(3, 6))
        pts = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(k)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=stroke_w, joint="curve")
    for _ in range(int(rng.integers(4, 7))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.2) * min(width, height)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=tuple(int(v) for v in rng.integers(0, 256, 3)),
                     width=max(2, round(width / 120)))
    return img


# ----------------------------------------------------------------------------------------------
# Tiles, seams, solvability
# ----------------------------------------------------------------------------------------------
def cut(img: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    """(H, W, 3) -> rows*cols tiles (h, w, 3) in row-major order; h = H // rows, w = W // cols."""
    h, w = img.shape[0] // rows, img.shape[1] // cols
    return [img[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]


def arrangement_costs(tiles: list[np.ndarray], rows: int, cols: int) -> dict[tuple[int, ...], float]:
    """Seam cost of every arrangement a (position p, row-major, holds tile a[p]).

    Cost = mean |dRGB| over all facing pixel pairs of adjacent tiles (right column of the left tile vs
    left column of the right one; bottom row of the upper tile vs top row of the lower one).
    """
    t = np.stack(tiles).astype(np.float64)  # (n, h, w, 3)
    n, h, w, _ = t.shape
    horiz = np.abs(t[:, None, :, -1] - t[None, :, :, 0]).sum(axis=(2, 3))  # (n, n): i left of j
    vert = np.abs(t[:, None, -1] - t[None, :, 0]).sum(axis=(2, 3))  # (n, n): i above j
    pairs_h = [(r * cols + c, r * cols + c + 1) for r in range(rows) for c in range(cols - 1)]
    pairs_v = [(r * cols + c, (r + 1) * cols + c) for r in range(rows - 1) for c in range(cols)]
    denom = 3.0 * (len(pairs_h) * h + len(pairs_v) * w)
    costs = {}
    for a in itertools.permutations(range(n)):
        total = sum(horiz[a[p], a[q]] for p, q in pairs_h) + sum(vert[a[p], a[q]] for p, q in pairs_v)
        costs[a] = float(total / denom)
    return costs


def solvability(tiles: list[np.ndarray], rows: int, cols: int) -> tuple[bool, float, float]:
    """(ok, identity cost, runner-up cost): ok iff identity is the unique argmin and runner-up >= 1.15x."""
    costs = arrangement_costs(tiles, rows, cols)
    identity = tuple(range(len(tiles)))
    best = costs.pop(identity)
    runner_up = min(costs.values())
    return runner_up > best and runner_up >= MIN_RATIO * best, best, runner_up


# ----------------------------------------------------------------------------------------------
# Rendering and answer
# ----------------------------------------------------------------------------------------------
def label_font(tile_h: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=max(12, tile_h // 6))


def render_input(tiles: list[np.ndarray], perm: list[int], rows: int, cols: int) -> Image.Image:
    """Slot k (row-major) shows tiles[perm[k]] with a blue border and label k (white, black stroke)."""
    h, w = tiles[0].shape[:2]
    canvas = np.concatenate([np.concatenate([tiles[perm[r * cols + c]] for c in range(cols)], axis=1)
                             for r in range(rows)], axis=0)
    img = Image.fromarray(np.ascontiguousarray(canvas), "RGB")
    draw = ImageDraw.Draw(img)
    font = label_font(h)
    for k in range(rows * cols):
        x0, y0 = (k % cols) * w, (k // cols) * h
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], outline=BORDER, width=BORDER_PX)
        draw.text((x0 + LABEL_XY[0], y0 + LABEL_XY[1]), str(k), fill=(255, 255, 255), font=font,
                  stroke_width=LABEL_STROKE, stroke_fill=(0, 0, 0))
    return img


def answer_of(perm: list[int]) -> str:
    """For each original position p (row-major), the display label holding tile p: perm.index(p)."""
    return "-".join(str(perm.index(p)) for p in range(len(perm)))


def make_item(index: int, seed: int, max_tries: int = 200) -> Record:
    """Item `index`: layouts alternate 2x2 / 1x3; redrawn until the solvability filter passes."""
    rng = np.random.default_rng([seed, _STREAM, index])
    layout = "2x2" if index % 2 == 0 else "1x3"
    rows, cols, (width, height) = LAYOUTS[layout]
    for _ in range(max_tries):
        original = np.asarray(source_image(rng, width, height))
        tiles = cut(original, rows, cols)
        ok, best, runner_up = solvability(tiles, rows, cols)
        if ok:
            break
    else:
        raise RuntimeError(f"jigsaw item {index}: no solvable source image in {max_tries} tries")
    n = rows * cols
    perm = list(range(n))
    while perm == list(range(n)):
        perm = [int(v) for v in rng.permutation(n)]
    h, w = tiles[0].shape[:2]
    target = Image.fromarray(np.ascontiguousarray(original[:rows * h, :cols * w]), "RGB")
    question = QUESTIONS[layout]
    meta = {"layout": layout, "perm": perm, "grid": [rows, cols], "tile_size": [w, h],
            "seam_identity": round(best, 4), "seam_runner_up": round(runner_up, 4)}
    return Record(id=f"jigsaw-{index:06d}", family="jigsaw", image=render_input(tiles, perm, rows, cols),
                  question=question, candidates=None, answer=answer_of(perm), answer_type="perm",
                  edit_prompt=JIGSAW_PREFIX + question, target_image=target, meta=meta)


def generate(n: int, seed: int) -> list[Record]:
    """n COCO-Jigsaw-style items (same seed -> same records, pixel for pixel)."""
    from tqdm import tqdm

    return [make_item(i, seed) for i in tqdm(range(n), desc="jigsaw", unit="item", disable=None, leave=False)]


def export_eval(records: list[Record], out_dir: str | Path) -> dict[str, Path]:
    """<out_dir>/coco_jigsaw.parquet (schema in the module docstring)."""
    items = [r for r in records if r.family == "jigsaw"]
    if not items:
        return {}
    rows = [{"id": r.id, "question": r.question, "answer": r.answer, "image": image_cell(r.image_png(), f"{r.id}.png"),
             "layout": r.meta["layout"]} for r in items]
    return {"coco_jigsaw": write_table(Path(out_dir) / "coco_jigsaw.parquet", rows,
                                       {"id": "string", "question": "string", "answer": "string", "image": "image",
                                        "layout": "string"})}
