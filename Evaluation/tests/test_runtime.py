"""Rank-0 helpers, metrics.jsonl, atomic writes, progress bars."""

from __future__ import annotations

import json
import os

import pytest

from etchr_eval import runtime


def test_metrics_jsonl_rows(tmp_path):
    import torch

    with runtime.MetricsWriter(tmp_path) as m:
        m.log({"loss": torch.tensor(0.5), "lr": 1e-4}, step=1)
        m.log({"loss": 0.25}, step=2)
    rows = runtime.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == 0.5 and rows[0]["lr"] == 1e-4 and rows[1]["loss"] == 0.25
    assert all("time" in r for r in rows)


def test_only_rank0_writes_and_prints(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with runtime.MetricsWriter(tmp_path) as m:
        m.log({"loss": 1.0}, step=1)
    assert not (tmp_path / "metrics.jsonl").exists()
    runtime.print0("hidden")
    bar = runtime.progress(range(3), total=3, desc="x")
    assert list(bar) == [0, 1, 2] and bar.disable
    assert "hidden" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    runtime.print0("shown")
    assert "shown" in capsys.readouterr().out


def test_progress_shows_rate_and_eta(capsys):
    for _ in runtime.progress(range(4), total=4, desc="edits", unit="edit"):
        pass
    err = capsys.readouterr().err
    assert "edits: 4/4" in err and "edit/s" in err and "<" in err  # elapsed<remaining, rate


def test_wandb_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        with runtime.MetricsWriter(tmp_path, wandb_enabled=True, wandb_project="t", config={"a": 1}) as m:
            m.log({"loss": 1.0}, step=1)
    finally:  # stop this process's wandb service; its WANDB_SERVICE would be inherited by later subprocesses
        import wandb
        wandb.teardown()
        os.environ.pop("WANDB_SERVICE", None)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert runtime.read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    runtime.atomic_write_json(target, {"a": 1})

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(runtime.os, "replace", boom)  # fail after the temp file was written
    with pytest.raises(OSError, match="disk full"):
        runtime.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is intact
    assert os.listdir(tmp_path) == ["out.json"]  # and no temp file is left


def test_run_dir_lock_removes_only_the_empty_dir_it_created(tmp_path):
    """A start that fails before writing anything leaves no run dir; a dir with content, or one that existed
    before the lock, stays."""
    fresh = tmp_path / "fresh"
    with runtime.RunDirLock(fresh):
        assert (fresh / ".lock").exists()
    assert not fresh.exists()
    used = tmp_path / "used"
    with runtime.RunDirLock(used):
        (used / "config.yaml").write_text("a: 1\n")
    assert (used / "config.yaml").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with runtime.RunDirLock(existing):
        pass
    assert existing.is_dir()
