"""results.jsonl: one row per (task, item id), appended atomically, safe against kill -9 at any moment.

- Each row is one `write()` of one complete line on an O_APPEND descriptor, then fsync.
- On open, a torn last line (killed mid-write) is cut off, so the file is again whole lines.
- A rerun first rewrites the file (temp file + rename) without the failure rows it will retry, so
  the file never holds two rows for one item.
- Sharded runs (torchrun) append to results.rank<R>.jsonl; at the end rank 0 folds every file of the
  run dir into results.jsonl (one row per item, in item order) and removes the rank files, whatever
  sequence of world sizes the reruns had (2 ranks killed, then 1 process; 1 then 4).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from .runtime import atomic_write_text


def row_key(row: dict) -> str:
    return f"{row['task']}/{row['id']}"


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Complete rows of a results file; a torn (unterminated or unparsable) last line is ignored."""
    rows = []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return rows
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n >= len(lines) - 2:  # the last line: a write cut short by a crash
                break
            raise ValueError(f"{path}: line {n + 1} is not valid JSON (the file was edited by hand?)") from None
    return rows


def better(a: Optional[dict], b: dict) -> dict:
    """Which of two rows for one item to keep: a success beats a failure, then the newer one."""
    if a is None:
        return b
    a_ok, b_ok = a.get("status") == "ok", b.get("status") == "ok"
    if a_ok != b_ok:
        return a if a_ok else b
    return b if b.get("time", 0) >= a.get("time", 0) else a


def merge_rows(rows: Iterable[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        k = row_key(row)
        out[k] = better(out.get(k), row)
    return out


def result_files(run_dir: str | os.PathLike) -> list[Path]:
    """results.jsonl and the per-rank files of sharded runs: any of them may hold finished items."""
    return sorted(Path(p) for p in glob.glob(str(Path(run_dir) / "results*.jsonl")))


def rank_files(run_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(Path(run_dir) / "results.rank*.jsonl")))


def consolidate(run_dir: str | os.PathLike, order: list[str]) -> list[dict]:
    """Fold results.jsonl and every results.rank*.jsonl into results.jsonl: exactly one row per item
    (a success beats a failure, then the newer row), the items of `order` ("task/id") first in that
    order, then any other items the files hold (kept, never dropped), sorted. The merged file is
    written atomically before the rank files are removed, so a kill at any point loses nothing.
    Returns the rows written."""
    run_dir = Path(run_dir)
    files = [run_dir / "results.jsonl", *rank_files(run_dir)]
    merged = merge_rows(r for f in files for r in read_rows(f))
    rows = [merged.pop(k) for k in order if k in merged]
    rows += [merged[k] for k in sorted(merged)]
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)
    target = run_dir / "results.jsonl"
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        atomic_write_text(target, text)
    for f in files[1:]:
        f.unlink(missing_ok=True)
    return rows


class ResultStore:
    """The results file this process appends to, plus a read-only view of its run's other files."""

    def __init__(self, run_dir: str | os.PathLike, filename: str = "results.jsonl"):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / filename
        self._repair_tail()
        self.rows = merge_rows(r for f in self.all_files() for r in read_rows(f))
        self._fd: Optional[int] = None

    def all_files(self) -> list[Path]:
        return result_files(self.run_dir)

    def _repair_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def finished(self, key: str) -> bool:
        row = self.rows.get(key)
        return row is not None and row.get("status") == "ok"

    def drop_failures(self) -> int:
        """Rewrite this process's file without failure rows (they are about to be retried)."""
        mine = read_rows(self.path)
        keep = [r for r in mine if r.get("status") == "ok"]
        if len(keep) != len(mine):
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
        for k in [k for k, r in self.rows.items() if r.get("status") != "ok"]:
            del self.rows[k]
        return len(mine) - len(keep)

    def append(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        written = os.write(self._fd, line)
        if written != len(line):  # pragma: no cover - regular files write whole buffers
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        os.fsync(self._fd)
        self.rows[row_key(row)] = better(self.rows.get(row_key(row)), row)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
