"""Logs that survive a kill -9 and a resume (issue #15 item 3): train_grpo.py with the guidance reward,
judged by the test double, is killed after a checkpoint and some later logged iterations, then rerun.

metrics.jsonl must list every step once, with the values of the attempt that continued (the crashed
attempt's extra rows sit in metrics.superseded.jsonl); both attempts log to one wandb run
(WANDB_MODE=offline, id in run_dir/wandb_id.txt); judge/* are the counts of their own iteration (the
double fails every request of one prompt, used by one iteration only), and judge/total_* are the run's
running sums, continued across the resume from the checkpoint (training_state/state.json)."""

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

from etchr_rl import checkpoint, runtime
from etchr_rl.judge import JudgeClient

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
CONFIG = str(REPO / "configs" / "rl" / "tiny_demo.yaml")
MARK = "Marked for an injected judge failure."
MARKED_ITERATION = 2  # 0-based: its row is step 6 (2 optimizer steps per iteration)
ITERATIONS = 6


@pytest.fixture(scope="module")
def six_prompts(tmp_path_factory) -> Path:
    """Six prompts, one per iteration (iteration i samples prompt i); prompt MARKED_ITERATION's question
    carries MARK, which the double answers with HTTP 500."""
    out = tmp_path_factory.mktemp("bench")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_benchmark.py"), "--out", str(out), "--n", "2",
                    "--families", "maze"], check=True, capture_output=True, timeout=300)
    rows = [json.loads(x) for x in (out / "train" / "grpo.jsonl").read_text().splitlines()]
    rows += [dict(r, id=f"{r['id']}-again") for r in rows]
    rows = rows[:ITERATIONS]
    assert len(rows) == ITERATIONS
    rows[MARKED_ITERATION]["qa_list"] = [dict(rows[MARKED_ITERATION]["qa_list"][0])]
    rows[MARKED_ITERATION]["qa_list"][0]["question"] += " " + MARK
    path = out / "train" / "six.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer_cmd(tiny_models, data, run_dir, url) -> list[str]:
    """Guidance reward only (per sample: an answer request, then a verdict request unless the answer failed);
    G=2, 2 optimizer steps per iteration, a checkpoint every 2 iterations; judge.max_retries=1 (tiny config)."""
    return [sys.executable, str(RL_DIR / "train_grpo.py"), "--config", CONFIG, f"model.pretrained_path={tiny_models.flux}",
            f"data.jsonl={data}", f"train.run_dir={run_dir}", f"judge.endpoints=[{url}]", "data.max_area=4096",
            "sampling.steps=4", "judge.timeout_s=5", "judge.backoff_s=0.01", "judge.max_failure_rate=1.0",
            "reward.weights={guidance: 1.0}", "train.grid_every=0", f"train.max_steps={2 * ITERATIONS}",
            "train.checkpoint_every=4", "wandb=true"]


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
def test_kill9_then_resume_keeps_steps_wandb_run_and_judge_counts(tiny_models, six_prompts, tmp_path,
                                                                  make_double_server):
    srv = make_double_server(rules=[(MARK, "500")])  # everything else: "1"
    run_dir = tmp_path / "run"
    cmd = trainer_cmd(tiny_models, six_prompts, run_dir, srv.base_url)
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

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", res.stdout).group(1))
    assert 4 <= resumed < last  # killed after a checkpoint, with logged iterations beyond it

    # ---- each step once: the first attempt's rows up to the checkpoint, then the resumed attempt's
    final = runtime.read_metrics(run_dir / "metrics.jsonl")
    kept = [r for r in first if r["step"] <= resumed]
    assert final[:len(kept)] == kept
    assert all(r["time"] >= killed_at for r in final[len(kept):])
    superseded = runtime.read_metrics(run_dir / "metrics.superseded.jsonl")
    assert superseded == [r for r in first if r["step"] > resumed] and superseded
    final = [r for r in final if "iteration" in r]  # the iteration rows (other rows, e.g. set-up info, may share a step)
    assert [r["step"] for r in final] == [2 * (i + 1) for i in range(ITERATIONS)]
    assert [r["iteration"] for r in final] == list(range(1, ITERATIONS + 1))

    # ---- judge/*: this iteration's requests only. Marked iteration: 2 answer requests, each failed after
    # 2 attempts (1 retry), so no verdict requests; every other iteration: 2 answers + 2 verdicts, no failure.
    for i, r in enumerate(final):
        marked = i == MARKED_ITERATION
        assert (r["judge/requests"], r["judge/failures"], r["judge/retries"]) == ((2, 2, 2) if marked else (4, 0, 0)), i
        assert r["judge/failure_rate"] == (1.0 if marked else 0.0)
        assert r["judge_failure_rate"] == (1.0 if marked else 0.0)  # the reward-level rate agrees
        assert 0 < r["judge/latency_p50_s"] <= r["judge/latency_p95_s"] <= r["judge/latency_max_s"]
    assert final[MARKED_ITERATION + 1]["judge/failures"] == 0  # the outage does not leak into the next row

    # ---- judge/total_*: running sums over the deduplicated rows, across the resume
    sums = {"requests": 0, "failures": 0, "retries": 0}
    for r in final:
        for k in sums:
            sums[k] += r[f"judge/{k}"]
            assert r[f"judge/total_{k}"] == sums[k], (r["step"], k)
        assert r["judge/total_failure_rate"] == pytest.approx(sums["failures"] / sums["requests"])
    assert sums == {"requests": 22, "failures": 2, "retries": 2}
    # the totals went into the checkpoint the rerun resumed from, and into the last one
    for step in (resumed, 2 * ITERATIONS):
        state = json.loads((checkpoint.step_dir(run_dir, step) / "training_state" / "state.json").read_text())
        assert state["position"]["judge_totals"] == {k: final[step // 2 - 1][f"judge/total_{k}"] for k in sums}

    # ---- one wandb run: the id file is unchanged and both attempts' offline runs carry it
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith("-" + run_id) for name in offline), offline


def test_window_and_totals_are_separate_and_totals_round_trip():
    c = JudgeClient(["http://127.0.0.1:9/v1"], "m")
    for latency, ok in ((0.1, True), (0.3, False), (0.2, True)):
        c._finish(type("R", (), {"latency_s": 0.0, "ok": ok, "endpoint": "e", "error": None if ok else "x",
                                 "attempts": 1})(), time.monotonic() - latency)
    s = c.stats()
    assert (s["requests"], s["failures"]) == (3, 1)
    assert s["latency_p50_s"] == pytest.approx(0.2, abs=0.05) and s["latency_max_s"] == pytest.approx(0.3, abs=0.05)
    c.reset_stats()
    assert c.stats()["requests"] == 0 and c.stats()["latency_max_s"] == 0.0
    assert c.totals() == {"requests": 3, "failures": 1, "retries": 0}  # a new window keeps the run totals
    assert c.total_stats()["total_failure_rate"] == pytest.approx(1 / 3)
    d = JudgeClient(["http://127.0.0.1:9/v1"], "m")
    d.load_totals(json.loads(json.dumps(c.totals())))  # as state.json stores them
    assert d.totals() == c.totals()
    with pytest.raises(ValueError, match="judge totals"):
        d.load_totals({"requests": -1})
