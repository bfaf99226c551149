"""Fine-grained perception fixtures, V*-style (DATA.md sections 3.1 and 4.3): a large canvas full of small
distractor shapes and one or two small, uniquely shaped targets. Target edit = the input plus a red
(255,0,0) outline box around each target (line width max(2, round(0.004 min(H, W))), no fill).

Questions (each item from its own random stream, so generate(3) is a prefix of generate(200)):
  attribute  "What is the color of the triangle?"        4 colour options   V* direct_attributes / HR FSP
  relative   "Is the star on the left or right side of the cross?"   2 options   V* relative_position
             "Is the star to the left of, to the right of, above or below the cross?"  4 options   HR FCP
The targets' shapes (triangle, star, diamond, cross) never occur among the distractors (circles,
squares), so "the triangle" names one object; a relative answer is kept only when its axis dominates
(offset along it >= 2x the other, and >= 3 object sizes).

Eval files written by `export_eval`, in the public schemas:

    vstar.parquet       image: Image (struct<bytes, path>), category: string (direct_attributes |
                        relative_position), question_id: string, question: string, choices: list<string>,
                        answer: int64 (index into choices)   = the ohjoonhee/vstar_bench mirror
    hrbench_4k.parquet  index: int64, question, answer (letter), category (FSP | FCP), A, B, C, D,
    hrbench_8k.parquet  cycle_category (cycle_1..cycle_4), image: string (base64 PNG)   = DreamMr/HR-Bench
                        Every question appears once per cycle, its options rotated by the cycle number
                        (VLMEvalKit's cyclic evaluation). As in VLMEvalKit TSVs, the image is stored on the
                        question's cycle_1 row only; the other rows hold that row's index.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from .export import KINDS, atomic_write_bytes, write_table
from .record import Record

BOX_PREFIX = "Draw a red box for the question. "  # edit_prefix_box_v1 (paper method figure)
RED = (255, 0, 0)
BACKGROUND = (238, 236, 228)
# No red: the red box must be the only red thing in a target edit.
PALETTE = {"blue": (30, 90, 220), "green": (40, 160, 60), "yellow": (235, 200, 30), "purple": (130, 60, 170),
           "orange": (245, 140, 20), "black": (25, 25, 25), "cyan": (20, 190, 200), "brown": (130, 80, 40),
           "pink": (240, 120, 190), "gray": (128, 128, 128)}
TARGET_SHAPES = ("triangle", "star", "diamond", "cross")
DISTRACTOR_SHAPES = ("circle", "square")

# canvas (W, H), object size range (px), distractor count range. HR "8K" = tinier targets, more clutter.
# Modest canvases (a fixture: the editor's reference tokens grow with the input's pixels).
BENCHMARKS: dict[str, dict[str, Any]] = {
    "vstar": {"canvas": (640, 480), "obj": (12, 18), "clutter": (60, 110), "stream": 11},
    "hrbench_4k": {"canvas": (800, 600), "obj": (9, 12), "clutter": (120, 200), "stream": 12},
    "hrbench_8k": {"canvas": (960, 720), "obj": (6, 9), "clutter": (220, 340), "stream": 13},
}
LETTERS = "ABCD"
IMAGE1 = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # one HF Image per cell


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
def shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    """Outline of a `shape` of size `s` (its bounding square's side) centred at (cx, cy); ellipse-free shapes."""
    h = s / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, h, h * 0.45)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for r, a in zip(radii, angles)]
    if shape == "cross":
        a = s / 6  # half the arm width
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, s), fill=fill)


def object_bbox(shape: str, cx: float, cy: float, s: float, canvas: tuple[int, int]) -> list[int]:
    """Exact pixel bbox [x0, y0, x1, y1) of the drawn object (rasterised, not the analytic square)."""
    mask = Image.new("L", canvas, 0)
    draw_object(ImageDraw.Draw(mask), shape, cx, cy, s, 255)
    return list(mask.getbbox())


def line_width(canvas: tuple[int, int]) -> int:
    return max(2, round(0.004 * min(canvas)))  # DATA.md section 3.1


