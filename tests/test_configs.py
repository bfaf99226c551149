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


LOADERS = {  # tree folder, package, loader, config, overrides (relative paths and one hub id)
    "eval": ("Evaluation", "etchr_eval", "load_eval_config", "configs/eval/dl3dv_reference.yaml",
             ["tasks.dl3dv.path=data/x.parquet", "editor.lora_path=runs/l.safetensors",
              "editor.pipe_path=black-forest-labs/FLUX.2-klein-base-9B"]),
    "sft": ("SFT", "etchr_sft", "load_sft_config", "configs/sft/klein9b_lora_r768.yaml",
            ["data.csv=data/sft/x.csv", "model.pretrained_path=black-forest-labs/FLUX.2-klein-base-9B"]),
    "rl": ("RL", "etchr_rl", "load_rl_config", "configs/rl/klein9b_grpo.yaml",
           ["data.root=data/rl", "train.resume=runs/rl/x/checkpoints/step-000010", "model.pretrained_path=tiny_models"]),
}


@pytest.mark.parametrize("tree", sorted(LOADERS))
def test_relative_paths_resolve_against_the_repo_root_from_any_cwd(tree, tmp_path):
    import json
    import subprocess
    import sys

    folder, pkg, fn, config, overrides = LOADERS[tree]
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / folder)!r}); from {pkg}.config import {fn}; "
            f"from omegaconf import OmegaConf; "
            f"print(json.dumps(OmegaConf.to_container({fn}(sys.argv[1], sys.argv[2:]))))")
    seen = []
    for cwd, cfg_arg in ((REPO, config), (REPO / folder, f"../{config}"), (tmp_path, str(REPO / config))):
        res = subprocess.run([sys.executable, "-c", code, cfg_arg, *overrides], cwd=cwd, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        seen.append(json.loads(res.stdout))
    assert seen[0] == seen[1] == seen[2]  # the same config from the root, the tree and elsewhere
    cfg = seen[0]
    if tree == "eval":
        assert cfg["tasks"]["dl3dv"]["path"] == str(REPO / "data" / "x.parquet")
        assert cfg["editor"]["lora_path"] == str(REPO / "runs" / "l.safetensors")
        assert cfg["run_dir"] == str(REPO / "runs" / "eval" / "dl3dv_reference")  # from the YAML
        assert cfg["editor"]["pipe_path"] == "black-forest-labs/FLUX.2-klein-base-9B"  # a hub id stays
    elif tree == "sft":
        assert cfg["data"]["csv"] == str(REPO / "data" / "sft" / "x.csv") and cfg["train"]["resume"] == "auto"
        assert cfg["model"]["pretrained_path"] == "black-forest-labs/FLUX.2-klein-base-9B"
        assert cfg["train"]["run_dir"] == str(REPO / "runs" / "sft" / "klein9b_lora_r768")
    else:
        assert cfg["data"]["root"] == str(REPO / "data" / "rl") and cfg["data"]["jsonl"] == str(REPO / "data" / "rl" / "GRPO-10K.jsonl")
        assert cfg["train"]["resume"] == str(REPO / "runs" / "rl" / "x" / "checkpoints" / "step-000010")
        assert cfg["model"]["pretrained_path"] == str(REPO / "tiny_models")  # a plain relative name is a path
