"""editor.preset and the speed switches it bundles: expansion at load time (visible in --print-config, the
run fingerprint and the edit-cache key), refusals, cfg_batch together with the TaylorSeer step cache (the same
edit as the step cache alone), compile against eager, and fp8 refused where torchao or a GPU is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from etchr_eval.config import EDITOR_PRESETS, ConfigError, EditorConfig, load_eval_config

EVAL_DIR = Path(__file__).resolve().parents[1]


def _cfg(tiny_models, **kw):
    base = dict(pipe_path=str(tiny_models.flux), lora_path=None, lora_scale=1.0, lora_alpha=None, device="cpu",
                dtype="fp32", steps=6, guidance=3.5, seed=126, per_item_seed=True, max_area=96 * 64, multiple_of=16,
                size_mode="keep_aspect", max_sequence_length=512, compile=False, step_cache="none",
                step_cache_interval=2, step_cache_warmup=4, cfg_batch=False, attention_backend="native",
                quantize="none", preset=None, compile_cache_dir=None)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_preset_expands_into_the_switches():
    cfg = load_eval_config(None, ["editor.pipe_path=/m", "editor.preset=fast"])
    for key, value in EDITOR_PRESETS["fast"].items():
        assert cfg.editor[key] == value, key
    assert cfg.editor.quantize == "fp8" and cfg.editor.step_cache == "taylorseer" and cfg.editor.cfg_batch
    # a switch set to the preset's own value is no conflict; one set to another value is refused
    same = load_eval_config(None, ["editor.pipe_path=/m", "editor.preset=fast_bf16", "editor.step_cache_interval=3"])
    assert same.editor.compile and same.editor.quantize == "none"
    # (a switch at its default cannot be told from an unset one: the preset sets it)
    with pytest.raises(ConfigError, match=r"editor.preset=fast_bf16 sets editor.step_cache_interval=3, "
                                          r"but editor.step_cache_interval=7 is set too"):
        load_eval_config(None, ["editor.pipe_path=/m", "editor.preset=fast_bf16", "editor.step_cache=none",
                                "editor.step_cache_interval=7"])
    with pytest.raises(ConfigError, match="use one of fast, fast_bf16"):
        load_eval_config(None, ["editor.pipe_path=/m", "editor.preset=fastest"])


def test_presets_name_real_switches_with_valid_values():
    fields = set(EditorConfig.__dataclass_fields__)
    for name, switches in EDITOR_PRESETS.items():
        assert set(switches) <= fields, name
        cfg = load_eval_config(None, ["editor.pipe_path=/m"] + [f"editor.{k}={str(v).lower()}" for k, v in switches.items()])
        assert all(cfg.editor[k] == v for k, v in switches.items())  # the same values pass validation without the preset


def test_print_config_shows_the_expanded_switches(tmp_path):
    res = subprocess.run([sys.executable, str(EVAL_DIR / "evaluate.py"), "--print-config", "editor.pipe_path=/m",
                          "editor.preset=fast_bf16", "tasks.maze.path=x.parquet"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    text = res.stdout
    assert "preset: fast_bf16" in text and "compile: true" in text and "cfg_batch: true" in text
    assert "step_cache: taylorseer" in text and "step_cache_interval: 3" in text


def test_preset_is_in_the_fingerprint_not_in_the_edit_cache_key(tiny_models, tmp_path):
    """The run fingerprint (run.json) names the preset and its switches; the edit-cache key holds only the
    switches, so an edit made with the same explicit switches is reused under the preset."""
    from etchr_eval.editor import EditCache, Editor

    switches = EDITOR_PRESETS["fast_bf16"]
    by_preset = Editor(_cfg(tiny_models, preset="fast_bf16", **switches), tmp_path / "c")
    explicit = Editor(_cfg(tiny_models, **switches), tmp_path / "c")
    fp = by_preset.fingerprint_fields()
    assert fp["preset"] == "fast_bf16" and fp["compile"] is True and fp["step_cache_interval"] == 3
    assert "preset" not in explicit.fingerprint_fields()
    img = Image.new("RGB", (96, 64), (10, 20, 30))
    key = lambda ed: EditCache.key(**ed.cache_fields(img, "Where?", 7))  # noqa: E731
    assert key(by_preset) == key(explicit)
    plain = Editor(_cfg(tiny_models), tmp_path / "c")
    assert key(plain) != key(explicit)  # the switches change the key


def _latents(ed, img, prompt, seed=3):
    """The editor's pipeline with its speed options, run as Editor.edit runs it, returning the final latents."""
    import torch

    from etchr_eval.editor import CFGBatch, negative_prompt

    pipe = ed.pipe
    batcher = pipe.transformer.forward if isinstance(pipe.transformer.forward, CFGBatch) else None
    extra = {}
    if batcher is not None:
        batcher.negative = negative_prompt(pipe, "cpu", 512)
        extra["negative_prompt_embeds"] = batcher.negative[0]
    try:
        with torch.inference_mode():
            return pipe(image=img, prompt=prompt, height=64, width=96, num_inference_steps=ed.cfg.steps,
                        guidance_scale=ed.cfg.guidance, generator=torch.Generator().manual_seed(seed),
                        output_type="latent", **extra).images
    finally:
        if batcher is not None:
            batcher.negative = batcher.pending = None


