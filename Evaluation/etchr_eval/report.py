"""Per-task tables (markdown + JSON) and an offline HTML report with thumbnails."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Optional

from .runtime import atomic_write_json, atomic_write_text


def _pct(num: float, den: int) -> Optional[float]:
    return round(100.0 * num / den, 2) if den else None


def summarize_task(rows: list[dict], *, items: int, aggregate=None) -> dict[str, Any]:
    """Numbers for one task from its result rows (one per item).

    Pass@1 is over items whose requests all succeeded; request failures are counted apart and never
    as wrong answers. `accuracy_accepted` / `accuracy_rejected` split ETCHR's accuracy by the verdict.
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    n = len(ok)
    acc = [r for r in ok if r.get("accepted")]
    rej = [r for r in ok if r.get("accepted") is False]
    has_base = any("baseline_score" in r for r in ok)
    out: dict[str, Any] = {
        "items": items,
        "scored": n,
        "failed": len(failed),
        "missing": max(0, items - len(rows)),
        "etchr_pass1": _pct(sum(r.get("etchr_score", 0.0) for r in ok), n),
        "baseline_pass1": _pct(sum(r.get("baseline_score", 0.0) for r in ok), n) if has_base else None,
        "verify_accept_rate": _pct(len(acc), n),
        "accuracy_accepted": _pct(sum(r.get("etchr_score", 0.0) for r in acc), len(acc)),
        "accuracy_rejected": _pct(sum(r.get("etchr_score", 0.0) for r in rej), len(rej)),
        "unextractable_etchr": sum(1 for r in ok if r.get("etchr_pred") is None),
        "unextractable_baseline": sum(1 for r in ok if has_base and r.get("baseline_pred") is None),
        "failures_by_stage": _count_stages(failed),
    }
    if out["etchr_pass1"] is not None and out["baseline_pass1"] is not None:
        out["delta"] = round(out["etchr_pass1"] - out["baseline_pass1"], 2)
    else:
        out["delta"] = None
    if aggregate is not None and ok:
        out.update(aggregate(ok))
    return out


