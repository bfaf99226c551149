"""Parity with each benchmark's official scorer: tests/parity/<task>.json holds model outputs with the
verdict the official implementation gives (derived by reading its code; `rule` names it). Ours
(the task's extract, then score) must agree on every case; a failure prints the whole table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etchr_eval.tasks import Item, get_task

PARITY = sorted((Path(__file__).parent / "parity").glob("*.json"))


def _item(task: str, case: dict) -> Item:
    if task == "chartqa":
        return Item(id="0", question="q", answer=list(case["gt"]), meta={"split": "human"}, source="parity")
    raise KeyError(f"no parity item builder for task {task!r}")


@pytest.mark.parametrize("path", PARITY, ids=[p.stem for p in PARITY])
def test_parity_with_official_scorer(path):
    spec = json.loads(path.read_text())
    task = get_task(spec["task"])
    assert len(spec["cases"]) >= 20, f"{path.name}: a parity table needs at least 20 cases"
    table, bad = [], 0
    for case in spec["cases"]:
        ours = task.score(task.extract(case["response"]), _item(spec["task"], case))["score"] == 1.0
        ok = ours == case["official_verdict"]
        bad += not ok
        table.append(f"{'ok  ' if ok else 'DIFF'} official={case['official_verdict']!s:5} ours={ours!s:5} "
                     f"{case['response']!r} gt={case['gt']!r}  ({case['note']})")
    assert bad == 0, f"{path.name}: {bad} case(s) differ from {spec['rule']}:\n" + "\n".join(table)


def test_parity_tables_exist():
    assert {p.stem for p in PARITY} >= {"chartqa"}
