"""RL demonstrably learns: train_grpo.py (subprocess) with the smooth target_similarity reward raises the
mean reward over a learning-rate-0 control with the same rollout seeds, and with the advantage sign flipped
(a wrapper script patches etchr_rl.advantages.combine, then runs train_grpo.py) it falls below the control.

Every other RL test runs random models, so a bug that stops learning (a flipped advantage sign, a sigma or
log-prob convention that differs between rollout and training, a LoRA the sampler does not see) passes them.

Setting (calibrated tiny twin, seed 0): two rows of one 32 x 32 prompt (2 x 2 target tokens: few latent
dimensions, so 16 rollouts per iteration estimate the reward direction well), G = 8, 4 SDE steps, all 3
trainable transitions, one optimizer step per iteration (on-policy), LoRA r4 at lr 0.05, 10 iterations. The
target is the tiny VAE's decode of the all-zero latent (an image the model can reach). The control (lr 0)
draws exactly the learner's noise, so learner - control is the effect of training alone.

Measured (loaded 2-core machine, this setting): the control's per-iteration means run from -0.0153 to
-0.0124 (std 0.0010, so the last-5 mean of an unpaired run has a standard error ~0.0005); learner - control
per iteration +0.0001, +0.0006, +0.0016, +0.0027, +0.0023, +0.0016, +0.0018, +0.0018, +0.0012 (iterations
2-10), +0.0017 over the last 5 (the same at lr 0.03; lr 0.1 overshoots: +0.0000); the flipped sign
-0.0055. The test asserts learner - control > MARGIN = 0.0007 and > 2 standard errors of the control's
last-5 mean, and flipped - control < -MARGIN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

RL_DIR = Path(__file__).resolve().parents[1]
REPO = RL_DIR.parent
CONFIG = str(REPO / "configs" / "rl" / "tiny_demo.yaml")
SIZE, ITERS, LAST_K, MARGIN = 32, 10, 5, 7e-4

pytestmark = pytest.mark.slow

FLIP_WRAPPER = '''
import runpy, sys
sys.path.insert(0, {rl_dir!r})
import etchr_rl.advantages as A

_combine = A.combine


def flipped(*args, **kwargs):  # the bug under test: every advantage with the wrong sign
    adv, valid = _combine(*args, **kwargs)
    return -adv, valid


A.combine = flipped  # train_grpo.py imports combine from the module when it starts
script = {script!r}
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


@pytest.fixture(scope="module")
def target_data(tiny_models, tmp_path_factory) -> Path:
    """Two rows of one prompt; the target image = the VAE's decode of the zero latent."""
    import torch

    from etchr_rl.model import decode, latent_grid, load_pipeline

    out = tmp_path_factory.mktemp("learn")
    pipe = load_pipeline(str(tiny_models.flux), torch.float32)
    h, w = latent_grid(pipe, SIZE, SIZE)
    decode(pipe, torch.zeros(1, h * w, pipe.transformer.config.in_channels), h, w)[0].save(out / "target.png")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(out / "source.png")
    rows = [{"id": i, "instruction": "Make the image uniform.", "source_image": "source.png",
             "target_image": "target.png", "qa_list": [{"question": "q", "answer": "a"}]} for i in range(2)]
    (out / "grpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "grpo.jsonl"


def argv(tiny_models, data, run_dir, *extra):
    return ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.jsonl={data}",
            f"train.run_dir={run_dir}", f"data.max_area={SIZE * SIZE}", "sampling.group_size=8", "sampling.steps=4",
            "sampling.timestep_fraction=1.0", "reward.weights={target_similarity: 1.0}", "train.prompts_per_step=2",
            "train.grid_every=0", "train.checkpoint_every=100000", "train.resume=never", *extra]


def start(cmd, log: Path):
    f = open(log, "w")
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1")), f


def finish(procs):
    for p, f in procs:
        try:
            p.wait(timeout=900)
        finally:
            if p.poll() is None:
                p.kill()
            f.close()


