#!/usr/bin/env python
"""Build the embedded benchmark: every procedural family's eval files plus the training exports.

    python scripts/build_benchmark.py --out benchmarks/embedded [--n 200] [--seed 0] [--families maze jigsaw]
    python Evaluation/evaluate.py --config configs/eval/embedded_benchmark.yaml

For each module named in scripts/procedural/__init__.py FAMILIES (a family whose file is absent is
skipped with a message), it runs generate(n, seed) and export_eval, which writes <out>/<task>.parquet
in that benchmark's schema. Then, over all records:

    <out>/train/sft.parquet, sft.csv        ETCHR-SFT-400K schema + DiffSynth CSV
    <out>/train/grpo.parquet, grpo.jsonl    ETCHR-GRPO-10K schema + RL JSONL
    <out>/train/images/<family>/<id>_input.png, <id>_output.png
    <out>/manifest.json                     task -> file and item count, training files, seed, n

Nothing is downloaded. Every file is written atomically; the same arguments give the same files, and a
rerun rewrites only what changed (stale image files of a bigger earlier build are removed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "etchr_procedural"


def load_procedural():
    """scripts/procedural as the package `etchr_procedural` (imported by path; idempotent)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    folder = HERE / "procedural"
    spec = importlib.util.spec_from_file_location(PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def _prune_images(train_dir: Path, keep: set[str]) -> int:
    """Remove *_input.png / *_output.png under train/images that no current record references."""
    removed = 0
    for path in sorted((train_dir / "images").glob("*/*_*put.png")):
        rel = path.relative_to(train_dir).as_posix()
        if rel not in keep and (rel.endswith("_input.png") or rel.endswith("_output.png")):
            path.unlink()
            removed += 1
    return removed


def build(out: str | Path, n: int = 200, seed: int = 0, families: list[str] | None = None,
          progress: bool = True) -> dict:
    """Build the benchmark into `out`; returns the manifest (also written to <out>/manifest.json)."""
    import pyarrow.parquet as pq

    if n < 1:
        raise ValueError(f"--n {n}: need at least 1 item per family")
    pkg = load_procedural()
    export = importlib.import_module(f"{PACKAGE}.export")
    names = list(families) if families else list(pkg.FAMILIES)
    unknown = [f for f in names if f not in pkg.FAMILIES]
    if unknown:
        raise ValueError(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                         f"known: {', '.join(pkg.FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"seed": seed, "n_per_benchmark": n, "families": {}, "tasks": {}, "train": {}}
    records = []
    for i, name in enumerate(names, start=1):
        module = pkg.family_module(name)
        if module is None:
            print(f"[{i}/{len(names)}] {name}: skipped, scripts/procedural/{name}.py does not exist", flush=True)
            manifest["families"][name] = {"status": "skipped (module absent)"}
            continue
        t0 = time.time()
        print(f"[{i}/{len(names)}] {name}: generating {n} item(s) per benchmark ...", flush=True)
        recs = module.generate(n, seed)
        paths = module.export_eval(recs, out)
        for task, path in sorted(paths.items()):
            path = Path(path)
            if path.resolve() != (out / f"{task}.parquet").resolve():
                raise RuntimeError(f"family {name}: task {task} was written to {path}, "
                                   f"expected {out / f'{task}.parquet'}")
            manifest["tasks"][task] = {"file": path.name, "items": pq.read_metadata(path).num_rows, "family": name}
        manifest["families"][name] = {"status": "built", "records": len(recs), "tasks": sorted(paths)}
        print(f"      {len(recs)} records, {', '.join(f'{t}.parquet' for t in sorted(paths))} "
              f"in {time.time() - t0:.1f} s", flush=True)
        records.extend(recs)
    if records:
        t0 = time.time()
        train = out / "train"
        print(f"training exports: {len(records)} records -> {train}/ ...", flush=True)
        export.export_sft(records, train, progress=progress)
        export.export_grpo(records, train, write_images=False)  # same image files as the SFT export
        removed = _prune_images(train, {p for r in records for p in export.image_paths(r)})
        by_family = dict(sorted(Counter(r.family for r in records).items()))
        manifest["train"] = {"records": len(records), "by_family": by_family,
                             "sft_parquet": "train/sft.parquet", "sft_csv": "train/sft.csv",
                             "grpo_parquet": "train/grpo.parquet", "grpo_jsonl": "train/grpo.jsonl",
                             "images": "train/images"}
        stale = f" ({removed} stale image files removed)" if removed else ""
        print(f"      done in {time.time() - t0:.1f} s{stale}", flush=True)
    export.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--n", type=int, default=200, help="items per benchmark (the paper's sets have about 200)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", nargs="+", default=None,
                    help="family modules to build (default: all of scripts/procedural FAMILIES)")
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        manifest = build(a.out, a.n, a.seed, a.families)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tasks = ", ".join(f"{t} ({v['items']})" for t, v in manifest["tasks"].items()) or "none"
    print(f"wrote {Path(a.out) / 'manifest.json'}: tasks {tasks}; {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
