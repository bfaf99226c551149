"""scripts/bench/bench_edit.py --tiny and scripts/bench/plot_frontier.py: the benchmark's orchestration on CPU
(the GPU figures are in docs/PERFORMANCE.md; no timing is asserted). Compile against eager, the cached and
batched variants' fidelity rows, the fp8 refusal row, and --second-start: the second process with the same
compile cache loads every compiled graph from it (cache hits, no misses) and makes the same edit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "scripts" / "bench"


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="2")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return env


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_bench_edit_tiny_variants_and_frontier_plot(tmp_path):
    out = tmp_path / "results.jsonl"
    res = subprocess.run([sys.executable, str(BENCH / "bench_edit.py"), "--tiny", "--size", "64", "--steps", "3",
                          "--repeats", "1", "--work", str(tmp_path / "work"), "--out", str(out),
                          "--variants", "plain,cfgbatch+taylorseer_i2_w1,preset=fast_bf16,compile,fp8"],
                         capture_output=True, text=True, timeout=600, env=_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = _rows(out)
    assert rows[0]["header"]["tiny"] is True and rows[0]["header"]["steps"] == 3
    v = {r["variant"]: r for r in rows if "variant" in r}
    assert set(v) == {"plain", "cfgbatch+taylorseer_i2_w1", "preset=fast_bf16", "compile", "fp8"}
    assert v["plain"]["bit_identical"] and v["plain"]["ratio_vs_plain"] == 1.0
    assert v["compile"]["latent_rel_err"] < 1e-4  # fp32 inductor kernels vs eager: float rounding only
    assert v["compile"]["compile"]["unique_graphs"] >= 2  # one graph per repeated block class
    cached = v["cfgbatch+taylorseer_i2_w1"]
    assert cached["switches"]["cfg_batch"] and cached["switches"]["step_cache_warmup"] == 1
    assert cached["finite"] and 1e-6 < cached["latent_rel_err"] < 0.5
    preset = v["preset=fast_bf16"]
    assert preset["switches"]["preset"] == "fast_bf16" and preset["switches"]["step_cache_interval"] == 3
    assert preset["compile"]["graph_breaks"] > 0  # the step cache's bookkeeping runs outside the graphs
    assert "needs torchao" in v["fp8"]["error"] or "needs a CUDA GPU" in v["fp8"]["error"]

    png = tmp_path / "frontier.png"
    plot = subprocess.run([sys.executable, str(BENCH / "plot_frontier.py"), str(out), "--out", str(png)],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "4 variants from 1 run" in plot.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"variant": "plain", "seconds": 1.0, "psnr_db": 100, "latent_rel_err": 0}\n')
    plot = subprocess.run([sys.executable, str(BENCH / "plot_frontier.py"), str(bad), "--out", str(png)],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert plot.returncode == 2 and "before any header" in plot.stderr


def test_pareto_front():
    sys.path.insert(0, str(BENCH))
    try:
        import plot_frontier
    finally:
        sys.path.remove(str(BENCH))
    pts = [(10.0, 44.0), (5.0, 40.0), (7.0, 39.0), (20.0, 100.0), (5.0, 38.0)]
    assert plot_frontier.pareto(pts, higher_is_better=True) == [1, 0, 3]  # (7, 39) and (5, 38) are beaten
    errs = [(10.0, 0.01), (5.0, 0.02), (7.0, 0.03), (20.0, 0.0)]
    assert plot_frontier.pareto(errs, higher_is_better=False) == [1, 0, 3]


def test_bench_edit_second_start_loads_the_compiled_kernels(tmp_path):
    out = tmp_path / "second.jsonl"
    res = subprocess.run([sys.executable, str(BENCH / "bench_edit.py"), "--tiny", "--second-start", "--size", "64",
                          "--steps", "2", "--guidance", "1", "--variants", "compile", "--work", str(tmp_path / "work"),
                          "--child-timeout", "400", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = _rows(out)
    starts = {r["start"]: r for r in rows if "start" in r}
    assert set(starts) == {"cold", "warm"}, rows
    cold, warm = starts["cold"]["compile"], starts["warm"]["compile"]
    assert cold["fxgraph_cache_miss"] >= 2 and cold["fxgraph_cache_hit"] == 0  # a new, empty folder
    assert warm["fxgraph_cache_hit"] == cold["fxgraph_cache_miss"] and warm["fxgraph_cache_miss"] == 0
    assert starts["cold"]["compile_cache_dir"] == starts["warm"]["compile_cache_dir"]
    summary = next(r["second_start"] for r in rows if "second_start" in r)
    assert summary["same_edit"] is True  # loaded kernels = the kernels built by the cold start
    assert summary["warm_fxgraph_cache_hit"] == warm["fxgraph_cache_hit"]