def _count_stages(failed: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in failed:
        for stage in (r.get("errors") or {"unknown": ""}):
            counts[stage] = counts.get(stage, 0) + 1
    return counts


COLUMNS = [("items", "items"), ("baseline_pass1", "baseline Pass@1"), ("etchr_pass1", "ETCHR Pass@1"),
           ("delta", "delta"), ("verify_accept_rate", "accept %"), ("accuracy_accepted", "acc (accepted)"),
           ("accuracy_rejected", "acc (rejected)"), ("failed", "request failures"), ("wall_s", "wall s"),
           ("edits_per_s", "edits/s")]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def markdown_table(summary: dict[str, dict]) -> str:
    head = "| task | " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    lines = [head, sep]
    for task, s in summary.items():
        lines.append(f"| {task} | " + " | ".join(_fmt(s.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str | os.PathLike, summary: dict[str, dict], meta: dict) -> dict[str, Path]:
    run_dir = Path(run_dir)
    md = ["# Edit-Verify-Reason results", "",
          f"MLLM `{meta.get('mllm_model')}`, editor `{meta.get('pipe_path')}`"
          + (f" + LoRA `{meta['lora_path']}`" if meta.get("lora_path") else "")
          + f", prompts {', '.join(sorted(set(meta.get('prompt_files', []))))}.", "",
          markdown_table(summary),
          "Pass@1 in %, over items whose requests all succeeded; request failures are counted apart.", ""]
    paths = {"json": run_dir / "summary.json", "md": run_dir / "summary.md"}
    atomic_write_json(paths["json"], {"tasks": summary, "meta": meta})
    atomic_write_text(paths["md"], "\n".join(md))
    return paths


# ----------------------------------------------------------------------------------------------
# HTML: one self-contained page plus small thumbnails next to it; works offline (file://).
# ----------------------------------------------------------------------------------------------
def _thumb(src: Path, dst: Path, size: int = 192) -> Optional[str]:
    from PIL import Image

    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            dst.parent.mkdir(parents=True, exist_ok=True)
            im.save(dst, format="JPEG", quality=85)
        return dst.name
    except OSError:
        return None


def write_html(run_dir: str | os.PathLike, rows_by_task: dict[str, list[dict]], summary: dict[str, dict],
               originals: dict[str, Any], meta: dict, max_items_per_task: int = 200) -> Path:
    """report.html with original | edit | verdict | answers | ground truth per item.

    `originals` maps "task/id" to a callable returning the original PIL image (decoded lazily).
    """
    run_dir = Path(run_dir)
    thumbs = run_dir / "report_thumbs"
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ETCHR evaluation</title><style>",
             "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}"
             ".ok{color:#070}.bad{color:#a00}.fail{background:#fee}pre{white-space:pre-wrap;max-width:28em;margin:0}",
             "</style></head><body><h1>ETCHR Edit-Verify-Reason</h1>",
             f"<p>MLLM <code>{esc(str(meta.get('mllm_model')))}</code>, editor <code>{esc(str(meta.get('pipe_path')))}</code>"
             f"{' + LoRA <code>' + esc(str(meta['lora_path'])) + '</code>' if meta.get('lora_path') else ''}.</p>",
             "<table><tr><th>task</th>" + "".join(f"<th>{esc(lbl)}</th>" for _, lbl in COLUMNS) + "</tr>"]
    for task, s in summary.items():
        parts.append(f"<tr><td>{esc(task)}</td>" + "".join(f"<td>{esc(_fmt(s.get(k)))}</td>" for k, _ in COLUMNS)
                     + "</tr>")
    parts.append("</table>")
    for task, rows in rows_by_task.items():
        parts.append(f"<h2>{esc(task)}</h2><table><tr><th>id</th><th>original</th><th>edit</th><th>verdict</th>"
                     "<th>baseline answer</th><th>ETCHR answer</th><th>ground truth</th></tr>")
        for r in rows[:max_items_per_task]:
            key = f"{task}/{r['id']}"
            safe = "".join(c if c.isalnum() else "_" for c in key)
            orig = None
            if key in originals:
                try:
                    img = originals[key]()
                    dst = thumbs / f"{safe}_orig.jpg"
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    img.thumbnail((192, 192))
                    img.save(dst, format="JPEG", quality=85)
                    orig = dst.name
                except Exception:
                    orig = None
            edit = _thumb(run_dir / r["edit_path"], thumbs / f"{safe}_edit.jpg") if r.get("edit_path") else None
            verdict = {True: "<span class='ok'>accepted</span>", False: "<span class='bad'>rejected</span>"}.get(
                r.get("accepted"), "-")

            def answer(stage: str) -> str:
                if f"{stage}_error" in r:
                    return f"<span class='bad'>request failed: {esc(r[stage + '_error'])}</span>"
                if f"{stage}_pred" not in r:
                    return "-"
                mark = "ok" if r.get(f"{stage}_score", 0) >= 1 else "bad"
                return (f"<span class='{mark}'>{esc(str(r[stage + '_pred']))}</span>"
                        f"<details><summary>response</summary><pre>{esc(str(r.get(stage + '_response', '')))}</pre>"
                        "</details>")

            img_cell = (lambda name: f"<img src='report_thumbs/{esc(name)}'>" if name else "-")
            cls = " class='fail'" if r.get("status") != "ok" else ""
            parts.append(f"<tr{cls}><td>{esc(str(r['id']))}<br><small>{esc(str(r.get('question', ''))[:300])}</small>"
                         f"</td><td>{img_cell(orig)}</td><td>{img_cell(edit)}</td><td>{verdict}</td>"
                         f"<td>{answer('baseline')}</td><td>{answer('etchr')}</td><td>{esc(str(r.get('gt')))}</td></tr>")
        if len(rows) > max_items_per_task:
            parts.append(f"<tr><td colspan=7>... {len(rows) - max_items_per_task} more items in results.jsonl</td></tr>")
        parts.append("</table>")
    parts.append(f"<pre>{esc(json.dumps(meta, indent=1, default=str)[:20000])}</pre></body></html>")
    path = run_dir / "report.html"
    atomic_write_text(path, "\n".join(parts))
    return path
