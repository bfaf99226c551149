"""The Edit-Verify-Reason loop in-process: pipelining order, request sharing, the judge hook."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
from PIL import Image

from etchr_eval.client import MLLMClient
from etchr_eval.loop import LoopSettings, run_task
from etchr_eval.results import ResultStore
from etchr_eval.tasks import get_task


class RecordingEditor:
    """Stands in for the GPU: records when each edit starts and ends."""

    def __init__(self, root, seconds=0.05):
        self.root, self.seconds = root, seconds
        self.events, self.lock = [], threading.Lock()
        self.stats = {"edits": 0, "cache_hits": 0, "edit_seconds": 0.0}

    def edit(self, image, prompt, seed):
        t0 = time.monotonic()
        time.sleep(self.seconds)
        path = self.root / f"{seed}.png"
        image.save(path)
        with self.lock:
            self.events.append(("edit", t0, time.monotonic()))
            self.stats["edits"] += 1
        return image, path, self.seconds, False


def _run(task, items, editor, client, store, judge=None, **kw):
    async def go():
        try:
            return await run_task(task, items, editor, client, store, LoopSettings(run_dir=str(store.run_dir), **kw),
                                  judge=judge)
        finally:
            await client.aclose()
    return asyncio.run(go())


def test_gpu_keeps_editing_while_answers_are_in_flight(dl3dv_parquet, tmp_path, make_double_server):
    srv = make_double_server(delay_s=0.4)
    task = get_task("dl3dv")
    items = task.load(str(dl3dv_parquet), 4)
    editor = RecordingEditor(tmp_path)
    client = MLLMClient([srv.base_url], "m", max_retries=0, concurrency=16)
    stats = _run(task, items, editor, client, ResultStore(tmp_path / "run"))
    assert stats.processed == 4 and stats.failed == 0
    edits = sorted(e[1:] for e in editor.events)
    # every edit started before the first item's answers could have come back (0.4 s per request,
    # verify then reason = >= 0.8 s after its edit): the GPU never waited for the MLLM
    first_answer_earliest = edits[0][1] + 0.8
    assert all(start < first_answer_earliest for start, _ in edits)
    # one request per stage: 4 baselines + 4 verifies + 4 two-image reasons (all accepted by the double)
    assert len(srv.requests) == 12


def test_rejected_items_reuse_the_baseline_answer(dl3dv_parquet, tmp_path, make_double_server):
    srv = make_double_server(rules=[("judge", "\\boxed{0}")])
    task = get_task("dl3dv")
    items = task.load(str(dl3dv_parquet), 3)
    store = ResultStore(tmp_path / "run")
    _run(task, items, RecordingEditor(tmp_path), MLLMClient([srv.base_url], "m"), store)
    assert len(srv.requests) == 6  # baseline + verify per item, nothing twice
    for row in store.rows.values():
        assert row["accepted"] is False and row["etchr_response"] == row["baseline_response"]
        assert row["etchr_score"] == row["baseline_score"] and row["etchr_images"] == 1


def _judged_task():
    base = get_task("dl3dv")
    return dataclasses.replace(
        base, name="dl3dv_judged_test",
        judge_request=lambda pred, response, item: None if pred is None else f"JUDGE pred={pred} gt={item.answer}",
        judge_score=lambda reply, item: {"score": float(reply.strip() == "1")})


def test_judge_graded_task(dl3dv_parquet, tmp_path, make_double_server):
    srv = make_double_server(rules=[("JUDGE pred=A", "1"), ("JUDGE", "0")])
    task = _judged_task()
    items = task.load(str(dl3dv_parquet), 3)
    store = ResultStore(tmp_path / "run")
    _run(task, items, RecordingEditor(tmp_path), MLLMClient([srv.base_url], "m"), store)
    judge_reqs = [r for r in srv.requests if "JUDGE" in str(r)]
    assert len(judge_reqs) == 6  # etchr + baseline per item
    assert all(len(r["messages"][0]["content"]) == 1 for r in judge_reqs)  # text only
    for row in store.rows.values():
        assert row["etchr_score"] == 1.0 and row["etchr_detail"]["judge_response"] == "1"


def test_failed_judge_is_a_failure_not_a_zero(dl3dv_parquet, tmp_path, make_double_server):
    srv = make_double_server(rules=[("JUDGE", "500")])
    task = _judged_task()
    items = task.load(str(dl3dv_parquet), 2)
    store = ResultStore(tmp_path / "run")
    _run(task, items, RecordingEditor(tmp_path), MLLMClient([srv.base_url], "m", max_retries=0), store)
    for row in store.rows.values():
        assert row["status"] == "failed" and "HTTP 500" in row["errors"]["etchr_judge"]
        assert "etchr_score" not in row
