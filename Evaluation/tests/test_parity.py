"""Parity with each benchmark's official scorer: tests/parity/<task>.json holds model outputs with the
verdict the official implementation gives (derived by reading its code; `rule` names it). Ours
(the task's extract, then score) must agree on every case; a failure prints the whole table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etchr_eval.extract import verify_verdict
from etchr_eval.tasks import DataError, Item, get_task
from etchr_eval.tasks.choice import options_from_list, parse_options
from etchr_eval.tasks.maze import shortest_len

PARITY = sorted((Path(__file__).parent / "parity").glob("*.json"))


def _item(task: str, case: dict) -> Item:
    if task == "chartqa":
        return Item(id="0", question="q", answer=list(case["gt"]), meta={"split": "human"}, source="parity")
    if task in ("charxiv_dq", "charxiv_rq"):  # `response` is the judge's reply to this item's judge prompt
        return Item(id="0", question="q", answer=case["gt"], meta={"instruction": "", "category": "all"},
                    source="parity")
    if task in ("maze", "frozenlake"):  # gt = the map rows
        blocked = "#" if task == "maze" else "H"
        return Item(id="0", question="q", answer="", source="parity",
                    meta={"rows": case["gt"], "blocked": blocked, "shortest_len": shortest_len(case["gt"], blocked)})
    if task == "coco_jigsaw":
        return Item(id="0", question="q", answer=case["gt"], source="parity")
    if task in ("vstar", "hrbench_4k", "viewspatial"):
        options = options_from_list(case["options"])
        return Item(id="0", question="q", answer=case["gt"], source="parity",
                    meta={"options": options, "category": "c", "cycle": "0", "question_type": "Person-RelDir"})
    if task == "dl3dv":
        return Item(id="0", question="q", answer=case["gt"], meta={"options": parse_options(case["candidates"])},
                    source="parity")
    raise KeyError(f"no parity item builder for task {task!r}")


def _ours(task, name: str, case: dict):
    """True / False, or None for a judge reply with no verdict (a failure record, DataError)."""
    if task is None:  # verify.json: the loop's accept verdict under the reference's rule
        return verify_verdict(case["response"], "reference")
    item = _item(name, case)
    if task.judge_score is None:
        return task.score(task.extract(case["response"]), item)["score"] == 1.0
    try:
        return task.judge_score(case["response"], item)["score"] == 1.0
    except DataError:
        return None


@pytest.mark.parametrize("path", PARITY, ids=[p.stem for p in PARITY])
def test_parity_with_official_scorer(path):
    spec = json.loads(path.read_text())
    task = None if spec["task"] == "verify" else get_task(spec["task"])
    assert len(spec["cases"]) >= 20, f"{path.name}: a parity table needs at least 20 cases"
    table, bad = [], 0
    for case in spec["cases"]:
        ours = _ours(task, spec["task"], case)
        # ours_verdict: only where the official code gives none (e.g. a judge reply it cannot parse)
        assert "ours_verdict" not in case or case["official_verdict"] is None, case
        ok = ours == case.get("ours_verdict", case["official_verdict"])
        bad += not ok
        table.append(f"{'ok  ' if ok else 'DIFF'} official={case['official_verdict']!s:5} ours={ours!s:5} "
                     f"{case['response']!r} gt={case['gt']!r}  ({case['note']})")
    assert bad == 0, f"{path.name}: {bad} case(s) differ from {spec['rule']}:\n" + "\n".join(table)


def test_parity_tables_exist():
    assert {p.stem for p in PARITY} >= {"chartqa", "charxiv", "frozenlake", "maze", "coco_jigsaw", "verify"}
