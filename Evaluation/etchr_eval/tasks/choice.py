"""Multiple-choice helpers shared by the letter-scored tasks (V*, HRBench, ViewSpatial, DL3DV-2k), and the
per-group accuracy helper of the task aggregates.

Options live in `Item.meta["options"]` as {"A": "red", "B": "blue", ...}. Which option an answer names
follows VLMEvalKit's exact-matching rule (open-compass/VLMEvalKit, vlmeval/utils/matching_util.py,
`can_infer` = `can_infer_option`, else `can_infer_text`; no LLM judge):
- option: the characters .()[],:;!*#{} become spaces, the text is split on whitespace, and the answer
  is the one option letter (upper case, one of the item's keys) that stands as a whole token; two or
  more different letters name nothing. So "Option C", "\\textbf{C}", "B - green", "green (B)", "(C)",
  "C." and "Answer: I believe it is C." all name their letter ("I" is not an option);
- text: else, when the answer is at most twice the options' total length, the one option whose
  lower-cased text occurs in the lower-cased answer ("green" alone names the only green option).
(Some VLMEvalKit revisions add a token-position condition to the option step that rejects a lone "C";
the long-standing rule, used here, accepts it.)
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from ..extract import last_boxed

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_OPTION = re.compile(r"(?:^|[\s;,\n(])\(?([A-Z])\s*[:.)]\s*")


def parse_options(candidates: str) -> dict[str, str]:
    """"A: red box; B. blue box; (C) tree" -> {"A": "red box", "B": "blue box", "C": "tree"}.

    Only labels in letter order from A count ("A: the U.S. flag; B: ..." has no option U): a letter
    mark that is not the next expected label is part of the current option's text.
    """
    marks = []
    for m in _OPTION.finditer(candidates):
        if len(marks) < len(LETTERS) and m.group(1) == LETTERS[len(marks)]:
            marks.append(m)
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


_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def infer_option(answer: str, options: dict[str, str]) -> Optional[str]:
    """VLMEvalKit can_infer_option: the one option letter standing as a token; None if none or several."""
    tokens = set(answer.translate(_SEPARATORS).split())
    hits = [k for k in options if k in tokens]
    return hits[0] if len(hits) == 1 else None


def infer_text(answer: str, options: dict[str, str]) -> Optional[str]:
    """VLMEvalKit can_infer_text: the one option whose text is inside the answer (case-insensitive)."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None  # a long reply quoting options is not an answer
    hits = [k for k, v in options.items() if str(v).strip() and str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def to_letter(text: Optional[str], options: dict[str, str]) -> Optional[str]:
    """The option letter an answer names (VLMEvalKit can_infer, see the module docstring); None if none.

    With no options known (a candidates string without labels) only a lone letter is accepted.
    """
    if text is None:
        return None
    if not options:
        m = re.fullmatch(r"\s*\(?([A-Z])[).:]?\s*", text)
        return m.group(1) if m else None
    return infer_option(text, options) or infer_text(text, options)


def extract_choice(response: Optional[str]) -> Optional[str]:
    """The answer part of a multiple-choice response (V*, HRBench: VLMEvalKit matches the whole reply).

    The protocol asks for \\boxed{}, so the last box wins; without one the whole response is the
    answer and to_letter decides (several letters in it name nothing). None for an empty response.
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    return response.strip() if response and response.strip() else None


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
