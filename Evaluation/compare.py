#!/usr/bin/env python
"""Several evaluation runs side by side: one markdown table and one HTML page.

    python Evaluation/compare.py RUN_DIR [RUN_DIR ...] [--out DIR] [--labels a,b,...]

Each RUN_DIR is a run dir (or a namespace dir, <run_dir>/ns/<name>) written by evaluate.py. Writes
DIR/compare.md and DIR/compare.html (default DIR: the current directory): the paper's 11 columns and
the average for every run (baseline and ETCHR rows, labelled by MLLM, editor checkpoint and the
settings that differ between the runs), the paper's rows for each MLLM it recognises, a Pass@1 plot
of all runs, and per-item agreement between every pair of runs: items scored in both, how many ETCHR
answers changed, how many verdicts changed, and how many items one run got right and the other wrong.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from etchr_eval.paper import COLUMNS, PAPER, _mean, column_value, paper_model  # noqa: E402
from etchr_eval.report import plot_pass1  # noqa: E402
from etchr_eval.results import merge_rows, read_rows  # noqa: E402
from etchr_eval.runtime import atomic_write_text  # noqa: E402


class CompareError(ValueError):
    pass


def load_run(run_dir: Path) -> dict:
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise CompareError(f"{run_dir}: no summary.json (not an evaluate.py run dir, or the run has not finished)")
    data = json.loads(summary_path.read_text())
    rows = merge_rows(read_rows(run_dir / "results.jsonl"))
    meta = data.get("meta", {})
    return {"dir": run_dir, "tasks": data["tasks"], "meta": meta, "rows": rows,
            "fingerprint": (meta.get("run_fingerprint") or {}).get("shared", {})}


def differing_settings(runs: list[dict]) -> list[str]:
    """Fingerprint fields whose values are not the same in every run (what tells the runs apart)."""
    keys = sorted({k for r in runs for k in r["fingerprint"]})
    return [k for k in keys if len({json.dumps(r["fingerprint"].get(k), sort_keys=True, default=str) for r in runs}) > 1]


def label_of(run: dict, differing: list[str]) -> str:
    fp = run["fingerprint"]
    parts = [str(run["meta"].get("mllm_model"))]
    parts += [f"{k.split('.', 1)[-1]}={fp.get(k)}" for k in differing if k not in ("mllm.model",)]
    return " | ".join(parts)


def table_rows(runs: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for run, label in zip(runs, labels):
        for stage, name in (("baseline", "baseline"), ("etchr", "ETCHR")):
            values = [column_value(run["tasks"], tasks, stage) for _, tasks in COLUMNS]
            rows.append({"run": label, "row": name, "values": values, "average": _mean(values)})
    for model in sorted({m for m in (paper_model(r["meta"].get("mllm_model")) for r in runs) if m}):
        for stage, name in (("baseline", "baseline"), ("etchr", "ETCHR")):
            values = list(PAPER[model][stage])
            rows.append({"run": f"paper, {model}", "row": name, "values": values,
                         "average": PAPER[model]["average"][0 if stage == "baseline" else 1]})
    return rows


def agreement(a: dict, b: dict) -> dict:
    """Per-item agreement of two runs over the items both scored (status ok in both)."""
    both = [k for k in a["rows"] if k in b["rows"] and a["rows"][k].get("status") == "ok"
            and b["rows"][k].get("status") == "ok"]
    out = {"items_in_both": len(both), "answers_changed": 0, "verdicts_changed": 0, "right_in_a_only": 0,
           "right_in_b_only": 0}
    for k in both:
        ra, rb = a["rows"][k], b["rows"][k]
        out["answers_changed"] += ra.get("etchr_pred") != rb.get("etchr_pred")
        out["verdicts_changed"] += ra.get("accepted") != rb.get("accepted")
        sa, sb = (ra.get("etchr_score") or 0) >= 1, (rb.get("etchr_score") or 0) >= 1
        out["right_in_a_only"] += sa and not sb
        out["right_in_b_only"] += sb and not sa
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def compare(run_dirs: list[str], out: str = ".", labels: list[str] | None = None) -> dict:
    if len(run_dirs) < 2:
        raise CompareError("give at least two run dirs")
    runs = [load_run(Path(d)) for d in run_dirs]
    differing = differing_settings(runs)
    if labels is None:
        labels = [label_of(r, differing) for r in runs]
        if len(set(labels)) < len(labels):  # same settings (e.g. two seeds of nothing): fall back to the dirs
            labels = [f"{lab} [{r['dir']}]" for lab, r in zip(labels, runs)]
    elif len(labels) != len(runs):
        raise CompareError(f"--labels has {len(labels)} names for {len(runs)} runs")
    rows = table_rows(runs, labels)
    pairs = [{"a": labels[i], "b": labels[j], **agreement(runs[i], runs[j])}
             for i, j in combinations(range(len(runs)), 2)]
    cols = [c for c, _ in COLUMNS]
    md = ["# Runs compared", "", "| run | row | " + " | ".join(cols) + " | Average |", "|---" * (len(cols) + 3) + "|"]
    md += [f"| {r['run']} | {r['row']} | " + " | ".join(_f(v) for v in r["values"]) + f" | {_f(r['average'])} |"
           for r in rows]
    md += ["", "Pass@1 in %; \"-\" = not evaluated. Our averages are over the columns each run has.",
           f"Settings that differ between the runs: {', '.join(differing) or 'none'}.", "",
           "## Per-item agreement (ETCHR answers, items scored in both runs)", "",
           "| run A | run B | items in both | answers changed | verdicts changed | right in A only | right in B only |",
           "|---|---|---|---|---|---|---|"]
    md += [f"| {p['a']} | {p['b']} | {p['items_in_both']} | {p['answers_changed']} | {p['verdicts_changed']} | "
           f"{p['right_in_a_only']} | {p['right_in_b_only']} |" for p in pairs]
    md += ["", "Runs:"] + [f"- {lab}: `{r['dir']}`" for lab, r in zip(labels, runs)]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.md", "\n".join(md) + "\n")
    plot = plot_pass1({lab: r["tasks"] for lab, r in zip(labels, runs)}, out_dir / "compare_assets" / "pass1.png")
    esc = html.escape
    head = "<tr><th>run</th><th>row</th>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "<th>Average</th></tr>"
    body = "".join(f"<tr><td>{esc(r['run'])}</td><td>{esc(r['row'])}</td>" + "".join(f"<td>{_f(v)}</td>" for v in r["values"])
                   + f"<td><b>{_f(r['average'])}</b></td></tr>" for r in rows)
    agree = "".join(f"<tr><td>{esc(p['a'])}</td><td>{esc(p['b'])}</td><td>{p['items_in_both']}</td><td>{p['answers_changed']}</td>"
                    f"<td>{p['verdicts_changed']}</td><td>{p['right_in_a_only']}</td><td>{p['right_in_b_only']}</td></tr>"
                    for p in pairs)
    links = "".join(f"<li>{esc(lab)}: <a href='{esc(os.path.relpath(r['dir'] / 'report.html', out_dir))}'>report</a> "
                    f"<code>{esc(str(r['dir']))}</code></li>" for lab, r in zip(labels, runs))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>ETCHR runs compared</title><style>"
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}"
            "td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px}</style></head><body><h1>Runs compared</h1>"
            f"<table>{head}{body}</table><p>Settings that differ: {esc(', '.join(differing) or 'none')}.</p>"
            f"<img src='{esc(os.path.relpath(plot, out_dir))}' alt='Pass@1 of every run' style='max-width:100%'>"
            "<h2>Per-item agreement</h2><table><tr><th>run A</th><th>run B</th><th>items in both</th><th>answers changed</th>"
            f"<th>verdicts changed</th><th>right in A only</th><th>right in B only</th></tr>{agree}</table>"
            f"<ul>{links}</ul></body></html>")
    atomic_write_text(out_dir / "compare.html", page)
    return {"rows": rows, "pairs": pairs, "labels": labels, "differing": differing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="evaluate.py run dirs (or namespace dirs)")
    ap.add_argument("--out", default=".", help="folder for compare.md, compare.html and compare_assets/")
    ap.add_argument("--labels", default=None, help="comma-separated names for the runs (default: from their settings)")
    args = ap.parse_args(argv)
    try:
        result = compare(args.run_dirs, args.out, args.labels.split(",") if args.labels else None)
    except (CompareError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "compare.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'compare.md'} and {Path(args.out) / 'compare.html'} ({len(result['labels'])} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
