"""A results file belongs to one run: fingerprints, namespaces, one live writer, fail-fast starts, and
exit codes that say when nothing useful happened. Entry scripts run as subprocesses."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest



ev = sys.modules["etchr_eval_tests_evalrun"]  # loaded by conftest.py


def _snapshot(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------
def test_second_mllm_in_the_same_run_dir_stops_naming_the_fields(tiny_models, dl3dv_parquet, tmp_path,
                                                                  make_double_server):
    first, second = make_double_server(default_answer="\\boxed{A}"), make_double_server(default_answer="\\boxed{B}")
    run_dir = tmp_path / "run"
    ev.ok(ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, first.base_url, "double", ["report_html=false"])))
    before = _snapshot(run_dir)
    assert json.loads((run_dir / "run.json").read_text())["shared"]["mllm.model"] == "double"

    # Another MLLM (model name and sampling) in the same run dir: stop, name the fields, touch nothing.
    n_requests = len(second.requests)
    res = ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, second.base_url, "double",
                                   ["report_html=false", "mllm.temperature=0.7", "editor.guidance=2.0"]))
    assert res.returncode == 2, res.stderr
    assert "mllm.temperature: 0.0 -> 0.7" in res.stderr and "editor.guidance: 3.5 -> 2.0" in res.stderr
    assert "namespace=auto" in res.stderr
    assert len(second.requests) == n_requests  # not one chat request was sent
    assert _snapshot(run_dir) == before  # results.jsonl, config.yaml, run.json, summaries untouched

    # With the namespace switch it evaluates into its own namespace; the first results stay as they were.
    ev.ok(ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, second.base_url, "double",
                                   ["report_html=false", "mllm.temperature=0.7", "namespace=auto"])))
    assert _snapshot(run_dir) == before
    (ns,) = (run_dir / "ns").iterdir()
    rows = ev.rows_of(ns)
    assert len(rows) == 6 and {r["etchr_pred"] for r in rows} == {"B"}
    s = json.loads((ns / "summary.json").read_text())["tasks"]["dl3dv"]
    assert s["edits_made"] == 0 and s["cache_hits"] == 6  # the namespaces share the run dir's edit cache
    fp = json.loads((ns / "run.json").read_text())
    assert {r["run"] for r in rows} != {r["run"] for r in ev.rows_of(run_dir)}
    assert fp["shared"]["mllm.temperature"] == 0.7

    # A rerun of the namespaced run with the same settings resumes it (nothing to do).
    ev.ok(ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, second.base_url, "double",
                                   ["report_html=false", "mllm.temperature=0.7", "namespace=auto"])))
    assert len(list((run_dir / "ns").iterdir())) == 1


def test_rows_from_another_run_are_refused_even_without_run_json(tiny_models, dl3dv_parquet, tmp_path,
                                                                 make_double_server):
    srv = make_double_server()
    run_dir = tmp_path / "run"
    args = ev.base_args(tiny_models, run_dir, dl3dv_parquet, srv.base_url, "double", ["report_html=false"])
    ev.ok(ev.run_eval(args))
    (run_dir / "run.json").unlink()
    rows = ev.rows_of(run_dir)
    rows[0]["run"] = "0123456789abcdef"
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = ev.run_eval(args)
    assert res.returncode == 2 and "produced by another run" in res.stderr and "dl3dv/" in res.stderr


def test_edit_cache_key_and_fingerprint_include_dtype_and_device(tiny_models, tmp_path):
    from PIL import Image

    from etchr_eval.config import load_eval_config
    from etchr_eval.editor import Editor, EditCache

    def editor(*over):
        cfg = load_eval_config(None, [f"editor.pipe_path={tiny_models.flux}", *over])
        return Editor(cfg.editor, tmp_path / "cache")

    img = Image.new("RGB", (64, 64), (10, 20, 30))
    keys = {}
    for name, over in {"fp32_cpu": ("editor.dtype=fp32", "editor.device=cpu"),
                       "bf16_cpu": ("editor.dtype=bf16", "editor.device=cpu"),
                       "fp32_cuda": ("editor.dtype=fp32", "editor.device=cuda:0"),
                       "fp32_cuda1": ("editor.dtype=fp32", "editor.device=cuda:1")}.items():
        e = editor(*over)  # constructing an Editor loads no model
        keys[name] = EditCache.key(**e.cache_fields(img, "p", 1))
        assert e.fingerprint_fields()["dtype"] == over[0].split("=")[1]
    assert len({keys["fp32_cpu"], keys["bf16_cpu"], keys["fp32_cuda"]}) == 3
    assert keys["fp32_cuda"] == keys["fp32_cuda1"]  # the device type matters, not which GPU
    assert editor("editor.device=cpu").dtype_name == "fp32"  # auto on CPU


def test_edit_cache_hits_only_when_dtype_matches(tiny_models, dl3dv_parquet, tmp_path, make_double_server):
    srv = make_double_server()
    cache = tmp_path / "cache"
    extra = [f"edit_cache_dir={cache}", "report_html=false", "tasks.dl3dv.limit=2"]
    ev.ok(ev.run_eval(ev.base_args(tiny_models, tmp_path / "a", dl3dv_parquet, srv.base_url, "double", extra)))
    ev.ok(ev.run_eval(ev.base_args(tiny_models, tmp_path / "b", dl3dv_parquet, srv.base_url, "double",
                                   extra + ["editor.dtype=bf16"])))
    ev.ok(ev.run_eval(ev.base_args(tiny_models, tmp_path / "c", dl3dv_parquet, srv.base_url, "double", extra)))
    made = {d: json.loads((tmp_path / d / "summary.json").read_text())["tasks"]["dl3dv"]["edits_made"] for d in "abc"}
    assert made == {"a": 2, "b": 2, "c": 0}


# ----------------------------------------------------------------------------------------------
# Exit codes that say when nothing useful happened
# ----------------------------------------------------------------------------------------------
def test_a_task_whose_every_item_failed_exits_non_zero_with_the_reason(tiny_models, dl3dv_parquet, tmp_path,
                                                                       make_double_server):
    srv = make_double_server(rules=[("", "500")])  # every request fails
    run_dir = tmp_path / "run"
    res = ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, srv.base_url, "double",
                                   ["report_html=false", "mllm.max_retries=0", "mllm.backoff_s=0.01"]))
    assert res.returncode == 3, res.stderr
    assert "dl3dv: 6 of 6 items failed" in res.stderr and "HTTP 500" in res.stderr
    assert json.loads((run_dir / "summary.json").read_text())["tasks"]["dl3dv"]["failed"] == 6  # still written
    res = ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, srv.base_url, "double",
                                   ["report_html=false", "mllm.max_retries=0", "mllm.backoff_s=0.01",
                                    "max_failed_fraction=1.0"]))  # 1.0: report failures, never exit 3
    assert res.returncode == 0, res.stderr


def test_failure_threshold_is_configurable(tiny_models, dl3dv_parquet, tmp_path, make_double_server):
    from etchr_eval.config import ConfigError, load_eval_config

    # Every request about scenes 0-3 fails: 4 of 6 items, over the 50% threshold but not all of them.
    srv = make_double_server(rules=[(f"In scene {i},", "500") for i in range(4)])
    base = ev.base_args(tiny_models, tmp_path / "run", dl3dv_parquet, srv.base_url, "double",
                        ["report_html=false", "mllm.max_retries=0", "mllm.backoff_s=0.01", "baseline=false"])
    res = ev.run_eval(base + ["max_failed_fraction=0.5"])
    assert res.returncode == 3 and "more than 50% of the items" in res.stderr and "4 of 6 items failed" in res.stderr
    ev.ok(ev.run_eval(base + ["max_failed_fraction=0.7", "run_dir=" + str(tmp_path / "run2")]))  # 4/6 <= 0.7
    with pytest.raises(ConfigError, match="max_failed_fraction"):
        load_eval_config(None, ["editor.pipe_path=x", "max_failed_fraction=1.5"])


def test_empty_benchmark_file_is_an_error_naming_it(tiny_models, tmp_path, double_server, make_dl3dv):
    import pandas as pd

    data = tmp_path / "empty.parquet"
    make_dl3dv(tmp_path / "one.parquet", n=1)
    pd.read_parquet(tmp_path / "one.parquet").iloc[:0].to_parquet(data)
    res = ev.run_eval(ev.base_args(tiny_models, tmp_path / "run", data, double_server.base_url, "double"))
    assert res.returncode == 2 and str(data) in res.stderr and "no items" in res.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_lora_that_does_not_fit_stops_before_any_edit(tiny_models, dl3dv_parquet, tmp_path, double_server):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "bad_lora.safetensors"
    # A LoRA for a wider model: its B @ A is 8 x 8 where the tiny transformer's layer is smaller or larger.
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(bad),
              metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 4, "r": 4})})
    res = ev.run_eval(ev.base_args(tiny_models, tmp_path / "run", dl3dv_parquet, double_server.base_url, "double",
                                   [f"editor.lora_path={bad}"]))
    assert res.returncode == 2, res.stderr
    assert "does not fit the weight" in res.stderr and "to_q" in res.stderr
    assert not double_server.requests  # stopped at start: no chat request, no edit
    assert not (tmp_path / "run" / "results.jsonl").exists()

    missing = tmp_path / "other_lora.safetensors"
    save_file({"transformer.no_such_block.lora_A.weight": torch.zeros(4, 8),
               "transformer.no_such_block.lora_B.weight": torch.zeros(8, 4)}, str(missing),
              metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 4})})
    res = ev.run_eval(ev.base_args(tiny_models, tmp_path / "run2", dl3dv_parquet, double_server.base_url, "double",
                                   [f"editor.lora_path={missing}"]))
    assert res.returncode == 2 and "not a layer of the transformer" in res.stderr


def test_lora_checkpoint_dir_is_accepted(tiny_models, tmp_path):
    from etchr_eval.editor import resolve_lora_path

    ckpt = tmp_path / "step-000010"
    ckpt.mkdir()
    (ckpt / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert resolve_lora_path(ckpt) == ckpt / "pytorch_lora_weights.safetensors"
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        resolve_lora_path(tmp_path)


# ----------------------------------------------------------------------------------------------
# One live writer per run dir
# ----------------------------------------------------------------------------------------------
def test_second_evaluator_on_a_live_run_dir_stops_naming_the_holder(tiny_models, dl3dv_parquet, tmp_path,
                                                                    double_server):
    import socket

    from etchr_eval.runtime import RunDirLock

    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):  # this test process plays the live evaluator
        res = ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, double_server.base_url, "double"))
    assert res.returncode == 2
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in res.stderr
    assert not (run_dir / "results.jsonl").exists() and not double_server.requests
    # The lock died with its holder: the same command now runs.
    ev.ok(ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, double_server.base_url, "double",
                                   ["report_html=false"])))


def test_run_dir_lock_is_released_by_the_kernel_when_the_holder_dies(tmp_path):
    import subprocess
    import time

    from etchr_eval.runtime import RunDirLock, RunDirLocked

    code = ("import sys, time; from etchr_eval.runtime import RunDirLock; RunDirLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=f"pid {proc.pid} "):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            RunDirLock(tmp_path).acquire().release()
            break
        except RunDirLocked:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_wandb_true_mirrors_the_summary(tiny_models, dl3dv_parquet, tmp_path, double_server):
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline")
    ev.ok(ev.run_eval(ev.base_args(tiny_models, run_dir, dl3dv_parquet, double_server.base_url, "double",
                                   ["report_html=false", "wandb=true", "tasks.dl3dv.limit=2"]), env=env))
    assert list((run_dir / "wandb").glob("offline-run-*")), "no wandb run was written"
    (row,) = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())["tasks"]["dl3dv"]
    assert row["dl3dv/items"] == 2 and row["dl3dv/etchr_pass1"] == summary["etchr_pass1"]


# ----------------------------------------------------------------------------------------------
# Command-line habits
# ----------------------------------------------------------------------------------------------
def test_help_lists_every_config_key_with_type_default_and_doc():
    import dataclasses

    from etchr_eval.config import EvalConfig

    res = ev.run_eval(["--help"])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "python evaluate.py --config" in out and "registered tasks:" in out and "dl3dv" in out
    assert "  editor.steps (int, default 40): denoising steps (reference: 40)" in out
    assert "  mllm.model (str, default 'Qwen/Qwen3-VL-8B-Instruct'): model name sent in each request" in out
    assert "  tasks.<name>.limit (int or null, default None): evaluate only the first N items" in out

    for section, cls in (("", EvalConfig), ("editor.", EvalConfig.__dataclass_fields__["editor"].default_factory),
                         ("mllm.", EvalConfig.__dataclass_fields__["mllm"].default_factory)):
        for f in dataclasses.fields(cls):
            assert f"  {section}{f.name}" in out, section + f.name


def test_tasks_and_limit_select_from_a_multi_task_yaml(tiny_models, tmp_path, double_server, make_dl3dv):
    import yaml

    data = tmp_path / "d.parquet"
    make_dl3dv(data, n=6)
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(yaml.safe_dump({"tasks": {"dl3dv": {"path": str(data)}, "viewspatial": {"path": "nowhere.json"},
                                             "maze": {"path": "nowhere.parquet"}}}, sort_keys=False))
    base = ["--config", str(cfg), f"editor.pipe_path={tiny_models.flux}", "editor.steps=2", "editor.max_area=16384",
            f"mllm.endpoints=[{double_server.base_url}]", "mllm.model=double", "report_html=false"]
    res = ev.run_eval(base + ["--print-config", "--tasks", "dl3dv", "--limit=2"])
    assert res.returncode == 0, res.stderr
    printed = yaml.safe_load(res.stdout)
    assert list(printed["tasks"]) == ["dl3dv"] and printed["tasks"]["dl3dv"]["limit"] == 2
    run_dir = tmp_path / "run"
    ev.ok(ev.run_eval(base + ["--tasks", "dl3dv", "--limit", "2", f"run_dir={run_dir}"]))
    assert len(ev.rows_of(run_dir)) == 2  # the other two tasks (missing files) were never loaded
    res = ev.run_eval(base + ["--tasks", "dl3dv,chartqa"])
    assert res.returncode == 2 and "--tasks chartqa: not in this config's tasks (dl3dv, viewspatial, maze)" in res.stderr
    res = ev.run_eval(base + ["--limit", "x"])
    assert res.returncode == 2 and "--limit 'x'" in res.stderr


# ----------------------------------------------------------------------------------------------
# compare.py
# ----------------------------------------------------------------------------------------------
def test_compare_renders_two_runs_side_by_side(tiny_models, dl3dv_parquet, tmp_path, make_double_server):
    import subprocess

    import pandas as pd

    a, b = make_double_server(default_answer="\\boxed{A}"), make_double_server(default_answer="\\boxed{D}")
    extra = [f"edit_cache_dir={tmp_path / 'cache'}"]
    ev.ok(ev.run_eval(ev.base_args(tiny_models, tmp_path / "ra", dl3dv_parquet, a.base_url, "double", extra)))
    ev.ok(ev.run_eval(ev.base_args(tiny_models, tmp_path / "rb", dl3dv_parquet, b.base_url, "double",
                                   extra + ["mllm.temperature=0.5"])))
    out = tmp_path / "cmp"
    res = subprocess.run([sys.executable, str(ev.EVAL_DIR / "compare.py"), str(tmp_path / "ra"), str(tmp_path / "rb"),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    md = (out / "compare.md").read_text()
    gt = pd.read_parquet(dl3dv_parquet)["answer"].tolist()
    pa, pb = 100 * sum(g == "A" for g in gt) / 6, 100 * sum(g == "D" for g in gt) / 6
    assert "Settings that differ between the runs: mllm.temperature." in md
    line_a = next(x for x in md.splitlines() if "temperature=0.0 | ETCHR |" in x)
    line_b = next(x for x in md.splitlines() if "temperature=0.5 | ETCHR |" in x)
    assert f"| {pa:.2f} |" in line_a and f"| {pb:.2f} |" in line_b  # the DL3DV-2k column
    right_a, right_b = sum(g == "A" for g in gt), sum(g == "D" for g in gt)
    assert "| 6 | 6 | " in md and f" | {right_a} | {right_b} |" in md  # every answer changed; who was right
    page = (out / "compare.html").read_text()
    assert "compare_assets/pass1.png" in page and (out / "compare_assets" / "pass1.png").stat().st_size > 5000
    res = subprocess.run([sys.executable, str(ev.EVAL_DIR / "compare.py"), str(tmp_path / "ra"), str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no summary.json" in res.stderr
