"""ChartQA (HuggingFaceM4/ChartQA, test split): chart question answering; DATA.md section 2.

Parquet `image, query, label (list[str]), human_or_machine (0 = human, 1 = machine / augmented)`.
Scoring follows the official rule exactly: google-research/pix2struct, pix2struct/metrics.py,
`relaxed_correctness(target, prediction, max_relative_change=0.05)`, credited if ANY label matches
(the metric takes the max over targets). There, `_to_float` is Python's float() after one trailing "%"
is stripped and divided by 100; when both sides are floats and the target is non-zero, the relative
change must be <= 0.05 in plain floats (at exactly 5%: "12.6" vs "12" gives 0.04999999999999997, a
hit; "1.05" vs "1" gives 0.050000000000000044, a miss);
otherwise a case-insensitive exact string match. So "1,200", "$3", "Yes." and "0.0" (for 0) miss.
Before it, ours only takes the last \\boxed{} and removes LaTeX markup (`\\%` -> "%", `\\text{}`,
`\\mathrm{}`, `\\textbf{}`, `\\mathbf{}` unwrapped), so `\\boxed{12\\%}` reads "12%".
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
_WRAP = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")


def strip_latex(text: str) -> str:
    """"\\text{Yes}" -> "Yes", "12\\%" -> "12%", "\\mathrm{kg}" -> "kg"; other text unchanged."""
    prev = None
    while prev != text:  # nested wrappers unwrap from the inside out
        prev, text = text, _WRAP.sub(r"\1", text)
    return text.replace("\\%", "%").strip()


def _to_float(text: str) -> Optional[float]:
    """pix2struct's _to_float: float(), a trailing "%" divides by 100; None if float() refuses."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_match(pred: str, target: str, tolerance: float = 0.05) -> bool:
    """pix2struct relaxed_correctness(target, pred) after strip_latex(pred) (see the module docstring)."""
    pred = strip_latex(pred)
    p, t = _to_float(pred), _to_float(target)
    if p is not None and t:  # t == 0 falls through to the string match, as in the official code
        return abs(p - t) / abs(t) <= tolerance
    return pred.lower() == target.lower()


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
