"""The README demo, run as users run it (a subprocess of the real script): the whole chain."""

import json
import subprocess
import sys

import pytest

from conftest import REPO


# The demo's own limit is 1500 s; the test's (pytest-timeout) must be above it, not the global 600 s.
@pytest.mark.timeout(1800)
def test_demo_runs_the_whole_chain(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout
    assert "RANDOM weights" in out and "server stopped" in out and "answer   :" in out
    # SFT -> merge -> RL -> merge -> evaluation, each through its real entry script
    sft_meta = json.loads((tmp_path / "models" / "sft-merged" / "meta.json").read_text())
    rl_meta = json.loads((tmp_path / "models" / "rl-merged" / "meta.json").read_text())
    assert sft_meta["tree"] == "sft" and rl_meta["tree"] == "rl"
    assert rl_meta["parents"][0]["tree"] == "sft"  # the RL model's lineage goes back through SFT
    run = tmp_path / "runs" / "eval"
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["tasks"]) == 11 and (run / "report.html").is_file()
    assert "| row | V* | HRBench-4K | HRBench-8K | ChartQA | CharXiv-DQ | CharXiv-RQ | Maze | FrozenLake |" in out
    assert summary["meta"]["pipe_path"].endswith("rl-merged")
    # Results at a glance: the report's plots, the training curves of both runs, one overlay of both.
    from PIL import Image

    for png in (run / "report_assets" / "pass1.png", run / "report_assets" / "verify_gate.png",
                tmp_path / "runs" / "sft" / "curves.png", tmp_path / "runs" / "rl" / "curves.png"):
        with Image.open(png) as im:
            im.verify()
    overlay = tmp_path / "overlay.png"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_run.py"), str(tmp_path / "runs" / "sft"),
                          str(tmp_path / "runs" / "rl"), "--out", str(overlay)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and overlay.stat().st_size > 5000, res.stderr[-2000:]
