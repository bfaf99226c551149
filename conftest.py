"""Fixtures shared by every tree's tests: the tiny models and the real local MLLM server.

This file is test scaffolding, not package code: the trees' packages still never import each other.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# Tests never touch the network or a hub, and wandb stays offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent


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
