#!/usr/bin/env python
"""Plot the training curves of one run, or overlay several, from their metrics.jsonl only.

    python scripts/plot_run.py runs/sft/klein9b_lora_r768 [--out curves.png]
    python scripts/plot_run.py runs/rl/a runs/rl/b --out compare.png [--keys loss,reward/guidance]

One panel per metric name (same names share an axis), one colour per run, legend = run dir names.
An unterminated last line (a row being written, or torn by a kill) is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SKIP = {"step", "time"}


def read_rows(path: Path) -> list[dict]:
    """metrics.jsonl rows; a torn last line is dropped, a broken line elsewhere names the file and line."""
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if n == len(lines):  # torn tail
                break
            raise ValueError(f"{path}: line {n} is not JSON ({exc})") from None
    return rows


def numeric_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """name -> (steps, values), last row of a step wins (a resumed run rewrites steps), sorted by step."""
    by: dict[str, dict[int, float]] = {}
    for r in rows:
        if "step" not in r:
            continue
        for k, v in r.items():
            if k not in SKIP and isinstance(v, (int, float)) and not isinstance(v, bool):
                by.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in by.items()}


def plot(run_dirs: list[Path], out: Path, keys: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        f = d / "metrics.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no metrics.jsonl (is {d} a run dir?)")
        runs.append((d, numeric_series(read_rows(f))))
    names = keys or sorted({k for _, s in runs for k in s})
    if not names:
        raise ValueError(f"no numeric metrics in {', '.join(str(d) for d in run_dirs)}")
    cols = 2 if len(names) > 3 else 1
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 2.3 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        ax = axes[i // cols, i % cols]
        for r, (d, series) in enumerate(runs):
            if name in series:
                steps, values = series[name]
                ax.plot(steps, values, color=colours[r % len(colours)], label=d.name,
                        marker="." if len(steps) < 50 else None)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    for j in range(len(names), nrows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    tmp.replace(out)  # no half-written PNG under the final name
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", type=Path, help="run dirs holding metrics.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="PNG (default: RUN_DIR/curves_all.png for one run, "
                                                          "./runs_compare.png for several)")
    ap.add_argument("--keys", default=None, help="comma-separated metric names (default: all numeric ones)")
    args = ap.parse_args(argv)
    out = args.out or (args.run_dirs[0] / "curves_all.png" if len(args.run_dirs) == 1 else Path("runs_compare.png"))
    keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
    try:
        print(plot(args.run_dirs, out, keys))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
