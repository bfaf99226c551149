"""Multiple-choice helpers shared by the letter-scored tasks (V*, HRBench, ViewSpatial, DL3DV-2k), and the
per-group accuracy helper of the task aggregates.

Options live in `Item.meta["options"]` as {"A": "red", "B": "blue", ...}. A prediction or ground truth
may be "B", "(B)", "B.", "B. red", "B: red", "B) red", "\\text{B}" or the option's text; anything else
names no option and scores 0.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from ..extract import last_boxed

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_OPTION = re.compile(r"(?:^|[\s;,\n(])\(?([A-Z])\s*[:.)]\s*")


def parse_options(candidates: str) -> dict[str, str]:
    """"A: red box; B. blue box; (C) tree" -> {"A": "red box", "B": "blue box", "C": "tree"}."""
    marks = list(_OPTION.finditer(candidates))
    out: dict[str, str] = {}
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(candidates)
        out[m.group(1)] = candidates[m.end():end].strip(" ;,.\n\t")
    return out


def options_from_list(choices: Iterable) -> dict[str, str]:
    """["red", "blue"] -> {"A": "red", "B": "blue"} (choice lists are in letter order)."""
    return {LETTERS[i]: str(c).strip() for i, c in enumerate(choices)}


def format_options(options: dict[str, str]) -> str:
    """{"A": "red", "B": "blue"} -> "A. red\\nB. blue" (the VLMEvalKit multiple-choice layout)."""
    return "\n".join(f"{k}. {v}" for k, v in options.items())


def mc_question(question: str, options: dict[str, str]) -> str:
    """Question, its lettered options, and the letter instruction, one per line."""
    return f"{question.strip()}\n{format_options(options)}\n{MC_INSTRUCTION}"


def _norm_text(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def to_letter(text: Optional[str], options: dict[str, str]) -> Optional[str]:
    """Map an answer in any accepted form to its option letter; None if it names no option."""
    if text is None:
        return None
    s = text.strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s).strip()
    # "(C)", "(C", "(C) text", "(C). text"; or "C", "C.", "C:", "C)" with optional text after the mark.
    # A bare letter followed by words ("C or D", "I think ...") is not an answer.
    m = (re.fullmatch(r"\(([A-Za-z])(?:\)(?:\s*[:.]?\s*.*)?)?", s, flags=re.S)
         or re.fullmatch(r"([A-Za-z])(?:\s*[:.)]\s*.*)?", s, flags=re.S))
    if m and (m.group(1).upper() in options or not options):
        return m.group(1).upper()
    target = _norm_text(s)
    if target:
        for letter, opt in options.items():
            if _norm_text(opt) == target:
                return letter
    return None


# Only "answer"/"is" ignore case: a lower-case "a" in "the answer is a red box" is not option A.
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\b\)?")


def extract_choice(response: Optional[str]) -> Optional[str]:
    """The answer part of a multiple-choice response.

    The protocol asks for \\boxed{}, so the last box wins. Without one: the last "answer is B" /
    "Answer: (B)", else a one-line reply taken whole ("B", "(B) red"; to_letter decides whether it names
    an option). None when nothing answer-like is found.
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    if not response or not response.strip():
        return None
    text = response.strip()
    hits = _ANSWER_IS.findall(text)
    if hits:
        return hits[-1]
    return text if "\n" not in text and len(text) <= 80 else None


def letter_score(pred: Optional[str], options: dict[str, str], gt_letter: str, **detail) -> dict:
    """{"score": 1.0 iff pred names the ground-truth option, "pred_letter", "gt_letter", **detail}."""
    letter = to_letter(pred, options)
    return {"score": float(letter == gt_letter), "pred_letter": letter, "gt_letter": gt_letter, **detail}


# ----------------------------------------------------------------------------------------------
# Aggregates: the loop's rows keep each stage's score detail (`<stage>_detail`), which is where the
# tasks put the grouping keys (category, split, cycle); rows without a score for a stage are skipped.
# ----------------------------------------------------------------------------------------------
STAGES = ("etchr", "baseline")


def pct(values: list[float]) -> Optional[float]:
    """Mean of 0/1 scores in percent, 2 decimals; None for no values."""
    return round(100.0 * sum(values) / len(values), 2) if values else None


def scores_by(rows: list[dict], stage: str, key: str) -> dict[str, list[float]]:
    """{group: [scores]} of `stage`, grouped by `<stage>_detail[key]`, groups in sorted order."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if f"{stage}_score" in r:
            group = str((r.get(f"{stage}_detail") or {}).get(key))
            out.setdefault(group, []).append(float(r[f"{stage}_score"]))
    return dict(sorted(out.items()))


def pct_by(rows: list[dict], stage: str, key: str) -> dict[str, Optional[float]]:
    """{group: accuracy %} of `stage` grouped by `<stage>_detail[key]`."""
    return {g: pct(v) for g, v in scores_by(rows, stage, key).items()}
