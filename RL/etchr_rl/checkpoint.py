"""Checkpoints of an RL run (CHECKPOINTS.md section 4): written under a temporary name and renamed
when complete, `latest` pointer, keep-last-K, meta.json beside the weights."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path
from typing import Optional

from .runtime import atomic_write_json, atomic_write_text, git_sha

SCHEMA_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs of interrupted saves are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def meta(*, kind: str, step: Optional[int], base_model: str, config: dict, lora: Optional[dict] = None,
         parents: Optional[list] = None) -> dict:
    return {"schema_version": SCHEMA_VERSION, "tree": "rl", "kind": kind, "step": step, "base_model": base_model,
            "lora": lora, "parents": parents or [], "config": config, "git_sha": git_sha(),
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "etchr_version": "0.1.0"}


def finalize(tmp: Path, final: Path, meta_obj: dict, keep_last: int) -> None:
    """meta.json last (its presence marks a complete checkpoint), rename into place, prune, point latest."""
    atomic_write_json(tmp / "meta.json", meta_obj)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(final.parent / "latest", final.name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(final.parent.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def read_meta(path: str | Path) -> Optional[dict]:
    p = Path(path) / "meta.json"
    return json.loads(p.read_text()) if p.is_file() else None
