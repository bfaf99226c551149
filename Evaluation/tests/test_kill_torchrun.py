"""kill -9 at random moments under torchrun (2 gloo ranks), then a rerun with another world size:
no row lost, none doubled, no edit computed twice, no worker left running, summary == results.jsonl.

Every evaluate.py process runs through a small wrapper that journals each edit written to the edit
cache (one line per EditCache.put), so an edit computed twice (two live processes racing on one
item) shows up as a repeated key. ETCHR_KILL_TRIALS=N runs N random kill moments per sequence.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest



ev = sys.modules["etchr_eval_tests_evalrun"]  # loaded by conftest.py

WRAPPER = '''
import runpy, sys
sys.path.insert(0, {eval_dir!r})
import etchr_eval.editor as editor
_put = editor.EditCache.put
def put(self, key, image, fields):
    out = _put(self, key, image, fields)
    with open({journal!r}, "a") as f:
        f.write(key + "\\n")
    return out
editor.EditCache.put = put
script = {script!r}
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''

N_ITEMS = 16


def _live(marker: str) -> list[int]:
    """pids of processes whose command line mentions `marker` (the test's unique run dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if marker in (p / "cmdline").read_bytes().decode("utf-8", "replace"):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def _rows_written(run_dir: Path) -> int:
    return sum(f.read_bytes().count(b"\n") for f in run_dir.glob("results*.jsonl"))


def _launch(world: int, wrapper: Path, args: list[str], env: dict) -> subprocess.Popen:
    if world == 1:
        cmd = [sys.executable, str(wrapper)] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(ev.free_port()), str(wrapper)] + args
    # Its own session, as a user's shell job would be: the test then kills the launcher's whole group.
    return subprocess.Popen(cmd, cwd=ev.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find left-over workers")
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2)], ids=["2ranks-killed-then-1", "1-killed-then-2ranks"])
def test_random_kills_then_rerun_with_another_world_size(worlds, tiny_models, tmp_path, make_double_server, make_dl3dv):
    killed_world, final_world = worlds
    trials = int(os.environ.get("ETCHR_KILL_TRIALS", "1"))
    rng = random.Random(1234 + killed_world)
    data = tmp_path / "d.parquet"
    make_dl3dv(data, n=N_ITEMS, seed=5)
    srv = make_double_server(delay_s=0.15)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    figures = {"trials": 0, "rows_lost": 0, "rows_doubled": 0, "edits_doubled": 0, "workers_left": 0}
    for trial in range(trials):
        run_dir = tmp_path / f"run{trial}"
        journal = tmp_path / f"journal{trial}.txt"
        wrapper = tmp_path / f"wrap{trial}.py"
        wrapper.write_text(WRAPPER.format(eval_dir=str(ev.EVAL_DIR), journal=str(journal),
                                          script=str(ev.EVAL_DIR / "evaluate.py")))
        args = ev.base_args(tiny_models, run_dir, data, srv.base_url, "double",
                            ["mllm.concurrency=2", "report_html=false"])
        kill_after = rng.randint(1, N_ITEMS - 4)
        proc = _launch(killed_world, wrapper, args, env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and _rows_written(run_dir) < kill_after:
            time.sleep(0.02)
        time.sleep(rng.random() * 0.3)  # a random moment after the row count was reached
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Workers must die with their launcher (PR_SET_PDEATHSIG), not race the rerun.
        end = time.monotonic() + 10
        while _live(str(run_dir)) and time.monotonic() < end:
            time.sleep(0.1)
        left = _live(str(run_dir))
        for pid in left:  # do not leak them into the rest of the suite
            os.kill(pid, signal.SIGKILL)
        figures["workers_left"] += len(left)
        assert not left, f"{len(left)} worker(s) outlived their killed launcher"
        assert 0 < _rows_written(run_dir) < N_ITEMS

        final = _launch(final_world, wrapper, args, env)
        _, err = final.communicate(timeout=600)
        assert final.returncode == 0, err[-6000:]
        rows = ev.rows_of(run_dir)
        ids = [int(r["id"]) for r in rows]
        figures["rows_lost"] += len(set(range(N_ITEMS)) - set(ids))
        figures["rows_doubled"] += len(ids) - len(set(ids))
        keys = journal.read_text().split()
        figures["edits_doubled"] += len(keys) - len(set(keys))
        assert sorted(ids) == list(range(N_ITEMS)), "one row per item"
        assert all(r["status"] == "ok" for r in rows)
        assert not list(run_dir.glob("results.rank*.jsonl"))
        summary = json.loads((run_dir / "summary.json").read_text())["tasks"]["dl3dv"]
        assert summary["scored"] + summary["failed"] == len(rows) == summary["items"]
        assert len(set(keys)) == N_ITEMS  # each item's edit was made exactly once over both runs
        figures["trials"] += 1
    print(f"kill figures ({killed_world} -> {final_world}): {json.dumps(figures)}")
    assert figures["workers_left"] == figures["rows_lost"] == figures["rows_doubled"] == figures["edits_doubled"] == 0