def red_box(bbox: Sequence[int], width: int) -> list[int]:
    """Inclusive outline rectangle [x0, y0, x1, y1] around an exclusive bbox, `width + 2` px clear of it."""
    pad = width + 2
    return [bbox[0] - pad, bbox[1] - pad, bbox[2] - 1 + pad, bbox[3] - 1 + pad]


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[int]], width: int) -> Image.Image:
    """The target edit: a copy of `image` with red outline boxes (PIL draws the outline inwards)."""
    out = image.copy()
    d = ImageDraw.Draw(out)
    for box in boxes:
        d.rectangle(list(box), outline=RED, width=width)
    return out


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------
def _place(rng, centres: list, sizes: list, s: float, canvas, margin: float, gap: float, tries: int = 200):
    """A centre for an object of size s, clear of all placed ones by `gap`; None after `tries` misses."""
    w, h = canvas
    for _ in range(tries):
        c = rng.uniform([margin, margin], [w - margin, h - margin])
        if not centres:
            return c
        d = np.linalg.norm(np.asarray(centres) - c, axis=1)
        if np.all(d >= (np.asarray(sizes) + s) / 2 + gap):
            return c
    return None


def _relation(dx: float, dy: float, s: float, four: bool):
    """"left" / "right" (/ "above" / "below") of target 1 relative to target 2, or None if ambiguous."""
    horizontal = abs(dx) >= 3 * s and (abs(dx) >= 2 * abs(dy) or not four)
    if horizontal:
        return "left" if dx < 0 else "right"
    if four and abs(dy) >= max(2 * abs(dx), 3 * s):
        return "above" if dy < 0 else "below"
    return None


def make_item(bench: str, index: int, seed: int) -> Record:
    """Item `index` of benchmark `bench` (vstar | hrbench_4k | hrbench_8k), from its own random stream."""
    cfg = BENCHMARKS[bench]
    rng = np.random.default_rng([seed, cfg["stream"], index])
    canvas = cfg["canvas"]
    width = line_width(canvas)
    relative = (index % 5 >= 3) if bench == "vstar" else (index % 2 == 1)  # V* 115:76, HR FSP:FCP 1:1
    four = bench != "vstar"
    while True:  # resample the whole scene until a relative answer is unambiguous
        size = float(rng.uniform(*cfg["obj"]))
        shapes = [str(x) for x in rng.choice(TARGET_SHAPES, size=2 if relative else 1, replace=False)]
        colours = [str(x) for x in rng.choice(list(PALETTE), size=len(shapes), replace=False)]
        margin = size + width + 4
        centres: list = []
        for _ in shapes:
            c = _place(rng, centres, [size] * len(centres), size, canvas, margin, gap=6 * size)
            if c is None:
                break
            centres.append(c)
        if len(centres) != len(shapes):
            continue
        answer = None
        if relative:
            answer = _relation(centres[0][0] - centres[1][0], centres[0][1] - centres[1][1], size, four)
            if answer is None:
                continue
        break
    image = Image.new("RGB", canvas, BACKGROUND)
    draw = ImageDraw.Draw(image)
    # Distractors keep clear of the targets' boxes, so the red outlines cover only background: _place
    # keeps circles apart, so use circles around the whole box and around each distractor (x1.5 > sqrt 2).
    clear = [1.5 * (size + 2 * (width + 3))] * len(centres)
    placed, placed_sizes = list(centres), list(clear)
    for _ in range(int(rng.integers(*cfg["clutter"]))):
        s = float(rng.uniform(*cfg["obj"]))
        c = _place(rng, placed, placed_sizes, 1.5 * s, canvas, s, gap=2, tries=20)
        if c is None:
            continue
        placed.append(c)
        placed_sizes.append(1.5 * s)
        draw_object(draw, str(rng.choice(DISTRACTOR_SHAPES)), c[0], c[1], s, PALETTE[str(rng.choice(list(PALETTE)))])
    targets = []
    for shape, colour, c in zip(shapes, colours, centres):
        draw_object(draw, shape, c[0], c[1], size, PALETTE[colour])
        bbox = object_bbox(shape, c[0], c[1], size, canvas)
        targets.append({"shape": shape, "color": colour, "center": [float(c[0]), float(c[1])], "size": size,
                        "bbox_xyxy": bbox, "bbox": [bbox[0], bbox[1], bbox[2] - bbox[0], bbox[3] - bbox[1]]})
    if relative:
        a, b = shapes
        if four:
            question = f"Is the {a} to the left of, to the right of, above or below the {b}?"
            choices = ["left", "right", "above", "below"]
        else:
            question = f"Is the {a} on the left or right side of the {b}?"
            choices = ["left", "right"]
        category = "FCP" if four else "relative_position"
    else:
        question = f"What is the color of the {shapes[0]}?"
        answer = colours[0]
        others = [str(x) for x in rng.choice([c for c in PALETTE if c != answer], size=3, replace=False)]
        choices = [answer] + others
        category = "FSP" if four else "direct_attributes"
    choices = [choices[k] for k in rng.permutation(len(choices))]
    k = choices.index(answer)
    boxes = [red_box(t["bbox_xyxy"], width) for t in targets]
    meta = {"benchmark": bench, "category": category, "choices": choices, "answer_index": k, "targets": targets,
            "boxes": boxes, "line_width": width}
    return Record(id=f"{bench}-{index:06d}", family="perception", image=image, question=question,
                  candidates="; ".join(f"{LETTERS[i]}: {c}" for i, c in enumerate(choices)), answer=LETTERS[k],
                  answer_type="letter", edit_prompt=BOX_PREFIX + question,
                  target_image=draw_boxes(image, boxes, width), meta=meta)


