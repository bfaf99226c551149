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

Official rule (princeton-nlp/CharXiv, src/reasoning_utils.py get_reasoning_result_gpt and
src/descriptive_utils.py get_descriptive_result_gpt / verify_grading_output; src/get_stats.py
get_*_scores): the judge's whole reply is read with json.loads; its "score" (descriptive: "score_T<i>",
next to "extract_answer_T<i>"; reasoning: next to "extracted_answer") must be in [0, 1], else the reply
is retried and finally scored -1, which get_stats counts as invalid (and 0). `parse_verdict` gives that
reply the official verdict, and also reads the same object inside ```json fences or extra text, our
prompt's \\boxed{1}/\\boxed{0}, and a bare or labelled Correct / Not correct / Incorrect. Where the
official code finds no verdict and none of those forms holds one, ours is a failure record (retried on
rerun) rather than the official 0: a judge that says nothing is not a wrong answer.
"""

from __future__ import annotations

import json
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
_WORDS = {"1": 1, "yes": 1, "correct": 1, "true": 1, "0": 0, "no": 0, "incorrect": 0, "false": 0, "wrong": 0,
          "not correct": 0}
# "not correct" before "correct", so that "Judgment: Not correct" is a 0.
_LABELLED = re.compile(r"(?:judg(?:e)?ment|verdict|output|score)\s*[:=]\s*\**\s*(not correct|incorrect|correct|[01])\b",
                       re.I)
# CharXiv's reply keys: reasoning {"extracted_answer", "score"}, descriptive (one triplet) {"extract_answer_T1", "score_T1"}.
_JSON_KEYS = (("extracted_answer", "score"), ("extract_answer_T1", "score_T1"))


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


def _json_verdict(obj) -> Optional[int]:
    """CharXiv's reading of one decoded reply: 1 / 0, or None (the official code retries, then scores -1)."""
    if not isinstance(obj, dict):
        return None
    for answer_key, score_key in _JSON_KEYS:
        if answer_key in obj and score_key in obj:
            value = obj[score_key]
            # Python's `value in [0, 1]`, as CharXiv checks it (True, 1.0 pass); a string "1" does not.
            if not isinstance(value, (str, list, dict)) and value in (0, 1):
                return int(value)
            return None
    return None


def _embedded_objects(text: str) -> list:
    """Every JSON object that starts at some "{" of `text` (fenced or in prose), in order."""
    decoder, found, pos = json.JSONDecoder(), [], text.find("{")
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except ValueError:
            pos = text.find("{", pos + 1)
            continue
        found.append(obj)
        pos = text.find("{", end)
    return found


def parse_verdict(reply: Optional[str]) -> Optional[int]:
    """1 / 0 from a judge reply; None when it holds no verdict.

    In order: a reply that is wholly a JSON object decides by CharXiv's own rule (see the module
    docstring); else the last CharXiv JSON object inside the text (```json fences, prose around it);
    else the last \\boxed{} ("1", "0", or yes/no/correct/incorrect words); else a reply that is only
    such a word or digit; else a last "Judgment: 1" / "Verdict = Not correct" line.
    """
    if reply is None:
        return None
    try:
        whole = json.loads(reply)
    except ValueError:
        whole = None  # not JSON: the other forms below
    if isinstance(whole, dict):
        return _json_verdict(whole)
    # Before \\boxed{}: the object's extracted answer may itself quote a "\\boxed{12}".
    embedded = [obj for obj in _embedded_objects(reply) if isinstance(obj, dict)
                and any(a in obj and k in obj for a, k in _JSON_KEYS)]
    if embedded:
        return _json_verdict(embedded[-1])
    boxed = last_boxed(reply)
    if boxed is not None:
        word = re.sub(r"^\\text\{(.*)\}$", r"\1", boxed.strip()).strip(" .*'\"").lower()
        return _WORDS.get(word)
    bare = re.sub(r"\s+", " ", reply.strip().strip(" .*'\"`!").lower())
    if bare in _WORDS:
        return _WORDS[bare]
    labelled = _LABELLED.findall(reply)
    if not labelled:
        return None
    last = labelled[-1].lower()
    return int(last) if last in ("0", "1") else _WORDS[last]


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
