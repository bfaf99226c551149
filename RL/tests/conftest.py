"""RL test fixtures: the scriptable judge double server, a dead endpoint, hand-built reward images.

Helper modules are loaded by file path (importlib), never through sys.path, so that no `conftest` or
helper name can shadow the repo root's or another tree's.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


double_server_mod = _load("etchr_rl_tests_double_server", HERE / "double_server.py")


@pytest.fixture
def double_server():
    """A judge double that answers "1" to everything."""
    with double_server_mod.DoubleServer() as srv:
        yield srv


@pytest.fixture
def make_double_server():
    """make_double_server(rules=..., default_answer=..., delay_s=..., timeout_sleep_s=...) -> started server."""
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
    """make() -> an OpenAI base URL on a port nothing listens on (bound, then released)."""

    def make() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{s.getsockname()[1]}/v1"

    return make
