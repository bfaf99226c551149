"""Subprocesses started by tests die with them (root conftest.py's GuardedPopen), and the demo's steps die
with the demo: checked by SIGKILLing the parent and by a pytest-timeout expiry, on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]  # this checkout's conftest.py (the guard), also in a fresh clone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

INNER = '''
import os, subprocess, sys, time
import pytest

def test_parent_killed():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(os.environ["ETCHR_PIDFILE"], "w").write(str(child.pid))
    time.sleep(600)

@pytest.mark.timeout(3)
def test_timed_out():
    # sh exits when killed; the backgrounded sleep (a grandchild) is what a plain subprocess.run leaves behind
    subprocess.run(["sh", "-c", 'sleep 600 & echo $! > "$ETCHR_PIDFILE"; wait'], timeout=500)
'''


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _wait_for(path: Path, proc: subprocess.Popen, limit_s: float = 120) -> int:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if path.is_file() and path.read_text().strip():
            return int(path.read_text())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"{path} never written")


def _gone_within(pid: int, limit_s: float = 30) -> bool:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _pytest(tmp_path: Path, test: str, pidfile: Path) -> subprocess.Popen:
    (tmp_path / "test_inner.py").write_text(INNER)
    env = dict(os.environ, ETCHR_PIDFILE=str(pidfile), PYTHONPATH=str(REPO))
    # -p conftest: the project's root conftest (the guard) as a plugin of a run outside the repo
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                             "--rootdir", str(tmp_path), f"test_inner.py::{test}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_child_dies_when_pytest_is_sigkilled(tmp_path):
    pidfile = tmp_path / "child.pid"
    inner = _pytest(tmp_path, "test_parent_killed", pidfile)
    child = _wait_for(pidfile, inner)
    assert _alive(child)
    os.kill(inner.pid, signal.SIGKILL)  # no teardown runs: only PR_SET_PDEATHSIG can end the child
    inner.communicate(timeout=60)
    assert _gone_within(child), f"child {child} outlived the SIGKILLed pytest"


def test_grandchild_dies_when_pytest_timeout_fails_the_test(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    inner = _pytest(tmp_path, "test_timed_out", pidfile)
    out, _ = inner.communicate(timeout=300)
    assert inner.returncode == 1 and "Timeout" in out, out
    grandchild = int(pidfile.read_text())
    assert _gone_within(grandchild), f"grandchild {grandchild} outlived its timed-out test:\n{out}"


def test_demo_steps_die_with_the_demo(tmp_path):
    pidfile = tmp_path / "step.pid"
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('demo', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m.run_step('sleep', [sys.executable, '-c', "
            "'import os, sys, time; open(sys.argv[1], \"w\").write(str(os.getpid())); time.sleep(600)', sys.argv[2]])")
    demo = subprocess.Popen([sys.executable, "-c", code, str(REPO / "scripts" / "demo.py"), str(pidfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step = _wait_for(pidfile, demo)
    os.kill(demo.pid, signal.SIGKILL)
    demo.communicate(timeout=60)
    assert _gone_within(step), f"demo step {step} outlived the SIGKILLed demo"
