#!/usr/bin/env python
"""plot_frontier: the speed-fidelity frontier of the editor's speed options from bench_edit's JSONL.

    python scripts/bench/plot_frontier.py results.jsonl [more.jsonl ...] [--out docs/edit_frontier.png]

Two panels: seconds per edit against PSNR of the decoded edit (dB, higher is better) and against the
relative error of the final latents (lower is better), both against the plain edit of the same run.
Every variant row of every file is a point (labelled with its variant; a file's header names the
editor, so rows of a 9B-shape run and of a nano-editor run are drawn in separate colours); the points
no other point beats on both time and fidelity (the Pareto frontier) are joined by a line.
Rows with an error and the --second-start rows are skipped; a row without one of the two fidelity
figures (a transcribed measurement) is drawn on the other panel only. Exact edits sit at 100 dB and, on
the log axis, at a latent error of 1e-7.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_runs(paths: list[str]) -> list[dict]:
    """-> [{"label": ..., "rows": [variant rows]}], one per header (a file may hold several runs)."""
    runs: list[dict] = []
    for path in paths:
        current = None
        for k, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{k}: not JSON ({exc})") from None
            if "header" in obj:
                h = obj["header"]
                editor = "tiny (CPU)" if h.get("tiny") else (Path(h["pipeline"]).name if h.get("pipeline") else "9B shape")
                current = {"label": f"{editor}, {h.get('card', '?')}, {h.get('date', '?')}, {h.get('steps')} steps, "
                                    f"CFG {h.get('guidance')}" + (f" ({h['source']})" if h.get("source") else ""),
                           "rows": [], "second_start": bool(h.get("second_start"))}
                runs.append(current)
            elif "variant" in obj and "seconds" in obj and "error" not in obj:
                if current is None:
                    raise ValueError(f"{path}:{k}: a variant row before any header")
                current["rows"].append(obj)
    runs = [r for r in runs if r["rows"] and not r["second_start"]]
    if not runs:
        raise ValueError(f"no variant rows with timings in {', '.join(paths)}")
    return runs


def pareto(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (x = seconds, lower is better), by x."""
    sign = 1 if higher_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    best, keep = None, []
    for i in order:
        y = sign * points[i][1]
        if best is None or y > best:
            keep.append(i)
            best = y
    return keep


def plot(runs: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    # Exact edits (PSNR 100, bench_edit's mark for mse 0) are drawn as triangles at the top of the PSNR
    # panel, so that the approximate ones keep a readable scale.
    finite = [r["psnr_db"] for run in runs for r in run["rows"] if r.get("psnr_db") is not None and r["psnr_db"] < 100]
    top = (max(finite) + 2.0) if finite else 100.0
    for c, run in enumerate(runs):
        color = f"C{c}"
        for ax, key, better_high, name in ((axes[0], "psnr_db", True, "PSNR vs plain (dB)"),
                                           (axes[1], "latent_rel_err", False, "latent rel. error vs plain")):
            rows = [r for r in run["rows"] if r.get(key) is not None]  # a transcribed row may lack one
            if not rows:
                continue
            if key == "latent_rel_err":
                pts = [(r["seconds"], max(r[key], 1e-7)) for r in rows]
            else:
                pts = [(r["seconds"], min(r[key], top)) for r in rows]
            exact = [r.get("psnr_db", 0) >= 100 for r in rows]
            for flag, marker in ((False, "o"), (True, "^")):
                sel = [p for p, e in zip(pts, exact) if e == flag]
                if sel:
                    ax.scatter([p[0] for p in sel], [p[1] for p in sel], color=color, marker=marker, zorder=3,
                               label=(run["label"] if not flag or not any(not e for e in exact) else None)
                               if ax is axes[0] else None)
            for r, p in zip(rows, pts):
                ax.annotate(r["variant"], p, fontsize=7, xytext=(4, 3), textcoords="offset points")
            front = pareto(pts, better_high)
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color=color, alpha=0.5, zorder=2)
            ax.set_xlabel("seconds per edit")
            ax.set_ylabel(name)
            if key == "latent_rel_err":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0].set_title("speed vs PSNR (up-left is better; triangles: exact)")
    axes[1].set_title("speed vs latent error (down-left is better; exact at 1e-7)")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=1)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * len(runs), 1, 1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_name(f".{Path(out).name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", nargs="+", help="bench_edit --out files")
    ap.add_argument("--out", default="docs/edit_frontier.png")
    a = ap.parse_args(argv)
    try:
        runs = read_runs(a.jsonl)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plot(runs, a.out)
    n = sum(len(r["rows"]) for r in runs)
    print(f"{a.out}: {n} variants from {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
