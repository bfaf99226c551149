"""Evaluation test fixtures: DL3DV-schema parquet files and the scriptable test-double server.

Modules are loaded by path (not via sys.path) so that no `conftest` / helper name can shadow another
tree's or the repo root's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EVAL_DIR = HERE.parent
REPO = EVAL_DIR.parent


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


double_server_mod = _load("etchr_eval_tests_double_server", HERE / "double_server.py")
fixture_mod = _load("etchr_scripts_make_dl3dv_fixture", REPO / "scripts" / "make_dl3dv_fixture.py")
# Entry-point helpers (run_eval, base_args, ...): test modules take it as sys.modules["etchr_eval_tests_evalrun"].
evalrun_mod = _load("etchr_eval_tests_evalrun", HERE / "evalrun.py")


@pytest.fixture(scope="session")
def dl3dv_parquet(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "dl3dv.parquet"
    fixture_mod.make(str(path), n=6, seed=0)
    return path


@pytest.fixture
def double_server():
    with double_server_mod.DoubleServer() as srv:
        yield srv


@pytest.fixture
def make_double_server():
    servers = []

    def make(**kw):
        srv = double_server_mod.DoubleServer(**kw).__enter__()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.__exit__(None, None, None)


@pytest.fixture
def dead_url():
    """An OpenAI base URL on a port nothing listens on (bound, then released)."""
    import socket

    def make() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{s.getsockname()[1]}/v1"

    return make


@pytest.fixture
def make_dl3dv():
    """make_dl3dv(path, n, seed): write a DL3DV-schema parquet of procedural scenes."""
    return lambda path, n=6, seed=0: fixture_mod.make(str(path), n=n, seed=seed)
