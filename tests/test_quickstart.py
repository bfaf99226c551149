"""The documented commands run as written: README's Evaluation block, the config headers that start a
server and evaluate, and the DL3DV reference path, against the stand-in `vllm` (tests/fakes/vllm) first
on PATH and the tiny models.

The only changes to the documented text are textual substitutions of fixtures for placeholders: the
model / checkpoint / data paths, 127.0.0.1:800N -> a free port range, a copy of the config with its
repository paths pointing at the fixtures, and torchrun's 8 processes -> 2 (CPU). Training launchers
(scripts/rl/train.sh, scripts/sft/train.sh) are left to their own tests; the header of
configs/eval/tiny_demo.yaml runs scripts/demo.py (tests/test_demo.py); configs/eval/embedded_benchmark.yaml's
header runs with a 3-item benchmark and `--limit 1` (its documented 200 items and `--limit 20` take an hour).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

FAKES = REPO / "tests" / "fakes"
VENV_BIN = Path(sys.executable).parent
KEY = "quickstart-sekrit"


def _free_base(n: int) -> int:
    """A port p with p .. p+n-1 all free."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n < 65000 and all(_free(q) for q in range(p, p + n)):
            return p
    raise RuntimeError(f"no {n} consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _ports(text: str, base: int) -> str:
    return re.sub(r"127\.0\.0\.1:800(\d)", lambda m: f"127.0.0.1:{base + int(m.group(1))}", text)


def _bash(script: str, env: dict, timeout: int = 540) -> subprocess.CompletedProcess:
    """Run `script` with bash -e from the repository root; the whole process group (servers started
    with `&` included) is killed afterwards, also when the script fails or times out."""
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    assert res.returncode == 0, f"exit {res.returncode}\n{script}\n--- output ---\n{out[-8000:]}"
    return res


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, PATH=f"{FAKES}:{VENV_BIN}:{os.environ['PATH']}", LOG_DIR=str(tmp_path / "logs"),
             READY_TIMEOUT="60", OMP_NUM_THREADS="1", FAKE_VLLM_LOG=str(tmp_path / "vllm_calls.jsonl"))
    for k in ("VLLM", "VLLM_API_KEY", "ETCHR_MLLM_API_KEY", "ETCHR_JUDGE_API_KEY", "MODEL_NAME", "BASE_PORT"):
        e.pop(k, None)
    return e


@pytest.fixture
def data(tmp_path, make_dl3dv_small):
    return make_dl3dv_small(tmp_path / "DL3DV-2k.parquet")


@pytest.fixture
def make_dl3dv_small():
    from conftest import load_script

    fixture = load_script("make_dl3dv_fixture")
    return lambda path: (fixture.make(str(path), n=2, seed=0), Path(path))[1]


def _reference_config(tmp_path, tiny_models, data, base) -> Path:
    """configs/eval/dl3dv_reference.yaml with its repository paths pointing at the fixtures."""
    text = (REPO / "configs" / "eval" / "dl3dv_reference.yaml").read_text()
    for old, new in (("checkpoints/etchr-rl-merged", tiny_models.flux), ("data/DL3DV-2k/test.parquet", data),
                     ("runs/eval/dl3dv_reference", tmp_path / "run")):
        assert old in text, old
        text = text.replace(old, str(new))
    path = tmp_path / "dl3dv_reference.yaml"
    path.write_text(_ports(text, base))
    return path


def _calls(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "vllm_calls.jsonl").read_text().splitlines()]


