"""scripts/bench/bench_sharded_resume.py on CPU: --dry-run prints one line per case with the exact command
train.sh builds (the real runs need CUDA, and say so with exit 2); bad arguments are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench" / "bench_sharded_resume.py"


def bench(*argv):
    return subprocess.run([sys.executable, str(BENCH), *argv], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_dry_run_lists_the_cases_and_their_launch_commands(tmp_path):
    res = bench("--out", str(tmp_path), "--dry-run")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["case"] for x in lines] == ["zero2_lora", "fsdp_lora", "fsdp_full"]
    for x in lines:
        cmd = x["command"]
        assert cmd.startswith("[sft/train.sh] ") and "-m accelerate.commands.launch" in cmd
        assert f"--config_file {x['accelerate_config']} --num_processes 1" in cmd
        assert f"lora.enabled={str(x['lora']).lower()}" in cmd and "train.checkpoint_every=4" in cmd
        assert x["kill_at_step"] == 6 and x["resume_from_step"] == 4
    assert "deepspeed_zero2.yaml" in lines[0]["command"] and "fsdp.yaml" in lines[2]["command"]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_refuses_bad_arguments_and_cpu_runs(tmp_path):
    res = bench("--out", str(tmp_path), "--kill-at", "3", "--dry-run")  # before the first checkpoint (4)
    assert res.returncode == 2 and "--checkpoint-every < --kill-at < --steps" in res.stderr
    res = bench("--out", str(tmp_path), "--cases", "fsdp_lora,zero9", "--dry-run")
    assert res.returncode == 2 and "zero9" in res.stderr
    import torch

    if not torch.cuda.is_available():
        res = bench("--out", str(tmp_path), "--cases", "fsdp_lora")
        assert res.returncode == 2 and "needs CUDA" in res.stderr
