"""Chart fixtures, ChartQA / CharXiv style (DATA.md sections 3.1 and 4.3): bar and line charts drawn with
PIL from a random table. Target edit = the input plus a red (255,0,0) outline box around each queried
chart element (a bar or point together with its value label, the title, an axis label).

Values are distinct within a chart, so every "highest" / "second-lowest" question has one answer. Each
item comes from its own random stream (generate(3) is a prefix of generate(200)).

Eval files written by `export_eval`, in the public schemas:

    chartqa.parquet     image: Image (struct<bytes, path>), query: string, label: list<string>,
                        human_or_machine: int64 (0 human, 1 machine: alternating)   = HuggingFaceM4/ChartQA
    charxiv_dq.parquet  image: Image, id: string, question: string, answer: string,
    charxiv_rq.parquet  grading_instruction: string, category: string (the question kind)
                        = the flat CharXiv schema of Evaluation/etchr_eval/tasks/charxiv.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

from .perception import BOX_PREFIX, draw_boxes, line_width, red_box, write_image_table
from .record import Record

CANVAS = (512, 384)
PLOT = (64, 54, 494, 310)  # x0, y0, x1, y1 of the plot area (pixels)
BACKGROUND, AXIS, TEXT = (255, 255, 255), (60, 60, 60), (20, 20, 20)
SERIES = [(31, 119, 180), (44, 160, 44), (148, 103, 189), (140, 86, 75), (23, 190, 207), (127, 127, 127)]
# (title, y-axis label, x-axis label, category pool, ordered pool?)
THEMES = [
    ("Annual revenue of a bakery", "Revenue (k$)", "Year", [str(y) for y in range(2014, 2025)], True),
    ("Monthly rainfall", "Rainfall (mm)", "Month",
     ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], True),
    ("Fruit sold at a market", "Boxes sold", "Fruit", ["Apples", "Pears", "Plums", "Grapes", "Figs", "Kiwis",
                                                      "Mangos", "Limes"], False),
    ("Visitors per city", "Visitors (thousands)", "City", ["Oslo", "Lima", "Pune", "Accra", "Perth", "Quito",
                                                          "Turin", "Hanoi"], False),
]
STREAMS = {"chartqa": 21, "charxiv_dq": 22, "charxiv_rq": 23}
EXACT_TEXT = "The answer is correct only if it gives the same text as the ground truth; ignore case and punctuation."
EXACT_NUMBER = "The answer is correct only if it gives the same number as the ground truth (units may be omitted)."


def fmt(v: float) -> str:
    """12.0 -> "12", 12.5 -> "12.5" (one decimal at most, as the value labels)."""
    return str(int(round(v))) if abs(v - round(v)) < 1e-9 else f"{v:.1f}"


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: same pixels on every machine


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def random_table(rng: np.random.Generator) -> dict[str, Any]:
    title, ylabel, xlabel, pool, ordered = THEMES[int(rng.integers(len(THEMES)))]
    k = int(rng.integers(4, 8))
    if ordered:
        start = int(rng.integers(0, len(pool) - k + 1))
        cats = pool[start:start + k]
    else:
        cats = [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))]
    decimals = bool(rng.random() < 0.3)
    grid = np.arange(50, 951) / 10.0 if decimals else np.arange(5, 96, dtype=float)
    values = [float(v) for v in rng.choice(grid, size=k, replace=False)]
    return {"title": title, "ylabel": ylabel, "xlabel": xlabel, "categories": cats, "values": values,
            "kind": "bar" if rng.random() < 0.6 else "line", "color": SERIES[int(rng.integers(len(SERIES)))]}


def _text(draw: ImageDraw.ImageDraw, xy, text: str, f, anchor: str, halo: bool = False) -> list[int]:
    """Draw text (with a white halo over lines when asked); returns its pixel bbox [x0, y0, x1, y1)."""
    stroke = 2 if halo else 0
    draw.text(xy, text, fill=TEXT, font=f, anchor=anchor, stroke_width=stroke, stroke_fill=BACKGROUND)
    return [int(v) for v in draw.textbbox(xy, text, font=f, anchor=anchor, stroke_width=stroke)]


def _union(*boxes: Sequence[int]) -> list[int]:
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def render(table: dict[str, Any]) -> tuple[Image.Image, dict[str, list[int]]]:
    """The chart, and the pixel bbox [x0, y0, x1, y1) of each element: "title", "xlabel", "ylabel", "cat:<name>"."""
    img = Image.new("RGB", CANVAS, BACKGROUND)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = PLOT
    small, label_font, title_font = font(11), font(13), font(16)
    boxes = {"title": _text(d, (CANVAS[0] // 2, 16), table["title"], title_font, "mt")}
    top = max(table["values"]) * 1.15
    step = next(s for s in (5, 10, 20, 25, 50, 100) if top / s <= 8)
    y_max = step * int(np.ceil(top / step))
    ypix = lambda v: y1 - (y1 - y0) * v / y_max  # noqa: E731
    for t in range(0, y_max + 1, step):  # y grid and tick labels
        d.line([(x0, ypix(t)), (x1, ypix(t))], fill=(225, 225, 225), width=1)
        d.text((x0 - 6, ypix(t)), str(t), fill=TEXT, font=small, anchor="rm")
    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXIS, width=2)
    boxes["xlabel"] = _text(d, ((x0 + x1) // 2, CANVAS[1] - 12), table["xlabel"], label_font, "mb")
    # The y label is drawn on its own strip and rotated, then pasted left of the tick labels.
    strip = Image.new("RGB", (y1 - y0, 20), BACKGROUND)
    ImageDraw.Draw(strip).text(((y1 - y0) // 2, 10), table["ylabel"], fill=TEXT, font=label_font, anchor="mm")
    rotated = strip.rotate(90, expand=True)
    img.paste(rotated, (6, y0))
    inner = ImageChops.difference(rotated, Image.new("RGB", rotated.size, BACKGROUND)).getbbox()
    boxes["ylabel"] = [6 + inner[0], y0 + inner[1], 6 + inner[2], y0 + inner[3]]
    k = len(table["categories"])
    slot = (x1 - x0) / k
    xs = [x0 + slot * (i + 0.5) for i in range(k)]
    if table["kind"] == "line":  # line and markers first, so the value labels stay on top
        points = [(cx, ypix(v)) for cx, v in zip(xs, table["values"])]
        d.line(points, fill=table["color"], width=3)
        for cx, cy in points:
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=table["color"], outline=AXIS)
    for cx, cat, v in zip(xs, table["categories"], table["values"]):
        _text(d, (cx, y1 + 6), cat, small, "mt")
        if table["kind"] == "bar":
            half = slot * 0.28
            d.rectangle([cx - half, ypix(v), cx + half, y1 - 1], fill=table["color"])
            mark = [int(np.floor(cx - half)), int(np.floor(ypix(v))), int(np.ceil(cx + half)) + 1, y1]
        else:
            mark = [int(cx) - 6, int(ypix(v)) - 6, int(cx) + 7, int(ypix(v)) + 7]
        label = _text(d, (cx, ypix(v) - 9), fmt(v), small, "mb", halo=True)
        boxes[f"cat:{cat}"] = _union(mark, label)
    return img, boxes


# ----------------------------------------------------------------------------------------------
# Questions: (question, answer, answer_type, elements to box, grading instruction, kind)
# ----------------------------------------------------------------------------------------------
def _pick(rng, seq, n=1):
    return [seq[i] for i in sorted(rng.choice(len(seq), size=n, replace=False))]


def chartqa_question(rng, t: dict) -> tuple:
    cats, vals = t["categories"], t["values"]
    x = t["xlabel"].lower()
    kind = ("value", "highest", "difference")[int(rng.integers(3))]
    if kind == "value":
        (c,) = _pick(rng, cats)
        return f"What is the value for {c}?", fmt(vals[cats.index(c)]), [c], kind
    if kind == "highest":
        c = cats[int(np.argmax(vals))]
        return f"Which {x} has the highest value?", c, [c], kind
    a, b = _pick(rng, cats, 2)
    return (f"What is the difference between the values of {a} and {b}?",
            fmt(round(abs(vals[cats.index(a)] - vals[cats.index(b)]), 1)), [a, b], kind)


def charxiv_question(rng, t: dict, reasoning: bool) -> tuple:
    cats, vals = t["categories"], t["values"]
    x, unit = t["xlabel"].lower(), "bars" if t["kind"] == "bar" else "data points"
    if not reasoning:
        kind = ("title", "xlabel", "count", "max_value")[int(rng.integers(4))]
        if kind == "title":
            return "What is the title of the chart? Answer with its exact text.", t["title"], ["title"], EXACT_TEXT, kind
        if kind == "xlabel":
            return "What is the label of the x-axis?", t["xlabel"], ["xlabel"], EXACT_TEXT, kind
        if kind == "count":
            return (f"How many {unit} are shown in the chart?", str(len(cats)), [f"cat:{c}" for c in cats],
                    EXACT_NUMBER, kind)
        c = cats[int(np.argmax(vals))]
        return ("What is the highest value labelled in the chart?", fmt(max(vals)), [f"cat:{c}"], EXACT_NUMBER,
                kind)
    kind = ("second_lowest", "sum", "count_above")[int(rng.integers(3))]
    if kind == "second_lowest":
        c = cats[int(np.argsort(vals)[1])]
        return f"Which {x} has the second-lowest value?", c, [f"cat:{c}"], EXACT_TEXT, kind
    if kind == "sum":
        a, b = _pick(rng, cats, 2)
        return (f"What is the sum of the values of {a} and {b}?", fmt(round(vals[cats.index(a)] + vals[cats.index(b)], 1)),
                [f"cat:{a}", f"cat:{b}"], EXACT_NUMBER, kind)
    ordered = sorted(vals)
    j = int(rng.integers(1, len(ordered)))  # threshold between two values: at least one above, one below
    threshold = int(np.floor((ordered[j - 1] + ordered[j]) / 2))
    above = [c for c, v in zip(cats, vals) if v > threshold]
    return (f"How many {x} values are above {threshold}?", str(len(above)), [f"cat:{c}" for c in above],
            EXACT_NUMBER, kind)


def make_item(bench: str, index: int, seed: int) -> Record:
    """Item `index` of `bench` (chartqa | charxiv_dq | charxiv_rq), from its own random stream."""
    rng = np.random.default_rng([seed, STREAMS[bench], index])
    while True:
        table = random_table(rng)
        image, boxes = render(table)
        if bench == "chartqa":
            question, answer, targets, kind = chartqa_question(rng, table)
            targets, instruction = [f"cat:{c}" for c in targets], ""
        else:
            question, answer, targets, instruction, kind = charxiv_question(rng, table, bench == "charxiv_rq")
        width = line_width(CANVAS)
        red = [red_box(boxes[t], width) for t in targets]
        # Keep only items whose boxes fit the canvas (a title longer than the canvas would not).
        if all(b[0] >= 0 and b[1] >= 0 and b[2] < CANVAS[0] and b[3] < CANVAS[1] for b in red):
            break
    meta = {"benchmark": bench, "kind": kind, "table": {k: table[k] for k in ("title", "xlabel", "ylabel",
                                                                            "categories", "values", "kind")},
            "color": list(table["color"]), "targets": targets, "element_boxes": {t: boxes[t] for t in targets},
            "boxes": red, "line_width": width, "grading_instruction": instruction,
            "split": "human" if index % 2 == 0 else "augmented"}
    return Record(id=f"{bench}-{index:06d}", family="chart", image=image, question=question, candidates=None,
                  answer=answer, answer_type="int" if kind in ("count", "count_above") else "text",
                  edit_prompt=BOX_PREFIX + question, target_image=draw_boxes(image, red, width), meta=meta)


def generate(n: int, seed: int) -> list[Record]:
    """n ChartQA items (human / augmented alternating), then n CharXiv DQ and n CharXiv RQ items."""
    from tqdm import tqdm

    return [make_item(bench, i, seed) for bench in STREAMS
            for i in tqdm(range(n), desc=bench, unit="item", disable=None, leave=False)]


def export_eval(records: Sequence[Record], out_dir: str | Path) -> dict[str, Path]:
    """<out_dir>/chartqa.parquet, charxiv_dq.parquet, charxiv_rq.parquet (schemas in the module docstring)."""
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    qa = [r for r in records if r.meta.get("benchmark") == "chartqa"]
    if qa:
        rows = [{"image": {"bytes": r.image_png(), "path": f"{r.id}.png"}, "query": r.question, "label": [r.answer],
                 "human_or_machine": 0 if r.meta["split"] == "human" else 1} for r in qa]
        out["chartqa"] = write_image_table(out_dir / "chartqa.parquet", rows, {
            "image": "image1", "query": "string", "label": "string_list", "human_or_machine": "int64"})
    for bench in ("charxiv_dq", "charxiv_rq"):
        recs = [r for r in records if r.meta.get("benchmark") == bench]
        if recs:
            rows = [{"image": {"bytes": r.image_png(), "path": f"{r.id}.png"}, "id": r.id, "question": r.question,
                     "answer": r.answer, "grading_instruction": r.meta["grading_instruction"],
                     "category": r.meta["kind"]} for r in recs]
            out[bench] = write_image_table(out_dir / f"{bench}.parquet", rows, {
                "image": "image1", "id": "string", "question": "string", "answer": "string",
                "grading_instruction": "string", "category": "string"})
    return out
