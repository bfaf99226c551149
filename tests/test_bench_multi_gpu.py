"""scripts/bench/bench_multi_gpu.py --tiny: the 2-GPU benchmark's orchestration on CPU (gloo, tiny models).

The real entry points run as subprocesses with 1 then 2 processes (SFT through accelerate launch with
configs/accelerate/ddp.yaml, evaluation through torchrun); the JSON lines and the table must carry
throughputs and a scaling efficiency for each. ZeRO-2 is skipped on CPU with a note (GPU only).
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

BENCH = REPO / "scripts" / "bench" / "bench_multi_gpu.py"


def run_bench(tmp_path, tiny_models, *extra):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(BENCH), "--tiny", "--out", str(out), "--work", str(tmp_path / "work"),
                          "--pipe", str(tiny_models.flux), *extra], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert "| scaling |" in (out / "table.md").read_text()
    return lines, {r["part"]: r for r in lines if "part" in r}


def test_tiny_sft_one_then_two_processes(tmp_path, tiny_models):
    lines, parts = run_bench(tmp_path, tiny_models, "--parts", "sft_zero2,sft_ddp", "--sft-warmup", "1",
                             "--sft-steps", "1")
    assert lines[0]["header"]["tiny"] is True
    assert parts["sft_zero2"]["skipped"] and "CPU" in parts["sft_zero2"]["reason"]
    for n in (1, 2):
        r = parts[f"sft_ddp_n{n}"]
        assert r["ok"], r
        assert r["num_processes"] == n and r["timed_steps"] == 1 and r["samples_per_s"] > 0
        assert f"{n} process(es)" in r["setup"] and "checkpoint_gib" not in r  # train.save_final=false
    (eff,) = [r for r in lines if r.get("scaling") == "sft_ddp_n2 vs sft_ddp_n1"]
    assert eff["efficiency"] > 0 and not any(r.get("scaling", "").startswith("sft_zero2") for r in lines)
    assert not (tmp_path / "work" / "runs" / "sft_ddp_n2").exists()  # run dirs are removed


def test_tiny_eval_one_then_two_ranks(tmp_path, tiny_models):
    lines, parts = run_bench(tmp_path, tiny_models, "--parts", "eval", "--eval-items", "4", "--eval-steps", "2",
                             "--latency", "0.05")
    for n in (1, 2):
        r = parts[f"eval_n{n}"]
        assert r["ok"], r
        assert r["rows"] == 4 and r["failed_rows"] == 0 and len(r["per_rank"]) == n and r["items_per_s"] > 0
        assert [p["items"] for p in r["per_rank"]] == [4 // n] * n
    (eff,) = [r for r in lines if r.get("scaling") == "eval_n2 vs eval_n1"]
    assert eff["efficiency"] > 0 and eff["unit"] == "items/s"
