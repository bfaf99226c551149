"""scripts/convert_lora.py: LoRA files between our diffusers naming and DiffSynth-Studio naming, both ways.

The round trips start from what the trainers write (etchr_sft / etchr_rl save_lora + meta.json) and from a
file written the way DiffSynth-Studio writes one (peft's inject_adapter_in_model, lora_alpha = rank, the
trainable parameters saved without a header). "Same effect" is checked on transformer outputs: the converted
file through Flux2KleinPipeline.load_lora_weights against Evaluation's own fusion (read_lora + fuse_lora)
of the original file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_script

RANK = 4
TARGETS = ["to_q", "to_v", "to_out.0", "add_k_proj", "linear_in", "to_qkv_mlp_proj"]


@pytest.fixture(scope="module")
def conv():
    return load_script("convert_lora")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "convert_lora.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=180)


def tiny_transformer(tiny_models):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer", dtype=torch.float32)


def randomise_lora(model, seed: int) -> None:
    """Non-zero lora_B (peft starts it at zero), so the LoRA changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_A" in name else 0.05))


def transformer_out(transformer) -> torch.Tensor:
    """One forward on fixed inputs: 4 x 4 image tokens, 8 text tokens. (1, 16, in_channels)"""
    cfg = transformer.config
    g = torch.Generator().manual_seed(123)
    hidden = torch.randn(1, 16, cfg.in_channels, generator=g)
    text = torch.randn(1, 8, cfg.joint_attention_dim, generator=g)
    hw = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    img_ids = torch.cat([torch.zeros(16, 1), hw.float(), torch.zeros(16, 1)], dim=1)[None]  # (1, 16, 4): t, h, w, l
    txt_ids = torch.cat([torch.zeros(8, 3), torch.arange(8.0)[:, None]], dim=1)[None]  # (1, 8, 4)
    with torch.no_grad():
        return transformer(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.6]),
                           img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]


def project_fused_out(tiny_models, lora_path, alpha=None) -> torch.Tensor:
    """The project's own fusion (Evaluation/etchr_eval/editor.py) of a LoRA file, then one forward."""
    from etchr_eval.editor import fuse_lora, read_lora

    state, a, r = read_lora(lora_path, alpha)
    t = tiny_transformer(tiny_models)
    fuse_lora(t, state, a, r)
    return transformer_out(t)


def diffusers_loaded_out(tiny_models, lora_file: Path) -> tuple[torch.Tensor, int]:
    """Flux2KleinPipeline.load_lora_weights of a file (unfused peft layers), then one forward."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
    n_lora = sum(1 for _, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    return transformer_out(pipe.transformer), n_lora  # n_lora: layers that got an adapter


def project_checkpoint(tiny_models, root: Path, tree: str, alpha: float) -> Path:
    """A checkpoint dir as SFT / RL write it: save_lora's file (diffusers naming, alpha in the header) + meta.json."""
    from peft import LoraConfig

    if tree == "sft":
        from etchr_sft.checkpoint import meta
        from etchr_sft.lora import save_lora
    else:
        from etchr_rl.checkpoint import meta
        from etchr_rl.lora import save_lora
    t = tiny_transformer(tiny_models)
    t.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=TARGETS))
    randomise_lora(t, seed=1)
    ckpt = root / f"{tree}-step-000002"
    save_lora(t, ckpt, RANK, alpha, TARGETS)
    lora = {"rank": RANK, "alpha": alpha, "targets": TARGETS}
    (ckpt / "meta.json").write_text(json.dumps(meta(kind="lora", step=2, base_model=str(tiny_models.flux), config={},
                                                    lora=lora)))
    return ckpt


