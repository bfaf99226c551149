"""Multi-node launches through the real scripts/sft/train.sh, on one CPU machine.

- DDP: two train.sh processes are two localhost "nodes" (NNODES=2, NGPU=1, NODE_RANK=0/1, gloo). Both
  ranks train (the losses equal one process with doubled accumulation, which needs rank 1's samples),
  and a rerun after removing the last checkpoint resumes and repeats the uninterrupted losses.
- ZeRO-2/3: DeepSpeed here has only its CPU accelerator and train_sft.py (and train.sh) refuse DeepSpeed
  and FSDP without CUDA on purpose (they would otherwise fall back to plain DDP without a word), so a
  ZeRO run cannot start on CPU. What is tested: the command train.sh builds for node 1 of 2 (DRY_RUN=1),
  and that accelerate, given exactly that command line and config, picks torch's per-node launcher
  (`deepspeed_multinode_launcher: standard`) with nnodes 2 / node_rank 1 rather than pdsh + hostfile
  (the `FileNotFoundError: 'deepspeed'` of issue #15). The GPU run is scripts/bench/bench_sharded_resume.sh.
- FSDP / DeepSpeed on CPU stop with exit 2 and a message naming the accelerate config, before any work.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent
TRAIN_SH = REPO / "scripts" / "sft" / "train.sh"
CONFIG = str(REPO / "configs" / "sft" / "tiny_demo.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_args(tiny_models, csv, run_dir, *extra):
    return ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={csv}",
            f"train.run_dir={run_dir}", "data.max_pixels=6144", *extra]


def two_nodes(argv, **env) -> list[subprocess.CompletedProcess]:
    """Start train.sh as node 0 and node 1 of 2 on 127.0.0.1; wait for both."""
    port = free_port()
    procs = [subprocess.Popen(["bash", str(TRAIN_SH), *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env_for(NNODES=2, NGPU=1, NODE_RANK=rank, MASTER_ADDR="127.0.0.1",
                                                     MASTER_PORT=port, **env))
             for rank in (0, 1)]
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for rank, res in enumerate(out):
        assert res.returncode == 0, f"node {rank}:\n" + res.stdout[-3000:] + res.stderr[-5000:]
    return out


def rows(path: Path) -> list[dict]:
    """The training rows of metrics.jsonl (those with a loss)."""
    found = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in found if "loss" in r]


def test_ddp_two_localhost_nodes_train_together_and_resume(tiny_models, sft_csv, tmp_path):
    run, one = tmp_path / "nodes", tmp_path / "one"
    node0, node1 = two_nodes(train_args(tiny_models, sft_csv, run, "train.max_steps=4", "train.checkpoint_every=2",
                                        "train.grad_accum=1"))
    assert "--num_machines 2 --machine_rank 1" in node1.stdout and "--rdzv_backend static --same_network" in node1.stdout
    assert "2 process(es) x batch 1 x accumulation 1 = 2 samples per optimizer step" in node0.stdout + node0.stderr
    first = rows(run / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]

    # Rank 1's half of each step is in the loss: one process with doubled accumulation sees the same samples.
    subprocess.run([sys.executable, str(SFT_DIR / "train_sft.py"),
                    *train_args(tiny_models, sft_csv, one, "train.max_steps=4", "train.grad_accum=2")],
                   cwd=REPO, env=env_for(), check=True, capture_output=True, timeout=600)
    assert [r["loss"] for r in first] == pytest.approx([r["loss"] for r in rows(one / "metrics.jsonl")], rel=1e-5)

    # Lose the step-4 checkpoint; both nodes resume from step 2 and repeat steps 3-4.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000004")
    node0, _ = two_nodes(train_args(tiny_models, sft_csv, run, "train.max_steps=4", "train.checkpoint_every=2",
                                    "train.grad_accum=1"))
    assert "at step 2" in node0.stdout + node0.stderr
    again = rows(run / "metrics.jsonl")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in first], rel=1e-6, abs=1e-7)
    assert (run / "checkpoints" / "step-000004" / "meta.json").is_file()


def dry_run(accelerate_config: str, **env) -> list[str]:
    res = subprocess.run(["bash", str(TRAIN_SH), "--config", CONFIG], cwd=REPO, capture_output=True, text=True,
                         env=env_for(DRY_RUN=1, ACCELERATE_CONFIG=accelerate_config, **env), timeout=60)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("[sft/train.sh] ")
    return shlex.split(line[len("[sft/train.sh] "):])


@pytest.mark.parametrize("zero", ["deepspeed_zero2", "deepspeed_zero3"])
def test_zero_node_one_of_two_launches_torch_per_node_not_pdsh(zero, monkeypatch):
    pytest.importorskip("deepspeed")
    cfg = f"configs/accelerate/{zero}.yaml"
    cmd = dry_run(cfg, NNODES=2, NODE_RANK=1, NGPU=4, MASTER_ADDR="10.0.0.1", MASTER_PORT=29611)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    launch_args = cmd[3:]
    assert launch_args == ["--config_file", cfg, "--num_processes", "8", "--num_machines", "2", "--machine_rank", "1",
                           "--main_process_ip", "10.0.0.1", "--main_process_port", "29611",
                           "--rdzv_backend", "static", "--same_network", "SFT/train_sft.py", "--config", CONFIG]

    # What accelerate's own launch_command does with that command line, its subprocess calls recorded.
    args, calls = accelerate_launch(launch_args, monkeypatch, REPO)
    assert args.use_deepspeed and args.deepspeed_multinode_launcher == "standard"
    assert [c[0] for c in calls] == ["torchrun"], f"accelerate would run {calls} (pdsh / hostfile launcher)"
    torch_args, env = calls[0][1], calls[0][2]
    assert (torch_args.nnodes, torch_args.node_rank, torch_args.nproc_per_node) == ("2", 1, "4")
    assert (torch_args.master_addr, torch_args.master_port, torch_args.rdzv_backend) == ("10.0.0.1", "29611", "static")
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == zero[-1]


def accelerate_launch(launch_args: list[str], monkeypatch, cwd: Path):
    """Run accelerate.commands.launch.launch_command on launch_args with its two ways of starting processes
    (torch's elastic launcher in-process, or a `deepspeed` subprocess) replaced by recorders."""
    import accelerate.commands.launch as launch

    calls = []
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(launch, "_run_torchrun", lambda a: calls.append(("torchrun", a, dict(os.environ))))
    monkeypatch.setattr(launch, "_run_subprocess", lambda cmd, env, quiet=False: calls.append(("subprocess", cmd, env)))
    args = launch.launch_command_parser().parse_args(launch_args)
    launch.launch_command(args)
    return args, calls


def test_zero_without_the_standard_launcher_would_need_pdsh(tmp_path, monkeypatch):
    """The control: the same config minus `deepspeed_multinode_launcher` is accelerate's pdsh path (the bug)."""
    pytest.importorskip("deepspeed")
    text = (REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text()
    assert "deepspeed_multinode_launcher: standard" in text
    bad = tmp_path / "zero2_default_launcher.yaml"
    bad.write_text("\n".join(line for line in text.splitlines() if "deepspeed_multinode_launcher" not in line) + "\n")
    # accelerate writes .deepspeed_env into the working directory on the pdsh path: tmp_path, not the repo
    _, calls = accelerate_launch(["--config_file", str(bad), "--num_processes", "2", "--num_machines", "2",
                                  "--machine_rank", "1", "--main_process_ip", "127.0.0.1", "--main_process_port",
                                  str(free_port()), str(SFT_DIR / "train_sft.py")], monkeypatch, tmp_path)
    assert [c[0] for c in calls] == ["subprocess"]
    assert calls[0][1][0] == "deepspeed" and "--hostfile" in calls[0][1]


def test_single_node_command_has_no_rendezvous_flags():
    cmd = dry_run("configs/accelerate/ddp.yaml", NGPU=2)
    assert "--num_processes" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    assert "--rdzv_backend" not in cmd and "--same_network" not in cmd
    c10d = dry_run("configs/accelerate/ddp.yaml", NNODES=3, NODE_RANK=2, NGPU=2, RDZV_BACKEND="c10d")
    assert c10d[c10d.index("--rdzv_backend") + 1] == "c10d" and "--same_network" not in c10d
    assert c10d[c10d.index("--num_processes") + 1] == "6"


@pytest.mark.parametrize("name,backend", [("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED")])
def test_sharding_config_without_cuda_stops_before_training(name, backend, tiny_models, sft_csv, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the config applies")
    cfg = f"configs/accelerate/{name}.yaml"
    run = tmp_path / "run"
    res = subprocess.run(["bash", str(TRAIN_SH), *train_args(tiny_models, sft_csv, run, "train.max_steps=1")],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=env_for(NGPU=1, ACCELERATE_CONFIG=cfg))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    assert f"{cfg} asks for {backend}" in res.stderr and "no CUDA" not in res.stdout
    assert not run.exists()  # nothing written: no run dir, no lock, no config
    # The trainer itself refuses too (accelerate launch without train.sh, or a launcher that sets the env).
    flag = "ACCELERATE_USE_FSDP" if backend == "FSDP" else "ACCELERATE_USE_DEEPSPEED"
    res = subprocess.run([sys.executable, str(SFT_DIR / "train_sft.py"),
                          *train_args(tiny_models, sft_csv, run, "train.max_steps=1")],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=env_for(**{flag: "true", "ACCELERATE_CONFIG": cfg}))
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"{cfg} asks for {'FSDP' if backend == 'FSDP' else 'DeepSpeed'}" in res.stderr
    assert "no CUDA device" in res.stderr and not (run / "checkpoints").exists()
