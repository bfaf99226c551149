"""Fixtures shared by every tree's tests: the tiny models and the real local MLLM server.

This file is test scaffolding, not package code: the trees' packages still never import each other.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Tests never touch the network or a hub, and wandb stays offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------
# Every subprocess a test starts dies with it (one place for all trees' tests). The pytest process's
# subprocess.Popen is replaced by GuardedPopen: the child gets its own process group and, on Linux,
# PR_SET_PDEATHSIG (SIGKILL), so it dies even when pytest is SIGKILLed; after each test the groups of
# the processes its body started are killed (also when pytest-timeout fails the test); and a wait on a
# child is cut to the time the test has left, so a subprocess limit never outlives the test's limit.
# ---------------------------------------------------------------------------------------------------

_MARGIN_S = 15.0  # a clamped subprocess wait ends this long before pytest-timeout would fire
_TEST_DEADLINE: list[float | None] = [None]  # monotonic deadline of the running test, None outside one
_STARTED: list[subprocess.Popen] = []  # every child started in this pytest process, in order
_PRCTL = None
if sys.platform.startswith("linux"):
    try:  # loaded before any fork: the child then only calls a function pointer
        import ctypes

        _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        _PRCTL = None


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """preexec_fn: the child gets SIGKILL when its parent dies, even by SIGKILL (Linux; no-op elsewhere)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class GuardedPopen(subprocess.Popen):
    """subprocess.Popen for the test process: own process group, dies with pytest, tracked for teardown.

    Arguments the caller passes itself (preexec_fn, start_new_session, process_group) are kept. The
    death signal is set only from the main thread: Linux sends it when the forking THREAD exits.
    """

    def __init__(self, *args, **kwargs):
        if "start_new_session" not in kwargs and kwargs.get("process_group") is None:
            kwargs["start_new_session"] = True
        if kwargs.get("preexec_fn") is None and threading.current_thread() is threading.main_thread():
            kwargs["preexec_fn"] = die_with_parent
        super().__init__(*args, **kwargs)
        try:
            self.guard_pgid = os.getpgid(self.pid)
        except ProcessLookupError:
            self.guard_pgid = None
        self.guard_per_test = _started_by_project_code()
        _STARTED.append(self)

    def _clamp(self, timeout):
        deadline = _TEST_DEADLINE[0]
        if timeout is None or deadline is None:
            return timeout
        return max(1.0, min(timeout, deadline - _MARGIN_S - time.monotonic()))

    def communicate(self, input=None, timeout=None):
        return super().communicate(input, self._clamp(timeout))

    def wait(self, timeout=None):
        return super().wait(self._clamp(timeout))


def _started_by_project_code() -> bool:
    """True if the first caller outside subprocess/asyncio is a file of this repository (a test, a script):
    library pools (e.g. torch's compile workers) live on to session end instead of dying after each test."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.endswith(("subprocess.py", __file__)) or f"{os.sep}asyncio{os.sep}" in name):
            path = Path(name)
            return path.is_relative_to(REPO) and ".venv" not in path.relative_to(REPO).parts
        f = f.f_back
    return False


def kill_process_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (its own group only, never pytest's) and reap the child."""
    pgid = getattr(proc, "guard_pgid", None)
    if pgid is not None and pgid != os.getpgrp():
        try:
            os.killpg(pgid, signal.SIGKILL)  # also the grandchildren left after the child exited
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


if hasattr(subprocess.Popen, "guard_registry"):  # this file imported a second time (`from conftest import`):
    GuardedPopen = subprocess.Popen  # one guard, one registry per process
    _STARTED, _TEST_DEADLINE = GuardedPopen.guard_registry, GuardedPopen.guard_deadline
else:
    GuardedPopen.guard_registry, GuardedPopen.guard_deadline = _STARTED, _TEST_DEADLINE
    subprocess.Popen = GuardedPopen  # subprocess.run/check_output/asyncio look the name up at call time


def _test_limit_s(item) -> float | None:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0]) or None
    if marker is not None and "timeout" in marker.kwargs:
        return float(marker.kwargs["timeout"]) or None
    try:
        return float(item.config.getini("timeout")) or None
    except (TypeError, ValueError):  # pytest-timeout absent, or no global limit
        return None


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    limit = _test_limit_s(item)  # pytest-timeout counts setup + call + teardown
    _TEST_DEADLINE[0] = None if limit is None else time.monotonic() + limit
    try:
        yield
    finally:
        _TEST_DEADLINE[0] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    first = len(_STARTED)
    try:
        yield
    finally:  # what the test body started does not outlive it (fixtures stop their own servers)
        mine = [p for p in _STARTED[first:] if p.guard_per_test]
        for proc in mine:
            kill_process_tree(proc)
        _STARTED[first:] = [p for p in _STARTED[first:] if not p.guard_per_test]


def pytest_sessionfinish(session, exitstatus):
    for proc in _STARTED:  # fixtures of every scope are done by now
        kill_process_tree(proc)
    _STARTED.clear()


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts are tools, not a package)."""
    path = REPO / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"etchr_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TinyModels:
    def __init__(self, root: Path):
        self.root = root
        self.flux = root / "flux2-klein-tiny"
        self.qwen = root / "qwen3-vl-tiny"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """The tiny FLUX.2-klein pipeline and Qwen3-VL, built once per test session (seed 0)."""
    prebuilt = os.environ.get("ETCHR_TINY_MODELS_DIR")  # reuse a build (subprocess tests, local loops)
    if prebuilt and (Path(prebuilt) / "flux2-klein-tiny" / "model_index.json").is_file():
        return TinyModels(Path(prebuilt))
    root = tmp_path_factory.mktemp("tiny_models")
    load_script("make_tiny_models").build(root, seed=0)
    return TinyModels(root)


@pytest.fixture(scope="session")
def mllm_server(tiny_models, tmp_path_factory):
    """A real `transformers serve` with the tiny Qwen3-VL on 127.0.0.1; stopped at session end."""
    srv_mod = load_script("local_mllm_server")
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = srv_mod.LocalMLLMServer(tiny_models.qwen, log_path=log).start()
    pid_file = os.environ.get("ETCHR_TEST_SERVER_PID_FILE")  # lets the cleanup test find the pid
    if pid_file:
        Path(pid_file).write_text(str(server.pid))
    try:
        yield server
    finally:
        server.stop()
