"""ChartQA (HuggingFaceM4/ChartQA, test split): chart question answering; DATA.md section 2.

Parquet `image, query, label (list[str]), human_or_machine (0 = human, 1 = machine / augmented)`.
Scoring is ChartQA's relaxed accuracy against each label (the best counts): if both sides read as
numbers ("12.4", "1,200", "$3", "45%" = 0.45), the prediction may differ by at most 5% of the label;
otherwise a case-insensitive exact match. One deviation: a label of 0 needs a prediction of exactly 0
(the official code falls back to string equality there, so "0.0" would miss "0").
Pass@1 as reported = mean of the human and augmented split accuracies; both are in the aggregate.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..extract import last_boxed
from .base import DataError, Item, Task, read_table, register, table_rows
from .choice import STAGES, scores_by

INSTRUCTION = "Answer the question using a single word or phrase."
SPLITS = {0: "human", 1: "augmented"}
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_GROUPED = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def clean(text: str) -> str:
    """Strip a \\text{} wrapper, surrounding quotes / spaces and a trailing full stop."""
    s = text.strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s, flags=re.S).strip()
    s = s.strip("\"'` ")
    return s[:-1].rstrip() if s.endswith(".") and not _NUMBER.fullmatch(s) else s


def to_number(text: str) -> Optional[float]:
    """"12.4" -> 12.4, "1,200" -> 1200, "$3" -> 3, "45%" -> 0.45; None if not a plain number."""
    s = clean(text).replace(" ", "")
    percent = s.endswith("%")
    s = s[:-1] if percent else s
    s = s[1:] if s.startswith("$") else s
    if _GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if not _NUMBER.fullmatch(s):
        return None
    value = float(s)
    return value / 100.0 if percent else value


def relaxed_match(pred: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA relaxed accuracy for one label (see the module docstring)."""
    p, t = to_number(pred), to_number(target)
    if p is not None and t is not None:
        if t == 0:
            return p == 0
        return abs(p - t) / abs(t) <= tolerance + 1e-9  # 1e-9: "12.6" vs "12" is exactly 5%
    return clean(pred).lower() == clean(target).lower()


def extract(response: Optional[str]) -> Optional[str]:
    """Last \\boxed{}; without one, a short one-line reply is taken whole."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    text = (response or "").strip()
    return text if text and "\n" not in text and len(text) <= 80 else None


def _split(value, where: str) -> str:
    if isinstance(value, (int, np.integer)) and int(value) in SPLITS:
        return SPLITS[int(value)]
    if isinstance(value, str) and value.strip().lower() in ("human", "machine", "augmented"):
        return "human" if value.strip().lower() == "human" else "augmented"
    raise DataError(f"{where}: column 'human_or_machine' must be 0 (human) or 1 (machine), got {value!r}")


def load(path: str, limit: Optional[int] = None) -> list[Item]:
    df = read_table(path, ["image", "query", "label", "human_or_machine"])
    items = []
    for row, rec, where in table_rows(df, path, limit):
        label = rec["label"]
        labels = [label] if isinstance(label, str) else [str(x) for x in label] if hasattr(label, "__len__") else []
        if not labels or not all(str(x).strip() for x in labels):
            raise DataError(f"{where}: column 'label' must be a non-empty list of strings, got {label!r}")
        items.append(Item(id=str(rec["id"]) if "id" in df.columns else str(row),
                          question=f"{str(rec['query']).strip()}\n{INSTRUCTION}", answer=[str(x) for x in labels],
                          image_cell=rec["image"], source=where,
                          meta={"split": _split(rec["human_or_machine"], where)}))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate values in column 'id'")
    return items


def score(pred: Optional[str], item: Item) -> dict:
    ok = pred is not None and any(relaxed_match(pred, label) for label in item.answer)
    return {"score": float(ok), "split": item.meta["split"]}


def aggregate(rows: list[dict]) -> dict:
    """Per-split accuracy and the reported mean of the two splits (of those present)."""
    out: dict = {"reported_metric": "mean of the human and augmented split accuracies (relaxed accuracy)"}
    for stage in STAGES:
        by_split = {k: sum(v) / len(v) for k, v in scores_by(rows, stage, "split").items()}
        for split in SPLITS.values():
            out[f"{stage}_{split}"] = round(100.0 * by_split[split], 2) if split in by_split else None
        out[f"{stage}_reported"] = round(100.0 * sum(by_split.values()) / len(by_split), 2) if by_split else None
    return out


TASK = register(Task(
    name="chartqa", family="box", edit_prefix="edit_prefix_box_v1", verify_prompt="verify_box_v1",
    load=load, extract=extract, score=score, aggregate=aggregate,
    description="ChartQA relaxed accuracy (parquet: image, query, label, human_or_machine)",
))
