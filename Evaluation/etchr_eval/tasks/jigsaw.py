"""COCO-Jigsaw: answer the arrangement of shuffled tiles as "a-b-c(-d)" (DATA.md sections 2 and 4.2).

The answer lists, for each original position in row-major order (TopLeft-TopRight-BottomLeft-BottomRight
or Left-Middle-Right), the label of the tile that belongs there. Rule: DATA.md 4.2 (the project's own
scorer, after Spatial-SSRL / ETCHR GRPO). Extraction: the last \\boxed{...} if present. Without a box,
only a permutation-shaped run counts: single digits joined by separators (`\\d(?:\\s*[-,>→]\\s*\\d)+`,
also "->", "=>", "⇒", ";"), not part of a longer number, whose digits are a permutation of 0..n-1
for a layout size n (3, 4 or 9); prose numbers such as "tile 2" or "10 of 12" never count. Of those
runs, the last one written in the asked answer format (hyphens or arrows, "1-2-0") wins, else the last
one with any separator: in "1-2-0 (strips 0, 1, 2)" the answer is 1-2-0, not the listing of strips.
Scoring: separators [,\\s>→] become "-", everything but digits and "-" is dropped, then exact match
with the ground truth. The detail also has per-position accuracy, averaged by the summary as
`<stage>_position_acc`.

Data file (written by scripts/build_benchmark.py; see scripts/procedural/jigsaw.py):
  coco_jigsaw: id, question, answer ("1-2-0"), image (list<Image>), layout ("2x2" | "1x3"; optional,
               else inferred from the number of labels in the answer)
"""

from __future__ import annotations

import re
from typing import Optional

from ..extract import last_boxed
from .base import DataError, Item, Task, read_table, register, table_rows

_SEP = re.compile(r"(?:->|=>|\\to|\\rightarrow|[,\s>→⇒;|-])+")
_RUN = re.compile(r"(?<!\d)\d(?:\s*(?:->|=>|[-,>→⇒;])\s*\d)+(?!\d)")
_ANSWER_FORMAT = re.compile(r"^\d(?:\s*(?:->|=>|[-→⇒])\s*\d)+$")  # the asked "a-b-c" form (or arrows)
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")
LAYOUT_OF_N = {3: "1x3", 4: "2x2", 9: "3x3"}
_IMAGE_COLS = ("image", "images")


def normalise(text: Optional[str]) -> str:
    """"\\boxed{1, 2, 0}" content / "1→2→0" / "[1,2,0]" -> "1-2-0"; "" if no digits."""
    if not text:
        return ""
    s = _SEP.sub("-", _TEXT.sub(r"\1", text))
    s = re.sub(r"[^0-9-]", "", s)
    return re.sub(r"-+", "-", s).strip("-")


def extract_perm(text: Optional[str]) -> Optional[str]:
    """Normalised arrangement from a response; the raw boxed text if it holds no digits; None if nothing."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return normalise(boxed) or boxed.strip()
    runs = [r for r in _RUN.findall(text) if is_permutation(normalise(r).split("-"))]
    formatted = [r for r in runs if _ANSWER_FORMAT.match(r)]
    return normalise((formatted or runs)[-1]) if runs else None


def is_permutation(labels: list[str]) -> bool:
    """["1", "2", "0"] -> True: the labels are 0..n-1 once each, n a layout size (3, 4 or 9)."""
    return len(labels) in LAYOUT_OF_N and sorted(labels) == [str(i) for i in range(len(labels))]


def score(pred: Optional[str], item: Item) -> dict:
    gt = item.answer.split("-")
    got = normalise(pred).split("-") if pred else []
    position_acc = sum(a == b for a, b in zip(got, gt)) / len(gt)
    return {"score": float(got == gt), "position_acc": round(position_acc, 4)}


def aggregate(rows: list[dict]) -> dict:
    """Mean per-position accuracy (in %) per stage, over the same items as Pass@1."""
    out = {}
    for stage in ("etchr", "baseline"):
        if any(f"{stage}_score" in r for r in rows):
            acc = sum((r.get(f"{stage}_detail") or {}).get("position_acc", 0.0) for r in rows)
            out[f"{stage}_position_acc"] = round(100.0 * acc / len(rows), 2)
    return out


def load(path: str, limit: Optional[int] = None) -> list[Item]:
    df = read_table(path, ["question", "answer"])
    image_col = next((c for c in _IMAGE_COLS if c in df.columns), None)
    if image_col is None:
        raise DataError(f"{path}: missing column(s) image; found {', '.join(map(str, df.columns))}")
    items = []
    for row, rec, where in table_rows(df, path, limit):
        gt = normalise(str(rec["answer"]))
        labels = gt.split("-") if gt else []
        if not is_permutation(labels):
            raise DataError(f"{where}: column 'answer' = {rec['answer']!r} is not a permutation of 0..n-1 with "
                            f"n in {sorted(LAYOUT_OF_N)}")
        layout = LAYOUT_OF_N[len(labels)]
        if "layout" in df.columns and str(rec["layout"]) != layout:
            raise DataError(f"{where}: column 'layout' = {rec['layout']!r} but column 'answer' has "
                            f"{len(labels)} labels ({layout})")
        item_id = str(rec["id"]) if "id" in df.columns else str(row)
        items.append(Item(id=item_id, question=str(rec["question"]), answer=gt, image_cell=rec[image_col],
                          meta={"layout": layout}, source=where))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate item ids in column 'id'")
    return items


TASK = register(Task(
    name="coco_jigsaw", family="jigsaw", edit_prefix="edit_prefix_jigsaw_v1", verify_prompt="verify_jigsaw_v1",
    load=load, extract=extract_perm, score=score, aggregate=aggregate,
    description="COCO-Jigsaw arrangement (id, question, answer 'a-b-c(-d)', image, layout); exact match after "
                "normalising separators, plus per-position accuracy",
))
