"""scripts/slurm/{sft,rl,eval}.sbatch on a fake allocation: the exact command each node would run.

A fake `scontrol` (hostname expansion) and a fake `srun` sit first on PATH. The fake srun runs its
command once per node of the step (concurrently, as srun does), with the SLURM_NODEID / SLURM_PROCID /
SLURM_LOCALID / SLURMD_NODENAME that Slurm gives the task, each task's output in its own file, and
refuses options the real srun would not get from these scripts. A fake `python` records its argv and
environment per node, so the launchers' final commands are compared argument by argument. The RL and
eval tests also start the real judge / MLLM launchers against the stand-in `vllm` (tests/fakes/vllm).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import REPO

SLURM = REPO / "scripts" / "slurm"
FAKES = REPO / "tests" / "fakes"
JOB_ID = 4242
PORT = 20000 + JOB_ID % 20000  # the sbatch scripts' MASTER_PORT rule

HOSTLIST = r'''
import re


def expand(spec):
    """gpu[01-03,07],login1 -> gpu01 gpu02 gpu03 gpu07 login1 (Slurm's hostlist syntax, one bracket)."""
    hosts = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", spec):
        prefix, ranges = m.group(1), m.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts
'''

SCONTROL = "#!" + sys.executable + "\nimport sys\n" + HOSTLIST + r'''
if sys.argv[1:3] != ["show", "hostnames"] or len(sys.argv) != 4:
    sys.exit("fake scontrol: only `scontrol show hostnames LIST`")
print("\n".join(expand(sys.argv[3])))
'''

SRUN = "#!" + sys.executable + "\nimport json, os, signal, subprocess, sys\n" + HOSTLIST + r'''
# The options these launchers use, each as --name=value; anything else is a mistake in a launcher.
KNOWN = {"--nodes", "--ntasks", "--ntasks-per-node", "--relative", "--kill-on-bad-exit"}
args, opts = sys.argv[1:], {}
while args and args[0].startswith("-"):
    name, eq, value = args.pop(0).partition("=")
    if name not in KNOWN or not eq or not value:
        sys.exit(f"fake srun: unexpected option {name}{eq}{value}")
    opts[name] = value
hosts = expand(os.environ["SLURM_JOB_NODELIST"])
n, rel = int(opts.get("--nodes", len(hosts))), int(opts.get("--relative", 0))
if int(opts.get("--ntasks", n)) != n or opts.get("--ntasks-per-node") != "1":
    sys.exit(f"fake srun: expected one task per node, got {opts}")
if rel + n > len(hosts) or not args:
    sys.exit(f"fake srun: {n} node(s) from {rel} do not fit {hosts}, or no command")
log_dir = os.environ["FAKE_SRUN_DIR"]
steps = os.path.join(log_dir, "steps.jsonl")
step = sum(1 for _ in open(steps)) if os.path.exists(steps) else 0
with open(steps, "a") as f:
    f.write(json.dumps({"step": step, "argv": sys.argv[1:], "hosts": hosts[rel:rel + n]}) + "\n")
procs = []
for i, host in enumerate(hosts[rel:rel + n]):
    env = dict(os.environ, SLURM_NODEID=str(i), SLURM_PROCID=str(i), SLURM_LOCALID="0", SLURMD_NODENAME=host,
               SLURM_STEP_NUM_NODES=str(n), SLURM_STEP_ID=str(step))
    out = open(os.path.join(log_dir, f"step{step}.{host}.out"), "w")
    procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))


def stop(signum, frame):  # srun forwards the signal to its tasks
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
sys.exit(max(p.wait() for p in procs))
'''

# Stands in for `python` on each node: records argv and what the launchers hand down, and, when told to,
# calls the judge / MLLM endpoint with and without the key from the environment.
PYTHON = "#!" + sys.executable + r'''
import json, os, sys, urllib.error, urllib.request
rec = {"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in
       ("NODE_RANK", "SLURM_NODEID", "MASTER_ADDR", "NNODES", "CUDA_VISIBLE_DEVICES", "ACCELERATE_CONFIG")}}
probe, key_env = os.environ.get("PROBE_URL"), os.environ.get("PROBE_KEY_ENV")
if probe:
    for label, headers in (("with_key", {"Authorization": "Bearer " + os.environ.get(key_env, "")}),
                           ("without_key", {})):
        try:
            rec[label] = urllib.request.urlopen(urllib.request.Request(probe, headers=headers), timeout=10).status
        except urllib.error.HTTPError as exc:
            rec[label] = exc.code
