"""DL3DV-2k (internlm/DL3DV-2k): multiple choice on a 3D scene; DATA.md section 1.3.

Question text = "Question: " + question + "Candidates: " + candidates (no separator, as the reference).
DL3DV-2k has no official scorer (the reference only logs the model's answers), so our rule is
documented here and in DATA.md 1.3: the answer is the last \\boxed{} (no box scores 0), and prediction
and ground truth are both normalised to the option letter by choice.to_letter (VLMEvalKit can_infer:
"C", "C.", "(C)", "Option C", "C: text", the option text alone; several letters name nothing).
Options come from `candidates` by choice.parse_options (labels A, B, C, ... in order only).
"""

from __future__ import annotations

from typing import Optional

from ..extract import last_boxed
from .base import DataError, Item, Task, read_table, register, table_rows
from .choice import parse_options, to_letter

__all__ = ["load", "parse_options", "score", "to_letter"]  # the letter helpers moved to choice.py


def load(path: str, limit: Optional[int] = None) -> list[Item]:
    df = read_table(path, ["question", "candidates", "answer", "images"])
    id_col = next((c for c in ("id", "question_id", "qid") if c in df.columns), None)
    items = []
    for row, rec, where in table_rows(df, path, limit):
        cand = rec["candidates"]
        if not isinstance(cand, str):
            raise DataError(f"{where}: column 'candidates' must be a string, got {type(cand).__name__}")
        question = "Question: " + str(rec["question"]) + "Candidates: " + cand
        item_id = str(rec[id_col]) if id_col else str(row)
        items.append(Item(id=item_id, question=question, answer=str(rec["answer"]), image_cell=rec["images"],
                          meta={"options": parse_options(cand)}, source=where))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate item ids in column {id_col!r}")
    return items


def score(pred: Optional[str], item: Item) -> dict:
    options = item.meta.get("options", {})
    gt = to_letter(item.answer, options)
    if gt is None:
        raise DataError(f"{item.source}: ground truth {item.answer!r} names no option of {sorted(options)}")
    letter = to_letter(pred, options)
    return {"score": float(letter == gt), "pred_letter": letter, "gt_letter": gt}


TASK = register(Task(
    name="dl3dv", family="3d", edit_prefix="edit_prefix_3d_v1", verify_prompt="verify_dl3dv_v1",
    load=load, extract=last_boxed, score=score,
    description="DL3DV-2k multiple choice (internlm/DL3DV-2k parquet: question, candidates, answer, images)",
))
