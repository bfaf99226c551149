"""The nano recipe (scripts/nano, docs/NANO.md): the whole chain in its --tiny CPU mode, the held-out split,
the rule scorer on hand-built edits, and the train.time_limit_s stop of both trainers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

NANO = REPO / "scripts" / "nano"


def _module(name: str):
    sys.path.insert(0, str(NANO))
    spec = importlib.util.spec_from_file_location(name, NANO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}
    env.pop("NANO_TINY", None)
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano") / "run"
    proc = subprocess.run(["bash", str(NANO / "run.sh"), "--tiny"], cwd=REPO, capture_output=True, text=True,
                          env=_env(OUT_DIR=str(out), NANO_FAMILIES="maze,jigsaw"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_tiny_chain_results(tiny_run):
    out, stdout = tiny_run
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == "etchr-nano-results/1" and res["env"]["tiny"] is True
    assert set(res["stages_s"]) == {"prepare", "sft", "eval_sft", "rl", "eval_rl"}
    assert all(v > 0 for v in res["stages_s"].values())
    assert res["total_s"] == pytest.approx(sum(res["stages_s"].values()), abs=0.5)
    for stage in ("sft", "rl"):
        maze = res["heldout"][stage]["maze"]
        assert maze["n"] == 3 and 0.0 <= maze["exact"] <= 1.0 and 0.0 <= maze["path_recall"] <= 1.0
        assert res["heldout"][stage]["jigsaw"]["n"] == 1
        assert res["maze_exact"][stage] == maze["exact"]
    fixed, broke = res["maze_exact"]["rl_fixed"], res["maze_exact"]["rl_broke"]
    assert res["maze_exact"]["rl_minus_sft"] == pytest.approx((fixed - broke) / 3, abs=1e-3)
    assert res["sft"]["steps"] == 2 and res["rl"]["steps"] == 1  # the tiny step caps, from the metrics files
    for curve in res["curves"].values():
        assert (out / curve).is_file()
    assert res["knobs"]["tiny"] is True and res["knobs"]["families"] == "maze,jigsaw"
    # The stages ran through the real entry points, and the chain's lineage is on disk.
    assert "+ " + sys.executable + " SFT/train_sft.py --config configs/sft/nano_maze.yaml" in stdout
    assert "+ " + sys.executable + " RL/train_grpo.py --config configs/rl/nano_maze.yaml" in stdout
    assert "[nano] held-out maze path correctness: SFT" in stdout.splitlines()[-1]
    sft_meta = json.loads((out / "sft_pipeline" / "meta.json").read_text())
    assert sft_meta["kind"] == "merged_pipeline" and sft_meta["parents"][0]["kind"] == "full"
    rl_meta = json.loads((out / "rl_pipeline" / "meta.json").read_text())
    assert rl_meta["parents"][1]["kind"] == "lora" and rl_meta["parents"][1]["tree"] == "rl"
    # The VAE was trained and its latent normalisation calibrated (not the random init's stats).
    model = res["model"]
    assert model["vae_training"]["steps"] == 3 and model["vae_training"]["calibration"]["latent_var_mean"] > 0
    assert model["vae_ceiling"]["maze"]["n"] == 3 and model["vae_ceiling"]["jigsaw"]["n"] == 1
    assert set(res["prepare_s"]) == {"data_s", "model_s"}
    assert (out / "eval_sft_edits").is_dir() and len(list((out / "eval_sft_edits").glob("*.png"))) == 4


def test_tiny_chain_heldout_is_unseen(tiny_run):
    out, _ = tiny_run
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]  # noqa: E731
    held = read(out / "data" / "heldout" / "grpo.jsonl")
    train = read(out / "data" / "train" / "grpo.jsonl")
    assert {tuple(r["maze_map"]) for r in held if "maze_map" in r}.isdisjoint(
        tuple(r["maze_map"]) for r in train if "maze_map" in r)
    import pandas as pd

    csv = pd.read_csv(out / "data" / "train" / "sft.csv", keep_default_na=False)
    assert len(csv) == 12 + 2 and all((out / "data" / "train" / p).is_file() for p in csv["image"])
    # The sizes the export adds match the files (so the SFT reader can skip opening them).
    for _, row in csv.iterrows():
        train = out / "data" / "train"
        with Image.open(train / row["image"]) as a, Image.open(train / row["edit_image"]) as b:
            assert (row["width"], row["height"], row["edit_width"], row["edit_height"]) == (*a.size, *b.size)


def test_run_refuses_an_earlier_run_dir(tiny_run):
    out, _ = tiny_run
    proc = subprocess.run(["bash", str(NANO / "run.sh"), "--tiny"], cwd=REPO, capture_output=True, text=True,
                          env=_env(OUT_DIR=str(out)), timeout=60)
    assert proc.returncode == 2 and "holds an earlier nano run" in proc.stderr
    bad = subprocess.run(["bash", str(NANO / "run.sh"), "--tiny"], cwd=REPO, capture_output=True, text=True,
                         env=_env(OUT_DIR=str(out.parent / "other"), NANO_FAMILIES="maze,chart"), timeout=60)
    assert bad.returncode == 2 and "unknown family 'chart'" in bad.stderr


@pytest.mark.parametrize("entry", ["sft", "rl"])
def test_time_limit_stops_training_with_a_final_checkpoint(tiny_run, entry):
    out, _ = tiny_run
    run_dir = out.parent / f"time_limit_{entry}"
    if entry == "sft":
        cmd = [sys.executable, "SFT/train_sft.py", "--config", "configs/sft/nano_maze.yaml",
               f"model.pretrained_path={out / 'model' / 'flux2-klein-nano'}", f"data.csv={out / 'data/train/sft.csv'}",
               'train.mixed_precision="no"', "data.num_workers=0", "train.batch_size=2", "train.max_steps=1000"]
    else:
        cmd = [sys.executable, "RL/train_grpo.py", "--config", "configs/rl/nano_maze.yaml",
               f"model.pretrained_path={out / 'sft_pipeline'}", f"data.jsonl={out / 'data/train/grpo.jsonl'}",
               "sampling.group_size=2", "sampling.steps=3", "train.prompts_per_step=1", "train.grad_accum=2",
               "train.micro_batch=2", "train.max_steps=1000"]
    proc = subprocess.run(cmd + [f"train.run_dir={run_dir}", "train.time_limit_s=0.001"], cwd=REPO,
                          capture_output=True, text=True, env=_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train.time_limit_s=0.001 reached" in proc.stdout
    # Stopped after the first optimizer step of 1000, and saved it as the final checkpoint.
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000001"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["step"] for r in rows] == [1]


# ----------------------------------------------------------------------------------------------
# Data and scoring (in process)
# ----------------------------------------------------------------------------------------------
def test_nano_mazes_are_the_generators_mazes_at_16px_cells():
    data = _module("nano_data")
    maze = importlib.import_module(f"{data.PKG}.maze")
    for i in range(4):
        ours, ref = data.maze_record(i, 7), maze.make_item("maze", i, 7)
        assert ours.meta["maze_map"] == ref.meta["maze_map"] and ours.answer == ref.answer
        n = ours.meta["size"]
        assert ours.image.size == ours.target_image.size == (16 * n, 16 * n)
    jig = data.jigsaw_record(1, 0)  # a 1x3 item: 768 x 512 -> 192 x 128
    assert jig.image.size == jig.target_image.size == (192, 128)


def test_heldout_copies_are_dropped_from_training(tmp_path):
    """2 x 2 mazes come in a handful of variants: most training draws repeat a held-out puzzle."""
    data = _module("nano_data")
    info = data.build(tmp_path, n_train=30, n_heldout=4, n_rl=5, sizes=(2,), workers=1, log=lambda *a: None)
    assert info["dropped_as_heldout_copies"] > 0
    assert info["train"]["maze"] == 30 - info["dropped_as_heldout_copies"]
    held = [json.loads(x) for x in (tmp_path / "heldout" / "grpo.jsonl").read_text().splitlines()]
    train = [json.loads(x) for x in (tmp_path / "train" / "grpo.jsonl").read_text().splitlines()]
    assert {tuple(r["maze_map"]) for r in held}.isdisjoint(tuple(r["maze_map"]) for r in train)
    with pytest.raises(ValueError, match="at least 2 x 2"):
        data.build(tmp_path / "bad", n_train=2, n_heldout=1, n_rl=1, sizes=(1,), workers=1)


def test_maze_scorer_on_hand_built_edits():
    data, score = _module("nano_data"), _module("nano_score")
    rec = data.maze_record(3, 0)
    m = rec.meta
    args = (m["maze_map"], m["start"], m["goal"])
    assert score.gt_path(*args) == {tuple(c) for c in m["path"][1:-1]}
    good = score.maze_metrics(rec.target_image, *args)
    assert good["exact"] and good["path_recall"] == 1.0 and not good["off_path_blue"]
    # Resized and noisy, the target still scores (the editor returns its own pixels).
    noisy = np.asarray(rec.target_image.resize((200, 200), Image.BILINEAR), np.int16)
    noisy = np.clip(noisy + np.random.default_rng(0).normal(0, 10, noisy.shape), 0, 255).astype(np.uint8)
    assert score.maze_metrics(Image.fromarray(noisy), *args)["exact"]
    blank = score.maze_metrics(rec.image, *args)
    assert not blank["exact"] and blank["path_recall"] == 0.0 and blank["blue_cells"] == 0
    # One path cell missing: recall (k - 1) / k, not exact. One wall painted blue: off-path and wall blue.
    arr = np.asarray(rec.target_image).copy()
    (r, c) = m["path"][1]
    arr[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = 255
    k = len(m["path"]) - 2
    miss = score.maze_metrics(Image.fromarray(arr), *args)
    assert not miss["exact"] and miss["path_recall"] == pytest.approx((k - 1) / k)
    walls = [(i, j) for i, row in enumerate(m["maze_map"]) for j, ch in enumerate(row) if ch == "#"]
    arr = np.asarray(rec.target_image).copy()
    wi, wj = walls[0]
    arr[wi * 16 + 3:(wi + 1) * 16 - 3, wj * 16 + 3:(wj + 1) * 16 - 3] = (0, 0, 255)
    stray = score.maze_metrics(Image.fromarray(arr), *args)
    assert not stray["exact"] and stray["off_path_blue"] and stray["wall_blue"] and stray["path_recall"] == 1.0


def test_aggregate_and_psnr():
    score = _module("nano_score")
    maze = {"family": "maze", "wall_blue": False}
    rows = [{**maze, "size": 5, "exact": True, "path_recall": 1.0, "off_path_blue": False},
            {**maze, "size": 6, "exact": False, "path_recall": 0.5, "off_path_blue": True},
            {"family": "jigsaw", "psnr": 30.0}, {"family": "jigsaw", "psnr": 10.0}]
    agg = score.aggregate(rows)
    assert agg["maze"] == {"n": 2, "exact": 0.5, "path_recall": 0.75, "off_path_blue_rate": 0.5, "wall_blue_rate": 0.0,
                           "exact_by_size": {"5": 1.0, "6": 0.0}}
    assert agg["jigsaw"] == {"n": 2, "psnr_mean": 20.0, "psnr_ge_20db": 0.5}
    a = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    b = Image.fromarray(np.full((8, 8, 3), 110, np.uint8))
    assert score.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 100))
    assert score.psnr(a, a) == 100.0