with open(os.path.join(os.environ["FAKE_PY_DIR"], os.environ["SLURMD_NODENAME"] + ".json"), "w") as f:
    json.dump(rec, f)
'''


def _write(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def cluster(tmp_path):
    """A fake 2-node allocation; returns run(script, *args, nodelist=..., **env) -> (proc, steps, outputs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write(bin_dir / "scontrol", SCONTROL)
    _write(bin_dir / "srun", SRUN)
    fake_py = _write(tmp_path / "fakepy", PYTHON)
    (tmp_path / "srun").mkdir()
    (tmp_path / "py").mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in
            ("NGPU", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN", "ETCHR_JUDGE_API_KEY")}

    def run(script, *args, nodelist="gpu[01-02]", nnodes=2, **env):
        e = dict(base, PATH=f"{bin_dir}:{FAKES}:{os.environ['PATH']}", SLURM_JOB_ID=str(JOB_ID),
                 SLURM_JOB_NODELIST=nodelist, SLURM_JOB_NUM_NODES=str(nnodes), SLURM_NNODES=str(nnodes),
                 SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO), FAKE_SRUN_DIR=str(tmp_path / "srun"),
                 FAKE_PY_DIR=str(tmp_path / "py"), PYTHON=str(fake_py))
        e.update({k: str(v) for k, v in env.items()})
        # sbatch runs a copy of the script from its spool folder: so do we, from another working directory
        spool = tmp_path / "spool"
        spool.mkdir(exist_ok=True)
        shutil.copy(SLURM / script, spool / "slurm_script")
        proc = subprocess.run(["bash", str(spool / "slurm_script"), *args], cwd=tmp_path, env=e,
                              capture_output=True, text=True, timeout=120)
        steps_file = tmp_path / "srun" / "steps.jsonl"
        steps = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
        outputs = {p.name: p.read_text() for p in (tmp_path / "srun").glob("step*.out")}
        calls = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "py").glob("*.json")}
        return proc, steps, outputs, calls

    run.fake_py = str(fake_py)
    return run


def _shown(text: str, tag: str) -> list[list[str]]:
    """The commands a launcher printed with show() under [tag], as argv lists."""
    return [shlex.split(line.split("] ", 1)[1]) for line in text.splitlines() if line.startswith(f"[{tag}] ")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SFT_ARGS = ["--config", "configs/sft/klein9b_lora_r768.yaml", "train.max_steps=5", "train.run_dir=runs/with space"]


def test_sft_two_nodes_run_accelerate_with_their_node_rank(cluster):
    proc, steps, _, calls = cluster("sft.sbatch", *SFT_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert [s["hosts"] for s in steps] == [["gpu01", "gpu02"]]
    assert steps[0]["argv"][:4] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert sorted(calls) == ["gpu01", "gpu02"]
    for host, rank in (("gpu01", "0"), ("gpu02", "1")):  # keyed by host: a swapped rank fails here
        assert calls[host]["argv"] == [
            "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/ddp.yaml",
            "--num_processes", "16", "--num_machines", "2", "--machine_rank", rank,
            "--main_process_ip", "gpu01", "--main_process_port", str(PORT),
            "--rdzv_backend", "static", "--same_network", "SFT/train_sft.py", *SFT_ARGS], host
        assert calls[host]["env"]["NODE_RANK"] == rank
    # The one printed srun line is the command that ran, pasteable into a shell.
    shown = [c for c in _shown(proc.stdout, "slurm/sft") if c[0] == "srun"]
    assert shown == [["srun", *steps[0]["argv"]]]


def test_sft_dry_run_prints_each_nodes_launch_and_gpus_from_the_gres_spec(cluster):
    # SLURM_GPUS_PER_NODE as --gpus-per-node=h200:4 sets it; DRY_RUN=1 reaches train.sh on every node.
    proc, _, outputs, calls = cluster("sft.sbatch", *SFT_ARGS, SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h200:4",
                                      DRY_RUN=1, ACCELERATE_CONFIG="configs/accelerate/deepspeed_zero3.yaml")
    assert proc.returncode == 0, proc.stderr
    assert calls == {}  # nothing was launched
    for host, rank in (("gpu01", 0), ("gpu02", 1)):
        line = [x for x in outputs[f"step0.{host}.out"].splitlines() if x.startswith("[sft/train.sh] ")]
        assert len(line) == 1
        assert (f"--num_processes 8 --num_machines 2 --machine_rank {rank} --main_process_ip gpu01 "
                f"--main_process_port {PORT}") in line[0]
        assert "--config_file configs/accelerate/deepspeed_zero3.yaml" in line[0]


def test_outside_an_allocation_and_without_arguments_stop_with_a_reason(cluster):
    proc, steps, _, _ = cluster("sft.sbatch", *SFT_ARGS, SLURM_JOB_ID="")
    assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr and steps == []
    proc, steps, _, _ = cluster("sft.sbatch")
    assert proc.returncode == 2 and "usage: sbatch scripts/slurm/sft.sbatch" in proc.stderr and steps == []
    proc, steps, _, _ = cluster("eval.sbatch", "--config", "x.yaml", SLURM_GPUS_ON_NODE="", NGPU="")
    if shutil.which("nvidia-smi") is None:
        assert proc.returncode == 2 and "cannot tell the GPUs per node" in proc.stderr and steps == []
    proc, steps, _, _ = cluster("rl.sbatch", "--config", "x.yaml", nodelist="gpu01", nnodes=1)
    assert proc.returncode == 2 and "leave none for the trainer" in proc.stderr and steps == []


RL_ARGS = ["--config", "configs/rl/klein9b_grpo.yaml", "train.max_steps=3"]


def test_rl_three_nodes_dry_run_trains_on_two_and_judges_on_the_last(cluster):
    proc, steps, outputs, calls = cluster("rl.sbatch", *RL_ARGS, nodelist="gpu[01-03]", nnodes=3, DRY_RUN=1)
    assert proc.returncode == 0, proc.stderr
    judge_urls = ",".join(f"http://gpu03:{8000 + i}/v1" for i in range(8))
    assert [c for c in _shown(proc.stdout, "slurm/rl") if c[0] == "srun"][0] == [
        "srun", "--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--relative=2", "env", "HOST=0.0.0.0", "NGPU=8",
        "BASE_PORT=8000", f"LOG_DIR=logs/judge-{JOB_ID}", "bash", "scripts/rl/serve_judge.sh"]
    assert "judges not started" in proc.stdout and calls == {}
    assert [s["hosts"] for s in steps] == [["gpu01", "gpu02"]]  # only the trainer step ran
    for host, rank in (("gpu01", 0), ("gpu02", 1)):
        line = [x for x in outputs[f"step0.{host}.out"].splitlines() if x.startswith("[rl/train.sh] ")]
        assert line == [f"[rl/train.sh] {cluster.fake_py} -m torch.distributed.run --nproc_per_node 8 --nnodes 2 "
                        f"--node_rank {rank} --master_addr gpu01 --master_port {PORT} RL/train_grpo.py "
                        f"{' '.join(RL_ARGS)} judge.endpoints=[{judge_urls}]"], host


def test_rl_judge_override_wins_and_parses_in_the_rl_config(cluster):
    """Two nodes: the trainer alone on gpu01, the judge URLs on gpu02; the override beats the user's."""
    user = "judge.endpoints=[http://elsewhere:9000/v1]"
    proc, _, outputs, _ = cluster("rl.sbatch", *RL_ARGS, user, DRY_RUN=1, JUDGE_GPUS=2, BASE_PORT=8100)
    assert proc.returncode == 0, proc.stderr
    assert "--relative=1" in [c for c in _shown(proc.stdout, "slurm/rl") if c[0] == "srun"][0]
    line = outputs["step0.gpu01.out"].splitlines()[-1]
    assert "--nnodes 1 --node_rank 0 --master_addr gpu01" in line
    overrides = line.split("RL/train_grpo.py ", 1)[1].split()
    assert overrides[-2:] == [user, "judge.endpoints=[http://gpu02:8100/v1,http://gpu02:8101/v1]"]
    resolved = subprocess.run([sys.executable, "RL/train_grpo.py", *overrides, "--print-config"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    import yaml

    judge = yaml.safe_load(resolved.stdout)["judge"]
    assert judge["endpoints"] == ["http://gpu02:8100/v1", "http://gpu02:8101/v1"]


def test_rl_starts_the_judges_waits_for_health_hands_the_key_and_stops_them(cluster):
    """The real flow against the stand-in vLLM: the judge node is `localhost`, so its URLs answer here."""
    port = _free_port()
    proc, steps, outputs, calls = cluster(
        "rl.sbatch", *RL_ARGS, nodelist="gpu01,localhost", JUDGE_GPUS=1, BASE_PORT=port, READY_TIMEOUT=60,
        PROBE_URL=f"http://localhost:{port}/v1/models", PROBE_KEY_ENV="ETCHR_JUDGE_API_KEY")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [s["hosts"] for s in steps] == [["localhost"], ["gpu01"]]  # judges first, then the trainer
    assert "judges ready" in proc.stdout
    call = calls["gpu01"]
    assert call["argv"][-1] == f"judge.endpoints=[http://localhost:{port}/v1]"
    # The made-up key reached the judge (it refuses a request without it) and the trainer (it has it).
    assert call["with_key"] == 200 and call["without_key"] == 401
    assert "judge.endpoints=" in outputs["step0.localhost.out"]  # serve_judge.sh came up on 0.0.0.0
    with pytest.raises(urllib.error.URLError):  # stopped with the job
        for _ in range(50):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            time.sleep(0.2)


EVAL_ARGS = ["--config", "configs/eval/dl3dv_reference.yaml", "--limit", "4"]


def test_eval_two_nodes_dry_run_one_torchrun_job_over_both(cluster):
    proc, steps, outputs, calls = cluster("eval.sbatch", *EVAL_ARGS, DRY_RUN=1, MLLM_GPUS=2,
                                          MODEL_PATH="/models/Qwen3-VL-8B-Instruct")
    assert proc.returncode == 0, proc.stderr
    assert [s["hosts"] for s in steps] == [["gpu01", "gpu02"]] and calls == {}
    assert steps[0]["argv"] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                                "bash", "scripts/slurm/eval_node.sh", *EVAL_ARGS]
    for host, rank in (("gpu01", "0"), ("gpu02", "1")):
        serve, run = _shown(outputs[f"step0.{host}.out"], f"slurm/eval node {rank}")
        assert serve == ["env", "NUM_GPUS=2", "FIRST_GPU=0", "HOST=127.0.0.1", "BASE_PORT=8000",
                         f"LOG_DIR=logs/vllm-{JOB_ID}-node{rank}", "bash", "Evaluation/launch_vllm.sh"]
        assert run == ["env", "CUDA_VISIBLE_DEVICES=2,3,4,5,6,7", cluster.fake_py, "-m", "torch.distributed.run",
                       "--nnodes", "2", "--node_rank", rank, "--nproc_per_node", "6", "--master_addr", "gpu01",
                       "--master_port", str(PORT), "Evaluation/evaluate.py", *EVAL_ARGS,
                       "mllm.endpoints=[http://127.0.0.1:8000/v1,http://127.0.0.1:8001/v1]"], host


def test_eval_node_serves_the_mllm_locally_then_runs_the_editor_ranks(cluster, tmp_path):
    model = tmp_path / "Qwen3-VL-8B-Instruct"
    model.mkdir()
    (model / "config.json").write_text("{}")
    port = _free_port()
    proc, _, outputs, calls = cluster(
        "eval.sbatch", *EVAL_ARGS, nodelist="gpu01", nnodes=1, NGPU=4, BASE_PORT=port, MODEL_PATH=model,
        READY_TIMEOUT=60, PROBE_URL=f"http://127.0.0.1:{port}/v1/models", PROBE_KEY_ENV="ETCHR_MLLM_API_KEY")
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(outputs.values())
    call = calls["gpu01"]
    assert call["argv"][:8] == ["-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0",
                                "--nproc_per_node", "3"]
    assert call["argv"][-1] == f"mllm.endpoints=[http://127.0.0.1:{port}/v1]"
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "1,2,3" and call["with_key"] == 200  # no key set: open
    with pytest.raises(urllib.error.URLError):  # launch_vllm.sh stopped with the node's task
        for _ in range(50):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            time.sleep(0.2)


def test_the_scripts_parse_and_pass_shellcheck():
    scripts = sorted(SLURM.glob("*.sbatch")) + sorted(SLURM.glob("*.sh"))
    assert [p.name for p in scripts] == ["eval.sbatch", "rl.sbatch", "sft.sbatch", "common.sh", "eval_node.sh"]
    for p in scripts:
        subprocess.run(["bash", "-n", str(p)], check=True)
        assert os.access(p, os.X_OK) or p.name == "common.sh", p
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    res = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
