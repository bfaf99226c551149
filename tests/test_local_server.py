"""The real local MLLM server (transformers serve + tiny Qwen3-VL) and its fixture's cleanup."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, load_script


def _data_uri(seed: int, size=(96, 128)) -> str:
    img = Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(server, n_images: int, text="What differs between the two images?"):
    from openai import OpenAI

    client = OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=60)
    content = [{"type": "image_url", "image_url": {"url": _data_uri(i)}} for i in range(n_images)]
    content.append({"type": "text", "text": text})
    return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": content}],
                                          max_tokens=8, temperature=0)


def test_server_answers_chat_with_two_data_uri_images(mllm_server):
    two = _chat(mllm_server, 2)
    assert isinstance(two.choices[0].message.content, str)
    assert 1 <= two.usage.completion_tokens <= 8
    one = _chat(mllm_server, 1)
    zero = _chat(mllm_server, 0)
    # Each image adds its vision tokens: proof that both images reached the model.
    per_image = one.usage.prompt_tokens - zero.usage.prompt_tokens
    assert per_image > 4
    assert two.usage.prompt_tokens - zero.usage.prompt_tokens == 2 * per_image


def test_server_is_bound_to_loopback_and_reports_model(mllm_server):
    import json
    import urllib.request

    assert mllm_server.host == "127.0.0.1"
    with urllib.request.urlopen(mllm_server.base_url + "/models", timeout=10) as r:
        ids = [m["id"] for m in json.load(r)["data"]]
    assert mllm_server.model in ids


def test_start_failure_names_the_log(tmp_path):
    mod = load_script("local_mllm_server")
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        mod.LocalMLLMServer(tmp_path)


INNER_TEST = textwrap.dedent('''
    import importlib.util, os, signal
    spec = importlib.util.spec_from_file_location("etchr_root_conftest", {conftest!r})
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    tiny_models, mllm_server = m.tiny_models, m.mllm_server

    def test_uses_server_then_fails(mllm_server):
        if os.environ.get("INNER_MODE") == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)   # the harshest end: no finaliser runs
        assert False, "deliberate failure"
''')


@pytest.mark.parametrize("mode", ["fail", "sigkill"])
def test_server_fixture_leaves_no_process_behind(tiny_models, tmp_path, mode):
    mod = load_script("local_mllm_server")
    inner = tmp_path / "test_inner.py"
    inner.write_text(INNER_TEST.format(conftest=str(REPO / "conftest.py")))
    pid_file = tmp_path / "pid"
    env = dict(os.environ, ETCHR_TEST_SERVER_PID_FILE=str(pid_file), ETCHR_TINY_MODELS_DIR=str(tiny_models.root),
               INNER_MODE=mode)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          str(inner)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if mode == "fail":
        assert res.returncode == 1, res.stdout + res.stderr
        assert "deliberate failure" in res.stdout
    else:
        assert res.returncode == -9, res.stdout + res.stderr
    pid = int(pid_file.read_text())
    import time

    deadline = time.monotonic() + 20
    while mod.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not mod.pid_alive(pid), f"server pid {pid} still running after the test process ended ({mode})"


def test_served_name_is_the_path_from_the_repo_root_or_absolute(tmp_path, monkeypatch):
    srv_mod = load_script("local_mllm_server")
    (tmp_path / "repo" / "tiny_models" / "q").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo" / "tiny_models")
    assert srv_mod.served_name("q", root=tmp_path / "repo") == "tiny_models/q"  # relative to the cwd, named from root
    assert srv_mod.served_name(tmp_path / "repo" / "tiny_models" / "q", root=tmp_path / "repo") == "tiny_models/q"
    assert srv_mod.served_name("q", root=tmp_path / "elsewhere") == str(tmp_path / "repo" / "tiny_models" / "q")
    assert srv_mod.served_name(REPO / "tiny_models" / "qwen3-vl-tiny") == "tiny_models/qwen3-vl-tiny"


def test_a_relative_model_path_serves_under_the_configs_name(tiny_models, tmp_path, monkeypatch):
    """--model given relative to another working directory: the server answers under the name configs use."""
    import json
    import urllib.request

    srv_mod = load_script("local_mllm_server")
    root = tmp_path / "checkout"
    (root / "tiny_models").mkdir(parents=True)
    (root / "tiny_models" / "qwen3-vl-tiny").symlink_to(tiny_models.qwen, target_is_directory=True)
    (root / "Evaluation").mkdir()
    monkeypatch.chdir(root / "Evaluation")
    with srv_mod.LocalMLLMServer("../tiny_models/qwen3-vl-tiny", root=root, log_path=tmp_path / "s.log") as srv:
        assert srv.model == "tiny_models/qwen3-vl-tiny"
        with urllib.request.urlopen(srv.base_url + "/models", timeout=10) as r:
            assert srv.model in [m["id"] for m in json.load(r)["data"]]
        reply = _chat(srv, 1, "Hi")
        assert reply.choices[0].message.content is not None
