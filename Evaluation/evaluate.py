#!/usr/bin/env python
"""Edit-Verify-Reason evaluation of any registered tasks.

    python evaluate.py --config ../configs/eval/dl3dv_reference.yaml [key=value ...]
    python evaluate.py --config ../configs/eval/embedded_benchmark.yaml --tasks maze,vstar --limit 20
    python evaluate.py --config ... --print-config          # the resolved config, then exit
    torchrun --nproc_per_node 8 evaluate.py --config ...      # items sharded over ranks / GPUs

Flags: --config FILE, --tasks a,b (a subset of the YAML's tasks), --limit N (first N items of each
selected task), --print-config, -h/--help; everything else is key=value overrides.

Writes into run_dir: config.yaml, results.jsonl (one row per item; resumable), edit_cache/,
summary.json / summary.md (per-task tables), report.html. A rerun skips finished items and retries
only failed ones; edits are cached, so evaluating a second MLLM reuses the first run's edits.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere without installing

from etchr_eval import runtime  # noqa: E402
from etchr_eval.client import EndpointError, MLLMClient  # noqa: E402
from etchr_eval.config import ConfigError, load_eval_config, save_config, split_cli, to_container  # noqa: E402
from etchr_eval.editor import Editor  # noqa: E402
from etchr_eval.loop import LoopSettings, run_task  # noqa: E402
from etchr_eval.prompts import prompt_versions  # noqa: E402
from etchr_eval.report import summarize_task, write_html, write_summary  # noqa: E402
from etchr_eval.fingerprint import (FINGERPRINT_FILE, FingerprintMismatch, check_run_dir, namespace_dir,  # noqa: E402
                                    row_hash, run_fingerprint)
from etchr_eval.fingerprint import merged as merged_fingerprint  # noqa: E402
from etchr_eval.prompts import load_prompt  # noqa: E402
from etchr_eval.results import ResultStore, consolidate, read_rows, result_files  # noqa: E402
from etchr_eval.runtime import RunDirLock, RunDirLocked, atomic_write_json  # noqa: E402
from etchr_eval.tasks import DataError, get_task  # noqa: E402
from etchr_eval.tasks.maze import scoring_variant  # noqa: E402

# Errors that stop a run at start with one line naming the key, file, endpoint or model (exit 2).
START_ERRORS = (ConfigError, DataError, EndpointError, FileNotFoundError, KeyError, FingerprintMismatch,
                RunDirLocked)

log = runtime.get_logger("etchr_eval")


def init_distributed() -> None:
    """torchrun sets WORLD_SIZE; the ranks then only need a barrier and an object gather."""
    if runtime.world_size() > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(runtime.local_rank())
            dist.init_process_group(backend=backend)


def gather(obj):
    if runtime.world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * runtime.world_size()
    dist.all_gather_object(out, obj)
    return out


class RunFailed(RuntimeError):
    """The run finished but produced nothing trustworthy for a task (e.g. every request failed)."""


def check_failures(summary: dict, rows_by_task: dict, max_failed_fraction) -> None:
    """Raise RunFailed naming each task whose failures pass the threshold, with the first reason."""
    bad = []
    for name, s in summary.items():
        items, failed = s["items"], s["failed"]
        if not items:
            continue
        over = failed == items if max_failed_fraction is None else failed / items > max_failed_fraction
        if over:
            first = next((r for r in rows_by_task.get(name, []) if r.get("status") != "ok"), {})
            reason = "; ".join(f"{k}: {v}" for k, v in (first.get("errors") or {}).items())[:300]
            bad.append(f"{name}: {failed} of {items} items failed (first: {first.get('id')}: {reason or 'unknown'})")
    if bad:
        limit = "every item" if max_failed_fraction is None else f"more than {max_failed_fraction:.0%} of the items"
        raise RunFailed(f"{limit} of a task failed, so its numbers mean nothing:\n  " + "\n  ".join(bad))


def run(cfg, on_row=None) -> dict:
    """Evaluate every task of `cfg`; returns the per-task summary (on every rank).

    `on_row(row)` is called in the writing process right after each row is appended to the results."""
    init_distributed()
    if runtime.world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        runtime.die_with_parent()  # a killed torchrun must not leave workers racing the rerun
    rank, world = runtime.rank(), runtime.world_size()
    run_dir = Path(cfg.run_dir)
    if not cfg.tasks:
        raise ConfigError("no tasks configured: add tasks.<name>.path=<data file> (registered tasks: "
                          f"{', '.join(sorted(__import__('etchr_eval.tasks', fromlist=['TASKS']).TASKS))})")
    # ---------------------------------------------------------------- build (checks before any write)
    # unknown task -> error listing the valid ones; cfg.scoring picks rule variants (scoring.frozenlake)
    tasks = {name: scoring_variant(get_task(name), cfg.scoring) for name in cfg.tasks}
    data = {name: tasks[name].load(tc.path, tc.limit) for name, tc in cfg.tasks.items()}
    for name, items in data.items():
        if not items:
            raise DataError(f"{cfg.tasks[name].path}: no items for task {name} (an empty benchmark file?)")
    client = MLLMClient.from_config(cfg.mllm, role="mllm")
    judge = None
    if cfg.judge is not None:  # judge-graded tasks (CharXiv) may use another model / endpoints
        judge = MLLMClient.from_config(cfg.judge, role="judge")
    for c in (client, judge):  # a wrong model name or an unreachable server stops the run before any edit
        if c is not None:
            asyncio.run(c.check_reachable())
    cache_dir = cfg.edit_cache_dir or run_dir / "edit_cache"
    editor = Editor(cfg.editor, cache_dir)  # a LoRA that does not fit the transformer stops here
    fp = run_fingerprint(cfg, editor.fingerprint_fields(), tasks, getattr(client, "served", None), load_prompt)
    out_dir = namespace_dir(run_dir, cfg.namespace, fp)

    # ---------------------------------------------------------------- claim the run dir (rank 0)
    lock = None
    problem = None
    if runtime.is_main():
        try:
            lock = RunDirLock(out_dir).acquire()  # a second live evaluator stops here, naming the holder
            stored = check_run_dir(out_dir, fp, [r for f in result_files(out_dir) for r in read_rows(f)])
            atomic_write_json(out_dir / FINGERPRINT_FILE, fp if stored is None else merged_fingerprint(stored, fp))
            save_config(cfg, out_dir)
        except (RunDirLocked, FingerprintMismatch) as exc:
            problem = exc
    problems = gather(None if problem is None else f"{type(problem).__name__}: {problem}")
    if problem is not None:
        raise problem
    if problems[0] is not None:  # other ranks stop with rank 0
        raise FingerprintMismatch(problems[0])
    store = ResultStore(out_dir, "results.jsonl" if world == 1 else f"results.rank{rank}.jsonl")
    runtime.barrier()  # every rank has read the finished items before any file is rewritten
    if cfg.retry_failed:
        store.drop_failures()
    settings = LoopSettings(baseline=cfg.baseline, verify_max_tokens=cfg.mllm.verify_max_tokens,
                            reason_max_tokens=cfg.mllm.reason_max_tokens, temperature=cfg.mllm.temperature,
                            image_format=cfg.mllm.image_format, jpeg_quality=cfg.mllm.jpeg_quality,
                            base_seed=cfg.editor.seed, per_item_seed=cfg.editor.per_item_seed,
                            max_inflight=max(16, 4 * cfg.mllm.concurrency), run_dir=str(out_dir),
                            run_hashes={name: row_hash(fp, name) for name in tasks})
    # One progress line over all tasks (items done / total, rate, ETA) above the per-task bars.
    overall = runtime.progress(total=sum(len(items[rank::world]) for items in data.values()), desc="all tasks",
                               unit="item")

    def row_done(row: dict) -> None:
        overall.update(1)
        if on_row is not None:
            on_row(row)

    settings.on_row = row_done
    settings.scoring = cfg.scoring  # verify_rule for the loop's verdict
    runtime.print0(f"evaluating {', '.join(f'{n} ({len(v)} items)' for n, v in data.items())} on {world} "
                   f"rank(s); editor {cfg.editor.pipe_path} [{editor.fingerprint}]; MLLM {cfg.mllm.model} at "
                   f"{', '.join(cfg.mllm.endpoints)}; results in {out_dir}")

    # ---------------------------------------------------------------- loop
    stats = {}

    async def all_tasks():
        try:
            for name, items in data.items():
                shard = items[rank::world]
                stats[name] = await run_task(tasks[name], shard, editor, client, store, settings,
                                             desc=f"{name} [rank {rank}]" if world > 1 else name, judge=judge)
                overall.update(stats[name].skipped)  # finished in an earlier run
        finally:
            overall.close()
            await client.aclose()
            if judge is not None:
                await judge.aclose()

    try:
        asyncio.run(all_tasks())
    finally:
        store.close()

    # ---------------------------------------------------------------- save (rank 0 folds every results file)
    all_stats = gather({n: vars(s) for n, s in stats.items()})
    runtime.barrier()
    summary: dict = {}
    failure = None
    if runtime.is_main():
        order = [f"{name}/{it.id}" for name, items in data.items() for it in items]
        merged = {f"{r['task']}/{r['id']}": r for r in consolidate(out_dir, order)}
        rows_by_task = {}
        for name, items in data.items():
            rows = [merged[f"{name}/{it.id}"] for it in items if f"{name}/{it.id}" in merged]
            rows_by_task[name] = rows
            s = summarize_task(rows, items=len(items), aggregate=tasks[name].aggregate)
            edits = sum(st[name]["edits"] for st in all_stats)
            wall = max(st[name]["wall_s"] for st in all_stats)
            s.update(wall_s=round(wall, 2), edits_made=edits,
                     cache_hits=sum(st[name]["cache_hits"] for st in all_stats),
                     edits_per_s=round(edits / wall, 4) if wall > 0 and edits else None,
                     edit_seconds=round(sum(st[name]["edit_seconds"] for st in all_stats), 2),
                     tail_wait_s=round(max(st[name]["tail_wait_s"] for st in all_stats), 2))
            summary[name] = s
        meta = {"mllm_model": cfg.mllm.model, "pipe_path": cfg.editor.pipe_path, "lora_path": cfg.editor.lora_path,
                "checkpoint_fingerprint": editor.fingerprint, "world_size": world,
                "run_fingerprint": fp, "run_hashes": settings.run_hashes, "namespace": cfg.namespace,
                "prompt_files": sorted({p for t in tasks.values() for p in (t.edit_prefix, t.verify_prompt,
                                                                             t.reason_one, t.reason_two)}),
                "prompt_sha256": prompt_versions(), "git_sha": runtime.git_sha(), "config": to_container(cfg),
                "scoring": to_container(cfg.scoring), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        paths = write_summary(out_dir, summary, meta)
        from etchr_eval.paper import append_results_table

        append_results_table(paths, summary, cfg.mllm.model)  # the paper's 11-column layout (Benchmarks issue)
        if cfg.report_html:
            originals = {f"{n}/{it.id}": it.image for n, items in data.items() for it in items}
            write_html(out_dir, rows_by_task, summary, originals, meta)
        if cfg.wandb:
            log_to_wandb(cfg, out_dir, summary)
        print((out_dir / "summary.md").read_text(), flush=True)
        runtime.print0(f"wrote {paths['md']}, {paths['json']}" + (f", {out_dir / 'report.html'}" if cfg.report_html
                                                                  else ""))
        try:
            check_failures(summary, rows_by_task, cfg.max_failed_fraction)
        except RunFailed as exc:
            failure = str(exc)
    failures = gather(failure)
    runtime.barrier()
    if lock is not None:
        lock.release()
    if failures[0] is not None:
        raise RunFailed(failures[0])
    return summary


def log_to_wandb(cfg, out_dir: Path, summary: dict) -> None:
    """Mirror the per-task numbers to wandb (metrics.jsonl gets the same row)."""
    flat = {f"{task}/{k}": v for task, s in summary.items() for k, v in s.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with runtime.MetricsWriter(out_dir, wandb_enabled=True, wandb_project=cfg.wandb_project,
                               wandb_run_name=f"{cfg.mllm.model} | {Path(cfg.editor.pipe_path).name}",
                               config=to_container(cfg)) as writer:
        writer.log(flat, step=0)


def parse_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """Pull --tasks, --limit, --print-config and --help out of argv; the rest is split_cli's."""
    flags: dict = {"tasks": None, "limit": None, "print_config": False, "help": False}
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, _, inline = arg.partition("=")
        if arg in ("-h", "--help"):
            flags["help"] = True
        elif arg == "--print-config":
            flags["print_config"] = True
        elif name in ("--tasks", "--limit"):
            if not inline:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                inline, i = argv[i + 1], i + 1
            if name == "--tasks":
                flags["tasks"] = [t.strip() for t in inline.split(",") if t.strip()]
            else:
                try:
                    flags["limit"] = int(inline)
                except ValueError:
                    raise ConfigError(f"--limit {inline!r}: give a whole number of items") from None
        else:
            rest.append(arg)
        i += 1
    return flags, rest


