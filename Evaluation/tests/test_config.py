"""Config loading: schema -> YAML -> overrides; unknown key / wrong type / missing value name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from etchr_eval.config import ConfigError, load_eval_config, save_config, split_cli


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_overrides_stack(tmp_path):
    path = _yaml(tmp_path, "editor:\n  pipe_path: /m\n  steps: 10\n")
    cfg = load_eval_config(path, ["editor.guidance=2.0", "tasks.dl3dv.path=x.parquet"])
    assert cfg.editor.steps == 10 and cfg.editor.guidance == 2.0 and cfg.editor.seed == 126
    assert cfg.tasks.dl3dv.path == str(Path(__file__).resolve().parents[2] / "x.parquet")  # against the repo root
    assert cfg.tasks.dl3dv.limit is None


@pytest.mark.parametrize("text,overrides,needle", [
    ("editor:\n  pipe_path: /m\n  stepz: 3\n", [], "editor.stepz"),
    ("editor:\n  pipe_path: /m\n", ["editor.steps=many"], "editor.steps"),
    ("editor:\n  pipe_path: /m\n", ["mllm.bogus=1"], "mllm.bogus"),
    ("editor:\n  steps: 3\n", [], "editor.pipe_path"),
    ("editor:\n  pipe_path: /m\n", ["tasks.t.limit=3"], "tasks.t.path"),
    ("editor:\n  pipe_path: /m\n  size_mode: squash\n", [], "editor.size_mode"),
    ("editor:\n  pipe_path: /m\n", ["editor.preset=turbo"], "editor.preset"),
    ("editor:\n  pipe_path: /m\n", ["editor.preset=fast", "editor.step_cache_interval=5"], "editor.step_cache_interval"),
    ("editor:\n  pipe_path: /m\n", ["editor.attention_backend=flash9"], "editor.attention_backend"),
    ("editor:\n  pipe_path: /m\n", ["editor.quantize=int3"], "editor.quantize"),
])
def test_errors_name_the_key(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_eval_config(_yaml(tmp_path, text), overrides)
    assert needle in str(err.value)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = _yaml(tmp_path, "edtor:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*edtor"):
        load_eval_config(path)


def test_missing_file_and_bad_cli():
    with pytest.raises(ConfigError, match="not found"):
        load_eval_config("nope/none.yaml")
    with pytest.raises(ConfigError, match="unexpected argument"):
        split_cli(["--cfg", "x"])
    assert split_cli(["--config", "a.yaml", "x.y=1", "z=2"]) == ("a.yaml", ["x.y=1", "z=2"])


def test_resolved_config_is_saved(tmp_path):
    cfg = load_eval_config(None, ["editor.pipe_path=/m", "run_dir=${editor.pipe_path}/run"])
    path = save_config(cfg, tmp_path)
    saved = OmegaConf.load(path)
    assert saved.run_dir == "/m/run"  # interpolations resolved
    assert saved.editor.steps == 40
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_scoring_switches(tmp_path):
    cfg = load_eval_config(None, ["editor.pipe_path=/m"])
    assert (cfg.scoring.frozenlake, cfg.scoring.verify_rule) == ("official", "trimmed")  # the documented defaults
    cfg = load_eval_config(_yaml(tmp_path, "scoring:\n  frozenlake: lenient\n"), ["editor.pipe_path=/m", "scoring.verify_rule=reference"])
    assert (cfg.scoring.frozenlake, cfg.scoring.verify_rule) == ("lenient", "reference")
    with pytest.raises(ConfigError, match="scoring.frozenlake='loose': use official or lenient"):
        load_eval_config(None, ["editor.pipe_path=/m", "scoring.frozenlake=loose"])
    with pytest.raises(ConfigError, match="scoring.verify_rule='exact': use trimmed or reference"):
        load_eval_config(None, ["editor.pipe_path=/m", "scoring.verify_rule=exact"])
