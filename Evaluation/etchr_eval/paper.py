"""The paper's main table (arXiv 2605.23897, Table 1; PROTOCOL.md section 3, DATA.md section 2) and our
results in its layout: 11 columns in the paper's order plus the average, rows baseline and ETCHR.

A column takes a task's reported number when the task defines one (`<stage>_reported`: HRBench's
cycle average, ChartQA's mean of the two splits), else its Pass@1 over scored items. When the MLLM is
one of the paper's three, the paper's rows are shown beside ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from .runtime import atomic_write_json, atomic_write_text

# (column label, task names that fill it), in the paper's order.
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("V*", ("vstar",)), ("HRBench-4K", ("hrbench_4k",)), ("HRBench-8K", ("hrbench_8k",)), ("ChartQA", ("chartqa",)),
    ("CharXiv-DQ", ("charxiv_dq",)), ("CharXiv-RQ", ("charxiv_rq",)), ("Maze", ("maze",)),
    ("FrozenLake", ("frozenlake", "frozen_lake")), ("COCO-Jigsaw", ("coco_jigsaw", "jigsaw")),
    ("ViewSpatial", ("viewspatial",)), ("DL3DV-2k", ("dl3dv",)),
]

# Pass@1 in %, per column in COLUMNS order: (baseline, with ETCHR), and the paper's 11-column averages.
PAPER: dict[str, dict[str, Any]] = {
    "Qwen3-VL-8B": {
        "baseline": [84.8, 78.1, 74.5, 86.7, 85.0, 47.9, 27.5, 9.5, 9.5, 41.1, 70.8],
        "etchr": [86.9, 80.6, 75.3, 88.4, 86.8, 49.7, 38.5, 13.5, 13.0, 57.2, 78.6],
        "average": (55.95, 60.77),
    },
    "Gemini-3.1-Flash-Lite": {
        "baseline": [69.6, 81.5, 74.5, 81.2, 93.8, 68.6, 40.0, 62.5, 27.5, 46.6, 70.1],
        "etchr": [72.3, 82.9, 75.1, 83.3, 94.6, 70.8, 51.5, 69.0, 36.0, 57.8, 82.7],
        "average": (65.08, 70.55),
    },
    "Kimi K2.5": {
        "baseline": [85.9, 85.6, 80.6, 93.7, 98.3, 77.1, 95.5, 52.5, 44.5, 54.9, 73.4],
        "etchr": [87.4, 86.8, 81.1, 94.1, 98.4, 77.9, 98.0, 57.0, 70.5, 57.7, 83.9],
        "average": (76.55, 81.16),
    },
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# Served names that do not spell the model out: the reference's launch_vllm.sh serves Qwen3-VL-8B as "qwen3".
ALIASES = {"qwen3": "Qwen3-VL-8B"}


def paper_model(mllm_model: Optional[str]) -> Optional[str]:
    """The paper's MLLM that `mllm_model` names, else None: "Qwen/Qwen3-VL-8B-Instruct" (our launchers'
    served name), "Qwen3-VL-8B-Instruct", ".../models/Qwen3-VL-8B-Instruct" and "qwen3" -> "Qwen3-VL-8B"."""
    name = (mllm_model or "").rstrip("/")
    alias = ALIASES.get(name.rsplit("/", 1)[-1].lower())
    if alias is not None:
        return alias
    key = _key(name)
    return next((name for name in PAPER if _key(name) in key), None)


def column_value(summary: dict[str, dict], tasks: tuple[str, ...], stage: str) -> Optional[float]:
    """A column's number for `stage` (etchr | baseline): the task's reported number, else its Pass@1."""
    for task in tasks:
        if task in summary:
            s = summary[task]
            reported = s.get(f"{stage}_reported")
            return reported if reported is not None else s.get(f"{stage}_pass1")
    return None


def _mean(values: list[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 2) if present else None


def results_table(summary: dict[str, dict], mllm_model: Optional[str]) -> dict[str, Any]:
    """Rows of the 11-column table and its markdown.

    Ours: "baseline" and "ETCHR", averaged over the columns each row has. The paper's rows (when the
    MLLM is one of its three) are averaged over the columns our ETCHR row has, so the averages compare.
    """
    labels = [label for label, _ in COLUMNS]
    ours = {stage: [column_value(summary, tasks, stage) for _, tasks in COLUMNS] for stage in ("baseline", "etchr")}
    present = [i for i, v in enumerate(ours["etchr"]) if v is not None]
    rows = [{"name": "baseline", "source": "ours", "values": ours["baseline"], "average": _mean(ours["baseline"])},
            {"name": "ETCHR", "source": "ours", "values": ours["etchr"], "average": _mean(ours["etchr"])}]
    model = paper_model(mllm_model)
    if model is not None:
        cols = present or list(range(len(COLUMNS)))
        for stage, name in (("baseline", "baseline"), ("etchr", "ETCHR")):
            values = PAPER[model][stage]
            rows.append({"name": name, "source": f"paper, {model}", "values": list(values),
                         "average": _mean([values[i] for i in cols])})
    table = {"columns": labels, "rows": rows, "paper_model": model, "average_over": [labels[i] for i in present]}
    table["markdown"] = _markdown(table, mllm_model)
    return table


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _markdown(table: dict[str, Any], mllm_model: Optional[str]) -> str:
    cols, n = table["columns"], len(table["columns"])
    lines = ["## Results in the paper's layout (Table 1)", "",
             "| row | " + " | ".join(cols) + " | Average |", "|---" * (n + 2) + "|"]
    for r in table["rows"]:
        lines.append(f"| {r['name']} ({r['source']}) | " + " | ".join(_fmt(v) for v in r["values"])
                     + f" | {_fmt(r['average'])} |")
    over = table["average_over"]
    if len(over) == n:
        note = f"Average = mean over all {n} columns."
    else:
        which = f" ({', '.join(over)})" if over else ""
        note = f"Average = mean over the {len(over)} of {n} columns this run has{which}, not over all {n}; " \
               "\"-\" = not evaluated."
    lines += ["", f"Pass@1 in %. {note}"]
    model = table["paper_model"]
    if model is not None:
        base, etchr = PAPER[model]["average"]
        lines.append(f"Paper rows: {model} as published; its {n}-column averages are {base:.2f} -> {etchr:.2f}.")
    else:
        lines.append(f"MLLM `{mllm_model}` is not one of the paper's three ({', '.join(PAPER)}): no paper rows.")
    return "\n".join(lines) + "\n"


def append_results_table(paths: dict[str, Path], summary: dict[str, dict], mllm_model: Optional[str]) -> dict:
    """Append the table to summary.md and add it to summary.json as "results_table" (both rewritten atomically)."""
    table = results_table(summary, mllm_model)
    md_path, json_path = Path(paths["md"]), Path(paths["json"])
    atomic_write_text(md_path, md_path.read_text() + "\n" + table["markdown"])
    data = json.loads(json_path.read_text())
    data["results_table"] = table
    atomic_write_json(json_path, data)
    return table
