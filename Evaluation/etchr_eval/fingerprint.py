"""Run fingerprints: what produced a results file, so that no table mixes two runs.

A fingerprint lists every setting that changes a row of results.jsonl: the MLLM (the configured name
and the names the endpoints report), its sampling parameters, the prompts (file names and text
hashes), the editor (checkpoint fingerprint and every setting that changes an edit: steps, guidance,
size rule, seed rule, dtype, device type, speed switches) and the scoring rules. It has a part shared
by all tasks and one part per task (prompts and scoring differ per task), so adding a task to a run
dir is not a change of run. Every row carries the hash of its (shared + task) part; the full
fingerprint is kept in `<run dir>/run.json`.

Settings that cannot change a row (concurrency, endpoints' URLs, timeouts, limits, report options)
are not part of it: a rerun may change them freely.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

FINGERPRINT_FILE = "run.json"
SCHEMA = 1


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_fingerprint(cfg, editor_fields: dict, tasks: dict, served: Optional[dict] = None,
                    prompt_text=None) -> dict[str, Any]:
    """The fingerprint of a run. `editor_fields` is Editor.fingerprint_fields(); `tasks` maps task
    names to Task objects; `served` maps each endpoint to its /v1/models entries (see served_as);
    `prompt_text(name) -> str` reads a prompt file (etchr_eval.prompts.load_prompt)."""
    m = cfg.mllm
    shared: dict[str, Any] = {
        "mllm.model": m.model,
        "mllm.served_as": served_as(m.model, served),
        "mllm.temperature": m.temperature,
        "mllm.verify_max_tokens": m.verify_max_tokens,
        "mllm.reason_max_tokens": m.reason_max_tokens,
        "mllm.image_format": m.image_format,
        "baseline": cfg.baseline,
    }
    if m.image_format == "jpeg":
        shared["mllm.jpeg_quality"] = m.jpeg_quality
    shared.update({f"editor.{k}": v for k, v in editor_fields.items()})
    scoring = getattr(cfg, "scoring", None)
    if scoring is not None:
        from omegaconf import OmegaConf

        shared.update({f"scoring.{k}": v for k, v in OmegaConf.to_container(scoring, resolve=True).items()})
    per_task: dict[str, dict[str, Any]] = {}
    for name, task in tasks.items():
        prompts = {"edit_prefix": task.edit_prefix, "verify": task.verify_prompt, "reason_one": task.reason_one,
                   "reason_two": task.reason_two}
        part = {f"prompt.{role}": f"{stem} sha256:{_sha(prompt_text(stem))}" if prompt_text else stem
                for role, stem in prompts.items()}
        if task.judge_request is not None:  # judge-graded: the judge model decides the score
            j = cfg.judge if cfg.judge is not None else cfg.mllm
            part["judge.model"] = j.model
        per_task[name] = part
    return {"schema": SCHEMA, "shared": shared, "tasks": per_task}


def served_as(model: str, served: Optional[dict]) -> list[str]:
    """What the endpoints say they serve under `model`: vLLM's /v1/models lists each served name
    (`id`) with the checkpoint behind it (`root`), so two runs with the same served name but another
    checkpoint behind it differ here. `served` maps endpoint -> the /v1/models `data` entries."""
    out = set()
    for entries in (served or {}).values():
        for e in entries:
            e = e if isinstance(e, dict) else {"id": str(e)}
            if e.get("id") == model:
                root = e.get("root")
                out.add(f"{model} ({root})" if root and root != model else model)
    return sorted(out)


def row_hash(fp: dict, task: str) -> str:
    """The hash every row of `task` carries (its `run` field)."""
    return _sha(json.dumps({"shared": fp["shared"], "task": fp["tasks"].get(task, {})}, sort_keys=True, default=str))


def differences(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every field that differs; tasks present in only one side are not a
    difference (a run dir may gain or lose tasks)."""
    out = []
    o, n = old.get("shared", {}), new.get("shared", {})
    for key in sorted(set(o) | set(n)):
        if o.get(key) != n.get(key):
            out.append(f"{key}: {o.get(key, '(absent)')!r} -> {n.get(key, '(absent)')!r}")
    for task in sorted(set(old.get("tasks", {})) & set(new.get("tasks", {}))):
        ot, nt = old["tasks"][task], new["tasks"][task]
        for key in sorted(set(ot) | set(nt)):
            if ot.get(key) != nt.get(key):
                out.append(f"{task}.{key}: {ot.get(key, '(absent)')!r} -> {nt.get(key, '(absent)')!r}")
    return out


def merged(old: dict, new: dict) -> dict:
    """The fingerprint to store after a matching rerun: the union of the tasks of both."""
    return {"schema": SCHEMA, "shared": new["shared"], "tasks": {**old.get("tasks", {}), **new["tasks"]}}


def namespace_dir(run_dir: str | Path, namespace: Optional[str], fp: dict) -> Path:
    """Where this run's results go: the run dir itself, or `<run dir>/ns/<name>`; "auto" names the
    namespace after the fingerprint, so each distinct run gets its own."""
    run_dir = Path(run_dir)
    if not namespace:
        return run_dir
    if namespace == "auto":
        name = _sha(json.dumps(fp, sort_keys=True, default=str))[:12]
    else:
        name = namespace
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"namespace={namespace!r}: use a plain folder name or 'auto'")
    return run_dir / "ns" / name


class FingerprintMismatch(ValueError):
    """A rerun whose settings differ from the ones that produced the results already in the run dir."""


def check_run_dir(out_dir: Path, fp: dict, rows: list[dict]) -> Optional[dict]:
    """Compare `fp` with what produced `out_dir`'s results; raise FingerprintMismatch naming the
    differing fields. Returns the stored fingerprint (None for a fresh dir)."""
    stored_path = out_dir / FINGERPRINT_FILE
    stored = None
    if stored_path.is_file():
        try:
            stored = json.loads(stored_path.read_text())
        except json.JSONDecodeError as exc:
            raise FingerprintMismatch(f"{stored_path}: not valid JSON ({exc}); it records what produced the "
                                      "results here: restore it or use a new run_dir") from None
        diffs = differences(stored, fp)
        if diffs:
            raise FingerprintMismatch(_message(out_dir, diffs))
    # Rows written by another run (run.json lost, or results copied in) must not be mixed either.
    foreign = [r for r in rows if r.get("task") in fp["tasks"] and r.get("run") != row_hash(fp, r["task"])]
    if foreign:
        if stored is None or any("run" not in r for r in foreign):
            raise FingerprintMismatch(
                f"{out_dir}: {len(foreign)} row(s) of results were produced by another run (first: "
                f"{foreign[0].get('task')}/{foreign[0].get('id')}, run {foreign[0].get('run', 'unrecorded')}) and "
                f"{FINGERPRINT_FILE} does not describe them; use a new run_dir or namespace=auto")
        raise FingerprintMismatch(f"{out_dir}: {len(foreign)} row(s) carry another run's fingerprint "
                                  f"(first: {foreign[0]['task']}/{foreign[0]['id']}); use a new run_dir or namespace=auto")
    return stored


def _message(out_dir: Path, diffs: list[str]) -> str:
    shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
    return (f"{out_dir} holds results of another run; differing settings:\n  " + "\n  ".join(shown) +
            "\nrerun with the original settings, pick another run_dir, or pass namespace=auto (or namespace=NAME) to "
            "write this run beside the first one (its edits are still shared through the edit cache)")
