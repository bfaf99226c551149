"""Editor parts: output sizing, seeds, LoRA reading/fusing (diffusers and DiffSynth naming), cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from etchr_eval.editor import (EditCache, checkpoint_fingerprint, fuse_lora, item_seed, normalise_lora_keys,
                               output_size, read_lora)


@pytest.mark.parametrize("w,h,mode,expected", [
    (1024, 1024, "keep_aspect", (1024, 1024)),
    (2048, 1024, "keep_aspect", (1440, 720)),  # sqrt(1/2) * (2048, 1024) = (1448.2, 724.1) -> floor to /16
    (4000, 3000, "keep_aspect", (1168, 880)),  # scale 0.2955: (1182.4, 886.8)
    (500, 300, "keep_aspect", (496, 288)),  # never upscaled; floored to multiples of 16
    (2048, 1024, "reference_clamp", (1024, 1024)),  # the reference distorts 2:1 into 1:1
    (1500, 700, "reference_clamp", (1024, 688)),
    (100, 70, "keep_aspect", (96, 64)),
])
def test_output_size(w, h, mode, expected):
    out = output_size(w, h, max_area=1024 * 1024, multiple_of=16, mode=mode)
    assert out == expected
    assert out[0] * out[1] <= 1024 * 1024 and out[0] % 16 == 0 and out[1] % 16 == 0


def test_keep_aspect_preserves_ratio_within_rounding():
    w, h = output_size(3000, 2000, max_area=1024 * 1024)
    assert abs(w / h - 1.5) < 0.03


def test_item_seed_is_stable_and_distinct():
    assert item_seed(126, "dl3dv", "17") == item_seed(126, "dl3dv", "17")
    assert item_seed(126, "dl3dv", "17") != item_seed(126, "dl3dv", "18")
    assert item_seed(126, "dl3dv", "17") != item_seed(127, "dl3dv", "17")
    assert item_seed(126, "dl3dv", "17", per_item=False) == 126
    assert 0 <= item_seed(126, "x", "y") < 2 ** 31
    assert item_seed(126, "dl3dv", "0") == int.from_bytes(
        __import__("hashlib").sha256(b"126:dl3dv:0").digest()[:4], "little") & 0x7FFFFFFF


def test_diffsynth_keys_are_converted():
    sd = {"transformer_blocks.0.attn.to_q.lora_A.default.weight": 1,
          "transformer.single_transformer_blocks.1.attn.to_out.lora_B.weight": 2}
    assert normalise_lora_keys(sd) == {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": 1,
                                       "transformer.single_transformer_blocks.1.attn.to_out.lora_B.weight": 2}


def _trained_lora(tiny_models, tmp_path, rank=4, alpha=8.0):
    """A LoRA with non-zero B on the tiny transformer, saved the diffusers way with its metadata."""
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_v", "to_qkv_mlp_proj"],
                     init_lora_weights=False)
    pipe.transformer.add_adapter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    sd = get_peft_model_state_dict(pipe.transformer)
    out = tmp_path / "lora"
    Flux2KleinPipeline.save_lora_weights(out, transformer_lora_layers=sd,
                                         transformer_lora_adapter_metadata=cfg.to_dict())
    return out / "pytorch_lora_weights.safetensors"


def test_fuse_equals_w_plus_scaled_ba_and_matches_diffusers(tiny_models, tmp_path):
    from diffusers import Flux2KleinPipeline

    path = _trained_lora(tiny_models, tmp_path)
    state, alpha, rank = read_lora(path)
    assert (alpha, rank) == (8.0, 4)
    base = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    w0 = base.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    n = fuse_lora(base.transformer, state, alpha, rank, scale=1.0)
    assert n == 2 * 2 + 2  # to_q + to_v in 2 double blocks, to_qkv_mlp_proj in 2 single blocks
    a = state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = state["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    torch.testing.assert_close(base.transformer.transformer_blocks[0].attn.to_q.weight, w0 + (alpha / rank) * b @ a)
    # diffusers' own path (load_lora_weights + fuse_lora) gives the same weights
    ref = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    ref.load_lora_weights(path.parent)
    ref.fuse_lora()
    ref.unload_lora_weights()
    for (n1, p1), (n2, p2) in zip(base.transformer.named_parameters(), ref.transformer.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)


def test_diffsynth_named_file_and_missing_alpha(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _trained_lora(tiny_models, tmp_path)
    sd = load_file(path)
    ds = {k.removeprefix("transformer.").replace(".lora_A.weight", ".lora_A.default.weight")
          .replace(".lora_B.weight", ".lora_B.default.weight"): v for k, v in sd.items()}
    ds_path = tmp_path / "ds" / "lora.safetensors"
    ds_path.parent.mkdir()
    save_file(ds, ds_path)  # no metadata: alpha unknown
    with pytest.raises(ValueError, match="alpha is not recorded"):
        read_lora(ds_path)
    (ds_path.parent / "meta.json").write_text(json.dumps({"lora": {"rank": 4, "alpha": 8.0}}))
    state, alpha, rank = read_lora(ds_path)
    assert alpha == 8.0 and set(state) == set(sd)
    for k in sd:
        torch.testing.assert_close(state[k], sd[k])


def test_fuse_rejects_foreign_layers(tiny_models):
    from diffusers import Flux2Transformer2DModel

    t = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer")
    bad = {"transformer.no_such.lora_A.weight": torch.zeros(2, 4), "transformer.no_such.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="no_such"):
        fuse_lora(t, bad, 2.0, 2)


def test_fingerprint_tracks_weights_and_lora(tiny_models, tmp_path):
    fp = checkpoint_fingerprint(tiny_models.flux)
    assert fp == checkpoint_fingerprint(tiny_models.flux)
    path = _trained_lora(tiny_models, tmp_path)
    assert checkpoint_fingerprint(tiny_models.flux, str(path)) != fp
    assert checkpoint_fingerprint(tiny_models.flux, str(path), 0.5) != checkpoint_fingerprint(tiny_models.flux, str(path))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        checkpoint_fingerprint(tmp_path)


def test_edit_cache_roundtrip(tmp_path):
    cache = EditCache(tmp_path)
    key = EditCache.key(checkpoint="a", prompt="p", seed=1, steps=4, guidance=3.5, width=64, height=64, image="i")
    assert key != EditCache.key(checkpoint="a", prompt="p", seed=2, steps=4, guidance=3.5, width=64, height=64, image="i")
    assert cache.get(key) is None
    img = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    cache.put(key, img, {"seed": 1})
    np.testing.assert_array_equal(np.asarray(cache.get(key)), np.asarray(img))
    cache.path(key).write_bytes(b"damaged")
    assert cache.get(key) is None  # recomputed rather than crashing


def test_step_cache_switch(tiny_models, tmp_path):
    """step_cache=taylorseer: a warmup covering every step computes every step (identical edits);
    interval 2 after a short warmup extrapolates (a different edit); the option is in the cache key."""
    from types import SimpleNamespace

    from etchr_eval.editor import Editor

    def cfg(**kw):
        base = dict(pipe_path=str(tiny_models.flux), lora_path=None, lora_scale=1.0, lora_alpha=None, device="cpu",
                    dtype="fp32", steps=6, guidance=3.5, max_area=96 * 64, multiple_of=16, size_mode="keep_aspect",
                    max_sequence_length=512, compile=False, step_cache="none", step_cache_interval=2,
                    step_cache_warmup=4)
        base.update(kw)
        return SimpleNamespace(**base)

    img = Image.fromarray((np.random.RandomState(1).rand(64, 96, 3) * 255).astype("uint8"))
    prompt = "Draw a red box for the question. Where?"
    exact = Editor(cfg(), tmp_path / "c1").edit(img, prompt, 7)[0]
    full = Editor(cfg(step_cache="taylorseer", step_cache_warmup=6), tmp_path / "c2")
    out, path, _, hit = full.edit(img, prompt, 7)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(exact))
    assert not hit and json.loads(path.with_suffix(".json").read_text())["step_cache"] == "taylorseer"
    fast = Editor(cfg(step_cache="taylorseer", step_cache_warmup=2), tmp_path / "c3")
    assert not np.array_equal(np.asarray(fast.edit(img, prompt, 7)[0]), np.asarray(exact))


def _editor_cfg(tiny_models, **kw):
    from types import SimpleNamespace

    base = dict(pipe_path=str(tiny_models.flux), lora_path=None, lora_scale=1.0, lora_alpha=None, device="cpu",
                dtype="fp32", steps=4, guidance=3.5, max_area=96 * 64, multiple_of=16, size_mode="keep_aspect",
                max_sequence_length=512, compile=False, step_cache="none", step_cache_interval=2, step_cache_warmup=4,
                cfg_batch=False, attention_backend="native", quantize="none")
    base.update(kw)
    return SimpleNamespace(**base)


def test_cfg_batch_runs_one_forward_per_step_and_matches(tiny_models, tmp_path):
    """cfg_batch: one batch-2 forward per step instead of two batch-1 forwards, the same latents (fp32,
    up to batch-size rounding), and the switch is part of the cache key; with guidance 1 nothing is batched."""
    from etchr_eval.editor import CFGBatch, Editor

    img = Image.fromarray((np.random.RandomState(3).rand(64, 96, 3) * 255).astype("uint8"))
    prompt = "Draw a red box for the question. Where?"
    plain = Editor(_editor_cfg(tiny_models), tmp_path / "c1")
    calls = []
    t = plain.pipe.transformer
    original = t.forward
    t.forward = lambda *a, **k: calls.append(k["hidden_states"].shape[0]) or original(*a, **k)
    ref = np.asarray(plain.edit(img, prompt, 5)[0], dtype=np.int16)
    assert calls == [1] * 8  # 4 steps x 2 sequential CFG branches

    fast = Editor(_editor_cfg(tiny_models, cfg_batch=True), tmp_path / "c2")
    batcher = fast.pipe.transformer.forward
    assert isinstance(batcher, CFGBatch)
    inner = batcher.forward
    calls.clear()
    batcher.forward = lambda *a, **k: calls.append(k["hidden_states"].shape[0]) or inner(*a, **k)
    out, path, _, _ = fast.edit(img, prompt, 5)
    assert calls == [2] * 4  # one batched forward per step
    assert np.abs(np.asarray(out, dtype=np.int16) - ref).max() <= 1  # fp32: at most one 8-bit level
    assert json.loads(path.with_suffix(".json").read_text())["cfg_batch"] is True
    assert batcher.pending is None and batcher.negative is None  # nothing left armed between edits

    calls.clear()
    no_cfg = Editor(_editor_cfg(tiny_models, cfg_batch=True, guidance=1.0), tmp_path / "c3")
    own = no_cfg.pipe.transformer.forward
    own_inner = own.forward
    own.forward = lambda *a, **k: calls.append(k["hidden_states"].shape[0]) or own_inner(*a, **k)
    no_cfg.edit(img, prompt, 5)
    assert calls == [1] * 4  # no CFG: plain batch-1 forwards


def test_attention_backend_switch_and_fp8_without_torchao(tiny_models, tmp_path, monkeypatch):
    """attention_backend reaches diffusers' dispatcher (math kernel on CPU: the same edit), and
    quantize=fp8 without torchao fails with an error that says what to install."""
    import builtins

    from etchr_eval.editor import Editor, fp8_targets

    img = Image.fromarray((np.random.RandomState(4).rand(64, 96, 3) * 255).astype("uint8"))
    ref = np.asarray(Editor(_editor_cfg(tiny_models), tmp_path / "a").edit(img, "Where?", 1)[0], dtype=np.int16)
    math_ed = Editor(_editor_cfg(tiny_models, attention_backend="_native_math"), tmp_path / "b")
    assert np.abs(np.asarray(math_ed.edit(img, "Where?", 1)[0], dtype=np.int16) - ref).max() <= 1
    procs = {type(m.processor).__name__ for m in math_ed.pipe.transformer.modules() if hasattr(m, "processor")}
    assert procs and all(getattr(m.processor, "_attention_backend", None) == "_native_math"
                         for m in math_ed.pipe.transformer.modules() if hasattr(m, "processor"))

    names = fp8_targets(math_ed.pipe.transformer)
    assert names and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    real_import = builtins.__import__

    def no_torchao(name, *a, **k):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(RuntimeError, match="quantize=fp8 needs torchao"):
        Editor(_editor_cfg(tiny_models, quantize="fp8"), tmp_path / "c").pipe
