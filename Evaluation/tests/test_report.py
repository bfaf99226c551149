"""report.html: plots that are real images, every item reachable (2,000-item task), failure reasons,
flip markers and filters, checked on the data files and in headless Chromium (screenshot kept)."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from etchr_eval.report import flip, summarize_task, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _row(task: str, i: int, base: float, etchr: float, **kw) -> dict:
    r = {"task": task, "id": str(i), "status": "ok", "question": f"question {i} " + "x" * (400 if i == 1 else 5),
         "gt": "A", "accepted": i % 2 == 0, "verify_response": f"verify says \\boxed{{{int(i % 2 == 0)}}} #{i}",
         "baseline_pred": "A" if base else "B", "baseline_score": base, "baseline_response": "b",
         "etchr_pred": "A" if etchr else "B", "etchr_score": etchr, "etchr_response": "e", "errors": {}}
    r.update(kw)
    return r


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report")
    # A 2,000-item task (as DL3DV-2k) and a small one with known flips and failures.
    big = [_row("big", i, float(i % 3 == 0), float(i % 5 == 0)) for i in range(2000)]
    small = [_row("small", 0, 0.0, 1.0), _row("small", 1, 1.0, 0.0), _row("small", 2, 1.0, 1.0),
             _row("small", 3, 0.0, 0.0),
             {"task": "small", "id": "4", "status": "failed", "question": "q4", "gt": "A",
              "errors": {"verify": "HTTP 404: The model `qwen9` does not exist."},
              "verify_error": "HTTP 404: The model `qwen9` does not exist."}]
    edit = run_dir / "edit_cache" / "ab" / "e0.png"
    edit.parent.mkdir(parents=True)
    Image.new("RGB", (96, 64), (0, 0, 255)).save(edit)
    small[0]["edit_path"] = "edit_cache/ab/e0.png"
    rows = {"big": big, "small": small}
    summary = {t: summarize_task(r, items=len(r)) for t, r in rows.items()}
    originals = {"small/0": lambda: Image.new("RGB", (80, 60), (200, 10, 10))}
    write_html(run_dir, rows, summary, originals, {"mllm_model": "m", "pipe_path": "p"})
    return run_dir, rows


def _pages(run_dir: Path) -> dict[int, list[dict]]:
    out = {}
    for f in (run_dir / "report_assets" / "rows").glob("*.js"):
        m = re.fullmatch(r"ETCHR\.loaded\((\d+), (.*)\);\n", f.read_text(), flags=re.S)
        out[int(m.group(1))] = json.loads(m.group(2))
    return out


def _index(run_dir: Path) -> list[dict]:
    html = (run_dir / "report.html").read_text()
    return json.loads(re.search(r"var INDEX = (\[.*?\]); var PER_PAGE", html, flags=re.S).group(1))


def test_plots_are_valid_images(report):
    run_dir, _ = report
    for name in ("pass1.png", "verify_gate.png"):
        with Image.open(run_dir / "report_assets" / name) as im:
            im.verify()
        with Image.open(run_dir / "report_assets" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(set(im.convert("L").tobytes())) > 10  # drawn, not blank


def test_every_item_is_reachable(report):
    run_dir, rows = report
    index, pages = _index(run_dir), _pages(run_dir)
    assert [(e["t"], e["i"]) for e in index] == [(t, r["id"]) for t, rs in rows.items() for r in rs]
    for e in index:  # each index entry points at its own row in its page file
        view = pages[e["p"]][e["k"]]
        assert (view["task"], view["id"]) == (e["t"], e["i"])
    assert len(pages) == -(-2005 // 50)
    assert (run_dir / "report.html").stat().st_size < 400_000  # the page itself stays small


def test_failed_rows_show_their_reason_and_flips_are_marked(report):
    run_dir, rows = report
    index = {(e["t"], e["i"]): e for e in _index(run_dir)}
    assert index[("small", "0")]["f"] == "improved" and index[("small", "1")]["f"] == "regressed"
    assert index[("small", "2")]["f"] is None and index[("small", "3")]["f"] is None
    assert index[("small", "4")]["s"] == "failed" and index[("small", "4")]["f"] is None
    for r in rows["big"]:  # flags equal the rule on every row of the big task
        assert index[("big", r["id"])]["f"] == flip(r)
    view = next(v for p in _pages(run_dir).values() for v in p if (v["task"], v["id"]) == ("small", "4"))
    assert view["errors"] == {"verify": "HTTP 404: The model `qwen9` does not exist."}
    first = next(v for p in _pages(run_dir).values() for v in p if (v["task"], v["id"]) == ("small", "0"))
    assert first["edit_full"] == "edit_cache/ab/e0.png" and (run_dir / first["edit_thumb"]).is_file()
    assert (run_dir / first["orig_full"]).is_file()  # a link to the full-size original


def _dom(url: str, tmp_path: Path) -> str:
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'prof'}",
                          "--allow-file-access-from-files", "--virtual-time-budget=8000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: .ci/run)")
def test_the_page_in_headless_chromium(report, tmp_path):
    run_dir, _ = report
    url = (run_dir / "report.html").as_uri()
    dom = _dom(url, tmp_path)
    assert dom.count("class=\"item ") == 50 and "page 1 of 41 (2005 items)" in dom
    last = _dom(url + "#task=big&filter=all&page=40", tmp_path)
    assert 'data-id="big/1999"' in last and "page 40 of 40 (2000 items)" in last
    fails = _dom(url + "#task=&filter=failures&page=1", tmp_path)
    assert fails.count("class=\"item ") == 1 and "The model `qwen9` does not exist." in fails
    improved = _dom(url + "#task=small&filter=improved&page=1", tmp_path)
    assert 'data-id="small/0"' in improved and 'data-id="small/1"' not in improved and "improved" in improved
    shot = tmp_path / "report.png"
    res = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'prof'}",
                          "--virtual-time-budget=8000", "--window-size=1400,1600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-3000:]
    with Image.open(shot) as im:  # the plots are in the top part of the page: not a blank screenshot
        top = im.convert("RGB").crop((0, 0, 1400, 900))
        assert len(set(top.getdata()) if False else {top.getpixel((x, y)) for x in range(0, 1400, 7) for y in range(0, 900, 7)}) > 50


def test_files_are_created_with_the_umask(report, tmp_path):
    import os

    from etchr_eval.runtime import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
