"""scripts/rl/serve_judge.sh with a stand-in `vllm` (a static HTTP server answering /health): one server
per GPU on consecutive ports, the judge.endpoints line, the key kept out of the log, and no server left
behind when the script is stopped or a server dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "rl" / "serve_judge.sh"

FAKE_VLLM = """#!/usr/bin/env bash
# Stand-in for `vllm serve MODEL ... --host H --port P ...`: records its arguments, serves /health.
echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $*" >> "$FAKE_LOG"
while [ $# -gt 0 ]; do
  case "$1" in --port) port=$2; shift;; --host) host=$2; shift;; esac
  shift
done
mkdir -p "$FAKE_ROOT/$port" && touch "$FAKE_ROOT/$port/health"
exec "$FAKE_PY" -m http.server "$port" --bind "$host" --directory "$FAKE_ROOT/$port"
"""


def _free_pair() -> int:
    """A port p with p and p + 1 both free (the script uses consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65000 and all(_free(q) for q in (p, p + 1)):
            return p
    raise RuntimeError("no two consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def fake_vllm(tmp_path):
    exe = tmp_path / "vllm"
    exe.write_text(FAKE_VLLM)
    exe.chmod(0o755)
    env = dict(os.environ, VLLM=str(exe), FAKE_LOG=str(tmp_path / "calls.log"), FAKE_ROOT=str(tmp_path / "www"),
               FAKE_PY=sys.executable, LOG_DIR=str(tmp_path / "logs"), READY_TIMEOUT="60")
    return env, tmp_path


def test_serves_one_judge_per_gpu_and_stops_them(fake_vllm):
    env, tmp = fake_vllm
    port = _free_pair()
    env.update(NGPU="2", BASE_PORT=str(port), ETCHR_JUDGE_API_KEY="sekrit-key")
    proc = subprocess.Popen(["bash", str(SCRIPT), "--max-num-seqs", "8"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if line.startswith("judge.endpoints="):
                break
        text = "".join(out)
        assert (f"judge.endpoints=[http://127.0.0.1:{port}/v1,http://127.0.0.1:{port + 1}/v1] "
                f"judge.model=Qwen/Qwen3-VL-8B-Instruct") in text, text
        assert "sekrit-key" not in text and "--api-key ***" in text  # echoed commands hide the key
        calls = (tmp / "calls.log").read_text().splitlines()
        assert len(calls) == 2
        assert calls[0].startswith("CUDA_VISIBLE_DEVICES=0 serve Qwen/Qwen3-VL-8B-Instruct")
        assert calls[1].startswith("CUDA_VISIBLE_DEVICES=1 ")
        assert f"--host 127.0.0.1 --port {port + 1}" in calls[1] and "--api-key sekrit-key" in calls[1]
        assert calls[1].endswith("--max-num-seqs 8")  # extra arguments pass through
        assert _listening(port) and _listening(port + 1)
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the script (its trap stops the servers)
        proc.wait(timeout=30)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (_listening(port) or _listening(port + 1)):
            time.sleep(0.2)
        assert not _listening(port) and not _listening(port + 1)
        assert proc.returncode != 0
    finally:  # if the trap failed, do not leave the stand-in servers behind (they share the script's group)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_server_that_dies_at_start_is_reported(fake_vllm):
    env, tmp = fake_vllm
    env.update(NGPU="1", BASE_PORT=str(_free_pair()), VLLM="false")
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "exited" in res.stderr and "judge_" in res.stderr
