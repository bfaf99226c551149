"""V*Bench (craigwu/vstar_bench): fine-grained perception, multiple choice; DATA.md section 2.

Two public layouts are read:
- the mirror parquet (ohjoonhee/vstar_bench): `image, category, question_id, question, choices (list),
  answer (int index into choices)`;
- the raw release: a folder of `<name>.json` (`question`, `options`, ...; **options[0] is correct**) with
  `<name>.jpg` beside each, in per-category subfolders (direct_attributes/, relative_position/).
  Shown in file order the answer would always be A, so the options are rotated by a fixed,
  id-derived amount (sha256 of the id): the same file always gives the same letters.

Question text = question, "A. ..." option lines, letter instruction. Scoring as VLMEvalKit's V* (an
ImageMCQDataset scored by open-compass/VLMEvalKit, vlmeval/utils/matching_util.py, `can_infer`, in its
exact-matching mode, no LLM judge): the last \\boxed{} if there is one, else the WHOLE response, must
name exactly one option (choice.to_letter); a reply naming several letters scores 0. Overall = micro
average over all questions (the official number, e.g. 89/115 + 57/76 = 76.44%), and per category in
the aggregate.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np

from .base import DataError, Item, Task, read_table, register, table_rows
from .choice import LETTERS, STAGES, extract_choice, letter_score, mc_question, options_from_list, pct_by

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _answer_index(value, n: int, where: str) -> int:
    """The mirror's int answer (also "2" or "C") -> index into choices; DataError naming the column."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        idx = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        idx = int(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        idx = LETTERS.index(value.strip().upper())
    else:
        raise DataError(f"{where}: column 'answer' must be an index into 'choices', got {value!r}")
    if not 0 <= idx < n:
        raise DataError(f"{where}: column 'answer' = {idx} is out of range for {n} choices")
    return idx


def _load_parquet(path: str, limit: Optional[int]) -> list[Item]:
    df = read_table(path, ["image", "category", "question", "choices", "answer"])
    items = []
    for row, rec, where in table_rows(df, path, limit):
        choices = rec["choices"]
        if isinstance(choices, str) or not hasattr(choices, "__len__") or len(choices) < 2:
            raise DataError(f"{where}: column 'choices' must be a list of at least 2 options, got {choices!r}")
        options = options_from_list(choices)
        gt = LETTERS[_answer_index(rec["answer"], len(options), where)]
        item_id = str(rec["question_id"]) if "question_id" in df.columns else str(row)
        items.append(Item(id=item_id, question=mc_question(str(rec["question"]), options), answer=gt,
                          image_cell=rec["image"], source=where,
                          meta={"options": options, "category": str(rec["category"])}))
    return items


def _load_raw(root: str, limit: Optional[int]) -> list[Item]:
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".json"))
    if not files:
        raise DataError(f"{root}: no V* question files (<name>.json beside <name>.jpg) in this folder")
    items = []
    for path in files[: len(files) if limit is None else limit]:
        rel = os.path.relpath(path, root)
        try:
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: could not be read as JSON ({exc})") from None
        for key in ("question", "options"):
            if key not in rec:
                raise DataError(f"{path}: missing key {key!r}")
        raw = [str(o) for o in rec["options"]]
        if len(raw) < 2:
            raise DataError(f"{path}: key 'options' needs at least 2 options, got {raw!r}")
        image = next((path[:-5] + e for e in IMAGE_EXTS if os.path.isfile(path[:-5] + e)), path[:-5] + ".jpg")
        item_id = rel[:-5].replace(os.sep, "/")
        shift = int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % len(raw)
        rotated = raw[shift:] + raw[:shift]  # the correct option (raw[0]) lands at index (-shift) % n
        options = options_from_list(rotated)
        category = rec.get("category") or (os.path.dirname(rel) or "unknown").replace(os.sep, "/")
        items.append(Item(id=item_id, question=mc_question(str(rec["question"]), options),
                          answer=LETTERS[(-shift) % len(raw)], image_cell=image, source=rel,
                          meta={"options": options, "category": str(category)}))
    return items


def load(path: str, limit: Optional[int] = None) -> list[Item]:
    """Items from the mirror parquet (or jsonl with its columns) or from a raw-release folder."""
    items = _load_raw(path, limit) if os.path.isdir(path) else _load_parquet(path, limit)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate question ids")
    return items


def score(pred: Optional[str], item: Item) -> dict:
    return letter_score(pred, item.meta["options"], item.answer, category=item.meta["category"])


def aggregate(rows: list[dict]) -> dict:
    """Per-category accuracy; the overall number is the loop's micro average (etchr_pass1)."""
    return {f"{stage}_by_category": pct_by(rows, stage, "category") for stage in STAGES}


TASK = register(Task(
    name="vstar", family="box", edit_prefix="edit_prefix_box_v1", verify_prompt="verify_box_v1",
    load=load, extract=extract_choice, score=score, aggregate=aggregate,
    description="V*Bench multiple choice (mirror parquet: image, category, question_id, question, choices, answer; "
                "or the raw json+jpg folder)",
))
