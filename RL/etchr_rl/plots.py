"""Training curves of an RL run: run_dir/curves.png from run_dir/metrics.jsonl (matplotlib, Agg); edit grids."""

from __future__ import annotations

import io
import os
from pathlib import Path

from .runtime import atomic_write_bytes, read_metrics

CURVES_FILE = "curves.png"
# One panel per entry: (title, metric keys drawn on it).
FIXED_PANELS = (("judge failure rate", ("judge_failure_rate",)), ("clip fraction", ("clip_fraction",)),
                ("ratio (mean)", ("ratio_mean",)), ("KL", ("kl",)),
                ("phase seconds per iteration", ("rollout_s", "reward_s", "train_s")))


def rl_panels(rows: list[dict]) -> list:
    """One panel per reward seen in the rows (reward/<name>: mean per iteration), then the fixed ones;
    the KL panel only when kl was logged (optim.kl_coef > 0)."""
    rewards = sorted({k for r in rows for k in r if k.startswith("reward/")})
    logged = {k for r in rows for k in r}
    return [(k, (k,)) for k in rewards] + [p for p in FIXED_PANELS if p[0] != "KL" or "kl" in logged]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, one point per step (a rerun after resume overwrites the same steps: the
    last row of a step wins), sorted by step; rows without a numeric value are skipped."""
    by_step: dict[int, float] = {}
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in row:
            by_step[int(row["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def write_curves(run_dir: str | os.PathLike, panels=None, name: str = CURVES_FILE) -> Path:
    """Plot run_dir/metrics.jsonl (all of it: a resumed run continues its curves) into run_dir/name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    panels = rl_panels(rows) if panels is None else panels
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), squeeze=False, sharex=True)
    for ax, (title, keys) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = series(rows, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("optimizer step (rows logged once per iteration)")
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    out = run_dir / name
    atomic_write_bytes(out, buf.getvalue())  # a viewer never sees half a PNG
    return out


def compose_panel(source, edits: list, prompt: str, thumb: int = 256, max_lines: int = 8):
    """One PIL image: source | edits... (each fitted in thumb x thumb), the prompt wrapped beneath in PIL's
    default font (at most max_lines lines; longer prompts end with '...')."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [source, *edits]
    width = thumb * len(tiles)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap(prompt, lambda s: probe.textlength(s, font=font), width - 8)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [lines[max_lines - 1].rstrip() + " ..."]
    line_h = 14
    out = Image.new("RGB", (width, thumb + 8 + line_h * len(lines)), "white")
    for i, im in enumerate(tiles):
        t = im.convert("RGB").copy()
        t.thumbnail((thumb, thumb))
        out.paste(t, (i * thumb + (thumb - t.width) // 2, (thumb - t.height) // 2))
    draw = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        draw.text((4, thumb + 4 + n * line_h), line, fill=(0, 0, 0), font=font)
    return out


def wrap(text: str, measure, width: float) -> list[str]:
    """Greedy word wrap of `text` so that measure(line) <= width (a single over-long word is cut)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            while measure(word) > width and len(word) > 1:  # cut a word wider than the line
                k = len(word)
                while k > 1 and measure(word[:k]) > width:
                    k -= 1
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:k])
                word = word[k:]
            cand = f"{line} {word}" if line else word
            if measure(cand) <= width:
                line = cand
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def stack(images: list):
    """Images one under another on white (left-aligned)."""
    from PIL import Image

    out = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out
