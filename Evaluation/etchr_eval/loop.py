"""Edit -> Verify -> Reason for one task, pipelined (PROTOCOL.md section 3).

The GPU edits items one after another in a worker thread while the MLLM requests of earlier items
are in flight on the event loop; the GPU waits for the MLLM only at the end (or when more than
`max_inflight` items are waiting for answers, to bound memory). The no-edit baseline (reason on the
original alone) is sent as soon as an item is picked up; when the verifier rejects the edit, the
ETCHR answer *is* that baseline answer: no request is ever sent twice.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from .client import MLLMClient, Reply, image_data_uri, user_message
from .editor import Editor, item_seed
from .extract import verify_verdict
from .prompts import load_prompt
from .results import ResultStore
from .runtime import get_logger, progress, rank
from .tasks.base import DataError, Item, ItemError, Task

log = get_logger("etchr_eval.loop")


@dataclass
class LoopSettings:
    baseline: bool = True
    verify_max_tokens: int = 4096
    reason_max_tokens: int = 4096
    temperature: float = 0.0
    image_format: str = "png"
    jpeg_quality: int = 75
    base_seed: int = 126
    per_item_seed: bool = True
    max_inflight: int = 128  # items edited but still waiting for MLLM answers
    run_dir: str = "."
    run_hashes: dict = field(default_factory=dict)  # task -> run fingerprint hash, stamped on every row
    on_row: Optional[Any] = None  # called with each row right after it is appended to the results file
    scoring: Optional[Any] = None  # cfg.scoring (verify_rule); None = the defaults


@dataclass
class TaskRunStats:
    items: int = 0
    skipped: int = 0
    processed: int = 0
    failed: int = 0
    edits: int = 0
    cache_hits: int = 0
    edit_seconds: float = 0.0
    wall_s: float = 0.0
    gpu_idle_wait_s: float = 0.0  # time the edit loop spent waiting for MLLM capacity
    tail_wait_s: float = 0.0  # time after the last edit until the last answer


def edit_prompt(task: Task, item: Item) -> str:
    return load_prompt(task.edit_prefix) + item.question


def verify_messages(task: Task, item: Item, orig_uri: str, edit_uri: str) -> list[dict]:
    return user_message([orig_uri, edit_uri], [load_prompt(task.verify_prompt), item.question])


def reason_messages(task: Task, item: Item, uris: list[str]) -> list[dict]:
    prompt = load_prompt(task.reason_two if len(uris) == 2 else task.reason_one)
    return user_message(uris, [prompt, item.question])


async def _score(task: Task, reply: Reply, item: Item, judge: Optional[MLLMClient]) -> dict:
    """Extract and score; judge-graded tasks ask the judge (a failed judge call is a failure, not a 0)."""
    pred = task.extract(reply.text)
    prompt = task.judge_request(pred, reply.text, item) if task.judge_request is not None else None
    if prompt is not None:
        verdict = await judge.chat(user_message([], [prompt]), max_tokens=task.judge_max_tokens, temperature=0.0)
        if not verdict.ok:
            return {"pred": pred, "judge_error": verdict.error}
        detail = task.judge_score(verdict.text, item)
        detail["judge_response"] = verdict.text
    else:
        detail = task.score(pred, item)
    out = {"pred": pred, "score": float(detail.pop("score")), "detail": detail}
    if pred is None:
        out["note"] = "no answer could be extracted from the response"
    return out


async def run_task(task: Task, items: list[Item], editor: Editor, client: MLLMClient, store: ResultStore,
                   s: LoopSettings, *, desc: Optional[str] = None, judge: Optional[MLLMClient] = None) -> TaskRunStats:
    """Evaluate `items` of `task`, appending one row per item to `store`; finished items are skipped."""
    judge = judge or client
    stats = TaskRunStats(items=len(items))
    todo = [it for it in items if not store.finished(f"{task.name}/{it.id}")]
    stats.skipped = len(items) - len(todo)
    if not todo:
        return stats
    loop = asyncio.get_running_loop()
    gpu = ThreadPoolExecutor(1, thread_name_prefix="etchr-edit")  # one edit at a time on the device
    cpu = ThreadPoolExecutor(2, thread_name_prefix="etchr-io")  # image decode / encode
    inflight = asyncio.Semaphore(max(1, s.max_inflight))
    bar = progress(total=len(todo), desc=desc or f"{task.name}", unit="item")
    pending: list[asyncio.Task] = []
    e0, h0, sec0 = editor.stats["edits"], editor.stats["cache_hits"], editor.stats["edit_seconds"]
    t_start = time.time()
    prompts = {"edit_prefix": task.edit_prefix, "verify": task.verify_prompt, "reason_one": task.reason_one,
               "reason_two": task.reason_two}

    def base_row(item: Item) -> dict:
        return {"task": task.name, "id": item.id, "run": s.run_hashes.get(task.name), "question": item.question,
                "gt": item.answer, "prompts": prompts, "rank": rank()}

    def finish(row: dict) -> None:
        row["time"] = time.time()
        row.setdefault("status", "ok" if not row.get("errors") else "failed")
        store.append(row)
        if s.on_row is not None:
            s.on_row(row)
        stats.processed += 1
        stats.failed += row["status"] != "ok"
        bar.update(1)

    async def reason(item: Item, uris: list[str]) -> Reply:
        return await client.chat(reason_messages(task, item, uris), max_tokens=s.reason_max_tokens,
                                 temperature=s.temperature)

    async def complete(item: Item, row: dict, orig_uri: str, edit_fut: asyncio.Future,
                       baseline: Optional[asyncio.Task]) -> None:
        errors: dict[str, str] = {}
        try:
            try:
                edit_img, edit_path, secs, hit = await edit_fut
            except Exception as exc:  # a failed edit is this item's failure, not the run's
                errors["edit"] = f"{type(exc).__name__}: {exc}"
                log.warning("%s/%s: edit failed: %s", task.name, item.id, errors["edit"])
                if baseline is not None:
                    _record_reply(row, "baseline", await baseline, errors)
                row["errors"] = errors
                return finish(row)
            row.update(edit_path=_rel(edit_path, s.run_dir), edit_size=list(edit_img.size),
                       edit_seconds=round(secs, 3), edit_cached=hit)
            edit_uri = await loop.run_in_executor(cpu, image_data_uri, edit_img, s.image_format, s.jpeg_quality)
            verify = await client.chat(verify_messages(task, item, orig_uri, edit_uri),
                                       max_tokens=s.verify_max_tokens, temperature=s.temperature)
            _record_reply(row, "verify", verify, errors)
            if verify.ok:
                accepted = verify_verdict(verify.text, getattr(s.scoring, "verify_rule", "trimmed"))
                row["accepted"] = accepted
                if accepted:
                    etchr = await reason(item, [orig_uri, edit_uri])
                elif baseline is not None:
                    etchr = await baseline  # the rejected item's answer is the baseline answer
                else:
                    etchr = await reason(item, [orig_uri])
                row["etchr_images"] = 2 if accepted else 1
                _record_reply(row, "etchr", etchr, errors)
                if etchr.ok:
                    await _record_score(row, "etchr", task, etchr, item, errors, judge)
            if baseline is not None:
                b = await baseline
                _record_reply(row, "baseline", b, errors)
                if b.ok:
                    await _record_score(row, "baseline", task, b, item, errors, judge)
        except Exception as exc:  # never let one item kill the run; keep the traceback in the record
            errors["internal"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc(limit=5)
        finally:
            inflight.release()
        row["errors"] = errors
        finish(row)

    try:
        for item in todo:
            t_wait = time.time()
            await inflight.acquire()
            stats.gpu_idle_wait_s += time.time() - t_wait
            row = base_row(item)
            try:
                image = await loop.run_in_executor(cpu, item.image)
            except ItemError as exc:
                inflight.release()
                row["errors"] = {"load": str(exc)}
                finish(row)
                continue
            prompt = edit_prompt(task, item)
            seed = item_seed(s.base_seed, task.name, item.id, s.per_item_seed)
            row.update(edit_prompt=prompt, seed=seed, image_size=list(image.size))
            orig_uri = await loop.run_in_executor(cpu, image_data_uri, image, s.image_format, s.jpeg_quality)
            baseline = asyncio.ensure_future(reason(item, [orig_uri])) if s.baseline else None
            edit_fut = loop.run_in_executor(gpu, editor.edit, image, prompt, seed)
            pending.append(asyncio.ensure_future(complete(item, row, orig_uri, edit_fut, baseline)))
            # Keep the GPU busy: start the next edit as soon as this one is done, not when it is judged.
            try:
                await asyncio.shield(edit_fut)
            except Exception:
                pass  # recorded by complete()
        t_last_edit = time.time()
        if pending:
            await asyncio.gather(*pending)
        stats.tail_wait_s = time.time() - t_last_edit
    finally:
        for p in pending:
            if not p.done():
                p.cancel()
        gpu.shutdown(wait=True)
        cpu.shutdown(wait=True)
        bar.close()
    stats.wall_s = time.time() - t_start
    stats.edits = editor.stats["edits"] - e0
    stats.cache_hits = editor.stats["cache_hits"] - h0
    stats.edit_seconds = editor.stats["edit_seconds"] - sec0
    return stats


def _rel(path, run_dir: str) -> str:
    import os

    try:
        return os.path.relpath(path, run_dir)
    except ValueError:
        return str(path)


def _record_reply(row: dict, stage: str, reply: Reply, errors: dict) -> None:
    if f"{stage}_response" in row or f"{stage}_error" in row:
        return
    if reply.ok:
        row[f"{stage}_response"] = reply.text
        row[f"{stage}_latency_s"] = round(reply.latency_s, 3)
    else:
        errors[stage] = reply.error
        row[f"{stage}_error"] = reply.error
    row[f"{stage}_attempts"] = reply.attempts


async def _record_score(row: dict, stage: str, task: Task, reply: Reply, item: Item, errors: dict,
                        judge: MLLMClient) -> None:
    try:
        sc = await _score(task, reply, item, judge)
    except DataError as exc:
        errors["score"] = str(exc)
        return
    if "judge_error" in sc:
        errors[f"{stage}_judge"] = sc["judge_error"]
        row[f"{stage}_judge_error"] = sc["judge_error"]
        return
    row[f"{stage}_pred"] = sc["pred"]
    row[f"{stage}_score"] = sc["score"]
    if sc["detail"]:
        row[f"{stage}_detail"] = sc["detail"]
    if "note" in sc:
        row[f"{stage}_note"] = sc["note"]
