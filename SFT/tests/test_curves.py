"""SFT curves and panels: a tiny run writes curves.png and a validation panel (source | edit, prompt);
--help / --print-config; files honour the umask (022 -> 0644 files, 0755 dirs), merged pipelines too."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SFT_DIR = Path(__file__).resolve().parents[1]
REPO = SFT_DIR.parent
CONFIG = str(REPO / "configs" / "sft" / "tiny_demo.yaml")


def _sft(*argv, umask=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, str(SFT_DIR / "train_sft.py"), *map(str, argv)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO, preexec_fn=pre)


def _png(path: Path) -> np.ndarray:
    im = np.asarray(Image.open(path).convert("RGB")).astype(float)
    assert im.std() > 5, f"{path} is blank"
    return im


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_run_writes_curves_and_panel_and_honours_umask(tiny_models, sft_csv, tmp_path):
    run_dir = tmp_path / "run"
    res = _sft("--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}",
               f"train.run_dir={run_dir}", "data.max_pixels=6144", "train.max_steps=3", "train.log_every=1",
               "train.validate_every=3", "train.validation_items=2", "train.validation_steps=2", umask=0o022)
    assert res.returncode == 0, res.stderr[-4000:]
    _png(run_dir / "curves.png")
    panel = _png(run_dir / "validation" / "panel-step-000003.png")
    edit = Image.open(run_dir / "validation" / "step-000003" / "000.png")
    assert panel.shape[1] >= 2 * min(256, edit.width)  # source beside the edit
    for f in (run_dir / "config.yaml", run_dir / "curves.png"):
        assert _mode(f) == 0o644, (f, oct(_mode(f)))
    ck = run_dir / "checkpoints" / "step-000003"
    assert _mode(ck) == 0o755
    # every file of the checkpoint, safetensors' own 0600 files included (finalize applies the umask)
    files = [f for f in ck.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert all(_mode(f) == 0o644 for f in files), [(str(f), oct(_mode(f))) for f in files if _mode(f) != 0o644]
    assert _mode(ck / "training_state") == 0o755
    # the merge of that checkpoint: a 0755 pipeline dir (mkdtemp's 0700 undone)
    out = tmp_path / "merged"
    res = subprocess.run([sys.executable, str(SFT_DIR / "merge_lora.py"), "--base", str(tiny_models.flux), "--lora",
                          str(ck), "--out", str(out)], capture_output=True, text=True, timeout=600,
                         preexec_fn=lambda: os.umask(0o022))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _mode(out) == 0o755 and all(_mode(f) == 0o644 for f in out.rglob("*") if f.is_file())
    assert all(_mode(d) == 0o755 for d in out.rglob("*") if d.is_dir())


def test_curves_continue_after_resume_and_skip_torn_rows(tmp_path):
    sys.path.insert(0, str(SFT_DIR))
    from etchr_sft.plots import series, write_curves

    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": None}]
    assert series(rows, "loss") == ([1, 2], [3.0, 1.5])  # the resumed run's row for step 2 wins
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1}\n{"step": 2, "loss": 0.5, "lr"')
    _png(write_curves(tmp_path))


def test_help_and_print_config(tiny_models, sft_csv):
    res = _sft("--help")
    assert res.returncode == 0
    assert "train.log_every (int, default 10): optimizer steps" in res.stdout
    assert "model.pretrained_path (str, default REQUIRED)" in res.stdout
    assert "accelerate launch" in res.stdout  # the launch examples
    res = _sft("--config", CONFIG, f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}",
               "optim.lr=0.5", "--print-config")
    assert res.returncode == 0, res.stderr
    assert "lr: 0.5" in res.stdout and "csv: " + str(sft_csv) in res.stdout
    assert _sft("--config", CONFIG, "nope.key=1", "--print-config").returncode == 2


def test_inference_dl3dv_help_lists_the_eval_keys():
    res = subprocess.run([sys.executable, str(REPO / "Evaluation" / "inference_dl3dv.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--vllm_baseurl" in res.stdout
    assert "config keys" in res.stdout and "wandb_project (str, default 'etchr-eval')" in res.stdout


def test_curves_redraw_is_throttled_by_curves_every_s(tiny_models, sft_csv, tmp_path, monkeypatch):
    """A redraw costs host time in which the GPU idles (~0.3 s a step with log_every=1): with
    train.curves_every_s it happens at the first log step, then at most every that many seconds, and
    always at the last step; 0 keeps the redraw at every log step."""
    monkeypatch.syspath_prepend(str(SFT_DIR))
    import train_sft

    from etchr_sft.config import load_sft_config

    calls = []
    monkeypatch.setattr(train_sft, "write_curves", lambda run_dir: calls.append(Path(run_dir)))
    common = [f"model.pretrained_path={tiny_models.flux}", f"data.csv={sft_csv}", "data.max_pixels=6144",
              "train.max_steps=4", "train.log_every=1", "train.validate_every=0", "train.save_final=false"]
    train_sft.train(load_sft_config(CONFIG, common + [f"train.run_dir={tmp_path / 'a'}", "train.curves_every_s=1e9"]))
    assert len(calls) == 2  # step 1 and the last step
    calls.clear()
    train_sft.train(load_sft_config(CONFIG, common + [f"train.run_dir={tmp_path / 'b'}", "train.curves_every_s=0"]))
    assert len(calls) == 4