def test_readme_evaluation_block_runs_verbatim(tmp_path, tiny_models, data, env):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Evaluation: Edit-Verify-Reason", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    base = _free_base(4)
    cfg = _reference_config(tmp_path, tiny_models, data, base)
    script = _ports(block, base)
    for old, new in (("/models/Qwen3-VL-8B-Instruct", tiny_models.qwen), ("/ckpt/etchr-rl-merged", tiny_models.flux),
                     ("DL3DV-2k.parquet", data), ("dl3dv.json", tmp_path / "dl3dv.json"),
                     ("../configs/eval/dl3dv_reference.yaml", cfg), ("--nproc_per_node 8", "--nproc_per_node 2")):
        assert old in script, old
        script = script.replace(old, str(new))
    env["BASE_PORT"] = str(base)  # launch_vllm.sh's ports follow the substituted ones
    _bash(script, env)
    calls = _calls(tmp_path)
    assert len(calls) == 4 and {c["argv"][c["argv"].index("--port") + 1] for c in calls} == \
        {str(base + i) for i in range(4)}
    assert all(c["argv"][c["argv"].index("--served-model-name") + 1] == "Qwen/Qwen3-VL-8B-Instruct" for c in calls)
    rows = [json.loads(x) for x in (tmp_path / "dl3dv.json").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(r["judge"] == "1" for r in rows)
    run = tmp_path / "run"
    results = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == ["0", "1"] and all(r["status"] == "ok" for r in results)
    assert "Paper rows: Qwen3-VL-8B" in (run / "summary.md").read_text()  # the served name is recognised


def test_config_headers_that_serve_and_evaluate_run_verbatim(tmp_path, tiny_models, data, env):
    base = _free_base(2)
    cfg = _reference_config(tmp_path, tiny_models, data, base)
    ran = []
    for name in ("eval/dl3dv_reference.yaml", "rl/klein9b_grpo.yaml"):
        header = (REPO / "configs" / name).read_text().split("# Launch:", 1)[1]
        lines = []
        for line in header.splitlines():
            if lines and re.match(r"^# [A-Z][\w ]*:", line):
                break  # the next header field (Hardware:)
            lines.append(line.lstrip("#").strip())
        cmds = [c for c in lines if c and "scripts/rl/train.sh" not in c]  # training: RL/tests
        script = _ports("\n".join(cmds), base)
        for old, new in (("/models/Qwen3-VL-8B-Instruct", tiny_models.qwen),
                         ("../configs/eval/dl3dv_reference.yaml", cfg)):
            script = script.replace(old, str(new))
        env["BASE_PORT"] = str(base)
        _bash(script + "\nkill %1\n", env)
        ran.append(name)
    assert ran == ["eval/dl3dv_reference.yaml", "rl/klein9b_grpo.yaml"]
    assert [json.loads(x)["status"] for x in (tmp_path / "run" / "results.jsonl").read_text().splitlines()] == \
        ["ok", "ok"]
    # serve_judge.sh served the RL config's judge.model on the ports its judge.endpoints list.
    sys.path.insert(0, str(REPO / "RL"))
    from etchr_rl.config import load_rl_config

    rl = load_rl_config(str(REPO / "configs" / "rl" / "klein9b_grpo.yaml"))
    judge_calls = _calls(tmp_path)[1:]
    assert len(judge_calls) == 2
    assert {c["argv"][c["argv"].index("--served-model-name") + 1] for c in judge_calls} == {rl.judge.model}
    assert sorted(f"http://127.0.0.1:{int(c['argv'][c['argv'].index('--port') + 1]) - base + 8000}/v1"
                  for c in judge_calls) == sorted(rl.judge.endpoints)


def test_dl3dv_reference_path_with_the_reference_flags_and_a_key(tmp_path, tiny_models, data, env):
    base = _free_base(1)
    out = tmp_path / "dl3dv.json"
    env["ETCHR_MLLM_API_KEY"] = KEY
    script = (f"cd Evaluation\n"
              f"MODEL_PATH={tiny_models.qwen} MODEL_NAME=qwen3 BASE_PORT={base} bash launch_vllm.sh &\n"
              f"until curl -sf -o /dev/null http://127.0.0.1:{base}/health; do sleep 1; done\n"
              f"python inference_dl3dv.py --vllm_baseurl http://127.0.0.1:{base}/v1 --vllm_api_key {KEY} "
              f"--model qwen3 --result_file {out} --pipe_path {tiny_models.flux} --data_parquet_path {data}\n"
              f"kill %1\n")
    res = _bash(script, env)
    log_text = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    launcher_out = "\n".join(line for line in res.stdout.splitlines() if line.startswith("[launch_vllm]"))
    assert "[launch_vllm] ready" in launcher_out and KEY not in launcher_out and KEY not in log_text
    (call,) = _calls(tmp_path)
    assert call["vllm_api_key_env"] and "--api-key" not in call["argv"] and KEY not in " ".join(call["argv"])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(r["status"] == "ok" for r in rows)
    summary = (tmp_path / "dl3dv_run" / "summary.md").read_text()
    assert "Paper rows: Qwen3-VL-8B" in summary  # the reference's served name "qwen3" is recognised
    assert KEY not in (tmp_path / "dl3dv_run" / "config.yaml").read_text()


def test_stand_in_vllm_answers_unknown_models_like_vllm(tmp_path, env):
    import urllib.error
    import urllib.request

    port = _free_base(1)
    proc = subprocess.Popen([str(FAKES / "vllm"), "serve", "/m/X", "--served-model-name", "X", "--host", "127.0.0.1",
                             "--port", str(port), "--max-model-len", "10", "--enforce-eager"], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL)
    try:
        import time

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                     data=json.dumps({"model": "Y", "messages": []}).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 404
        assert json.loads(err.value.read()) == {"object": "error", "message": "The model `Y` does not exist.",
                                                "type": "NotFoundError", "param": None, "code": 404}
        models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5))
        assert [m["id"] for m in models["data"]] == ["X"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_embedded_benchmark_header_runs_verbatim(tmp_path, env):
    """The 11-column CPU recipe: build the benchmark and the tiny models, start the real local server,
    evaluate every task. Substituted: the output folders (tmp), the port, --n 3 and --limit 1."""
    base = _free_base(1)
    bench, tiny = tmp_path / "bench", tmp_path / "tiny"
    text = (REPO / "configs" / "eval" / "embedded_benchmark.yaml").read_text()
    header = text.split("# Launch:", 1)[1].split("# Hardware:", 1)[0]
    script = "\n".join(line.lstrip("#").strip() for line in header.splitlines())
    cfg = tmp_path / "embedded_benchmark.yaml"
    subs_cfg = (("benchmarks/embedded", bench), ("tiny_models/flux2-klein-tiny", tiny / "flux2-klein-tiny"),
                ("tiny_models/qwen3-vl-tiny", tiny / "qwen3-vl-tiny"), ("runs/eval/embedded_benchmark", tmp_path / "run"))
    for old, new in subs_cfg:
        assert old in text, old
        text = text.replace(old, str(new))
    cfg.write_text(_ports(text, base))
    for old, new in (("--out benchmarks/embedded", f"--out {bench} --n 3"), ("--out tiny_models", f"--out {tiny}"),
                     ("tiny_models/qwen3-vl-tiny", tiny / "qwen3-vl-tiny"), ("configs/eval/embedded_benchmark.yaml", cfg),
                     ("--limit 20", "--limit 1"), ("--port 8000", f"--port {base}")):
        assert old in script, old
        script = script.replace(old, str(new))
    _bash(_ports(script, base) + "\nkill %1\n", env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["tasks"]
    assert len(summary) == 11 and all(s["items"] == 1 for s in summary.values())
    assert "| row | V* | HRBench-4K |" in (tmp_path / "run" / "summary.md").read_text()  # the 11-column table
