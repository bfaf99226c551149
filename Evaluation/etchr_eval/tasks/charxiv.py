"""CharXiv descriptive (DQ) and reasoning (RQ) questions (princeton-nlp/CharXiv), graded by a judge model.

CharXiv's own release nests four descriptive and one reasoning question per chart; this task reads a
flat parquet, one question per row, one file per task (charxiv_dq.parquet, charxiv_rq.parquet):

| column | type | meaning |
|---|---|---|
| `image` | HF Image struct `{bytes, path}` (or bytes, or a path) | the chart |
| `question` | string | the question exactly as the MLLM sees it (format hints included) |
| `answer` | string | the ground truth |
| `grading_instruction` | string, may be empty | how the judge must compare: CharXiv's per-question rule |
|  |  | for the answer type, e.g. "numbers must match to 1 decimal place" |
| `id` (optional) | string / int | item id; default: the row number |
| `category` (optional) | string | reported per category when present |

Grading: the judge (cfg.judge, else the evaluated MLLM, through the same OpenAI client) gets
judge_charxiv_v1.txt filled with the question, ground truth, instruction, the extracted answer and the
full response, and answers \\boxed{1} or \\boxed{0}. A judge reply with no verdict is a failure record
(like a failed request), never a 0. An empty response is not sent to the judge: it scores 0.
"""

from __future__ import annotations

import re
from typing import Optional

import pandas as pd

from ..extract import last_boxed
from ..prompts import load_prompt
from .base import DataError, Item, Task, read_table, register, table_rows
from .chartqa import extract  # same answer extraction: last \boxed{}, else a short one-line reply
from .choice import STAGES, pct_by

JUDGE_PROMPT = "judge_charxiv_v1"
NO_ANSWER = "(no \\boxed{} answer found)"
_FIELDS = re.compile(r"\{(question|gt_answer|instruction|extracted|response)\}")
_WORDS = {"1": 1, "yes": 1, "correct": 1, "true": 1, "0": 0, "no": 0, "incorrect": 0, "false": 0, "wrong": 0}
_LABELLED = re.compile(r"(?:judg(?:e)?ment|verdict|output|score)\s*[:=]\s*\**\s*([01])\b", re.I)


def load(path: str, limit: Optional[int] = None) -> list[Item]:
    df = read_table(path, ["image", "question", "answer", "grading_instruction"])
    items = []
    for row, rec, where in table_rows(df, path, limit):
        for col in ("question", "answer"):
            if not isinstance(rec[col], str) or not rec[col].strip():
                raise DataError(f"{where}: column {col!r} must be a non-empty string, got {rec[col]!r}")
        instruction = rec["grading_instruction"]
        if instruction is None or (not isinstance(instruction, str) and pd.isna(instruction)):
            instruction = ""
        elif not isinstance(instruction, str):
            raise DataError(f"{where}: column 'grading_instruction' must be a string, got {instruction!r}")
        category = str(rec["category"]) if "category" in df.columns else "all"
        items.append(Item(id=str(rec["id"]) if "id" in df.columns else str(row), question=rec["question"].strip(),
                          answer=rec["answer"].strip(), image_cell=rec["image"], source=where,
                          meta={"instruction": instruction.strip(), "category": category}))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate values in column 'id'")
    return items


def judge_request(pred: Optional[str], response: str, item: Item) -> Optional[str]:
    """The judge's text prompt, or None for an empty response (scored 0 by `score`)."""
    if not (response or "").strip():
        return None
    values = {"question": item.question, "gt_answer": item.answer,
              "instruction": item.meta["instruction"] or "(none: judge by meaning)",
              "extracted": pred if pred is not None else NO_ANSWER, "response": re.sub(r"<\|[A-Za-z0-9_]+\|>", "", response).strip()}  # no control tokens
    # One pass, so a response that happens to contain "{gt_answer}" is not filled in.
    return _FIELDS.sub(lambda m: values[m.group(1)], load_prompt(JUDGE_PROMPT))


def parse_verdict(reply: Optional[str]) -> Optional[int]:
    """1 / 0 from a judge reply; None when it holds no verdict.

    The last \\boxed{} decides when present ("1", "0", or yes/no/correct/incorrect words); otherwise a
    reply that is only such a word or digit, or a last "Judgment: 1" / "Verdict = 0" line.
    """
    if reply is None:
        return None
    boxed = last_boxed(reply)
    if boxed is not None:
        word = re.sub(r"^\\text\{(.*)\}$", r"\1", boxed.strip()).strip(" .*'\"").lower()
        return _WORDS.get(word)
    bare = reply.strip().strip(" .*'\"`").lower()
    if bare in _WORDS:
        return _WORDS[bare]
    labelled = _LABELLED.findall(reply)
    return int(labelled[-1]) if labelled else None


def judge_score(reply: str, item: Item) -> dict:
    verdict = parse_verdict(reply)
    if verdict is None:  # no signal: a failure record (retried on rerun), not a wrong answer
        raise DataError(f"{item.source}: the judge's reply holds no verdict (\\boxed{{1}} or \\boxed{{0}}): "
                        f"{(reply or '')[:200]!r}")
    return {"score": float(verdict), "category": item.meta["category"], "judge_prompt": JUDGE_PROMPT}


def score(pred: Optional[str], item: Item) -> dict:
    """Only reached for an empty response (nothing to judge)."""
    return {"score": 0.0, "category": item.meta["category"], "judged": False}


def aggregate(rows: list[dict]) -> dict:
    return {f"{stage}_by_category": pct_by(rows, stage, "category") for stage in STAGES}


for _name, _kind in (("charxiv_dq", "descriptive"), ("charxiv_rq", "reasoning")):
    register(Task(
        name=_name, family="box", edit_prefix="edit_prefix_box_v1", verify_prompt="verify_box_v1",
        load=load, extract=extract, score=score, aggregate=aggregate,
        judge_request=judge_request, judge_score=judge_score,
        description=f"CharXiv {_kind} questions, judge-graded (parquet: image, question, answer, grading_instruction)",
    ))
