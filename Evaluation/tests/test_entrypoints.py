"""evaluate.py and inference_dl3dv.py run as users run them (subprocesses), on the tiny pipeline.

Against the real local server (transformers serve) for the end-to-end runs; against the test double
for exact failure behaviour, resume after kill -9, the edit cache and multi-rank sharding.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ev = sys.modules["etchr_eval_tests_evalrun"]  # loaded by conftest.py
EVAL_DIR, REPO, CONFIG = ev.EVAL_DIR, ev.REPO, ev.CONFIG
run_eval, base_args, rows_of, ok, _free_port = ev.run_eval, ev.base_args, ev.rows_of, ev.ok, ev.free_port


# ----------------------------------------------------------------------------------------------
# Real server end to end
# ----------------------------------------------------------------------------------------------
def test_evaluate_against_real_server_writes_tables_and_report(tiny_models, mllm_server, dl3dv_parquet, tmp_path):
    run_dir = tmp_path / "run"
    res = ok(run_eval(base_args(tiny_models, run_dir, dl3dv_parquet, mllm_server.base_url, mllm_server.model)))
    assert "| dl3dv | 6 |" in res.stdout  # the markdown table is printed
    rows = rows_of(run_dir)
    assert sorted(r["id"] for r in rows) == [str(i) for i in range(6)]
    assert all(r["status"] == "ok" for r in rows), [r.get("errors") for r in rows]
    for r in rows:  # a random model: answers are gibberish but every stage ran and was recorded
        assert isinstance(r["verify_response"], str) and isinstance(r["baseline_response"], str)
        assert r["accepted"] in (True, False) and (run_dir / r["edit_path"]).is_file()
        assert r["edit_size"] == [128, 96]
    summary = json.loads((run_dir / "summary.json").read_text())
    s = summary["tasks"]["dl3dv"]
    assert s["items"] == 6 and s["scored"] == 6 and s["failed"] == 0 and s["edits_made"] == 6
    assert summary["meta"]["prompt_files"] == ["edit_prefix_3d_v1", "reason_one_image_v1", "reason_two_images_v1",
                                               "verify_dl3dv_v1"]
    html = (run_dir / "report.html").read_text()
    assert "report_assets/pass1.png" in html and len(list((run_dir / "report_assets" / "thumbs").glob("*.jpg"))) == 12
    assert len(list((run_dir / "report_assets" / "full").glob("*_orig.png"))) == 6
    cfg = (run_dir / "config.yaml").read_text()
    assert "steps: 4" in cfg and str(dl3dv_parquet) in cfg


def test_inference_dl3dv_keeps_the_reference_cli(tiny_models, mllm_server, dl3dv_parquet, tmp_path):
    result_file = tmp_path / "dl3dv.json"
    res = ok(run_eval(["--vllm_baseurl", mllm_server.base_url, "--vllm_api_key", "EMPTY", "--model", mllm_server.model,
                       "--result_file", str(result_file), "--pipe_path", str(tiny_models.flux),
                       "--data_parquet_path", str(dl3dv_parquet), "--config", CONFIG, "tasks.dl3dv.limit=3"],
                      script="inference_dl3dv.py"))
    ref_rows = [json.loads(x) for x in result_file.read_text().splitlines()]
    assert len(ref_rows) == 3
    assert set(ref_rows[0]) >= {"id", "result", "gt", "judge", "question", "response", "response_judge"}
    assert ref_rows[0]["question"].startswith("Question: In scene 0") and ref_rows[0]["judge"] in ("0", "1")
    run_dir = tmp_path / "dl3dv_run"
    assert (run_dir / "summary.md").is_file() and (run_dir / "report.html").is_file()
    assert "vllm_api_key" not in (run_dir / "config.yaml").read_text() and "EMPTY" not in (run_dir / "config.yaml").read_text()
    assert "wrote" in res.stdout


# ----------------------------------------------------------------------------------------------
# Failures, resume, cache
# ----------------------------------------------------------------------------------------------
def test_fault_injection_records_failures_and_rerun_retries_only_them(tiny_models, dl3dv_parquet, tmp_path,
                                                                      make_double_server):
    faulty = make_double_server(rules=[("In scene 1,", "500"), ("In scene 2,", "timeout"),
                                       ("In scene 3,", "malformed"), ("In scene 4,", "close")], timeout_sleep_s=3)
    run_dir = tmp_path / "run"
    extra = ["mllm.max_retries=0", "mllm.timeout_s=1", "mllm.backoff_s=0.01"]
    ok(run_eval(base_args(tiny_models, run_dir, dl3dv_parquet, faulty.base_url, "double", extra)))
    rows = {r["id"]: r for r in rows_of(run_dir)}
    assert {i for i, r in rows.items() if r["status"] == "ok"} == {"0", "5"}
    assert "HTTP 500" in rows["1"]["errors"]["verify"] and "HTTP 500" in rows["1"]["errors"]["baseline"]
    assert rows["2"]["errors"]["verify"] == "timeout after 1 s"
    assert "no choices" in rows["3"]["errors"]["verify"]
    assert "connection error" in rows["4"]["errors"]["verify"]
    for i in "1234":  # failures never count as wrong answers
        assert "etchr_score" not in rows[i] and "baseline_score" not in rows[i]
    s = json.loads((run_dir / "summary.json").read_text())["tasks"]["dl3dv"]
    expected = 100.0 * sum(rows[i]["gt"] == "A" for i in "05") / 2  # the double always answers \boxed{A}
    assert (s["failed"], s["scored"], s["etchr_pass1"]) == (4, 2, expected)
    # rerun against a healthy server: only the 4 failed items are sent again, and no edit is recomputed
    healthy = make_double_server()
    ok(run_eval(base_args(tiny_models, run_dir, dl3dv_parquet, healthy.base_url, "double", extra)))
    asked = {int(t.split("In scene ")[1].split(",")[0]) for req in healthy.requests
             for t in [json.dumps(req)] if "In scene " in t}
    assert asked == {1, 2, 3, 4}
    rows2 = rows_of(run_dir)
    assert sorted(r["id"] for r in rows2) == [str(i) for i in range(6)]  # exactly one row per item
    assert all(r["status"] == "ok" for r in rows2)
    s2 = json.loads((run_dir / "summary.json").read_text())["tasks"]["dl3dv"]
    assert s2["edits_made"] == 0 and s2["cache_hits"] == 4 and s2["failed"] == 0


def test_second_mllm_reuses_every_edit(tiny_models, dl3dv_parquet, tmp_path, make_double_server):
    cache = tmp_path / "shared_cache"
    first, second = make_double_server(default_answer="\\boxed{A}"), make_double_server(default_answer="\\boxed{B}")
    extra = [f"edit_cache_dir={cache}", "report_html=false"]
    ok(run_eval(base_args(tiny_models, tmp_path / "m1", dl3dv_parquet, first.base_url, "m1", extra)))
    ok(run_eval(base_args(tiny_models, tmp_path / "m2", dl3dv_parquet, second.base_url, "m2", extra)))
    s1 = json.loads((tmp_path / "m1" / "summary.json").read_text())["tasks"]["dl3dv"]
    s2 = json.loads((tmp_path / "m2" / "summary.json").read_text())["tasks"]["dl3dv"]
    assert s1["edits_made"] == 6 and s2["edits_made"] == 0 and s2["cache_hits"] == 6
    a = {r["id"]: r["edit_path"] for r in rows_of(tmp_path / "m1")}
    b = {r["id"]: r["edit_path"] for r in rows_of(tmp_path / "m2")}
    assert {k: Path(v).name for k, v in a.items()} == {k: Path(v).name for k, v in b.items()}
    assert {r["etchr_pred"] for r in rows_of(tmp_path / "m2")} == {"B"}  # the second MLLM really answered


def test_kill_9_mid_run_then_rerun_leaves_one_row_per_item(tiny_models, tmp_path, make_double_server, make_dl3dv):
    data = tmp_path / "d12.parquet"
    make_dl3dv(data, n=12, seed=3)
    srv = make_double_server(delay_s=0.25)
    run_dir = tmp_path / "run"
    args = base_args(tiny_models, run_dir, data, srv.base_url, "double", ["mllm.concurrency=2", "report_html=false"])
    for kill_after_rows in (2, 6):  # two kills at different moments, then a full run
        proc = subprocess.Popen([sys.executable, str(EVAL_DIR / "evaluate.py")] + args, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        results = run_dir / "results.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= kill_after_rows:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n = len(rows_of(run_dir))
        assert kill_after_rows <= n < 12
    ok(run_eval(args))
    rows = rows_of(run_dir)
    assert sorted(int(r["id"]) for r in rows) == list(range(12))
    assert all(r["status"] == "ok" for r in rows)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------
def test_unreachable_server_stops_before_any_edit(tiny_models, dl3dv_parquet, tmp_path, dead_url):
    url = dead_url()
    res = run_eval(base_args(tiny_models, tmp_path / "run", dl3dv_parquet, url, "m"))
    assert res.returncode == 2
    assert "no MLLM endpoint is reachable" in res.stderr and url in res.stderr
    assert not (tmp_path / "run" / "results.jsonl").exists() and not (tmp_path / "run" / "edit_cache").exists()


def test_missing_column_and_unknown_task_are_clear_errors(tiny_models, tmp_path, double_server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["A"]}), bad)
    res = run_eval(base_args(tiny_models, tmp_path / "r", bad, double_server.base_url, "m"))
    assert res.returncode == 2 and "bad.parquet: missing column(s) candidates, images" in res.stderr
    res = run_eval(base_args(tiny_models, tmp_path / "r", bad, double_server.base_url, "m", ["tasks.nope.path=x"]))
    assert res.returncode == 2 and "unknown task 'nope'" in res.stderr


def test_undecodable_image_becomes_a_failure_record(tiny_models, tmp_path, double_server, make_dl3dv):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    make_dl3dv(good, n=3, seed=1)
    t = pq.read_table(good).to_pylist()
    t[1]["images"] = [{"bytes": b"\x89PNG broken", "path": "x.png"}]
    bad = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(good)), bad)
    ok(run_eval(base_args(tiny_models, tmp_path / "r", bad, double_server.base_url, "m")))
    rows = {r["id"]: r for r in rows_of(tmp_path / "r")}
    assert rows["1"]["status"] == "failed" and "mixed.parquet row 1: image could not be decoded" in rows["1"]["errors"]["load"]
    assert rows["0"]["status"] == rows["2"]["status"] == "ok"


# ----------------------------------------------------------------------------------------------
# Multi-rank sharding equals one process
# ----------------------------------------------------------------------------------------------
def _comparable(run_dir: Path) -> dict:
    out = {}
    for r in rows_of(run_dir):
        digest = hashlib.sha256((run_dir / r["edit_path"]).read_bytes()).hexdigest()
        out[r["id"]] = (r["status"], r["seed"], digest, r["accepted"], r["etchr_pred"], r["etchr_score"],
                        r["baseline_pred"], r["baseline_score"])
    return out


def test_torchrun_two_ranks_equals_one_process(tiny_models, dl3dv_parquet, tmp_path, make_double_server):
    srv = make_double_server()
    one, two = tmp_path / "one", tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same CPU kernels in both runs (torchrun's default is 1)
    ok(run_eval(base_args(tiny_models, one, dl3dv_parquet, srv.base_url, "m", ["report_html=false"]), env=env))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), str(EVAL_DIR / "evaluate.py")]
                         + base_args(tiny_models, two, dl3dv_parquet, srv.base_url, "m", ["report_html=false"]),
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    ok(res)
    assert not list(two.glob("results.rank*.jsonl"))  # folded into results.jsonl by rank 0 at the end
    ranks = {r["id"]: r["rank"] for r in rows_of(two)}
    assert set(ranks.values()) == {0, 1}
    assert _comparable(one) == _comparable(two)
    s1 = json.loads((one / "summary.json").read_text())["tasks"]["dl3dv"]
    s2 = json.loads((two / "summary.json").read_text())["tasks"]["dl3dv"]
    for k in ("items", "scored", "failed", "etchr_pass1", "baseline_pass1", "verify_accept_rate", "edits_made"):
        assert s1[k] == s2[k], k


# ----------------------------------------------------------------------------------------------
# inference_dl3dv.py --result_file: the reference's rows, appended per item, rewritten at the end
# ----------------------------------------------------------------------------------------------
FAKE_VLLM = REPO / "tests" / "fakes" / "vllm"


@pytest.fixture
def fake_vllm_server(tmp_path):
    """The stand-in `vllm serve` (tests/fakes/vllm) on a free port; its process group is killed at the end."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), "serve", "/models/Qwen3-VL-8B-Instruct",
                             "--served-model-name", "Qwen/Qwen3-VL-8B-Instruct", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "stand-in vllm did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_result_file_rows_keep_reference_types_one_per_item_in_order(tiny_models, dl3dv_parquet, tmp_path,
                                                                     fake_vllm_server):
    result_file = tmp_path / "dl3dv.json"
    result_file.write_text('{"id": 1, "result": "stale line of an earlier run"}\n')  # rewritten at the end
    res = ok(run_eval(["--vllm_baseurl", fake_vllm_server, "--result_file", str(result_file),
                       "--pipe_path", str(tiny_models.flux), "--data_parquet_path", str(dl3dv_parquet),
                       "--config", CONFIG, "editor.steps=1"], script="inference_dl3dv.py"))
    rows = [json.loads(x) for x in result_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(6))  # the row number, an int, as the reference's enumerate
    assert all(r["judge"] == "1" and r["result"] == "1" and r["response_judge"] == "\\boxed{1}" for r in rows)
    assert "wrote" in res.stdout and "(6 rows)" in res.stdout
    # A rerun finds every item finished: the file is still exactly one row per item.
    ok(run_eval(["--vllm_baseurl", fake_vllm_server, "--result_file", str(result_file), "--pipe_path",
                 str(tiny_models.flux), "--data_parquet_path", str(dl3dv_parquet), "--config", CONFIG,
                 "editor.steps=1"], script="inference_dl3dv.py"))
    assert [json.loads(x)["id"] for x in result_file.read_text().splitlines()] == list(range(6))


