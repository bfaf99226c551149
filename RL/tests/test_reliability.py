"""Reliability of an RL run dir: resume never unpickles (a planted payload runs nothing), `latest` is
the newest complete checkpoint after a kill between rename and pointer, a torn metrics.jsonl row is cut,
LoRA header / meta.json cross-check, one live trainer per run dir, workers die with their launcher."""

from __future__ import annotations

from collections import OrderedDict

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from etchr_rl import checkpoint, runtime
from etchr_rl.checkpoint import CheckpointError

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
CONFIG = str(REPO / "configs" / "rl" / "tiny_demo.yaml")
DEAD_JUDGE = "http://127.0.0.1:9/v1"  # rule rewards only: the judge is never asked


@pytest.fixture(scope="module")
def rl_jsonl(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_benchmark.py"), "--out", str(out), "--n", "2",
                    "--families", "maze"], check=True, capture_output=True, timeout=300)
    return out / "train" / "grpo.jsonl"


def trainer(tiny_models, data, run_dir, *extra):
    """train_grpo.py with the maze_path rule reward: G=2 samples, 2 optimizer steps per iteration."""
    cmd = [sys.executable, str(RL_DIR / "train_grpo.py"), "--config", CONFIG,
           f"model.pretrained_path={tiny_models.flux}",
           f"data.jsonl={data}", f"train.run_dir={run_dir}", f"judge.endpoints=[{DEAD_JUDGE}]", "data.max_area=4096",
           "sampling.steps=4", "reward.weights={maze_path: 1.0}", "train.grid_every=0", "train.checkpoint_every=2",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def four_steps(tiny_models, rl_jsonl, tmp_path_factory) -> Path:
    """A run dir with complete checkpoints step-000002 and step-000004 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("rel") / "run"
    res = trainer(tiny_models, rl_jsonl, run_dir, "train.max_steps=4")
    assert res.returncode == 0, res.stderr[-4000:]
    return run_dir


class Payload:
    """Unpickling this calls os.system: what a planted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------ safe resume
def test_planted_pickle_stops_the_resume_and_runs_nothing(tiny_models, rl_jsonl, four_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    state = run_dir / "checkpoints" / "step-000004" / "training_state"
    assert sorted(p.name for p in state.iterdir()) == ["optimizer.json", "optimizer.safetensors", "rng_0.json",
                                                        "state.json", "trainable.safetensors"]
    marker = tmp_path / "PWNED"
    torch.save({"position": Payload(marker)}, state / "custom_checkpoint_0.pkl")  # what accelerate used to unpickle
    res = trainer(tiny_models, rl_jsonl, run_dir, "train.max_steps=6")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "custom_checkpoint_0.pkl" in res.stderr and "unexpected file" in res.stderr
    assert not marker.exists()
    assert not (run_dir / "checkpoints" / "step-000006").exists()  # no training happened
    # the payload in place of a real file: safetensors does not unpickle it either
    (state / "custom_checkpoint_0.pkl").unlink()
    torch.save(Payload(marker), state / "optimizer.safetensors")
    res = trainer(tiny_models, rl_jsonl, run_dir, "train.max_steps=6")
    assert res.returncode == 2 and "cannot read the training state" in res.stderr and str(state) in res.stderr
    assert not marker.exists()


def test_old_pickle_format_is_refused_without_unpickling(tmp_path):
    state = tmp_path / "training_state"
    state.mkdir()
    marker = tmp_path / "PWNED"
    torch.save(Payload(marker), state / "custom_checkpoint_0.pkl")
    acc = SimpleNamespace(distributed_type="NO", process_index=0, unwrap_model=lambda m: m)
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: the old pickle format"):
        checkpoint.load_training_state(state, acc, None, None, None, lora=True)
    assert not marker.exists()


def test_state_round_trip_is_exact(tmp_path):
    """Weights, AdamW moments, the LR scheduler, accelerator.step and every RNG come back bit for bit."""
    import random

    import numpy as np
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=20)
        return model, opt, sched

    def train_steps(model, opt, sched, n):
        for _ in range(n):
            model(torch.randn(4, 5)).square().mean().backward()
            opt.step()
            sched.step()
            opt.zero_grad()

    acc = Accelerator(cpu=True)
    model, opt, sched = build()
    model, opt = acc.prepare(model, opt)
    train_steps(model, opt, sched, 3)
    acc.step = 6
    checkpoint.save_training_state(tmp_path / "ts", acc, model, opt, sched, {"step": 3}, lora=False)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    train_steps(model, opt, sched, 2)
    expect_w = {k: v.clone() for k, v in model.state_dict().items()}
    expect_lr = sched.get_last_lr()

    model2, opt2, sched2 = build()
    model2, opt2 = acc.prepare(model2, opt2)
    acc.step = 0
    assert checkpoint.load_training_state(tmp_path / "ts", acc, model2, opt2, sched2, lora=False) == {"step": 3}
    assert acc.step == 6
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    train_steps(model2, opt2, sched2, 2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expect_w[k]), k
    assert sched2.get_last_lr() == expect_lr and opt2.param_groups[0]["betas"] == (0.9, 0.95)


def test_deepspeed_engine_loads_become_weights_only(tmp_path):
    """DeepSpeed's own checkpoint engine unpickles with weights_only=False; the patched one loads what
    a ZeRO checkpoint holds (loss scaler, stage enum, tensors) and refuses a payload, naming the file."""
    ce_mod = pytest.importorskip("deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    engine = SimpleNamespace(checkpoint_engine=ce_mod.TorchCheckpointEngine())
    checkpoint._safe_deepspeed_loads(engine)
    good = {"loss_scaler": DynamicLossScaler(2 ** 16, 1000, 1, 1, False, True, torch.bfloat16),
            "zero_stage": ZeroStageEnum.gradients, "param_shapes": [{"w": torch.Size([3, 4])}],
            "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}},
                                     "param_groups": [{"betas": (0.9, 0.99)}]},
            "sparse_tensor_module_names": set(), "ds_version": "0.19",
            # ZeRO-1/2 optimizer states map each parameter to its slice (the H200 ZeRO-2 resume refused these
            # before fragment_address joined the allow-list: docs/PERFORMANCE.md)
            "param_slice_mappings": [OrderedDict(w=fragment_address(numel=12, start=0))]}
    engine.checkpoint_engine.save(good, str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    out = engine.checkpoint_engine.load(str(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"), map_location="cpu")
    assert out["loss_scaler"].cur_scale == 2 ** 16 and out["zero_stage"] == ZeroStageEnum.gradients
    assert torch.equal(out["base_optimizer_state"]["state"][0]["exp_avg"], torch.ones(3))
    assert out["param_slice_mappings"][0]["w"] == fragment_address(numel=12, start=0)
    marker, bad = tmp_path / "PWNED", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused to load.*globals outside the "
                                              "allow-list: .*system"):
        engine.checkpoint_engine.load(str(bad))
    assert not marker.exists()


# ------------------------------------------------------------------ latest pointer, torn metrics
def test_kill_between_rename_and_pointer(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def save(step):
        tmp = checkpoint.step_dir(run_dir, step).parent / f".step-{step:06d}.tmp"
        tmp.mkdir(parents=True)
        (tmp / "weights").write_text(str(step))
        checkpoint.finalize(tmp, checkpoint.step_dir(run_dir, step), {"step": step}, keep_last=0)

    save(2)

    class Killed(BaseException):
        pass

    def killed_mid_pointer(path, text):  # the temp file exists, the rename into `latest` never happens
        (Path(path).parent / ".latest.x1y2.tmp").write_text(text)
        raise Killed

    monkeypatch.setattr(checkpoint, "atomic_write_text", killed_mid_pointer)
    with pytest.raises(Killed):
        save(4)
    monkeypatch.undo()
    ckdir = run_dir / "checkpoints"
    (ckdir / ".step-000006.tmp").mkdir()  # and a save killed before its rename
    assert (ckdir / "latest").read_text() == "step-000002\n"  # the stale pointer
    assert checkpoint.latest_checkpoint(run_dir).name == "step-000004"  # resume scans, never trusts it
    done = checkpoint.repair_checkpoints(run_dir)
    assert (ckdir / "latest").read_text() == "step-000004\n"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step-000002", "step-000004"]
    assert "latest -> step-000004 (was step-000002)" in done
    assert checkpoint.repair_checkpoints(run_dir) == []  # idempotent


def test_rerun_repairs_pointer_and_cuts_torn_metrics(tiny_models, rl_jsonl, four_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(four_steps, run_dir)
    ckdir = run_dir / "checkpoints"
    (ckdir / "latest").write_text("step-000002\n")
    (ckdir / ".latest.abcd.tmp").write_text("step-000004\n")
    (ckdir / ".step-000006.tmp" / "training_state").mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.12')  # kill -9 mid-row
    res = trainer(tiny_models, rl_jsonl, run_dir, "train.max_steps=6")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step-000004 at step 4" in res.stdout
    assert (ckdir / "latest").read_text() == "step-000006\n"
    assert not list(ckdir.glob(".*"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # every line parses
    assert [r["step"] for r in rows] == [2, 4, 6] and [r["iteration"] for r in rows] == [1, 2, 3]


def test_metrics_reader_and_writer_on_a_torn_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in runtime.read_metrics(path)] == [1, 2]  # a reader during or after the kill
    with runtime.MetricsWriter(tmp_path) as m:
        m.log({"loss": 1.0}, step=3)
    assert path.read_text().startswith('{"step": 1}\n{"step": 2}\n{"step": 3, "time"')
    assert [r["step"] for r in runtime.read_metrics(path)] == [1, 2, 3]
    assert runtime.cut_torn_tail(path) == 0
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl: line 2"):
        runtime.read_metrics(path)
    path.write_text('no newline at all')
    assert runtime.cut_torn_tail(path) == len("no newline at all") and path.read_text() == ""


# ------------------------------------------------------------------ LoRA metadata cross-check
def write_lora(root: Path, *, tensor_rank=8, header_rank=8, header_alpha=16.0, meta_alpha=16.0, meta_rank=8) -> Path:
    """A two-layer LoRA file in diffusers naming with header metadata and a meta.json beside it."""
    from safetensors.torch import save_file

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    state = {}
    for mod, (i, o) in {"transformer_blocks.0.attn.to_q": (16, 16), "transformer_blocks.0.attn.to_k": (16, 12)}.items():
        state[f"transformer.{mod}.lora_A.weight"] = torch.randn(tensor_rank, i, generator=g)
        state[f"transformer.{mod}.lora_B.weight"] = torch.randn(o, tensor_rank, generator=g)
    md = {"transformer.r": header_rank, "transformer.lora_alpha": header_alpha, "transformer.target_modules": ["to_q"]}
    save_file(state, str(root / "pytorch_lora_weights.safetensors"), metadata={"lora_adapter_metadata": json.dumps(md)})
    (root / "meta.json").write_text(json.dumps({"kind": "lora", "lora": {"rank": meta_rank, "alpha": meta_alpha}}))
    return root


def test_lora_rank_comes_from_the_tensors_and_alphas_must_agree(tmp_path):
    from etchr_rl.lora import read_lora

    _, alpha, rank = read_lora(write_lora(tmp_path / "ok"))
    assert (alpha, rank) == (16.0, 8)
    with pytest.raises(ValueError, match=r"header lora_adapter_metadata\) says rank 4, the lora_A tensors .* rank 8"):
        read_lora(write_lora(tmp_path / "r", header_rank=4, meta_rank=4))  # would fuse at alpha/4: twice the strength
    with pytest.raises(ValueError, match=r"meta.json \(lora\) says rank 4"):
        read_lora(write_lora(tmp_path / "m", meta_rank=4))
    d = write_lora(tmp_path / "a", header_alpha=8.0)
    with pytest.raises(ValueError) as exc:
        read_lora(d)
    msg = str(exc.value)
    assert "alpha 8" in msg and "alpha 16" in msg and str(d / "pytorch_lora_weights.safetensors") in msg \
        and str(d / "meta.json") in msg


def test_merge_refuses_disagreeing_alphas(tiny_models, tmp_path):
    d = write_lora(tmp_path / "lora", header_alpha=8.0)
    res = subprocess.run([sys.executable, str(RL_DIR / "merge_lora.py"), "--base", str(tiny_models.flux), "--lora",
                          str(d), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 2 and "LoRA alpha mismatch" in res.stderr and "alpha 8" in res.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ one live writer, die with the launcher
def test_second_trainer_on_a_held_run_dir_stops_naming_the_holder(tiny_models, rl_jsonl, tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from etchr_rl.runtime import RunDirLock; RunDirLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(120)", str(RL_DIR), str(run_dir)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = trainer(tiny_models, rl_jsonl, run_dir, "train.max_steps=2")
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"pid {holder.pid} on host {socket.gethostname()}" in res.stderr
        assert not (run_dir / "config.yaml").exists()  # stopped before writing anything
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with runtime.RunDirLock(run_dir):  # the kernel dropped the dead holder's lock
        with pytest.raises(runtime.RunDirLocked, match=f"pid {os.getpid()} "):
            runtime.RunDirLock(run_dir).acquire()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_worker_dies_with_its_launcher(tmp_path):
    ready = tmp_path / "child.pid"
    child = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from etchr_rl.runtime import die_with_parent;"
             "assert die_with_parent(); open(sys.argv[2], 'w').write(str(os.getpid())); time.sleep(120)")
    parent = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], "
              "sys.argv[3]]); time.sleep(120)")
    launcher = subprocess.Popen([sys.executable, "-c", parent, child, str(RL_DIR), str(ready)])
    try:
        for _ in range(300):
            if ready.is_file() and ready.read_text():
                break
            time.sleep(0.1)
        pid = int(ready.read_text())
        assert _alive(pid)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        for _ in range(300):
            if not _alive(pid):
                break
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if ready.is_file() and ready.read_text() and _alive(int(ready.read_text())):
            os.kill(int(ready.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
