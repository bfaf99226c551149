"""merge_lora.py (exact fusion, DiffSynth naming, lineage, evaluated by Evaluation) and prepare_data.py."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent
IMAGE_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def run(script, *argv, ok=True):
    res = subprocess.run([sys.executable, str(script), *map(str, argv)], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    if ok:
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res


@pytest.fixture(scope="module")
def trained(tiny_models, sft_csv, tmp_path_factory):
    """A 3-step LoRA checkpoint of the tiny model."""
    run_dir = tmp_path_factory.mktemp("sftrun")
    run(SFT_DIR / "train_sft.py", "--config", REPO / "configs" / "sft" / "tiny_demo.yaml",
        f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}", f"train.run_dir={run_dir}",
        "data.max_pixels=6144", "train.max_steps=3", "optim.lr=1e-2")
    return run_dir / "checkpoints" / "step-000003"


def test_merge_is_exact_and_matches_base_plus_lora(tiny_models, trained, tmp_path):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    run(SFT_DIR / "merge_lora.py", "--base", tiny_models.flux, "--lora", trained, "--out", out)
    merged = Flux2Transformer2DModel.from_pretrained(out / "transformer").state_dict()
    base = Flux2Transformer2DModel.from_pretrained(tiny_models.flux / "transformer").state_dict()
    lora = load_file(trained / "pytorch_lora_weights.safetensors")
    alpha, rank = 8.0, 4
    fused = set()
    for k, a in lora.items():
        if ".lora_A." not in k:
            continue
        mod = k[len("transformer."):].replace(".lora_A.weight", "")
        b = lora[k.replace("lora_A", "lora_B")]
        torch.testing.assert_close(merged[mod + ".weight"], base[mod + ".weight"] + (alpha / rank) * b @ a,
                                   rtol=1e-6, atol=1e-7)
        fused.add(mod + ".weight")
    assert len(fused) == 28
    for k in base:  # everything else is untouched
        if k not in fused:
            assert torch.equal(merged[k], base[k]), k
    assert not any("lora" in k for k in merged)  # no adapter left in the saved model
    # component files other than transformer/ are byte-identical copies
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (tiny_models.flux / sub).iterdir():
            assert (out / sub / f.name).read_bytes() == f.read_bytes()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "merged_pipeline" and meta["config"]["alpha"] == 8.0 and meta["config"]["fused_layers"] == 28
    assert meta["parents"][1]["kind"] == "lora" and meta["parents"][1]["step"] == 3
    # the merged pipeline edits exactly like base + LoRA loaded (unfused) by diffusers
    img = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))

    def edit(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(image=img, prompt="Draw a red box for the question. Where?", height=64, width=96,
                    num_inference_steps=3, guidance_scale=3.5, generator=torch.Generator().manual_seed(0),
                    output_type="np").images[0]

    ref = Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)
    ref.load_lora_weights(trained)
    np.testing.assert_allclose(edit(Flux2KleinPipeline.from_pretrained(out, dtype=torch.float32)), edit(ref),
                               atol=1e-4)
    assert not np.allclose(edit(Flux2KleinPipeline.from_pretrained(tiny_models.flux, dtype=torch.float32)), edit(ref),
                           atol=1e-4)  # and the LoRA does change the edit


def test_merge_accepts_diffsynth_naming_and_refuses_unknown_alpha(tiny_models, trained, tmp_path):
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file, save_file

    sd = load_file(trained / "pytorch_lora_weights.safetensors")
    ds = {k[len("transformer."):].replace(".weight", ".default.weight"): v for k, v in sd.items()}
    path = tmp_path / "diffsynth" / "lora.safetensors"
    path.parent.mkdir()
    save_file(ds, path)
    res = run(SFT_DIR / "merge_lora.py", "--base", tiny_models.flux, "--lora", path, "--out", tmp_path / "x", ok=False)
    assert res.returncode == 2 and "alpha is not recorded" in res.stderr
    run(SFT_DIR / "merge_lora.py", "--base", tiny_models.flux, "--lora", path, "--out", tmp_path / "m1", "--alpha", 8)
    run(SFT_DIR / "merge_lora.py", "--base", tiny_models.flux, "--lora", trained, "--out", tmp_path / "m2")
    a = Flux2Transformer2DModel.from_pretrained(tmp_path / "m1" / "transformer").state_dict()
    b = Flux2Transformer2DModel.from_pretrained(tmp_path / "m2" / "transformer").state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])
    res = run(SFT_DIR / "merge_lora.py", "--base", tiny_models.flux, "--lora", trained, "--out", tmp_path / "m2", ok=False)
    assert res.returncode == 2 and "exists" in res.stderr


def test_merged_pipeline_is_evaluated_by_inference_dl3dv(tiny_models, trained, mllm_server, tmp_path):
    out = tmp_path / "merged"
    run(SFT_DIR / "merge_lora.py", "--base", tiny_models.flux, "--lora", trained, "--out", out)
    spec = importlib.util.spec_from_file_location("etchr_mk_dl3dv", REPO / "scripts" / "make_dl3dv_fixture.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = mod.make(str(tmp_path / "dl3dv.parquet"), n=2)
    result = tmp_path / "dl3dv.json"
    run(REPO / "Evaluation" / "inference_dl3dv.py", "--pipe_path", out, "--vllm_baseurl", mllm_server.base_url,
        "--model", mllm_server.model, "--data_parquet_path", data, "--result_file", result,
        "--config", REPO / "configs" / "eval" / "tiny_demo.yaml")
    rows = [json.loads(x) for x in result.read_text().splitlines()]
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)


# ----------------------------------------------------------------------------------------------
# prepare_data.py
# ----------------------------------------------------------------------------------------------
def _png(seed, size=(80, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


def _shard(path, start, n, corrupt_row=None, drop_column=None):
    cols = {"prompt": [f"Draw the shortest path of the maze in blue. Maze {start + i}" for i in range(n)],
            "edit_image": [[{"bytes": _png(start + i), "path": f"in_{start + i}.png"}] for i in range(n)],
            "image": [[{"bytes": b"garbage" if i == corrupt_row else _png(1000 + start + i),
                        "path": f"out_{start + i}.png"}] for i in range(n)]}
    types = {"prompt": pa.string(), "edit_image": IMAGE_TYPE, "image": IMAGE_TYPE}
    if drop_column:
        cols.pop(drop_column)
    pq.write_table(pa.table({k: pa.array(v, types[k]) for k, v in cols.items()}), path)
    return path


def test_prepare_data_streams_resumes_and_trains(tiny_models, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _shard(src / "train-00000.parquet", 0, 3)
    _shard(src / "train-00001.parquet", 3, 2)
    out = tmp_path / "sft"
    res = run(SFT_DIR / "prepare_data.py", "--input", str(src / "*.parquet"), "--out", out)
    assert json.loads(res.stdout.strip().splitlines()[-1])["rows"] == 5
    import pandas as pd

    df = pd.read_csv(out / "sft_data.csv")
    assert list(df.columns[:3]) == ["image", "edit_image", "prompt"] and len(df) == 5
    assert df.prompt[4].endswith("Maze 4")
    first = out / df.image[0]
    assert first.read_bytes() == _png(1000)  # the target, original bytes
    assert (out / df.edit_image[0]).read_bytes() == _png(0)
    assert (df.width[0], df.height[0]) == (80, 64)
    # rerun: both shards are complete -> nothing is rewritten
    mtime = first.stat().st_mtime_ns
    run(SFT_DIR / "prepare_data.py", "--input", str(src / "*.parquet"), "--out", out)
    assert first.stat().st_mtime_ns == mtime
    # the CSV trains
    run(SFT_DIR / "train_sft.py", "--config", REPO / "configs" / "sft" / "tiny_demo.yaml",
        f"model.pretrained_path={tiny_models.flux}", f"data.csv={out / 'sft_data.csv'}",
        f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2", "data.max_pixels=6144")


def test_prepare_data_errors_name_shard_and_row(tmp_path):
    bad = _shard(tmp_path / "bad.parquet", 0, 3, corrupt_row=1)
    res = run(SFT_DIR / "prepare_data.py", "--input", bad, "--out", tmp_path / "o1", ok=False)
    assert res.returncode == 2 and "bad.parquet row 1 image: image could not be decoded" in res.stderr
    assert not (tmp_path / "o1" / "sft_data.csv").exists()
    res = run(SFT_DIR / "prepare_data.py", "--input", bad, "--out", tmp_path / "o2", "--on_error", "skip")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["skipped"]) == (2, 1)
    assert json.loads((tmp_path / "o2" / "skipped.jsonl").read_text())["row"] == 1
    nocol = _shard(tmp_path / "nocol.parquet", 0, 2, drop_column="edit_image")
    res = run(SFT_DIR / "prepare_data.py", "--input", nocol, "--out", tmp_path / "o3", ok=False)
    assert res.returncode == 2 and "nocol.parquet: missing column(s) edit_image" in res.stderr


# ----------------------------------------------------------------------------------------------
# Full fine-tuning: the checkpoint's transformer/ becomes a pipeline dir (merge_lora.py --checkpoint)
# ----------------------------------------------------------------------------------------------
# RL's loader runs in its own process: this tree's files never import another tree's package.
RL_LOAD = str(Path(__file__).resolve().parents[2] / "tests" / "drivers" / "rl_load.py")


def _state_digest(transformer_dir) -> str:
    import hashlib

    from diffusers import Flux2Transformer2DModel

    h = hashlib.sha256()
    for k, v in sorted(Flux2Transformer2DModel.from_pretrained(transformer_dir).state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def full_trained(tiny_models, sft_csv, tmp_path_factory):
    """A 2-step full fine-tuning checkpoint of the tiny model."""
    run_dir = tmp_path_factory.mktemp("sftfull")
    run(SFT_DIR / "train_sft.py", "--config", REPO / "configs" / "sft" / "tiny_demo.yaml",
        f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}", f"train.run_dir={run_dir}",
        "data.max_pixels=6144", "train.max_steps=2", "lora.enabled=false", "optim.lr=1e-3")
    return run_dir / "checkpoints" / "step-000002"


def test_full_checkpoint_assembles_into_a_pipeline_that_rl_and_evaluation_load(tiny_models, full_trained, tmp_path):
    out = tmp_path / "assembled"
    res = run(SFT_DIR / "merge_lora.py", "--checkpoint", full_trained, "--out", out)  # --base from meta.json
    assert "assembled the full fine-tuning checkpoint" in res.stdout
    # transformer/ is the checkpoint's, byte for byte; every other component is the base's
    for f in (full_trained / "transformer").iterdir():
        assert (out / "transformer" / f.name).read_bytes() == f.read_bytes()
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (tiny_models.flux / sub).iterdir():
            assert (out / sub / f.name).read_bytes() == f.read_bytes()
    assert (out / "model_index.json").read_bytes() == (tiny_models.flux / "model_index.json").read_bytes()
    assert _state_digest(out / "transformer") != _state_digest(tiny_models.flux / "transformer")  # trained
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "merged_pipeline" and meta["step"] == 2 and meta["base_model"] == str(tiny_models.flux)
    assert meta["config"]["mode"] == "full" and meta["config"]["checkpoint"] == str(full_trained)
    assert meta["config"]["dtype"] == "float32"
    parent = meta["parents"][1]
    assert parent["kind"] == "full" and parent["step"] == 2 and parent["config"]["lora"]["enabled"] is False

    # RL's model loader takes it, with the trained weights
    rl = subprocess.run([sys.executable, RL_LOAD, str(out)], capture_output=True, text=True, timeout=300,
                        cwd=REPO)
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert rl.stdout.split() == ["Flux2KleinPipeline", _state_digest(full_trained / "transformer")]

    # Evaluation/evaluate.py runs it end to end (test-double MLLM server)
    double = _load_by_path("etchr_eval_tests_double_server", REPO / "Evaluation" / "tests" / "double_server.py")
    fixture = _load_by_path("etchr_mk_dl3dv", REPO / "scripts" / "make_dl3dv_fixture.py")
    data = fixture.make(str(tmp_path / "dl3dv.parquet"), n=2)
    run_dir = tmp_path / "eval"
    with double.DoubleServer() as srv:
        run(REPO / "Evaluation" / "evaluate.py", "--config", REPO / "configs" / "eval" / "tiny_demo.yaml",
            f"editor.pipe_path={out}", "mllm.model=double", f"mllm.endpoints=[{srv.base_url}]",
            f"tasks.dl3dv.path={data}", f"run_dir={run_dir}", "report_html=false")
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 2 and all(r["status"] == "ok" and (run_dir / r["edit_path"]).is_file() for r in rows)
    assert json.loads((run_dir / "summary.json").read_text())["tasks"]["dl3dv"]["edits_made"] == 2


def test_assemble_refuses_what_it_cannot_build(tiny_models, full_trained, trained, tmp_path):
    import shutil

    res = run(SFT_DIR / "merge_lora.py", "--full", "--checkpoint", trained, "--out", tmp_path / "a", ok=False)
    assert res.returncode == 2 and "not a full fine-tuning checkpoint" in res.stderr  # a LoRA checkpoint
    res = run(SFT_DIR / "merge_lora.py", "--checkpoint", full_trained, "--out", tmp_path / "b", "--scale", 2, ok=False)
    assert res.returncode == 2 and "--alpha and --scale apply to LoRA" in res.stderr
    other = tmp_path / "other_base"  # same components, a transformer of another shape
    shutil.copytree(tiny_models.flux, other)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    cfg["num_layers"] += 1
    (other / "transformer" / "config.json").write_text(json.dumps(cfg))
    res = run(SFT_DIR / "merge_lora.py", "--checkpoint", full_trained, "--base", other, "--out", tmp_path / "c", ok=False)
    assert res.returncode == 2 and "differs from" in res.stderr and "num_layers" in res.stderr
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.*"))  # nothing half-written
    (tmp_path / "d").mkdir()
    res = run(SFT_DIR / "merge_lora.py", "--checkpoint", full_trained, "--out", tmp_path / "d", ok=False)
    assert res.returncode == 2 and "exists" in res.stderr


def _load_by_path(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
