"""scripts/bench/repro_compiled_backward.py on the CPU (--tiny): one compiled case in a subprocess gives one JSON
line with the eager-vs-compiled gradient difference; a failing case is recorded (phase, error), not raised; an
unknown case name stops with exit 2. The real sweep runs on an H200 (docs/PERFORMANCE.md)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench" / "repro_compiled_backward.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline")


def _module():
    spec = importlib.util.spec_from_file_location("etchr_repro_compiled_backward", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_tiny_compiled_case_reports_a_json_line(tmp_path):
    out = tmp_path / "cases.jsonl"
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--cases", "compile_ckpt_512", "--backend", "aot_eager",
                          "--out", str(out)], capture_output=True, text=True, timeout=240, env=ENV, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    case, summary = lines[0], lines[-1]
    assert case["case"] == "compile_ckpt_512" and case["ok"] is True, case
    assert case["cuda_launch_blocking"] == "1" and case["ckpt"] is True and case["tiny"] is True
    assert case["tokens"] == 512 + 2 * (64 // 16) ** 2  # the tiny run scales the 512^2 edit's side by 1/8
    assert case["grads"] > 0 and case["grad_max_abs"] > 0  # LoRA B is non-zero: every LoRA weight has a gradient
    assert case["grad_rel_diff"] < 1e-5 and case["loss_rel_diff"] < 1e-6  # aot_eager computes what eager does
    assert case["grad_rtol"] == 0.05  # the default verdict tolerance reached the child
    assert summary == {**summary, "summary": True, "cases": 1, "failed": 0}
    assert [json.loads(x) for x in out.read_text().splitlines()] == [case]


def test_a_failing_case_is_recorded_not_raised():
    mod = _module()
    case = {**mod.all_cases()["compile_ckpt_512"], "inductor": {"no_such_option": True}}
    args = argparse.Namespace(tiny=True, double=1, single=1, rank=4, backend="aot_eager", grad_rtol=0.05)
    rec = mod.run_case(case, args)
    assert rec["ok"] is False and rec["phase"] == "setup"
    assert "no_such_option" in rec["error"] and "Traceback" in rec["traceback"]


def test_gradients_beyond_the_tolerance_fail_the_case():
    """A case that runs but whose compiled gradients differ from eager's (what the H200 showed) is a failure,
    phase "gradients"; a tolerance below aot_eager's exact agreement (negative) forces that verdict here."""
    mod = _module()
    args = argparse.Namespace(tiny=True, double=1, single=1, rank=4, backend="aot_eager", grad_rtol=-1.0)
    rec = mod.run_case(mod.all_cases()["compile_ckpt_512"], args)
    assert rec["ok"] is False and rec["phase"] == "gradients", rec
    assert "differ from eager" in rec["error"] and rec["grad_rtol"] == -1.0 and "seconds" in rec


def test_unknown_case_name_exits_2():
    res = subprocess.run([sys.executable, str(SCRIPT), "--cases", "compile_ckpt_512,nope"], capture_output=True,
                         text=True, timeout=60, env=ENV, cwd=REPO)
    assert res.returncode == 2 and "nope" in res.stderr


def test_every_sweep_case_is_well_formed():
    mod = _module()
    for sweep, cases in mod.SWEEPS.items():
        assert cases and len({c["name"] for c in cases}) == len(cases), sweep
        for c in cases:
            assert c["size"] in (512, 768, 1024) and c["compile"] in ("none", "regional")