def test_cfg_batch_with_step_cache_equals_the_step_cache_alone(tiny_models, tmp_path):
    """cfg_batch + taylorseer: one batch-2 forward per step (none for the uncond branch), and the same latents as
    the step cache on two sequential branches (fp32: the extrapolation is row-wise); the step cache itself does
    change the latents against plain (so the check has teeth)."""
    from etchr_eval.editor import CFGBatch, Editor

    img = Image.fromarray((np.random.RandomState(5).rand(64, 96, 3) * 255).astype("uint8"))
    prompt = "Draw a red box for the question. Where?"
    cache = dict(step_cache="taylorseer", step_cache_interval=2, step_cache_warmup=2)
    plain = _latents(Editor(_cfg(tiny_models), tmp_path / "p"), img, prompt)
    alone = _latents(Editor(_cfg(tiny_models, **cache), tmp_path / "a"), img, prompt)
    both_ed = Editor(_cfg(tiny_models, cfg_batch=True, **cache), tmp_path / "b")
    batcher = both_ed.pipe.transformer.forward
    assert isinstance(batcher, CFGBatch)
    inner, calls = batcher.forward, []
    batcher.forward = lambda *a, **k: calls.append(k["hidden_states"].shape[0]) or inner(*a, **k)
    both = _latents(both_ed, img, prompt)
    assert calls == [2] * 6
    rel = lambda x, y: float((x - y).norm() / y.norm())  # noqa: E731
    assert rel(both, alone) < 1e-5
    assert rel(alone, plain) > 1e-4  # the step cache is approximate: a 1e-5 match is not trivially true
    out, path, _, _ = both_ed.edit(img, prompt, 3)  # through Editor.edit: both switches in the cache record
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["cfg_batch"] is True and record["step_cache"] == "taylorseer"


def test_fp8_refused_without_torchao(tiny_models, tmp_path, monkeypatch):
    import builtins

    from etchr_eval.editor import Editor

    real_import = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(RuntimeError, match=r"quantize=fp8 needs torchao \(editor.preset=fast includes it; "
                                           r"preset=fast_bf16 needs no fp8\)"):
        Editor(_cfg(tiny_models, preset="fast", **EDITOR_PRESETS["fast"]), tmp_path / "c")  # refused at start
    assert not (tmp_path / "c").exists()  # nothing written


def test_fp8_refused_without_a_gpu(tiny_models, tmp_path, monkeypatch):
    """torchao importable (a stand-in module here), but the editor runs on the CPU: refused, naming the device."""
    from etchr_eval.editor import Editor

    fake = types.ModuleType("torchao")
    fake.quantization = types.ModuleType("torchao.quantization")
    monkeypatch.setitem(sys.modules, "torchao", fake)
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake.quantization)
    with pytest.raises(RuntimeError, match=r"quantize=fp8 needs a CUDA GPU with fp8 matmuls.*runs on 'cpu'"):
        Editor(_cfg(tiny_models, quantize="fp8"), tmp_path / "c")


def test_compile_cache_dir_is_configured_before_compiling(tmp_path, monkeypatch):
    import torch

    from etchr_eval.editor import configure_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    path = configure_compile_cache(str(tmp_path / "kern"))
    assert path == str(tmp_path / "kern") and (tmp_path / "kern").is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == path and torch._inductor.config.fx_graph_cache is True
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == path  # what inductor itself will use
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "env"))
    assert configure_compile_cache(None) == str(tmp_path / "env")  # an explicit environment wins over the default


def test_compile_cache_dir_resolves_against_the_repo():
    cfg = load_eval_config(None, ["editor.pipe_path=/m", "editor.compile_cache_dir=runs/kernels"])
    assert cfg.editor.compile_cache_dir == str(EVAL_DIR.parent / "runs" / "kernels")
    assert json.dumps(EDITOR_PRESETS)  # plain data (recorded as such)