def diffsynth_file(tiny_models, path: Path) -> tuple[Path, torch.Tensor]:
    """A LoRA written as DiffSynth-Studio writes one: peft inject_adapter_in_model with lora_alpha = lora_rank
    (training_module.add_lora_to_model), the trainable parameters saved with no header. Also returns the
    output of that training-time model (peft layers, scale alpha / rank = 1)."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file

    t = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS), tiny_transformer(tiny_models))
    randomise_lora(t, seed=2)
    state = {n: p.detach().clone().contiguous() for n, p in t.named_parameters() if "lora_" in n}
    assert all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path, transformer_out(t)


def header(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["lora_adapter_metadata"])


def load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def n_layers(state: dict) -> int:
    return sum(1 for k in state if ".lora_A." in k)


# ----------------------------------------------------------------------------------------------
def test_the_layer_list_is_the_models(tiny_models, conv):
    t = tiny_transformer(tiny_models)
    linears = {conv.module_pattern(n) for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(conv.FLUX2_LINEARS)
    assert conv.module_pattern("single_transformer_blocks.23.attn.to_out") == "single_transformer_blocks.N.attn.to_out"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("tree", ["sft", "rl"])
def test_project_checkpoint_to_diffsynth_and_back(tiny_models, tmp_path, tree):
    alpha = 8.0  # != rank: the DiffSynth file must carry alpha / rank = 2 in its weights
    ckpt = project_checkpoint(tiny_models, tmp_path, tree, alpha)
    original = load(ckpt / "pytorch_lora_weights.safetensors")

    ds = tmp_path / "export" / "lora_diffsynth.safetensors"
    res = run_script(ckpt, ds, "--to", "diffsynth")  # IN is the checkpoint dir
    assert res.returncode == 0, res.stderr
    assert re.search(r"\d+ tensors, \d+ layers, rank 4, alpha 8 .*scale 2", res.stdout), res.stdout
    ds_state = load(ds)
    assert set(ds_state) == {k.removeprefix("transformer.").replace(".weight", ".default.weight") for k in original}
    for k, v in original.items():
        dk = k.removeprefix("transformer.").replace(".weight", ".default.weight")
        want = v * 2.0 if ".lora_B." in k else v  # x2 is exact in float32
        assert torch.equal(ds_state[dk], want), dk
    assert (header(ds)["r"], header(ds)["lora_alpha"]) == (RANK, float(RANK))
    # DiffSynth's rule: pipe.load_lora(alpha=1) fuses W + 1.0 * B @ A. Same weights as our fusion of the original.
    from etchr_eval.editor import fuse_lora, normalise_lora_keys, read_lora

    ours, theirs = tiny_transformer(tiny_models), tiny_transformer(tiny_models)
    fuse_lora(ours, *read_lora(ckpt))
    fuse_lora(theirs, normalise_lora_keys(ds_state), alpha=1.0, rank=1)  # factor alpha / rank = 1
    for (n, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)

    back = tmp_path / "back" / "pytorch_lora_weights.safetensors"
    res = run_script(ds, back, "--to", "diffusers")  # no --alpha: the DiffSynth export records alpha = rank
    assert res.returncode == 0, res.stderr
    back_state = load(back)
    assert set(back_state) == set(original)
    md = header(back)
    assert (md["transformer.r"], md["transformer.lora_alpha"]) == (RANK, float(RANK))
    assert sorted(md["transformer.target_modules"]) == sorted(k[len("transformer."):-len(".lora_A.weight")]
                                                              for k in original if ".lora_A." in k)
    # the round trip has the original's effect: through diffusers' loader, and through our own reader
    base_out = transformer_out(tiny_transformer(tiny_models))
    want = project_fused_out(tiny_models, ckpt)
    assert (want - base_out).abs().max() > 1e-3  # the LoRA does change the outputs
    got, n_lora = diffusers_loaded_out(tiny_models, back)
    assert n_lora == n_layers(original)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(project_fused_out(tiny_models, back), want, rtol=1e-4, atol=1e-5)


def test_alpha_equal_to_rank_round_trips_bit_for_bit(tiny_models, tmp_path):
    ckpt = project_checkpoint(tiny_models, tmp_path, "sft", float(RANK))  # the r768 / alpha 768 recipe's case
    ds, back = tmp_path / "ds.safetensors", tmp_path / "back.safetensors"
    assert run_script(ckpt, ds, "--to", "diffsynth").returncode == 0
    assert run_script(ds, back, "--to", "diffusers").returncode == 0
    original, back_state = load(ckpt / "pytorch_lora_weights.safetensors"), load(back)
    assert set(original) == set(back_state) and all(torch.equal(original[k], back_state[k]) for k in original)


@pytest.mark.timeout(400)
def test_diffsynth_file_to_diffusers_loads_with_the_same_effect(tiny_models, tmp_path):
    ds, trained_out = diffsynth_file(tiny_models, tmp_path / "diffsynth" / "epoch-4.safetensors")
    out = tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"

    res = run_script(ds, out, "--to", "diffusers")  # nothing records alpha: refused, with the way out
    assert res.returncode == 2 and not out.exists() and not out.parent.exists()
    assert str(ds) in res.stderr and "lora_alpha = lora_rank" in res.stderr and "scale 1" in res.stderr
    assert f"--alpha {RANK}" in res.stderr

    res = run_script(ds, out, "--to", "diffusers", "--alpha", RANK)
    assert res.returncode == 0, res.stderr
    assert "rank 4, alpha 4 (from --alpha), scale 1" in res.stdout
    md = header(out)
    assert (md["transformer.r"], md["transformer.lora_alpha"]) == (RANK, float(RANK))
    want = project_fused_out(tiny_models, ds, alpha=float(RANK))
    got, n_lora = diffusers_loaded_out(tiny_models, out)
    assert n_lora == n_layers(load(ds))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, trained_out, rtol=1e-4, atol=1e-5)  # = the DiffSynth training-time model
    assert (got - transformer_out(tiny_transformer(tiny_models))).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# In-process: records of alpha, refusals, nothing half-written
# ----------------------------------------------------------------------------------------------
def small_state(naming: str, rank_a=RANK, rank_b=RANK, modules=("transformer_blocks.0.attn.to_q",
                                                                 "single_transformer_blocks.1.attn.to_out")):
    g = torch.Generator().manual_seed(0)
    state = {}
    for m in modules:
        a, b = torch.randn(rank_a, 32, generator=g), torch.randn(32, rank_b, generator=g)
        if naming == "diffusers":
            state[f"transformer.{m}.lora_A.weight"], state[f"transformer.{m}.lora_B.weight"] = a, b
        else:
            state[f"{m}.lora_A.default.weight"], state[f"{m}.lora_B.default.weight"] = a, b
    return state


def write(path: Path, state: dict, md: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(md)} if md is not None else None)
    return path


def test_diffsynth_alpha_keys_are_its_alpha(conv, tmp_path, capsys):
    state = small_state("diffsynth")
    for k in list(state):
        if ".lora_B." in k:
            state[k.replace(".lora_B.default.weight", ".alpha")] = torch.tensor(8.0)
    src, out = write(tmp_path / "legacy.safetensors", state), tmp_path / "out.safetensors"
    assert conv.main([str(src), str(out), "--to", "diffusers"]) == 0
    assert "alpha 8 (from" in capsys.readouterr().out
    assert header(out)["transformer.lora_alpha"] == 8.0 and n_layers(load(out)) == 2
    assert all(torch.equal(load(out)["transformer." + k.replace(".default", "")], v) for k, v in state.items()
               if ".lora_" in k)
    # back to DiffSynth: no alpha keys, alpha / rank = 2 in lora_B
    out2 = tmp_path / "clean.safetensors"
    assert conv.main([str(out), str(out2), "--to", "diffsynth"]) == 0
    clean = load(out2)
    assert not any(k.endswith(".alpha") for k in clean)
    k = "transformer_blocks.0.attn.to_q.lora_B.default.weight"
    assert torch.equal(clean[k], state[k] * 2.0)


MD_OK = {"transformer.r": RANK, "transformer.lora_alpha": 8.0, "transformer.target_modules": ["to_q"]}


@pytest.mark.parametrize("case,pattern", [
    ("unknown_key", r"unknown key 'transformer\.transformer_blocks\.0\.attn\.to_q\.lora_down\.weight'"),
    ("prefixed_module", r"unknown key 'pipe\.dit\.[a-z_]+\.\d\.attn\.to_[a-z]+\.lora_[AB]\.default\.weight': .*without the "
                        r"prefix 'pipe\.dit\.' it would be one .*--remove_prefix_in_ckpt pipe\.dit\."),
    ("foreign_module", r"unknown key 'transformer\.text_encoder\.layers\.0\.q_proj\.lora_A\.weight': "
                       r"'text_encoder\.layers\.0\.q_proj' is not a linear layer of Flux2Transformer2DModel \(layers"),
    ("mixed", r"mixed namings: 'transformer\..*' is diffusers naming, '.*default\.weight' is DiffSynth naming"),
    ("rank_ab", r"rank mismatch in layer 'single_transformer_blocks\.1\.attn\.to_out': lora_A is \(4, 32\) \(rank 4\), "
                r"lora_B is \(32, 3\) \(rank 3\)"),
    ("two_ranks", r"several LoRA ranks \(rank 2: .*rank 4: "),
    ("no_partner", r"layer 'single_transformer_blocks\.1\.attn\.to_out' has no lora_B tensor"),
    ("header_rank", r"says rank 8, the lora_A tensors of .* have rank 4"),
    ("alpha_arg_disagrees", r"--alpha 4 disagrees with .*header lora_adapter_metadata\), which says alpha 8"),
    ("meta_alpha_disagrees", r"alpha mismatch: .*header lora_adapter_metadata\) says alpha 8, .*meta\.json \(lora\) says alpha 16"),
    ("diffusers_no_alpha", r"alpha is not recorded .*pass --alpha A"),
    ("rslora", r"use_rslora=True"),
    ("alpha_keys_disagree", r"DiffSynth alpha keys disagree"),
])
def test_refusals_name_the_file_and_write_nothing(conv, tmp_path, capsys, case, pattern):
    d = tmp_path / "in"
    args = []
    if case == "unknown_key":
        state = small_state("diffusers")
        state["transformer.transformer_blocks.0.attn.to_q.lora_down.weight"] = torch.zeros(4, 32)
        src = write(d / "f.safetensors", state, MD_OK)
    elif case == "prefixed_module":  # a DiffSynth run without --remove_prefix_in_ckpt pipe.dit.
        src = write(d / "f.safetensors", {"pipe.dit." + k: v for k, v in small_state("diffsynth").items()})
        args = ["--alpha", "4"]
    elif case == "foreign_module":
        state = small_state("diffusers")
        state["transformer.text_encoder.layers.0.q_proj.lora_A.weight"] = torch.zeros(4, 32)
        src = write(d / "f.safetensors", state, MD_OK)
    elif case == "mixed":
        src = write(d / "f.safetensors", {**small_state("diffusers", modules=("transformer_blocks.0.attn.to_q",)),
                                          **small_state("diffsynth", modules=("transformer_blocks.1.attn.to_q",))}, MD_OK)
    elif case == "rank_ab":
        src = write(d / "f.safetensors", small_state("diffusers", rank_b=3), MD_OK)
    elif case == "two_ranks":
        state = {**small_state("diffusers", modules=("transformer_blocks.0.attn.to_q",)),
                 **small_state("diffusers", rank_a=2, rank_b=2, modules=("transformer_blocks.0.attn.to_k",))}
        src = write(d / "f.safetensors", state, MD_OK)
    elif case == "no_partner":
        state = small_state("diffusers")
        del state["transformer.single_transformer_blocks.1.attn.to_out.lora_B.weight"]
        src = write(d / "f.safetensors", state, MD_OK)
    elif case == "header_rank":
        src = write(d / "f.safetensors", small_state("diffusers"), {**MD_OK, "transformer.r": 8})
    elif case == "alpha_arg_disagrees":
        src, args = write(d / "f.safetensors", small_state("diffusers"), MD_OK), ["--alpha", "4"]
    elif case == "meta_alpha_disagrees":
        src = write(d / "pytorch_lora_weights.safetensors", small_state("diffusers"), MD_OK).parent  # IN = the dir
        (d / "meta.json").write_text(json.dumps({"kind": "lora", "lora": {"rank": RANK, "alpha": 16.0}}))
    elif case == "diffusers_no_alpha":
        src = write(d / "f.safetensors", small_state("diffusers"))
    elif case == "rslora":
        src = write(d / "f.safetensors", small_state("diffusers"), {**MD_OK, "transformer.use_rslora": True})
    else:
        state = small_state("diffsynth")
        state["transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(4.0)
        state["single_transformer_blocks.1.attn.to_out.alpha"] = torch.tensor(8.0)
        src = write(d / "f.safetensors", state)
    out = tmp_path / "out" / "converted.safetensors"
    for to in ("diffusers", "diffsynth"):
        assert conv.main([str(src), str(out), "--to", to, *args]) == 2
        err = capsys.readouterr().err
        assert re.search(pattern, err), err
        assert str(d) in err
        assert not out.parent.exists()  # refused before anything was created


def test_a_failed_write_leaves_the_old_file_and_no_temp(conv, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    src = write(tmp_path / "in.safetensors", small_state("diffusers"), MD_OK)
    out = tmp_path / "out" / "lora.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"previous export")

    def torn_save(state, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # part of a file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save)
    with pytest.raises(OSError, match="No space left"):
        conv.convert(src, out, "diffsynth")
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in out.parent.iterdir()) == ["lora.safetensors"]
    monkeypatch.undo()
    assert conv.main([str(src), str(out), "--to", "diffsynth"]) == 0
    assert n_layers(load(out)) == 2 and sorted(p.name for p in out.parent.iterdir()) == ["lora.safetensors"]


def test_out_path_rules(conv, tmp_path, capsys):
    src = write(tmp_path / "ck" / "pytorch_lora_weights.safetensors", small_state("diffusers"), MD_OK)
    assert conv.main([str(src), str(src), "--to", "diffusers"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert conv.main([str(src), str(tmp_path), "--to", "diffusers"]) == 2
    assert "give the .safetensors file to write" in capsys.readouterr().err
    # into a checkpoint folder whose meta.json says alpha 8: a DiffSynth export there (alpha = rank) would be
    # refused by every reader of the pair, so the converter refuses it
    (src.parent / "meta.json").write_text(json.dumps({"kind": "lora", "lora": {"rank": RANK, "alpha": 8.0}}))
    assert conv.main([str(src), str(src.parent / "ds.safetensors"), "--to", "diffsynth"]) == 2
    assert "write OUT to another folder" in capsys.readouterr().err
    assert conv.main([str(src), str(src.parent / "copy.safetensors"), "--to", "diffusers"]) == 0
    assert conv.main([str(tmp_path / "missing"), str(tmp_path / "x.safetensors"), "--to", "diffusers"]) == 2
    assert "not found" in capsys.readouterr().err