def generate(n: int, seed: int) -> list[Record]:
    """n V* items, then n HRBench-4K and n HRBench-8K questions (each exported as 4 cyclic rows)."""
    from tqdm import tqdm

    return [make_item(bench, i, seed) for bench in BENCHMARKS
            for i in tqdm(range(n), desc=bench, unit="item", disable=None, leave=False)]


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def write_image_table(path: str | Path, rows: Sequence[dict], kinds: dict[str, str]) -> Path:
    """export.write_table plus the kind "image1": one HF Image (struct<bytes, path>) per cell, the image
    column of the V*, ChartQA and CharXiv releases (export.KINDS has only list<Image>). Atomic."""
    path = Path(path)
    arrays, fields, features = [], [], {}
    for col, kind in kinds.items():
        if kind == "image1":
            typ, feature = IMAGE1, {"_type": "Image"}
        elif kind in KINDS:
            typ, feature = KINDS[kind]
        else:
            raise ValueError(f"{path}: unknown column kind {kind!r}; use image1 or one of {sorted(KINDS)}")
        try:
            arrays.append(pa.array([row[col] for row in rows], typ))
        except KeyError:
            raise ValueError(f"{path}: a row has no column {col!r}") from None
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"{path}: column {col!r} is not {kind}: {exc}") from None
        fields.append(pa.field(col, typ))
        features[col] = feature
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def hrbench_rows(records: Sequence[Record]) -> list[dict]:
    """4 rows per question: cycle k shows the options rotated by k; index = k * len(records) + i."""
    n = len(records)
    rows = []
    for k in range(4):
        for i, r in enumerate(records):
            choices = r.meta["choices"][k:] + r.meta["choices"][:k]
            image = base64.b64encode(r.image_png()).decode("ascii") if k == 0 else str(i)
            rows.append({"index": k * n + i, "question": r.question, "answer": LETTERS[choices.index(
                r.meta["choices"][r.meta["answer_index"]])], "category": r.meta["category"],
                **{LETTERS[j]: choices[j] for j in range(4)}, "cycle_category": f"cycle_{k + 1}", "image": image})
    return rows


def export_eval(records: Sequence[Record], out_dir: str | Path) -> dict[str, Path]:
    """<out_dir>/vstar.parquet, hrbench_4k.parquet, hrbench_8k.parquet (schemas in the module docstring)."""
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    by_bench = {b: [r for r in records if r.meta.get("benchmark") == b] for b in BENCHMARKS}
    if by_bench["vstar"]:
        rows = [{"image": {"bytes": r.image_png(), "path": f"{r.id}.png"}, "category": r.meta["category"],
                 "question_id": r.id, "question": r.question, "choices": r.meta["choices"],
                 "answer": r.meta["answer_index"]} for r in by_bench["vstar"]]
        out["vstar"] = write_image_table(out_dir / "vstar.parquet", rows, {
            "image": "image1", "category": "string", "question_id": "string", "question": "string",
            "choices": "string_list", "answer": "int64"})
    for bench in ("hrbench_4k", "hrbench_8k"):
        if by_bench[bench]:
            kinds = {"index": "int64", "question": "string", "answer": "string", "category": "string",
                     **{c: "string" for c in LETTERS}, "cycle_category": "string", "image": "string"}
            out[bench] = write_table(out_dir / f"{bench}.parquet", hrbench_rows(by_bench[bench]), kinds)
    return out
