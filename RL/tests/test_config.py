"""RL config: reference defaults, strict loading, validation messages."""

from __future__ import annotations

import pytest

from etchr_rl.config import ConfigError, load_rl_config, save_config

REQ = ["model.pretrained_path=/m", "data.jsonl=/d.jsonl"]


def test_reference_defaults():
    cfg = load_rl_config(None, REQ)
    s = cfg.sampling
    assert (s.group_size, s.steps, s.shift, s.eta, s.guidance) == (8, 25, 3.0, 0.7, 1.0)
    assert int((s.steps - 1) * s.timestep_fraction) == 14  # 14 of the 24 kept transitions are trained
    assert (cfg.lora.rank, cfg.lora.alpha) == (64, 128)
    assert dict(cfg.reward.weights) == {"guidance": 0.5, "correctness": 0.5}
    assert cfg.reward.correctness_images == "original_and_edited" and cfg.reward.adv_clip == 5.0
    assert (cfg.optim.lr, cfg.optim.clip_range, cfg.train.grad_accum) == (1e-5, 1e-4, 4)
    assert not s.same_init_noise_in_group


@pytest.mark.parametrize("overrides,needle", [
    (["sampling.group_size=1"], "sampling.group_size"),
    (["sampling.grup_size=4"], "sampling.grup_size"),
    (["reward.correctness_images=all"], "reward.correctness_images"),
    (["data.resize=stretch"], "data.resize"),
    (["judge.max_failure_rate=1.5"], "judge.max_failure_rate"),
    (["optim.lr=fast"], "optim.lr"),
])
def test_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_rl_config(None, REQ + overrides)
    assert needle in str(err.value)


def test_missing_required_values_are_listed(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.jsonl, model\.pretrained_path"):
        load_rl_config(None, [])
    cfg = load_rl_config(None, REQ + ["train.max_steps=3"])
    assert "max_steps: 3" in save_config(cfg, tmp_path).read_text()
