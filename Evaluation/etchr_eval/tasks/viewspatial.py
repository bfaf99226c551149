"""ViewSpatial-Bench (lidingm/ViewSpatial-Bench), Person perspective - Relative Direction; DATA.md section 2.

`ViewSpatial-Bench.json` is a JSON list (JSONL, and a parquet with the same columns, are also read) of
`question_type, image_path, question, answer, choices`: `image_path` is a path or a list of paths (the
first is used); `choices` is the option text ("A. left\\nB. right ...") or a list; `answer` is a letter,
"A. left" or the option text. Only the paper's column is kept: question_type "Person perspective -
Relative Direction" (also "Person-RelDir"), not the other person-perspective types. Item ids are the
row numbers in the whole file.

Image paths resolve against the file's folder; the release writes them as "ViewSpatial-Bench/<zip
folder>/...", so that first component is dropped when the path does not exist as written.
Scoring. With a \\boxed{} answer (the protocol's answer slot) the last box is read by choice.to_letter
(VLMEvalKit can_infer: "Option C", "green (B)", the option text alone). Without a box we apply the
official rule, ZJU-REAL/ViewSpatial-Bench, evaluate.py, `evaluate_vlm` + `extract_option`: only the
response's last line counts, and its answer is the first standalone letter A-D, case-insensitive
(`\\b([A-D])\\b`), so "it is a chair" on the last line reads A and a letter on an earlier line is ignored.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from .base import DataError, Item, Task, read_table, register
from ..extract import last_boxed
from .choice import letter_score, mc_question, options_from_list, parse_options, to_letter

KEYS = ("question_type", "image_path", "question", "answer", "choices")
PERSON_RELDIR = {"personperspectiverelativedirection", "personreldir"}


def is_person_reldir(question_type: str) -> bool:
    return re.sub(r"[^a-z]", "", str(question_type).lower()) in PERSON_RELDIR


def _records(path: str) -> list:
    """The file's questions as a list of dicts (JSON list, JSONL, or a parquet with the same columns)."""
    if path.endswith(".parquet"):
        df = read_table(path, list(KEYS))
        return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rec.items()}
                for rec in df.to_dict("records")]
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                return [json.loads(line) for line in f if line.strip()]
            data = json.load(f)
    except ValueError as exc:
        raise DataError(f"{path}: could not be read as JSON ({exc})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    return data


def resolve_image(image_path, base_dir: str, where: str) -> str:
    """Absolute path of the item's (first) image; see the module docstring for the fallback."""
    if isinstance(image_path, (list, tuple, np.ndarray)):
        image_path = list(image_path)
    path = image_path[0] if isinstance(image_path, list) and image_path else image_path
    if not isinstance(path, str) or not path:
        raise DataError(f"{where}: key 'image_path' must be a path or a list of paths, got {image_path!r}")
    if os.path.isabs(path):
        return path
    direct = os.path.join(base_dir, path)
    parts = path.replace("\\", "/").split("/", 1)
    stripped = os.path.join(base_dir, parts[1]) if len(parts) == 2 else direct
    return direct if os.path.exists(direct) or not os.path.exists(stripped) else stripped


def load(path: str, limit: Optional[int] = None) -> list[Item]:
    base_dir = os.path.dirname(os.path.abspath(path))
    records = _records(path)
    items, types = [], set()
    for row, rec in enumerate(records):
        where = f"{os.path.basename(path)} row {row}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object with keys {', '.join(KEYS)}")
        missing = [k for k in KEYS if k not in rec]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        types.add(str(rec["question_type"]))
        if not is_person_reldir(rec["question_type"]):
            continue
        choices = rec["choices"]
        options = options_from_list(choices) if isinstance(choices, list) else parse_options(str(choices))
        if len(options) < 2:
            raise DataError(f"{where}: key 'choices' holds fewer than 2 lettered options: {choices!r}")
        gt = to_letter(str(rec["answer"]), options)
        if gt is None:
            raise DataError(f"{where}: key 'answer' = {rec['answer']!r} names none of the options {sorted(options)}")
        items.append(Item(id=str(row), question=mc_question(str(rec["question"]), options),
                          answer=gt, image_cell=resolve_image(rec["image_path"], base_dir, where), source=where,
                          meta={"options": options, "question_type": str(rec["question_type"])}))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path}: no 'Person perspective - Relative Direction' questions; question_type values "
                        f"found: {', '.join(sorted(types)) or '(none)'}")
    return items


_OFFICIAL_LETTER = re.compile(r"\b([A-D])\b", re.IGNORECASE)


def extract(response: Optional[str]) -> Optional[str]:
    """Last \\boxed{} content; else the official last-line letter (module docstring); None if neither."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    if not response:
        return None
    m = _OFFICIAL_LETTER.search(response.split("\n")[-1])
    return m.group(1).upper() if m else None


def score(pred: Optional[str], item: Item) -> dict:
    return letter_score(pred, item.meta["options"], item.answer, question_type=item.meta["question_type"])


TASK = register(Task(
    name="viewspatial", family="3d", edit_prefix="edit_prefix_3d_v1", verify_prompt="verify_dl3dv_v1",
    load=load, extract=extract, score=score,
    description="ViewSpatial-Bench Person-RelDir multiple choice (JSON: question_type, image_path, question, "
                "answer, choices; images relative to the file)",
))