def rewards(run_dir: Path) -> list[float]:
    return [json.loads(x)["reward/target_similarity"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_target_similarity_and_a_flipped_sign_lowers_it(tiny_models, target_data, tmp_path):
    wrapper = tmp_path / "flip_advantage.py"
    wrapper.write_text(FLIP_WRAPPER.format(rl_dir=str(RL_DIR), script=str(RL_DIR / "train_grpo.py")))
    common = ["train.grad_accum=16", f"train.max_steps={ITERS}"]  # 16 samples -> one optimizer step per iteration
    runs = {"learn": ([str(RL_DIR / "train_grpo.py")], ["optim.lr=0.05"]),
            "control": ([str(RL_DIR / "train_grpo.py")], ["optim.lr=0"]),
            "flipped": ([str(wrapper)], ["optim.lr=0.05"])}
    procs = {}
    for name, (script, extra) in runs.items():  # all three at once: one thread each
        procs[name] = start([sys.executable, *script, *argv(tiny_models, target_data, tmp_path / name, *common, *extra)],
                            tmp_path / f"{name}.log")
    finish(procs.values())
    for name, (p, _) in procs.items():
        assert p.returncode == 0, f"{name}: " + (tmp_path / f"{name}.log").read_text()[-4000:]
    r = {name: rewards(tmp_path / name) for name in runs}
    assert all(len(v) == ITERS for v in r.values()), r
    assert r["learn"][0] == r["control"][0] == r["flipped"][0]  # same seeds, same untrained model: same edits
    last = {name: float(np.mean(v[-LAST_K:])) for name, v in r.items()}
    se = float(np.std(r["control"], ddof=1)) / np.sqrt(LAST_K)  # the noise of an unpaired last-k mean
    gain, loss = last["learn"] - last["control"], last["flipped"] - last["control"]
    report = f"last-{LAST_K} means {last}; gain {gain:+.5f}, flipped {loss:+.5f}, control se {se:.5f}; per run {r}"
    print(report)
    assert gain > max(MARGIN, 2 * se), report
    assert loss < -MARGIN, report


def test_several_steps_per_rollout_batch_clip_the_ratio(tiny_models, target_data, tmp_path):
    """Two optimizer steps per iteration: the second trains on rollouts of the policy before the first step,
    so its ratios leave [1 - 1e-4, 1 + 1e-4] and the clip fraction is non-zero; one step per iteration stays
    on-policy (ratio 1, nothing clipped)."""
    common = ["sampling.group_size=4", "train.prompts_per_step=1", "optim.lr=0.1", "train.max_steps=2"]
    off, on = tmp_path / "off", tmp_path / "on"
    procs = [start([sys.executable, str(RL_DIR / "train_grpo.py"),
                    *argv(tiny_models, target_data, off, *common, "train.grad_accum=2")], tmp_path / "off.log"),
             start([sys.executable, str(RL_DIR / "train_grpo.py"),
                    *argv(tiny_models, target_data, on, *common, "train.grad_accum=4")], tmp_path / "on.log")]
    finish(procs)
    for (p, _), log in zip(procs, ("off.log", "on.log")):
        assert p.returncode == 0, (tmp_path / log).read_text()[-4000:]
    m_off = [json.loads(x) for x in (off / "metrics.jsonl").read_text().splitlines()]
    m_on = [json.loads(x) for x in (on / "metrics.jsonl").read_text().splitlines()]
    assert len(m_off) == 1 and m_off[0]["step"] == 2  # one iteration, two optimizer steps
    # half the transitions (the second step's) are off-policy; with lr 0.1 they all move past 1e-4
    assert 0 < m_off[0]["clip_fraction"] <= 0.5, m_off[0]
    assert m_off[0]["ratio_max"] - m_off[0]["ratio_min"] > 2e-4, m_off[0]
    assert all(r["clip_fraction"] == 0.0 and abs(r["ratio_max"] - 1) <= 1e-4 and abs(r["ratio_min"] - 1) <= 1e-4
               for r in m_on), m_on
