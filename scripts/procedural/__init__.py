"""Procedural data generators (numpy/PIL, seeded, nothing downloaded): DATA.md section 4.

Each family module in this folder exposes the same two functions:

    generate(n: int, seed: int) -> list[Record]            # n items per benchmark of the module
    export_eval(records, out_dir) -> dict[task_name, Path]  # writes exactly <out_dir>/<task>.parquet

`Record` (record.py) is the internal record of DATA.md section 4: the eval item AND its ground-truth
edit image. export.py turns records into the training formats (SFT parquet + CSV, GRPO parquet + JSONL).
scripts/build_benchmark.py runs every module named in FAMILIES.

These are tools, not an installed package: scripts/build_benchmark.py (`load_procedural()`) and the
tests import this folder by path as the package `etchr_procedural`, so family modules use relative
imports (`from .record import Record`) and nothing named `procedural` goes on sys.path.
"""

from __future__ import annotations

import importlib
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Module names (files <name>.py here), in build order. maze.py yields the Maze and FrozenLake
# benchmarks, jigsaw.py COCO-Jigsaw, perception.py V* and HRBench 4K/8K, chart.py ChartQA and CharXiv
# DQ/RQ, scene3d.py DL3DV-2k and ViewSpatial. Other families append their module name here.
FAMILIES = ["maze", "jigsaw", "perception", "chart", "scene3d"]


def family_module(name: str):
    """The family module `name`, or None when its file is absent (a family not written yet)."""
    if not (HERE / f"{name}.py").is_file():
        return None
    return importlib.import_module(f"{__name__}.{name}")
