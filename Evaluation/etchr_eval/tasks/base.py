"""What a benchmark task is, and the registry evaluate.py looks tasks up in.

A task turns a data file in its public schema into items, says how to prompt the editor and the MLLM
for an item, extracts the answer from a response and scores it. The Edit-Verify-Reason loop
(etchr_eval.loop) is the same for every task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from PIL import Image


class DataError(ValueError):
    """A data file that cannot be read as the task's schema; the message names file, row and column."""


class ItemError(ValueError):
    """One item that cannot be evaluated (e.g. undecodable image); becomes a failure record."""


@dataclass
class Item:
    id: str  # unique within the task; results are keyed by (task, id)
    question: str  # the question text exactly as the MLLM and the editor see it
    answer: Any  # ground truth, in the task's own format
    image_cell: Any = None  # raw image cell (see decode_image); decoded lazily, per item
    meta: dict = field(default_factory=dict)  # anything the scorer needs (options, category, ...)
    source: str = ""  # "file:row" for error messages

    def image(self) -> Image.Image:
        return decode_image(self.image_cell, where=self.source)


@dataclass(frozen=True)
class Task:
    name: str
    family: str  # 3d | box | maze | jigsaw: picks the edit prefix family (DATA.md routing)
    edit_prefix: str  # prompt file name, e.g. "edit_prefix_3d_v1"
    verify_prompt: str  # prompt file name, e.g. "verify_dl3dv_v1"
    load: Callable[[str, Optional[int]], list]  # (path, limit) -> list[Item]
    extract: Callable[[Optional[str]], Optional[str]]  # response -> prediction (None = unextractable)
    score: Callable[[Optional[str], Item], dict]  # (prediction, item) -> {"score": float in [0,1], ...}
    aggregate: Optional[Callable[[list], dict]] = None  # scored rows -> extra summary numbers
    reason_one: str = "reason_one_image_v1"
    reason_two: str = "reason_two_images_v1"
    description: str = ""
    # Judge-graded tasks (CharXiv): judge_request(pred, response, item) -> the judge's text prompt, or
    # None when there is nothing to judge (scored by `score` then); judge_score(judge reply, item) ->
    # {"score": ...}. The judge is cfg.judge's endpoint/model, else the evaluated MLLM.
    judge_request: Optional[Callable[[Optional[str], str, Item], Optional[str]]] = None
    judge_score: Optional[Callable[[str, Item], dict]] = None
    judge_max_tokens: int = 1024


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} registered twice")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS)) or '(none)'}")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------
# Image cells (DATA.md section 6): list<struct<bytes,path>>, a bare struct, bytes, or a path string.
# ----------------------------------------------------------------------------------------------
def decode_image(cell: Any, where: str = "", base_dir: str | None = None) -> Image.Image:
    """An image cell -> 8-bit RGB by the image rule (etchr_eval.images: 16-bit, float, alpha on white,
    palette, CMYK, EXIF orientation; every pixel decoded, so truncated files fail); every task's items
    come through here. Any failure is an ItemError (a failure record for that item)."""
    import os

    import numpy as np

    from ..images import ImageError, open_rgb8

    value = cell
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            raise ItemError(f"{where}: empty image list")
        value = value[0]
    try:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is not None:
                return open_rgb8(bytes(data), where)
            value = path
        if isinstance(value, (bytes, bytearray)):
            return open_rgb8(value, where)
        if isinstance(value, str) and value:
            path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
            return open_rgb8(path, where)
    except ImageError as exc:
        raise ItemError(str(exc)) from None
    raise ItemError(f"{where}: no image bytes or path in cell of type {type(cell).__name__}")


def table_rows(df, path: str, limit: Optional[int] = None):
    """(row number, row, "file row N" for error messages) for the first `limit` rows (all if None)."""
    import os

    name = os.path.basename(path)
    for row in range(len(df) if limit is None else min(limit, len(df))):
        yield row, df.iloc[row], f"{name} row {row}"


def read_table(path: str, required: list[str]):
    """Read a parquet / jsonl / json / csv table; a missing file or column raises DataError naming it."""
    import os

    import pandas as pd

    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        if path.endswith(".parquet"):
            df = pd.read_parquet(path)
        elif path.endswith(".jsonl"):
            df = pd.read_json(path, lines=True)
        elif path.endswith(".json"):
            df = pd.read_json(path)
        elif path.endswith(".csv"):
            df = pd.read_csv(path)
        else:
            raise DataError(f"{path}: unsupported file type (use .parquet, .jsonl, .json or .csv)")
    except DataError:
        raise
    except Exception as exc:  # pyarrow / json errors: say which file
        raise DataError(f"{path}: could not be read ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")
    return df
