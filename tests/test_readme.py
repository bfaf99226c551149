"""The README's two commands are the ones CI and users run: keep them in sync with .ci/run."""

from conftest import REPO

TEST_CMD = "bash env_setup.sh && .venv/bin/python -m pytest"
DEMO_CMD = "bash env_setup.sh && .venv/bin/python scripts/demo.py"


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text()
    assert TEST_CMD in readme and DEMO_CMD in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert TEST_CMD in ci.splitlines()


def test_one_served_name_and_one_port_everywhere():
    """launch_vllm.sh, serve_judge.sh, inference_dl3dv.py, both schemas and every real-model config agree."""
    import re
    import sys

    name, port = "Qwen/Qwen3-VL-8B-Instruct", "8000"
    launch = (REPO / "Evaluation" / "launch_vllm.sh").read_text()
    judge = (REPO / "scripts" / "rl" / "serve_judge.sh").read_text()
    assert f"MODEL_NAME=${{MODEL_NAME:-{name}}}" in launch and f"BASE_PORT=${{BASE_PORT:-{port}}}" in launch
    assert f"SERVED_MODEL_NAME=${{SERVED_MODEL_NAME:-{name}}}" in judge and f"BASE_PORT=${{BASE_PORT:-{port}}}" in judge
    sys.path.insert(0, str(REPO / "Evaluation"))
    import inference_dl3dv

    args = inference_dl3dv.parse([])
    assert args.model == name and args.vllm_baseurl == f"http://127.0.0.1:{port}/v1"
    from etchr_eval.config import MLLMConfig

    assert MLLMConfig().model == name and MLLMConfig().endpoints == [f"http://127.0.0.1:{port}/v1"]
    sys.path.insert(0, str(REPO / "RL"))
    from etchr_rl.config import JudgeConfig

    assert JudgeConfig().model == name and JudgeConfig().endpoints[0] == f"http://127.0.0.1:{port}/v1"
    for cfg in ("configs/eval/dl3dv_reference.yaml", "configs/rl/klein9b_grpo.yaml"):
        text = (REPO / cfg).read_text()
        assert f"model: {name}" in text, cfg
        ports = re.findall(r"127\.0\.0\.1:(\d+)", text.split("\n", 1)[1])
        assert ports and all(int(p) - int(port) in range(8) for p in ports), (cfg, ports)
    for doc in ("README.md", "RL.md"):
        text = (REPO / doc).read_text()
        assert ":10000" not in text.replace("BASE_PORT=10000", ""), f"{doc}: the reference's port, not ours"