def test_result_file_ids_follow_the_source_id_column(tmp_path):
    sys.path.insert(0, str(EVAL_DIR))
    import pandas as pd
    from inference_dl3dv import RowAppender, reference_ids

    ints, strs, none = tmp_path / "i.parquet", tmp_path / "s.parquet", tmp_path / "n.jsonl"
    pd.DataFrame({"id": [7, 3, 9], "question": ["q"] * 3}).to_parquet(ints)
    pd.DataFrame({"question_id": ["a7", "007", "x"], "question": ["q"] * 3}).to_parquet(strs)
    none.write_text('{"question": "q"}\n{"question": "r"}\n')
    assert reference_ids(str(ints)) == {"7": 7, "3": 3, "9": 9}
    assert reference_ids(str(strs), limit=2) == {"a7": "a7", "007": "007"}  # strings stay strings ("007")
    assert reference_ids(str(none)) == {"0": 0, "1": 1}
    # Two appenders on one file (as two ranks): whole lines, other tasks' rows ignored.
    out = tmp_path / "rows.json"
    a, b = RowAppender(out, {"7": 7}), RowAppender(out, {"7": 7, "3": 3})
    a({"task": "dl3dv", "id": "7", "accepted": True, "etchr_pred": "B"})
    b({"task": "maze", "id": "3"})
    b({"task": "dl3dv", "id": "3", "accepted": False})
    a.close(), b.close()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["id"], r["judge"], r["result"]) for r in rows] == [(7, "1", "B"), (3, "0", None)]


def test_result_file_refuses_namespace_auto(tiny_models, dl3dv_parquet, tmp_path):
    res = run_eval(["--result_file", str(tmp_path / "r.json"), "--pipe_path", str(tiny_models.flux),
                    "--data_parquet_path", str(dl3dv_parquet), "--config", CONFIG, "namespace=auto"],
                   script="inference_dl3dv.py")
    assert res.returncode == 2 and "namespace=auto" in res.stderr and not (tmp_path / "r.json").exists()
