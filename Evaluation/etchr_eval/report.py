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
# Plots (matplotlib, Agg, PNG files next to the report)
# ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_pass1(runs: dict[str, dict[str, dict]], path: str | os.PathLike) -> Path:
    """Grouped bars: baseline and ETCHR Pass@1 per task, the delta written above each pair; with
    several runs (`runs`: label -> summary), one pair of bars per run and task, side by side."""
    import numpy as np

    plt = _plt()
    tasks = sorted({t for s in runs.values() for t in s})
    n_runs = len(runs)
    width = 0.8 / (2 * n_runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) * n_runs + 2), 4.2))
    x = np.arange(len(tasks))
    for k, (label, summary) in enumerate(runs.items()):
        base = [summary.get(t, {}).get("baseline_pass1") for t in tasks]
        etchr = [summary.get(t, {}).get("etchr_pass1") for t in tasks]
        off = (2 * k - n_runs) * width + width / 2
        tag = f" ({label})" if n_runs > 1 else ""
        ax.bar(x + off, [b or 0 for b in base], width, label=f"baseline{tag}", color=f"C{2 * k}", alpha=0.55)
        bars = ax.bar(x + off + width, [e or 0 for e in etchr], width, label=f"ETCHR{tag}", color=f"C{2 * k + 1}")
        for bar, b, e in zip(bars, base, etchr):
            if b is not None and e is not None:
                ax.annotate(f"{e - b:+.1f}", (bar.get_x() + bar.get_width() / 2, max(b, e)), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("Pass@1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Pass@1: baseline vs ETCHR (delta above the bars)")
    ax.legend(fontsize=8, ncol=max(1, n_runs))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_verify_gate(runs: dict[str, dict[str, dict]], path: str | os.PathLike) -> Path:
    """One point per task: verify accept rate (x) against ETCHR accuracy on accepted (filled) and on
    rejected (open) items: if the gate helps, accepted items sit above rejected ones."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    markers = "osD^v<>p"
    for k, (label, summary) in enumerate(runs.items()):
        tag = f" ({label})" if len(runs) > 1 else ""
        for t, s in sorted(summary.items()):
            rate = s.get("verify_accept_rate")
            if rate is None:
                continue
            m = markers[k % len(markers)]
            if s.get("accuracy_accepted") is not None:
                ax.scatter(rate, s["accuracy_accepted"], marker=m, color=f"C{k}", label=f"accepted{tag}")
            if s.get("accuracy_rejected") is not None:
                ax.scatter(rate, s["accuracy_rejected"], marker=m, facecolors="none", edgecolors=f"C{k}",
                           label=f"rejected{tag}")
            ys = [v for v in (s.get("accuracy_accepted"), s.get("accuracy_rejected")) if v is not None]
            if ys:
                ax.annotate(t, (rate, max(ys)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.set_xlabel("verify accept rate (%)")
    ax.set_ylabel("ETCHR accuracy (%)")
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    ax.set_title("Does the verify gate help? (filled: accepted, open: rejected)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# HTML: one page plus its folder report_assets/ (plots, thumbnails, full-size originals, row pages).
# The page embeds a compact index of every row (id, task, flags); the rows themselves live in page
# files (report_assets/rows/<n>.js) loaded on demand, so a 10,000-row run opens at once and works
# from file:// (script tags load there, fetch() does not).
# ----------------------------------------------------------------------------------------------
ROWS_PER_PAGE = 50


def flip(row: dict) -> Optional[str]:
    """'improved' (baseline wrong, ETCHR right), 'regressed' (the reverse), else None."""
    b, e = row.get("baseline_score"), row.get("etchr_score")
    if b is None or e is None or row.get("status") != "ok":
        return None
    if e >= 1 > b:
        return "improved"
    if b >= 1 > e:
        return "regressed"
    return None


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def _save_image(img, dst: Path, *, thumb: bool) -> Optional[str]:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if thumb:
            img = img.convert("RGB")
            img.thumbnail((192, 192))
            img.save(dst, format="JPEG", quality=85)
        else:
            img.save(dst, format="PNG")
        return dst.name
    except (OSError, ValueError):
        return None


def _row_view(r: dict, run_dir: Path, assets: Path, original) -> dict:
    """What the page shows of one row (long texts folded by the page)."""
    from PIL import Image

    key = f"{r['task']}/{r['id']}"
    safe = _safe(key)
    view = {"id": str(r["id"]), "task": r["task"], "status": r.get("status"), "question": r.get("question"),
            "gt": r.get("gt"), "accepted": r.get("accepted"), "flip": flip(r), "errors": r.get("errors") or {},
            "verify": r.get("verify_response")}
    for stage in ("baseline", "etchr"):
        view[stage] = {"pred": r.get(f"{stage}_pred"), "score": r.get(f"{stage}_score"),
                       "response": r.get(f"{stage}_response"), "error": r.get(f"{stage}_error"),
                       "note": r.get(f"{stage}_note")}
    if original is not None:
        full = assets / "full" / f"{safe}_orig.png"
        thumb = assets / "thumbs" / f"{safe}_orig.jpg"
        try:
            img = original() if not (full.is_file() and thumb.is_file()) else None
        except Exception:  # an undecodable original is that row's failure, shown as such
            img = None
        if img is not None:
            _save_image(img, full, thumb=False)
            _save_image(img.copy(), thumb, thumb=True)
        if full.is_file():
            view["orig_full"] = os.path.relpath(full, run_dir)
        if thumb.is_file():
            view["orig_thumb"] = os.path.relpath(thumb, run_dir)
    if r.get("edit_path") and (run_dir / r["edit_path"]).is_file():
        view["edit_full"] = r["edit_path"]
        thumb = assets / "thumbs" / f"{safe}_edit.jpg"
        if not thumb.is_file():
            try:
                with Image.open(run_dir / r["edit_path"]) as im:
                    _save_image(im, thumb, thumb=True)
            except OSError:
                pass
        if thumb.is_file():
            view["edit_thumb"] = os.path.relpath(thumb, run_dir)
    return view


def _js_literal(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, default=str).replace("</", "<\\/")


def write_html(run_dir: str | os.PathLike, rows_by_task: dict[str, list[dict]], summary: dict[str, dict],
               originals: dict[str, Any], meta: dict, rows_per_page: int = ROWS_PER_PAGE) -> Path:
    """report.html: summary table, plots, and every row of every task (original | edit | verdict with
    the verify response | answers with their responses | ground truth | failure reason | flip marker),
    filterable (flips, improved, regressed, failures, accepted, rejected) and paginated.

    `originals` maps "task/id" to a callable returning the original PIL image (decoded lazily)."""
    run_dir = Path(run_dir)
    assets = run_dir / "report_assets"
    rows_dir = assets / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for old in rows_dir.glob("*.js"):  # a rerun's pages replace the last run's
        old.unlink()
    plots = {"pass1": plot_pass1({"run": summary}, assets / "pass1.png").name,
             "gate": plot_verify_gate({"run": summary}, assets / "verify_gate.png").name}
    index, page, n_page = [], [], 0

    def flush() -> None:
        nonlocal page, n_page
        if page:
            atomic_write_text(rows_dir / f"{n_page}.js", f"ETCHR.loaded({n_page}, {_js_literal(page)});\n")
            n_page += 1
            page = []

    for task, rows in rows_by_task.items():
        for r in rows:
            view = _row_view(r, run_dir, assets, originals.get(f"{task}/{r['id']}"))
            index.append({"t": task, "i": view["id"], "p": n_page, "k": len(page),
                          "f": view["flip"], "s": view["status"], "a": view["accepted"]})
            page.append(view)
            if len(page) == rows_per_page:
                flush()
    flush()
    esc = html.escape
    head_rows = "".join(f"<tr><td>{esc(task)}</td>" + "".join(f"<td>{esc(_fmt(s.get(k)))}</td>" for k, _ in COLUMNS)
                        + "</tr>" for task, s in summary.items())
    page_html = _PAGE.format(
        mllm=esc(str(meta.get("mllm_model"))), editor=esc(str(meta.get("pipe_path"))),
        lora=(" + LoRA <code>" + esc(str(meta["lora_path"])) + "</code>") if meta.get("lora_path") else "",
        head="".join(f"<th>{esc(lbl)}</th>" for _, lbl in COLUMNS), summary_rows=head_rows,
        pass1=f"report_assets/{plots['pass1']}", gate=f"report_assets/{plots['gate']}",
        tasks="".join(f"<option>{esc(t)}</option>" for t in rows_by_task),
        index=_js_literal(index), per_page=int(rows_per_page),
        meta=esc(json.dumps(meta, indent=1, default=str)[:50000]))
    path = run_dir / "report.html"
    atomic_write_text(path, page_html)
    return path


_PAGE = """<!doctype html><html><head><meta charset='utf-8'><title>ETCHR evaluation</title><style>
body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 6px;vertical-align:top;font-size:13px}}
.ok{{color:#070}}.bad{{color:#a00}}.fail{{background:#fee}}pre{{white-space:pre-wrap;max-width:30em;margin:0}}
.improved{{background:#e6f6e6}}.regressed{{background:#fbeaea}}.plots img{{max-width:48%;margin-right:1%}}
#bar button.on{{font-weight:bold}}.flip{{font-weight:bold}}
</style></head><body><h1>ETCHR Edit-Verify-Reason</h1>
<p>MLLM <code>{mllm}</code>, editor <code>{editor}</code>{lora}.</p>
<table><tr><th>task</th>{head}</tr>{summary_rows}</table>
<div class='plots'><img id='plot-pass1' src='{pass1}' alt='Pass@1 per task'><img id='plot-gate' src='{gate}' alt='verify gate'></div>
<h2>Items</h2>
<div id='bar'>task <select id='task'><option value=''>all</option>{tasks}</select>
show <select id='filter'><option value='all'>all</option><option value='flips'>flips</option>
<option value='improved'>improved (baseline wrong, ETCHR right)</option><option value='regressed'>regressed</option>
<option value='failures'>failures</option><option value='accepted'>accepted</option><option value='rejected'>rejected</option></select>
<button id='prev'>&lt; prev</button> <span id='where'></span> <button id='next'>next &gt;</button></div>
<table id='items'><thead><tr><th>id / question</th><th>original</th><th>edit</th><th>verdict</th><th>baseline answer</th>
<th>ETCHR answer</th><th>ground truth</th></tr></thead><tbody id='body'></tbody></table>
<details><summary>run metadata</summary><pre>{meta}</pre></details>
<script>
var INDEX = {index}; var PER_PAGE = {per_page};
var ETCHR = {{pages: {{}}, want: {{}}, loaded: function(n, rows) {{ this.pages[n] = rows; render(); }}}};
var state = {{task: '', filter: 'all', page: 0}};
function esc(s) {{ return String(s === null || s === undefined ? '' : s).replace(/[&<>"']/g, function(c) {{
  return {{'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}}[c]; }}); }}
function fold(text, n) {{ text = String(text === null || text === undefined ? '' : text);
  return text.length <= n ? esc(text) : esc(text.slice(0, n)) + '&hellip;<details><summary>full text</summary><pre>' + esc(text) + '</pre></details>'; }}
function keep(e) {{ if (state.task && e.t !== state.task) return false; var f = state.filter;
  if (f === 'flips') return !!e.f; if (f === 'improved' || f === 'regressed') return e.f === f;
  if (f === 'failures') return e.s !== 'ok'; if (f === 'accepted') return e.a === true; if (f === 'rejected') return e.a === false;
  return true; }}
function selected() {{ return INDEX.filter(keep); }}
function need(p) {{ if (ETCHR.pages[p] || ETCHR.want[p]) return; ETCHR.want[p] = 1; var s = document.createElement('script');
  s.src = 'report_assets/rows/' + p + '.js'; document.head.appendChild(s); }}
function img(thumb, full) {{ if (!thumb) return '-'; var i = "<img loading='lazy' src='" + esc(thumb) + "'>";
  return full ? "<a href='" + esc(full) + "' target='_blank'>" + i + "</a>" : i; }}
function answer(a) {{ if (a.error) return "<span class='bad'>request failed: " + esc(a.error) + "</span>";
  if (a.pred === null && a.response === null) return '-';
  var mark = (a.score || 0) >= 1 ? 'ok' : 'bad';
  return "<span class='" + mark + "'>" + esc(a.pred === null ? '(no answer extracted)' : a.pred) + "</span>" +
    (a.note ? '<br><small>' + esc(a.note) + '</small>' : '') +
    '<details><summary>response</summary><pre>' + esc(a.response) + '</pre></details>'; }}
function row(r) {{ var cls = r.status !== 'ok' ? 'fail' : (r.flip || '');
  var verdict = r.accepted === true ? "<span class='ok'>accepted</span>" : r.accepted === false ? "<span class='bad'>rejected</span>" : '-';
  if (r.verify !== null && r.verify !== undefined) verdict += '<details><summary>verify response</summary><pre>' + esc(r.verify) + '</pre></details>';
  var flipm = r.flip === 'improved' ? "<span class='flip ok' title='baseline wrong, ETCHR right'>&#9650; improved</span><br>" :
              r.flip === 'regressed' ? "<span class='flip bad' title='baseline right, ETCHR wrong'>&#9660; regressed</span><br>" : '';
  var errs = Object.keys(r.errors || {{}}).map(function(k) {{ return "<div class='bad reason'>" + esc(k) + ': ' + esc(r.errors[k]) + '</div>'; }}).join('');
  return "<tr class='item " + cls + "' data-id='" + esc(r.task + '/' + r.id) + "'><td>" + flipm + '<b>' + esc(r.task) + '/' + esc(r.id) + '</b><br><small>' +
    fold(r.question, 300) + '</small>' + errs + '</td><td>' + img(r.orig_thumb, r.orig_full) + '</td><td>' + img(r.edit_thumb, r.edit_full) +
    '</td><td>' + verdict + '</td><td>' + answer(r.baseline) + '</td><td>' + answer(r.etchr) + '</td><td>' + esc(r.gt) + '</td></tr>'; }}
function render() {{ var sel = selected(); var pages = Math.max(1, Math.ceil(sel.length / PER_PAGE));
  if (state.page >= pages) state.page = pages - 1; var part = sel.slice(state.page * PER_PAGE, (state.page + 1) * PER_PAGE);
  var missing = part.filter(function(e) {{ return !ETCHR.pages[e.p]; }});
  document.getElementById('where').textContent = 'page ' + (state.page + 1) + ' of ' + pages + ' (' + sel.length + ' items)';
  if (missing.length) {{ missing.forEach(function(e) {{ need(e.p); }}); return; }}
  document.getElementById('body').innerHTML = part.map(function(e) {{ return row(ETCHR.pages[e.p][e.k]); }}).join(''); }}
function go() {{ state.task = document.getElementById('task').value; state.filter = document.getElementById('filter').value;
  location.hash = 'task=' + encodeURIComponent(state.task) + '&filter=' + state.filter + '&page=' + (state.page + 1); render(); }}
function fromHash() {{ var h = {{}}; location.hash.slice(1).split('&').forEach(function(kv) {{ var p = kv.split('=');
  if (p[0]) h[p[0]] = decodeURIComponent(p[1] || ''); }});
  if (h.task !== undefined) {{ state.task = h.task; document.getElementById('task').value = h.task; }}
  if (h.filter) {{ state.filter = h.filter; document.getElementById('filter').value = h.filter; }}
  if (h.page) state.page = Math.max(0, parseInt(h.page, 10) - 1); }}
document.getElementById('task').onchange = function() {{ state.page = 0; go(); }};
document.getElementById('filter').onchange = function() {{ state.page = 0; go(); }};
document.getElementById('prev').onclick = function() {{ if (state.page > 0) {{ state.page--; go(); }} }};
document.getElementById('next').onclick = function() {{ state.page++; go(); }};
fromHash(); render();
</script></body></html>
"""
