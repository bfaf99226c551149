"""RL curves and grids: a tiny run (rule rewards, no judge) writes curves.png and an edit grid with the
source and the prompt; --help / --print-config; files honour the umask (022 -> 0644 files, 0755 dirs)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
CONFIG = str(REPO / "configs" / "rl" / "tiny_demo.yaml")


@pytest.fixture(scope="module")
def grpo_jsonl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_benchmark.py"), "--out", str(out), "--n", "2",
                    "--families", "maze", "jigsaw"], check=True, capture_output=True, timeout=300)
    return out / "train" / "grpo.jsonl"


def _rl(*argv, umask=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, str(RL_DIR / "train_grpo.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=900, env=env, cwd=REPO, preexec_fn=pre)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_run_writes_curves_and_grid_and_honours_umask(tiny_models, grpo_jsonl, tmp_path, dead_url):
    run_dir = tmp_path / "run"
    res = _rl("--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.jsonl={grpo_jsonl}",
              f"train.run_dir={run_dir}", f"judge.endpoints=[{dead_url()}]", "data.max_area=4096", "sampling.steps=4",
              "reward.weights={maze_path: 1.0, jigsaw_restore: 1.0}", "train.max_steps=2", "train.prompts_per_step=1",
              "train.grad_accum=2", "train.grid_every=1", umask=0o022)
    assert res.returncode == 0, res.stderr[-4000:]
    curves = np.asarray(Image.open(run_dir / "curves.png").convert("RGB")).astype(float)
    assert curves.std() > 5
    grid = Image.open(run_dir / "grids" / "iter-000000.png")
    assert "group_size: 2" in (run_dir / "config.yaml").read_text()
    assert grid.width == 160 * 3  # source + G=2 edits
    assert grid.height > 160  # the prompt beneath the row
    assert np.asarray(grid.convert("L")).astype(float)[165:].std() > 1  # prompt text drawn
    for f in (run_dir / "config.yaml", run_dir / "curves.png"):
        assert _mode(f) == 0o644, (f, oct(_mode(f)))
    ck = run_dir / "checkpoints" / "step-000002"
    assert _mode(ck) == 0o755 and all(_mode(f) == 0o644 for f in ck.rglob("*.json"))
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, str(RL_DIR / "merge_lora.py"), "--base", str(tiny_models.flux), "--lora",
                          str(ck), "--out", str(out)], capture_output=True, text=True, timeout=600,
                         preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _mode(out) == 0o755 and _mode(out / "meta.json") == 0o644


def test_panels_follow_the_logged_rewards():
    sys.path.insert(0, str(RL_DIR))
    from etchr_rl.plots import rl_panels

    titles = [p[0] for p in rl_panels([{"step": 1, "reward/a": 1.0, "reward/b": None, "clip_fraction": 0.1}])]
    assert titles[:2] == ["reward/a", "reward/b"] and "KL" not in titles
    assert "KL" in [p[0] for p in rl_panels([{"step": 1, "kl": 0.1}])]


def test_help_and_print_config(tiny_models):
    res = _rl("--help")
    assert res.returncode == 0
    assert "train.grid_every (int, default 10)" in res.stdout and "torchrun" in res.stdout
    res = _rl("--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", "optim.lr=0.25", "--print-config")
    assert res.returncode == 0, res.stderr
    assert "lr: 0.25" in res.stdout
