"""Frozen requests: the exact messages, image count and sampling parameters sent per task and path.

Regenerate after an intended protocol change with ETCHR_UPDATE_SNAPSHOTS=1 and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EVAL_DIR = Path(__file__).resolve().parents[1]
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"
URI = re.compile(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+")


def normalise(requests: list[dict]) -> list[dict]:
    out = []
    for req in requests:
        text = URI.sub(lambda m: f"<{m.group(1)} image>", json.dumps(req, sort_keys=True))
        out.append(json.loads(text))
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


CASES = {
    # verifier accepts: baseline [I], verify [I, edit], reason [I, edit]
    "dl3dv_accepted": ([], []),
    # verifier rejects: baseline [I] and verify only; the ETCHR answer is the baseline answer
    "dl3dv_rejected": ([["judge", "\\boxed{0}"]], []),
    # no baseline: a rejected item is answered from [I] by its own request
    "dl3dv_rejected_no_baseline": ([["judge", "\\boxed{0}"]], ["baseline=false"]),
    # the reference's image encoding
    "dl3dv_jpeg": ([], ["mllm.image_format=jpeg"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_request_snapshot(case, tiny_models, dl3dv_parquet, tmp_path, make_double_server):
    rules, extra = CASES[case]
    srv = make_double_server(rules=[tuple(r) for r in rules])
    # Schema defaults (no YAML): the protocol's real sampling settings are what gets frozen.
    args = [f"editor.pipe_path={tiny_models.flux}", "editor.steps=2", "mllm.model=Qwen/Qwen3-VL-8B-Instruct",
            f"mllm.endpoints=[{srv.base_url}]", f"tasks.dl3dv.path={dl3dv_parquet}", "tasks.dl3dv.limit=1",
            f"run_dir={tmp_path}", "report_html=false", *extra]
    res = subprocess.run([sys.executable, str(EVAL_DIR / "evaluate.py"), *args], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = normalise(srv.requests)
    path = SNAPSHOTS / f"{case}.json"
    if os.environ.get("ETCHR_UPDATE_SNAPSHOTS") == "1":
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert path.is_file(), f"missing snapshot {path}; run with ETCHR_UPDATE_SNAPSHOTS=1"
    assert got == json.loads(path.read_text())


def test_snapshots_say_what_the_protocol_says():
    """Hand-checked facts of the frozen files, so a regenerated snapshot cannot drift silently."""
    acc = json.loads((SNAPSHOTS / "dl3dv_accepted.json").read_text())
    assert len(acc) == 3
    for req in acc:
        assert req["temperature"] == 0 and req["max_tokens"] == 4096 and req["model"] == "Qwen/Qwen3-VL-8B-Instruct"
        content = req["messages"][0]["content"]
        images = [c for c in content if c["type"] == "image_url"]
        texts = [c["text"] for c in content if c["type"] == "text"]
        assert content[: len(images)] == images  # images first, then the prompt, then the question
        assert len(texts) == 2 and texts[1].startswith("Question: In scene 0") and "Candidates: A: " in texts[1]
        if texts[0].startswith("Please judge"):
            assert len(images) == 2
        elif "two images" in texts[0]:
            assert len(images) == 2
        else:
            assert texts[0].startswith("Answer the question based on the image above.") and len(images) == 1
    assert len(json.loads((SNAPSHOTS / "dl3dv_rejected.json").read_text())) == 2  # nothing is asked twice
    assert len(json.loads((SNAPSHOTS / "dl3dv_rejected_no_baseline.json").read_text())) == 2
    assert "<jpeg image>" in (SNAPSHOTS / "dl3dv_jpeg.json").read_text()


ALL_TASKS = ["vstar", "hrbench_4k", "hrbench_8k", "chartqa", "charxiv_dq", "charxiv_rq", "maze", "frozenlake",
             "coco_jigsaw", "viewspatial", "dl3dv"]


def test_request_snapshot_of_every_task(tiny_models, tmp_path, make_double_server):
    """One item of each of the 11 columns through the real evaluate.py; the requests of each task
    (verify, reason with one or two images, baseline, CharXiv's judge) are frozen per task."""
    from etchr_eval.tasks import get_task

    bench = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(EVAL_DIR.parent / "scripts" / "build_benchmark.py"), "--out", str(bench),
                          "--n", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((bench / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(ALL_TASKS)
    srv = make_double_server()
    args = [f"editor.pipe_path={tiny_models.flux}", "editor.steps=2", "editor.max_area=16384",
            "mllm.model=Qwen/Qwen3-VL-8B-Instruct", f"mllm.endpoints=[{srv.base_url}]", f"run_dir={tmp_path / 'run'}",
            "report_html=false"]
    args += [f"tasks.{t}.path={bench / manifest['tasks'][t]['file']}" for t in ALL_TASKS]
    args += [f"tasks.{t}.limit=1" for t in ALL_TASKS]
    res = subprocess.run([sys.executable, str(EVAL_DIR / "evaluate.py"), *args], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    questions = {t: get_task(t).load(str(bench / manifest["tasks"][t]["file"]), 1)[0].question for t in ALL_TASKS}
    by_task: dict[str, list] = {t: [] for t in ALL_TASKS}
    for req in srv.requests:
        text = json.dumps(req, ensure_ascii=False)
        owners = [t for t, q in questions.items() if json.dumps(q, ensure_ascii=False)[1:-1] in text]
        assert len(owners) >= 1, f"request of no task: {text[:300]}"
        by_task[max(owners, key=lambda t: len(questions[t]))].append(req)
    for task in ALL_TASKS:
        got = normalise(by_task[task])
        assert len(got) >= 3, task  # baseline, verify and a reason (or the shared baseline) at least
        path = SNAPSHOTS / "tasks" / f"{task}.json"
        if os.environ.get("ETCHR_UPDATE_SNAPSHOTS") == "1":
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(got, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        assert path.is_file(), f"missing snapshot {path}; run with ETCHR_UPDATE_SNAPSHOTS=1"
        assert got == json.loads(path.read_text()), task
