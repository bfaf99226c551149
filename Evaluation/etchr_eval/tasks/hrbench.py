"""HR-Bench 4K / 8K (DreamMr/HR-Bench): high-resolution perception, multiple choice; DATA.md section 2.

Files `hr_bench_4k.parquet` / `.tsv` (and 8k): `index, question, answer (letter), category (FSP / FCP),
A, B, C, D, cycle_category, image (base64 string)`. As in VLMEvalKit's TSVs, an image cell of at most
64 characters that equals another row's `index` refers to that row's image (one image stored once for
the rows that share it).

Each cycle_category holds every question once, with its options in one cyclic order. The reported
number is VLMEvalKit's: accuracy within each cycle_category, then the mean over cycles; FSP and FCP
likewise (per cycle, then averaged). Scoring as VLMEvalKit (open-compass/VLMEvalKit,
vlmeval/utils/matching_util.py, `can_infer`, exact-matching mode, no LLM judge) on the last \\boxed{}
if there is one, else on the WHOLE response: it must name exactly one option (choice.to_letter).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Optional

import pandas as pd

from .base import DataError, Item, Task, read_table, register, table_rows
from .choice import STAGES, extract_choice, letter_score, mc_question, scores_by

COLUMNS = ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image"]


def _read(path: str):
    """parquet / jsonl via read_table; the .tsv release via pandas (tab-separated, quoted)."""
    if not path.endswith(".tsv"):
        return read_table(path, COLUMNS)
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        df = pd.read_csv(path, sep="\t", dtype={"index": str, "cycle_category": str})
    except Exception as exc:
        raise DataError(f"{path}: could not be read as TSV ({type(exc).__name__}: {exc})") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")
    return df


def _image_bytes(cell, where: str, by_index: dict):
    """base64 string -> bytes; a short string naming another row's index -> that row's image."""
    if not isinstance(cell, str):
        return cell  # already an image struct / bytes / path: decode_image handles it
    if len(cell) <= 64 and len(by_index.get(cell.strip(), "")) > 64:
        cell = by_index[cell.strip()]
    try:
        return base64.b64decode("".join(cell.split()), validate=True)  # line-wrapped base64 is still base64
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: column 'image' is not a base64-encoded image") from None


def make_loader(name: str):
    def load(path: str, limit: Optional[int] = None) -> list[Item]:
        df = _read(path)
        by_index = {str(i): c for i, c in zip(df["index"], df["image"]) if isinstance(c, str)}
        items = []
        for row, rec, where in table_rows(df, path, limit):
            options = {k: str(rec[k]).strip() for k in "ABCD" if not pd.isna(rec[k]) and str(rec[k]).strip()}
            gt = str(rec["answer"]).strip().upper()
            if gt not in options:
                raise DataError(f"{where}: column 'answer' = {rec['answer']!r} is not one of the options "
                                f"{', '.join(options)}")
            items.append(Item(id=str(rec["index"]), question=mc_question(str(rec["question"]), options), answer=gt,
                              image_cell=_image_bytes(rec["image"], where, by_index), source=where,
                              meta={"options": options, "category": str(rec["category"]),
                                    "cycle": str(rec["cycle_category"])}))
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise DataError(f"{path}: duplicate values in column 'index'")
        return items

    load.__name__ = f"load_{name}"
    return load


def score(pred: Optional[str], item: Item) -> dict:
    return letter_score(pred, item.meta["options"], item.answer, category=item.meta["category"],
                        cycle=item.meta["cycle"])


def cycle_average(rows: list[dict], stage: str) -> dict:
    """{"all": mean over cycles of the cycle's accuracy, <category>: same within the category} in %.

    A category absent from a cycle is averaged over the cycles that have it.
    """
    cycles: dict[str, list[dict]] = {}
    for r in rows:
        if f"{stage}_score" in r:
            cycles.setdefault(str(r[f"{stage}_detail"]["cycle"]), []).append(r)
    per_type: dict[str, list[float]] = {}  # accuracies (fractions) per cycle; rounded only at the end
    for cycle_rows in cycles.values():
        scores = [float(r[f"{stage}_score"]) for r in cycle_rows]
        per_type.setdefault("all", []).append(sum(scores) / len(scores))
        for cat, values in scores_by(cycle_rows, stage, "category").items():
            per_type.setdefault(cat, []).append(sum(values) / len(values))
    return {k: round(100.0 * sum(v) / len(v), 2) for k, v in sorted(per_type.items())}


def aggregate(rows: list[dict]) -> dict:
    out: dict = {"reported_metric": "mean over cycle_category of per-cycle accuracy (VLMEvalKit)"}
    for stage in STAGES:
        avg = cycle_average(rows, stage)
        out[f"{stage}_reported"] = avg.pop("all", None)
        out[f"{stage}_by_category"] = avg
    return out


for _name, _res in (("hrbench_4k", "4K"), ("hrbench_8k", "8K")):
    register(Task(
        name=_name, family="box", edit_prefix="edit_prefix_box_v1", verify_prompt="verify_box_v1",
        load=make_loader(_name), extract=extract_choice, score=score, aggregate=aggregate,
        description=f"HR-Bench {_res} multiple choice (parquet / tsv: index, question, answer, category, A-D, "
                    "cycle_category, base64 image)",
    ))
