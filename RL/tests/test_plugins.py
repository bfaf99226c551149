"""reward.plugins: custom rewards from config, through train_grpo.py as users run it, and the wrapper's
contract (signatures, values, names) in-process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from etchr_rl import rewards as R

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
CONFIG = str(REPO / "configs" / "rl" / "tiny_demo.yaml")

PLUGIN = '''
import numpy as np

def brightness(inputs):
    """Mean pixel value of the edit in [0, 1]; None for rows whose meta says skip."""
    return [None if x.meta.get("skip") else float(np.asarray(x.edited, dtype=np.float64).mean() / 255.0)
            for x in inputs]

def short(inputs):
    return [0.0] * (len(inputs) - 1)

async def with_ctx(inputs, ctx):
    return [1.0 if ctx.judge is None else 0.0 for _ in inputs]
with_ctx.reward_name = "async_ctx"
'''


@pytest.fixture
def data(tmp_path) -> Path:
    """One prompt (64 x 64 source) as a GRPO JSONL."""
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "src.png")
    row = {"id": 0, "instruction": "Make it bright.", "source_image": "src.png", "qa_list": [{"question": "q", "answer": "a"}]}
    (tmp_path / "grpo.jsonl").write_text(json.dumps(row) + "\n")
    return tmp_path / "grpo.jsonl"


def run(tiny_models, data, run_dir, *extra, cwd=REPO):
    argv = ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.jsonl={data}",
            f"train.run_dir={run_dir}", "data.max_area=4096", "sampling.steps=4", "train.grid_every=0", *extra]
    return subprocess.run([sys.executable, str(RL_DIR / "train_grpo.py"), *argv], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=cwd)


def test_plugin_file_reward_is_trained_on_and_logged(tiny_models, data, tmp_path):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(PLUGIN)
    run_dir = tmp_path / "run"
    res = run(tiny_models, data, run_dir, f"reward.plugins=[{plugin}:brightness,{plugin}:with_ctx]",
              "reward.weights={brightness: 1.0, async_ctx: 0.5}", "train.grad_accum=2", "train.max_steps=2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert 0.0 < r["reward/brightness"] < 1.0 and r["reward/async_ctx"] == 1.0
        assert r["judge_failure_rate"] == 0.0  # judge-free plugin: its None would not count as a failure
    # brightness varies within the group (random edits): non-zero advantages, a real update
    assert any(r["advantage_abs_mean"] > 0 for r in rows) and any(r["grad_norm"] > 0 for r in rows)
    assert rows[0]["reward/brightness"] != rows[1]["reward/brightness"]  # each iteration's own edits


def test_plugin_module_path_relative_file_and_errors_before_gpu_work(tiny_models, data, tmp_path):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    # a relative file path resolves against the working directory; wrong length stops before the model loads
    res = run(tiny_models, data, tmp_path / "a", "reward.plugins=[my_rewards.py:short]", "reward.weights={short: 1.0}",
              cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "reward plugin 'my_rewards.py:short'" in res.stderr and "returned 2 values for 3 inputs" in res.stderr
    assert "Loading pipeline" not in res.stdout + res.stderr and not (tmp_path / "a" / "checkpoints").exists()
    # an import error names the entry and the cause
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere_xyz\n")
    res = run(tiny_models, data, tmp_path / "b", f"reward.plugins=[{tmp_path / 'broken.py'}:f]",
              "reward.weights={f: 1.0}")
    assert res.returncode == 2 and "reward.plugins entry" in res.stderr and "broken.py:f" in res.stderr
    assert "ModuleNotFoundError" in res.stderr and "not_a_module_anywhere_xyz" in res.stderr
    # a module that is not importable at all
    res = run(tiny_models, data, tmp_path / "c", "reward.plugins=[no_such_pkg_h9.rewards:f]", "reward.weights={f: 1.0}")
    assert res.returncode == 2 and "'no_such_pkg_h9.rewards:f'" in res.stderr and "importing" in res.stderr
    # an attribute that does not exist lists what the module has
    res = run(tiny_models, data, tmp_path / "d", f"reward.plugins=[{tmp_path / 'my_rewards.py'}:nope]",
              "reward.weights={nope: 1.0}")
    assert res.returncode == 2 and "has no attribute 'nope'" in res.stderr and "brightness" in res.stderr


# ---------------------------------------------------------------------------------------------- in-process
def _inputs(n, **meta):
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    return [R.RewardInput(instruction="x", question="q", answer="a", original=img, edited=img, meta=dict(meta))
            for _ in range(n)]


def _score(plugin, inputs):
    ctx = R.RewardContext(judge=None, cfg=None, images=R.ImageURIs(), extras={})
    return asyncio.run(plugin.score(inputs, ctx))


def test_wrapper_contract():
    def red(inputs):
        return [np.float32(np.asarray(x.edited)[..., 0].mean() / 255) for x in inputs]

    p = R.make_plugin_reward("m:red", red)
    assert (p.name, p.needs_judge, p.takes_ctx) == ("red", False, False)
    assert _score(p, _inputs(3)) == [1.0, 1.0, 1.0] and all(type(v) is float for v in _score(p, _inputs(2)))

    class Obj:
        name, needs_judge = "objective", True

        async def score(self, inputs, ctx):
            return [None] * len(inputs)

    o = R.make_plugin_reward("m:Obj", Obj)  # a class is instantiated
    assert (o.name, o.needs_judge, o.takes_ctx) == ("objective", True, True) and _score(o, _inputs(2)) == [None, None]

    with pytest.raises(R.RewardConfigError, match="takes neither"):
        R.make_plugin_reward("m:f", lambda a, b, c: None)
    with pytest.raises(R.RewardConfigError, match="async method score"):
        R.make_plugin_reward("m:o", type("O", (), {"name": "o", "score": lambda self, i, c: []})())
    with pytest.raises(R.RewardConfigError, match="must be an identifier"):
        R.make_plugin_reward("m:<lambda>", lambda inputs: [])
    bad = {"nan": lambda inputs: [float("nan")] * len(inputs), "str": lambda inputs: ["1"] * len(inputs),
           "scalar": lambda inputs: 1.0, "short": lambda inputs: [1.0]}
    msgs = {"nan": "instead of NaN", "str": "value 0 is '1'", "scalar": "returned float", "short": "returned 1 values"}
    for key, fn in bad.items():
        fn.reward_name = f"bad_{key}"
        with pytest.raises(R.RewardConfigError, match=msgs[key]) as e:
            _score(R.make_plugin_reward(f"m:{key}", fn), _inputs(2))
        assert f"'m:{key}'" in str(e.value)


def test_load_plugins_names_and_probe(tmp_path):
    f = tmp_path / "p.py"
    f.write_text(PLUGIN + "\ndef maze_path(inputs):\n    return [0.0] * len(inputs)\n"
                          "\ndef boom(inputs):\n    raise KeyError('target')\n")
    try:
        plugins = R.load_plugins([f"{f}:brightness"])
        assert R.get_reward("brightness") is plugins[0]
        R.load_plugins([f"{f}:brightness"])  # loading again (same process) replaces, no clash
        with pytest.raises(R.RewardConfigError, match="is a built-in reward"):
            R.load_plugins([f"{f}:maze_path"])
        with pytest.raises(R.RewardConfigError, match="both define reward 'brightness'"):
            R.load_plugins([f"{f}:brightness", f"{f}:brightness"])
        with pytest.raises(R.RewardConfigError, match="module:function"):
            R.load_plugins(["no_colon_here"])
        with pytest.raises(R.RewardConfigError, match="does not exist"):
            R.load_plugins([f"{tmp_path / 'absent.py'}:f"])
        boom = R.load_plugins([f"{f}:boom"])
        with pytest.raises(R.RewardConfigError, match=r"failed on a probe batch of 3 inputs: KeyError: 'target'"):
            R.probe_plugins(boom, _inputs(3), None)
        R.probe_plugins(plugins, _inputs(3), None)  # a good plugin passes
        # the trainer's entry point treats the plugin as any reward: values, None for rows it skips
        out = R.compute_rewards_sync(_inputs(1) + _inputs(1, skip=True), ["brightness"], None, None)
        assert out["brightness"][0] == pytest.approx(85 / 255) and out["brightness"][1] is None
        assert R.failure_rate(out) == 0.0  # judge-free: None is "not applicable", not a failure
    finally:
        for name in ("brightness", "boom"):
            R.REWARDS.pop(name, None)


def test_target_similarity_golden_values(tmp_path):
    """-mean((edit - target)^2) in [0, 1] pixels, edit resized to the target; None without a target."""
    Image.new("RGB", (4, 4), (255, 255, 255)).save(tmp_path / "white.png")
    black, grey = Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (4, 4), (51, 51, 51))
    half = Image.new("RGB", (4, 4), (255, 255, 255))
    half.paste((0, 0, 0), (0, 0, 4, 2))  # top half black
    meta = {"target_image": str(tmp_path / "white.png")}
    assert R.target_similarity(black, meta) == pytest.approx(-1.0)  # 8 x 8 resized to 4 x 4
    assert R.target_similarity(grey, meta) == pytest.approx(-(0.8 ** 2))
    assert R.target_similarity(half, meta) == pytest.approx(-0.5)
    assert R.target_similarity(Image.new("RGB", (4, 4), "white"), meta) == 0.0
    xs = [R.RewardInput("x", "q", "a", grey, grey, dict(meta)), R.RewardInput("x", "q", "a", grey, grey, {})]
    out = R.compute_rewards_sync(xs, ["target_similarity"], None, None)
    assert out["target_similarity"] == [pytest.approx(-0.64), None]
    with pytest.raises(R.RewardConfigError, match="does not exist"):
        R.target_similarity(grey, {"target_image": str(tmp_path / "gone.png")})
