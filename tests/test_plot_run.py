"""scripts/plot_run.py: overlays two runs from metrics.jsonl (subprocess), tolerates a torn last line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _run_dir(root: Path, name: str, scale: float, torn: bool) -> Path:
    d = root / name
    d.mkdir()
    rows = [{"step": s, "time": 0.0, "loss": scale / s, "lr": 1e-4} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (d / "metrics.jsonl").write_text(text + ('{"step": 6, "loss"' if torn else ""))
    return d


def test_overlay_of_two_runs_with_a_torn_tail(tmp_path):
    a, b = _run_dir(tmp_path, "run_a", 1.0, torn=True), _run_dir(tmp_path, "run_b", 2.0, torn=False)
    out = tmp_path / "cmp.png"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(a), str(b), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape[0] > 100 and im.shape[1] > 100
    assert im.std() > 5  # not blank: axes, lines, text
    assert not list(tmp_path.glob(".*.tmp"))


def test_broken_middle_line_is_an_error_naming_the_line(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(d), "--out", str(tmp_path / "x.png")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "line 2" in res.stderr and not (tmp_path / "x.png").exists()