def select(cfg, tasks: Optional[list[str]], limit: Optional[int]):
    """Keep only `tasks` of the config (in the YAML's order) and cap each at `limit` items."""
    if tasks:
        unknown = [t for t in tasks if t not in cfg.tasks]
        if unknown:
            raise ConfigError(f"--tasks {','.join(unknown)}: not in this config's tasks ({', '.join(cfg.tasks) or 'none'}); "
                              "add them with tasks.<name>.path=<data file>")
        for name in [n for n in cfg.tasks if n not in tasks]:
            del cfg.tasks[name]
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit {limit}: must be >= 1")
        for name in cfg.tasks:
            cfg.tasks[name].limit = limit
    return cfg


def main(argv=None) -> int:
    try:
        flags, rest = parse_flags(sys.argv[1:] if argv is None else argv)
        if flags["help"]:
            from etchr_eval.config import EvalConfig, config_help
            from etchr_eval.tasks import TASKS

            print(config_help(EvalConfig, __doc__) + "\nregistered tasks: " + ", ".join(sorted(TASKS)))
            return 0
        config_path, overrides = split_cli(rest)
        cfg = select(load_eval_config(config_path, overrides), flags["tasks"], flags["limit"])
        if flags["print_config"]:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(cfg, resolve=True), end="")
            return 0
        run(cfg)
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except START_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
