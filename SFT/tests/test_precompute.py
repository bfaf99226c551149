"""SFT/precompute.py and train_sft.py with data.precomputed_dir: the same losses as encoding in the loop,
resume after a kill, 2-rank sharding, stale settings refused, the encoders not run by the trainer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent
CONFIG = str(REPO / "configs" / "sft" / "tiny_demo.yaml")
BATCH, SHARD_BATCHES = 2, 1  # 8 rows in 2 size buckets -> 4 batches -> 4 shards


def base_args(tiny_models, csv, *extra):
    return ["--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={csv}",
            "data.max_pixels=6144", *extra]


def run(script, argv, *, torchrun=0, env=None, ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", **(env or {}))
    cmd = [sys.executable]
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port", str(port)]
    res = subprocess.run(cmd + [str(SFT_DIR / script)] + argv, capture_output=True, text=True, timeout=400,
                         env=env, cwd=REPO)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def precompute(tiny_models, csv, out, *extra, **kw):
    return run("precompute.py", base_args(tiny_models, csv, f"data.precomputed_dir={out}",
                                          f"data.precompute_batch_size={BATCH}",
                                          f"data.precompute_shard_batches={SHARD_BATCHES}", *extra), **kw)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def shard_bytes(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


@pytest.fixture(scope="module")
def pre(tiny_models, sft_csv, tmp_path_factory) -> Path:
    """One uninterrupted single-process precompute of the fixture CSV."""
    out = tmp_path_factory.mktemp("pre") / "pre"
    res = precompute(tiny_models, sft_csv, out)
    assert "8 rows, 8 distinct, 4 shards" in res.stdout
    return out


def test_layout_meta_and_index(pre):
    meta = json.loads((pre / "meta.json").read_text())
    assert meta["rows"] == 8 and meta["encoded_this_run"] == 8 and meta["entries_total"] == 8
    assert meta["shards_total"] == 4 and meta["batch_size"] == BATCH and meta["samples_per_s"] > 0
    assert meta["settings"]["max_pixels"] == 6144 and meta["settings"]["reference_resize"] == "pipeline"
    assert set(meta["settings"]["model"]) == {"vae", "text_encoder", "tokenizer"}
    index = json.loads((pre / "index.json").read_text())
    assert len(index["entries"]) == 8 and len(index["files"]) == 16
    from safetensors import safe_open

    names = set()
    for p in (pre / "shards").iterdir():
        with safe_open(str(p), "pt") as f:
            names |= set(f.keys())
            assert json.loads(f.metadata()["etchr_precompute"]) == {"schema": 1, "settings": meta["settings"]}
    assert names == {f"{k}.{f}" for k in index["entries"] for f in ("prompt_embeds", "text_ids", "target", "reference")}
    assert not list(pre.rglob("*.pt")) and not list(pre.rglob("*.pkl"))  # pickle-free


def test_precomputed_training_gives_the_eager_losses(tiny_models, sft_csv, pre, tmp_path):
    """Batch 2 over both buckets, 3 steps, fp32 on CPU; the precomputed run also runs a validation edit (the
    encoders come to the device for it)."""
    eager, fast = tmp_path / "eager", tmp_path / "fast"
    common = ["train.batch_size=2", "train.max_steps=3", "train.checkpoint_every=100"]
    run("train_sft.py", base_args(tiny_models, sft_csv, f"train.run_dir={eager}", *common))
    res = run("train_sft.py", base_args(tiny_models, sft_csv, f"train.run_dir={fast}", *common,
                                        f"data.precomputed_dir={pre}", "train.validate_every=3",
                                        "train.validation_items=1", "train.validation_steps=1"))
    assert "text encoder and VAE not run for training" in res.stdout
    assert len(losses(fast)) == 3
    assert losses(fast) == pytest.approx(losses(eager), rel=1e-6, abs=1e-8)
    assert len(list((fast / "validation" / "step-000003").glob("*.png"))) == 1


def test_trainer_never_calls_the_encoders(tiny_models, sft_csv, pre, tmp_path):
    """In-process: the text encoder's and the VAE encoder's forward raise; training still runs."""
    sys.path.insert(0, str(SFT_DIR))
    import train_sft

    from etchr_sft.config import load_sft_config
    from etchr_sft.model import load_pipeline

    pipe = load_pipeline(str(tiny_models.flux), torch.float32)

    def refuse(*a, **k):
        raise AssertionError("encoder called during precomputed training")

    pipe.text_encoder.forward = refuse
    pipe.vae.encode = refuse
    cfg = load_sft_config(CONFIG, [f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}",
                                   f"train.run_dir={tmp_path}", "data.max_pixels=6144", "train.max_steps=2",
                                   f"data.precomputed_dir={pre}", "train.save_final=false",
                                   "train.checkpoint_every=100"])
    assert train_sft.train(cfg, pipe=pipe)["step"] == 2


def test_killed_precompute_resumes_to_the_same_files(tiny_models, sft_csv, pre, tmp_path):
    out = tmp_path / "pre"
    res = precompute(tiny_models, sft_csv, out, env={"ETCHR_PRECOMPUTE_EXIT_AFTER": "2"}, ok=False)
    assert res.returncode == 3, res.stderr[-2000:]
    assert len(list((out / "shards").glob("shard-*"))) == 1 and not (out / "index.json").exists()
    (out / "shards" / ".shard-000001-x.safetensors.tmp-99").write_bytes(b"torn")  # a killed write's leftover
    res = precompute(tiny_models, sft_csv, out)
    assert "1 of 4 shards done, 6 samples to encode" in res.stdout
    assert shard_bytes(out) == shard_bytes(pre)
    assert json.loads((out / "index.json").read_text()) == json.loads((pre / "index.json").read_text())
    assert json.loads((out / "meta.json").read_text())["encoded_this_run"] == 6
    res = precompute(tiny_models, sft_csv, out)  # complete: nothing left
    assert "4 of 4 shards done, 0 samples to encode" in res.stdout


def test_two_ranks_write_the_same_shards_each_row_once(tiny_models, sft_csv, pre, tmp_path):
    out = tmp_path / "pre"
    res = precompute(tiny_models, sft_csv, out, torchrun=2)
    assert "over 2 process(es)" in res.stdout
    assert shard_bytes(out) == shard_bytes(pre)  # shard n on rank n % 2; the plan is independent of the world size
    from safetensors import safe_open

    seen = []
    for p in (out / "shards").iterdir():
        with safe_open(str(p), "pt") as f:
            seen += [k.split(".")[0] for k in f.keys() if k.endswith(".target")]
    assert len(seen) == 8 and len(set(seen)) == 8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["encoded_this_run"] == 8


@pytest.mark.parametrize("override, setting", [("data.max_pixels=4096", "max_pixels: stored 6144, this run 4096"),
                                               ("data.reference_resize=diffsynth",
                                                "reference_resize: stored 'pipeline', this run 'diffsynth'")])
def test_stale_settings_are_refused(tiny_models, sft_csv, pre, tmp_path, override, setting):
    res = run("train_sft.py", base_args(tiny_models, sft_csv, f"train.run_dir={tmp_path}", "train.max_steps=1",
                                        f"data.precomputed_dir={pre}", override), ok=False)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "row 0" in res.stderr and setting in res.stderr and "SFT/precompute.py" in res.stderr
    assert not (tmp_path / "metrics.jsonl").exists() or not losses(tmp_path)


def test_unfinished_dir_and_cache_keys_are_refused(tiny_models, sft_csv, tmp_path):
    res = run("train_sft.py", base_args(tiny_models, sft_csv, f"train.run_dir={tmp_path / 'r'}",
                                        f"data.precomputed_dir={tmp_path / 'none'}"), ok=False)
    assert res.returncode == 2 and "no index.json" in res.stderr
    from etchr_sft.config import ConfigError, load_sft_config

    with pytest.raises(ConfigError, match="supersedes"):
        load_sft_config(CONFIG, [f"data.precomputed_dir={tmp_path}", "data.cache_text_embeddings=true"])


def test_fingerprint_sees_one_changed_weight_and_keys_see_image_bytes(tiny_models, sft_csv, tmp_path):
    sys.path.insert(0, str(SFT_DIR))
    import shutil

    from etchr_sft.data import read_csv
    from etchr_sft.model import load_pipeline
    from etchr_sft.precompute import FileHashes, model_fingerprint, row_key

    pipe = load_pipeline(str(tiny_models.flux), torch.float32)
    a = model_fingerprint(pipe)
    assert model_fingerprint(pipe) == a
    with torch.no_grad():
        p = next(pipe.vae.parameters())
        p.view(-1)[0] += 1.0  # element 0 is always in the strided sample
    b = model_fingerprint(pipe)
    assert b["vae"] != a["vae"] and b["text_encoder"] == a["text_encoder"]
    shutil.copytree(sft_csv.parent, tmp_path / "d")
    rows = read_csv(str(tmp_path / "d" / sft_csv.name))
    settings = {"max_pixels": 6144, "multiple_of": 16, "reference_resize": "pipeline", "max_sequence_length": 512,
                "dtype": "fp32", "model": a}
    k0 = row_key(rows[0], settings, FileHashes())
    from PIL import Image

    with Image.open(rows[0].reference) as im:  # same size, one pixel changed: same bucket, other bytes
        im = im.convert("RGB")
        im.putpixel((0, 0), (0, 0, 0))
        im.save(rows[0].reference)
    assert row_key(rows[0], settings, FileHashes()) != k0
