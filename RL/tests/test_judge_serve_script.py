"""scripts/rl/serve_judge.sh with the stand-in `vllm` (tests/fakes/vllm): one server per GPU on consecutive
ports, the judge.endpoints line, the key passed as $VLLM_API_KEY (never on the command line nor in the
log) and enforced, and no server left behind when the script is stopped or a server dies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "rl" / "serve_judge.sh"

FAKE_VLLM = REPO / "tests" / "fakes" / "vllm"  # the shared stand-in: /health, /v1/models, chat


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
    env = dict(os.environ, VLLM=str(FAKE_VLLM), FAKE_VLLM_LOG=str(tmp_path / "calls.jsonl"),
               LOG_DIR=str(tmp_path / "logs"), READY_TIMEOUT="60")
    env.pop("VLLM_API_KEY", None)
    return env, tmp_path


def _models_status(port: int, key) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["data"][0]["id"] == "Qwen/Qwen3-VL-8B-Instruct"
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


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
        assert "sekrit-key" not in text and "VLLM_API_KEY" in text  # the key is never printed
        # the servers start in the background, so their calls land in either order: sort by GPU
        calls = sorted((json.loads(line) for line in (tmp / "calls.jsonl").read_text().splitlines()),
                       key=lambda c: c["cuda_visible_devices"])
        assert len(calls) == 2
        assert [c["cuda_visible_devices"] for c in calls] == ["0", "1"]
        assert f"--port {port} " in " ".join(calls[0]["argv"]) + " "  # GPU i serves BASE_PORT + i
        assert calls[0]["argv"][:2] == ["serve", "Qwen/Qwen3-VL-8B-Instruct"]
        argv = " ".join(calls[1]["argv"])
        assert f"--host 127.0.0.1 --port {port + 1}" in argv
        assert all(c["vllm_api_key_env"] and "--api-key" not in c["argv"] and "sekrit-key" not in " ".join(c["argv"])
                   for c in calls)  # through the environment, so ps never shows it
        assert calls[1]["argv"][-2:] == ["--max-num-seqs", "8"]  # extra arguments pass through
        assert _models_status(port, "sekrit-key") == 200 and _models_status(port + 1, None) == 401
        logs = "".join(p.read_text() for p in (tmp / "logs").iterdir())
        assert "sekrit-key" not in logs
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
