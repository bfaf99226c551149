"""The README demo, run as users run it (a subprocess of the real script)."""

import subprocess
import sys

from conftest import REPO


def test_demo_runs_end_to_end(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "RANDOM weights" in res.stdout and "server stopped" in res.stdout
    assert (tmp_path / "edit.png").is_file() and (tmp_path / "original.png").is_file()
    assert "answer   :" in res.stdout
    run = tmp_path / "runs" / "eval"
    assert (run / "report.html").is_file() and (run / "summary.md").is_file()
    assert len((run / "results.jsonl").read_text().splitlines()) == 8
    assert "| dl3dv | 8 |" in res.stdout
