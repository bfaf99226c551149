"""Logs that survive a kill -9 and a resume (issue #15 item 3): train_sft.py is killed after a checkpoint
and some later logged steps, then rerun; metrics.jsonl must list every step once, with the values of the
attempt that continued, the crashed attempt's extra rows sit in metrics.superseded.jsonl, and both
attempts log to one wandb run (WANDB_MODE=offline, id in run_dir/wandb_id.txt)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etchr_sft import checkpoint, runtime

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent
CONFIG = str(REPO / "configs" / "sft" / "tiny_demo.yaml")
MAX_STEPS = 12


def trainer_cmd(tiny_models, csv, run_dir) -> list[str]:
    return [sys.executable, str(SFT_DIR / "train_sft.py"), "--config", CONFIG, f"model.pretrained_path={tiny_models.flux}",
            f"data.csv={csv}", f"train.run_dir={run_dir}", "data.max_pixels=6144", f"train.max_steps={MAX_STEPS}",
            "train.checkpoint_every=3", "train.log_every=1", "train.validate_every=0", "wandb=true"]


def env() -> dict:
    """Each attempt starts its own wandb service, as a rerun on a cluster does: WANDB_SERVICE (set in this
    process by any in-process wandb run) would attach both attempts to one service, which still holds the
    killed attempt's run and refuses the resume with "run ID ... is in use"."""
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    e.pop("WANDB_SERVICE", None)
    return e


def newest_checkpoint_dir_step(run_dir: Path) -> int:
    """The highest step of any checkpoint folder, complete or still being written (an upper bound of the
    step a rerun resumes at); -1 when there is none."""
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("*step-*")
             if (m := re.search(r"step-(\d+)", p.name))] if (run_dir / "checkpoints").is_dir() else []
    return max(steps, default=-1)


def kill9_after_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout_s: float = 400) -> tuple[int, float]:
    """SIGKILL `proc` once a complete checkpoint exists and metrics.jsonl holds a step above every checkpoint
    folder. The check runs with the process stopped (SIGSTOP), so nothing moves between check and kill.
    Returns (the last logged step, the wall-clock time of the kill)."""
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"the trainer ended (rc {proc.returncode}) before it could be killed"
        if metrics.is_file() and checkpoint.list_checkpoints(run_dir):
            os.kill(proc.pid, signal.SIGSTOP)
            rows = runtime.read_metrics(metrics)
            last = max((r["step"] for r in rows), default=-1)
            if last > newest_checkpoint_dir_step(run_dir):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return last, time.time()
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"no logged step past a checkpoint within {timeout_s} s")


@pytest.mark.timeout(900)
def test_kill9_then_resume_logs_each_step_once_to_one_wandb_run(tiny_models, sft_csv, tmp_path):
    run_dir = tmp_path / "run"
    cmd = trainer_cmd(tiny_models, sft_csv, run_dir)
    log1 = open(tmp_path / "attempt1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, cwd=REPO, env=env())
    try:
        last, killed_at = kill9_after_checkpoint(proc, run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
        log1.close()
    first = runtime.read_metrics(run_dir / "metrics.jsonl")  # what the crashed attempt left
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert re.fullmatch(r"[0-9a-z]{8}", run_id)

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", res.stdout).group(1))
    assert 3 <= resumed < last  # killed after a checkpoint, with logged steps beyond it

    final = runtime.read_metrics(run_dir / "metrics.jsonl")
    kept = [r for r in first if r["step"] <= resumed]  # up to the checkpoint: the first attempt's rows, untouched
    assert final[:len(kept)] == kept
    assert all(r["time"] >= killed_at for r in final[len(kept):])  # the rest: the resumed attempt's rows
    assert [r["step"] for r in final if "loss" in r] == list(range(1, MAX_STEPS + 1))  # each step once, in order
    superseded = runtime.read_metrics(run_dir / "metrics.superseded.jsonl")
    assert superseded == [r for r in first if r["step"] > resumed] and superseded  # replaced rows kept aside
    assert {r["step"] for r in superseded if "loss" in r} == set(range(resumed + 1, last + 1))

    # one wandb run: the id file is unchanged and both attempts' offline runs carry it
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith("-" + run_id) for name in offline), offline


def test_drop_rows_after_moves_later_steps_aside_and_keeps_bytes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 0.5}', '{"step": 2,  "loss": 0.25}', '{"step": 3, "loss": 0.2}',
             '{"step": 4, "loss": 0.1}', '{"step": 5, "loss": 0.1']  # the last row torn by the kill
    path.write_text("\n".join(lines))
    with runtime.MetricsWriter(tmp_path, resume_step=2) as m:
        assert m.dropped == 2
        m.log({"loss": 0.3}, step=3)
    text = path.read_text().splitlines()
    assert text[:2] == lines[:2]  # kept rows byte for byte (the double space included)
    assert [json.loads(x)["step"] for x in text] == [1, 2, 3] and json.loads(text[2])["loss"] == 0.3
    assert (tmp_path / "metrics.superseded.jsonl").read_text().splitlines() == lines[2:4]
    with runtime.MetricsWriter(tmp_path, resume_step=0) as m:  # a fresh start in the same dir
        assert m.dropped == 3
    assert path.read_text() == ""
    with runtime.MetricsWriter(tmp_path) as m:  # no resume_step (Evaluation, ad-hoc use): append only
        m.log({"x": 1}, step=9)
    assert [r["step"] for r in runtime.read_metrics(path)] == [9]


def test_broken_row_and_bad_wandb_id_name_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON object"):
        runtime.MetricsWriter(tmp_path, resume_step=1)
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n'  # nothing changed
    assert runtime.wandb_run_id(tmp_path) == runtime.wandb_run_id(tmp_path)  # made once, then read
    (tmp_path / "wandb_id.txt").write_text("../x\n")
    with pytest.raises(ValueError, match="wandb_id.txt"):
        runtime.wandb_run_id(tmp_path)
