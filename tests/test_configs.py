"""Every YAML under configs/ loads with its tree's schema (or accelerate's), and opens with its header."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO

EXPECTED = {"eval": 3, "sft": 4, "rl": 3, "accelerate": 4}


def _load(path: Path):
    kind = path.parent.name
    if kind == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        return load_config_from_file(str(path))
    if kind == "eval":
        from etchr_eval.config import load_eval_config as load
    elif kind == "sft":
        from etchr_sft.config import load_sft_config as load
    elif kind == "rl":
        from etchr_rl.config import load_rl_config as load
    else:
        raise AssertionError(f"unexpected config folder {kind}")
    return load(str(path))


def test_every_yaml_loads_and_the_count_is_known():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    counts: dict[str, int] = {}
    for f in files:
        _load(f)
        counts[f.parent.name] = counts.get(f.parent.name, 0) + 1
    assert counts == EXPECTED, f"configs changed: {counts}; update EXPECTED if that was intended"
    assert len(files) == sum(EXPECTED.values())


BLOCKING = ("launch_vllm.sh", "serve_judge.sh", "local_mllm_server.py")  # serve until stopped


def _header(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return lines[:next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_yaml_header_says_how_to_launch(path):
    head = _header(path)[:10]
    assert head[0].startswith("# "), f"{path}: the first line must be a comment saying what it reproduces"
    text = "\n".join(head).lower()
    assert "launch" in text or "accelerate launch" in text, f"{path}: header must give the launch command"
    if path.parent.name != "accelerate":
        assert "hardware" in text and "time" in text and "reproduces" in text, path


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_header_never_chains_a_blocking_server_with_and(path):
    """`bash launch_vllm.sh && python evaluate.py` never reaches evaluate.py: servers start with `&`."""
    for line in _header(path):
        cmd = line.split("#", 2)[1] if line.count("#") >= 2 else line.lstrip("# ")
        for name in BLOCKING:
            if name in cmd:
                rest = cmd.split(name, 1)[1]
                assert "&&" not in rest, f"{path}: {line.strip()!r} chains a blocking server with &&"
                assert "&" in rest, f"{path}: {line.strip()!r} starts a blocking server without &"
