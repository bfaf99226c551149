"""Running evaluate.py / inference_dl3dv.py as a user would (subprocesses), for the entry-point tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parents[1]
REPO = EVAL_DIR.parent
CONFIG = str(REPO / "configs" / "eval" / "tiny_demo.yaml")


def run_eval(args: list[str], *, script="evaluate.py", timeout=600, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EVAL_DIR / script)] + args, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env or os.environ.copy())


def base_args(tiny_models, run_dir, data, url, model, extra=()):
    return ["--config", CONFIG, f"editor.pipe_path={tiny_models.flux}", f"mllm.model={model}",
            f"mllm.endpoints=[{url}]", f"tasks.dl3dv.path={data}", f"run_dir={run_dir}", *extra]


def rows_of(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "results.jsonl").read_text().splitlines() if line.strip()]


def ok(res):
    assert res.returncode == 0, f"exit {res.returncode}\nSTDOUT\n{res.stdout[-4000:]}\nSTDERR\n{res.stderr[-6000:]}"
    return res


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
