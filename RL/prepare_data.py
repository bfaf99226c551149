#!/usr/bin/env python
"""ETCHR-GRPO-10K parquet shards (or our procedural GRPO exports) -> image files + the RL JSONL.

    python RL/prepare_data.py --input 'data/ETCHR-GRPO-10K/data/*.parquet' --out data/grpo [--on_error skip]

Input columns (DATA.md section 1.2): source_image list<struct<bytes, path>> (length 1; a bare struct,
a path string or {bytes: null, path} work too), instruction: string, qa_list: list<string>, each a
Python-literal dict ("{'question': ..., 'answer': ...}", parsed with ast.literal_eval; real dicts are
accepted). Optional: a target image column (target_image, output_image or edited_image; or
--target_column), an `id` column, and any other columns (maze_map, start, goal, layout, ...), which are
copied into each JSONL row for the rule-based rewards. Columns holding binary data other than the
images are not copied (listed in the summary).

Output:
    <out>/images/<id>_input.<ext>  (+ <id>_output.<ext> with a target column; original bytes, never re-encoded)
    <out>/grpo.jsonl  {"id", "instruction", "source_image", ["target_image"], "qa_list": [{"question", "answer"}], ...}
The id is the `id` column when present, else the row's index over all shards (sorted by path).

Streams record batches (the dataset is never held in memory), resumes (a shard whose part file exists
is skipped; images already written are kept), writes atomically (temp + rename), shows progress.
Every image is checked by decoding all its pixels through the image rule (etchr_rl.images: 16-bit,
float, alpha, palette, CMYK, EXIF orientation), so a truncated or damaged file is caught here and not
when training reaches it. A missing column, bad image, unparsable qa_list, QA without question/answer,
or an instruction with no known task prefix stops (--on_error fail, the default; "raise" is the same)
with the file and row named, writing no part or final JSONL for it, or, with --on_error skip, is
skipped, counted ("skipped" in the summary) and listed in <out>/skipped.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

if __name__ == "__main__":  # run as a script: this tree's package, also from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import ImageFile  # noqa: E402

from etchr_rl.data import DataError  # noqa: E402
from etchr_rl.images import ImageError, check_encoded  # noqa: E402
from etchr_rl.rewards import RewardConfigError, family_of  # noqa: E402
from etchr_rl.runtime import atomic_write_bytes, atomic_write_text, progress  # noqa: E402

REQUIRED = ["source_image", "instruction", "qa_list"]
TARGET_COLUMNS = ("target_image", "output_image", "edited_image")
EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


# ----------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------
def image_bytes(cell: Any, where: str, base_dir: Path) -> bytes:
    """Encoded bytes of an image cell: list<struct<bytes,path>> (first item), a bare struct, or a path
    (absolute or relative to the parquet's folder) when the struct carries no bytes."""
    value = cell
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise DataError(f"{where}: empty image list")
        value = value[0]
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        if path.is_file():
            return path.read_bytes()
        raise DataError(f"{where}: no image bytes and the path {value!r} does not exist")
    raise DataError(f"{where}: no image in the cell (expected list<struct<bytes, path>>)")


def check_image(data: bytes, where: str) -> str:
    """The file extension of encoded image bytes; every pixel is decoded (etchr_rl.images.check_encoded),
    so damaged, truncated or unconvertible bytes raise DataError."""
    try:
        fmt, _, _ = check_encoded(data, where)
    except ImageError as exc:
        raise DataError(str(exc)) from None
    return EXT.get(fmt, ".png")


def parse_qa_list(cell: Any, where: str) -> list[dict]:
    """qa_list cell -> [{"question": str, "answer": str}, ...].

    Elements are strings holding Python dict literals (single quotes: json.loads fails on them), or
    dicts; a whole-list literal string is accepted too.
    """
    if isinstance(cell, str):
        cell = _literal(cell, where + " qa_list")
        if isinstance(cell, dict):
            cell = [cell]
    if not isinstance(cell, (list, tuple)) or len(cell) == 0:
        raise DataError(f"{where}: qa_list must be a non-empty list, got {str(cell)[:80]!r}")
    out = []
    for k, item in enumerate(cell):
        here = f"{where} qa_list[{k}]"
        qa = _literal(item, here) if isinstance(item, str) else item
        if not isinstance(qa, dict):
            raise DataError(f"{here}: expected a dict with question and answer, got {type(qa).__name__}")
        missing = [key for key in ("question", "answer") if qa.get(key) is None]
        if missing:
            raise DataError(f"{here}: missing {' and '.join(missing)} (keys: {sorted(qa)})")
        out.append({"question": str(qa["question"]), "answer": str(qa["answer"])})
    return out


def _literal(text: str, where: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:  # JSON spells true/false/null, which literal_eval rejects
        return json.loads(text)
    except json.JSONDecodeError:
        raise DataError(f"{where}: not a Python or JSON literal: {text[:80]!r}") from None


def _has_binary(arrow_type) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) or \
            pa.types.is_fixed_size_binary(arrow_type):
        return True
    if pa.types.is_struct(arrow_type):
        return any(_has_binary(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type):
        return _has_binary(arrow_type.value_type)
    if pa.types.is_map(arrow_type):
        return _has_binary(arrow_type.key_type) or _has_binary(arrow_type.item_type)
    return False


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def plan_columns(shard: str, names: list[str], schema, target_column: Optional[str]) -> dict:
    """Which columns are read and what they mean; a missing required column names the shard."""
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise DataError(f"{shard}: missing column(s) {', '.join(missing)}; found {', '.join(names)} "
                        "(expected the ETCHR-GRPO-10K schema: source_image, instruction, qa_list)")
    if target_column is not None and target_column not in names:
        raise DataError(f"{shard}: --target_column {target_column!r} not found; found {', '.join(names)}")
    target = target_column or next((c for c in TARGET_COLUMNS if c in names), None)
    used = set(REQUIRED) | {"id"} | ({target} if target else set())
    extras = [c for c in names if c not in used and not _has_binary(schema.field(c).type)]
    ignored = [c for c in names if c not in used and c not in extras]
    return {"target": target, "extras": extras, "ignored": ignored, "has_id": "id" in names}


def row_id(rec: dict, index: int, has_id: bool, where: str) -> Any:
    """The row's id: the `id` column (must be filename-safe) or the global row index."""
    if not has_id:
        return index
    value = rec.get("id")
    if value is None or not SAFE_ID.match(str(value)):
        raise DataError(f"{where}: id {value!r} is empty or not filename-safe (letters, digits, '.', '_', '-')")
    return value


def write_if_new(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        return  # written by an earlier, interrupted run
    atomic_write_bytes(path, data)


def process_shard(shard: str, first_index: int, out: Path, on_error: str, target_column: Optional[str],
                  bar, skipped: list, ignored: set) -> list[str]:
    """One parquet file -> JSONL lines (images written on the way)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard)
    schema = pf.schema_arrow
    plan = plan_columns(shard, schema.names, schema, target_column)
    ignored.update(plan["ignored"])
    columns = REQUIRED + ([plan["target"]] if plan["target"] else []) + (["id"] if plan["has_id"] else []) \
        + plan["extras"]
    base_dir = Path(shard).resolve().parent
    lines, row = [], 0
    for batch in pf.iter_batches(batch_size=64, columns=columns):
        for rec in batch.to_pylist():
            where = f"{shard} row {row}"
            try:
                rid = row_id(rec, first_index + row, plan["has_id"], where)
                instruction = rec["instruction"]
                if not isinstance(instruction, str) or not instruction.strip():
                    raise DataError(f"{where}: empty or missing instruction")
                try:
                    family_of(instruction)
                except RewardConfigError as exc:
                    raise DataError(f"{where}: {exc}") from None
                qa_list = parse_qa_list(rec["qa_list"], where)
                src = image_bytes(rec["source_image"], where + " source_image", base_dir)
                src_ext = check_image(src, where + " source_image")
                tgt = tgt_ext = None
                if plan["target"] and rec.get(plan["target"]) is not None:
                    tgt = image_bytes(rec[plan["target"]], f"{where} {plan['target']}", base_dir)
                    tgt_ext = check_image(tgt, f"{where} {plan['target']}")
            except DataError as exc:
                if on_error != "skip":
                    raise
                skipped.append({"file": shard, "row": row, "error": str(exc)})
                row += 1
                bar.update(1)
                continue
            entry: dict[str, Any] = {"id": rid, "instruction": instruction,
                                     "source_image": f"images/{rid}_input{src_ext}"}
            write_if_new(out / entry["source_image"], src)
            if tgt is not None:
                entry["target_image"] = f"images/{rid}_output{tgt_ext}"
                write_if_new(out / entry["target_image"], tgt)
            entry["qa_list"] = qa_list
            for c in plan["extras"]:
                entry[c] = rec[c]
            lines.append(json.dumps(entry, ensure_ascii=False, default=str))
            row += 1
            bar.update(1)
    return lines


def prepare(inputs: list[str], out: str, on_error: str = "fail", target_column: Optional[str] = None) -> dict:
    """All shards -> <out>/grpo.jsonl + images; returns a summary dict (also printed as JSON)."""
    import pyarrow.parquet as pq

    if on_error not in ("fail", "raise", "skip"):
        raise ValueError(f"on_error {on_error!r}: use fail (= raise) or skip")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # PIL's default, stated: truncated files must fail the decode

    shards = sorted({p for pattern in inputs for p in (glob.glob(pattern) or [pattern])})
    if not shards:
        raise DataError("no input files given")
    for s in shards:
        if not os.path.isfile(s):
            raise DataError(f"input not found: {s}")
    stems = [Path(s).stem for s in shards]
    if len(set(stems)) != len(stems):
        raise DataError(f"input files share a name ({', '.join(sorted(stems))}); their part files would collide: "
                        "prepare them into separate --out folders")
    out_dir = Path(out)
    parts = out_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    counts = {s: pq.ParquetFile(s).metadata.num_rows for s in shards}
    firsts, acc = {}, 0
    for s in shards:  # global row index = the id when the data has no id column
        firsts[s], acc = acc, acc + counts[s]
    todo = [s for s in shards if not (parts / f"{Path(s).stem}.jsonl").is_file()]
    bar = progress(total=acc, desc="prepare", unit="row", initial=sum(counts[s] for s in shards if s not in todo))
    ignored: set = set()
    for s in shards:  # finished files too, so that a resumed run reports the same summary
        if s not in todo:
            schema = pq.ParquetFile(s).schema_arrow
            ignored.update(plan_columns(s, schema.names, schema, target_column)["ignored"])
    try:
        for s in todo:
            skipped_here: list = []
            lines = process_shard(s, firsts[s], out_dir, on_error, target_column, bar, skipped_here, ignored)
            stem = Path(s).stem
            atomic_write_text(parts / f"{stem}.skipped.jsonl", "".join(json.dumps(x) + "\n" for x in skipped_here))
            atomic_write_text(parts / f"{stem}.jsonl", "".join(line + "\n" for line in lines))  # last: complete
    finally:
        bar.close()
    # The final JSONL: every part, in shard order; ids must be unique across shards.
    lines, seen, skipped = [], {}, []
    for s in shards:
        stem = Path(s).stem
        skipped_file = parts / f"{stem}.skipped.jsonl"
        if skipped_file.is_file():
            skipped += [json.loads(x) for x in skipped_file.read_text(encoding="utf-8").splitlines() if x.strip()]
        for line in (parts / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rid = str(json.loads(line)["id"])
            if rid in seen:
                raise DataError(f"{s}: id {rid!r} also appears in {seen[rid]}; ids must be unique across inputs")
            seen[rid] = s
            lines.append(line)
    jsonl = out_dir / "grpo.jsonl"
    atomic_write_text(jsonl, "".join(line + "\n" for line in lines))
    if skipped:
        atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps(x) + "\n" for x in skipped))
    elif (out_dir / "skipped.jsonl").is_file():
        (out_dir / "skipped.jsonl").unlink()  # from an earlier run over other inputs: it would misreport this one
    summary = {"files": len(shards), "rows": len(lines), "skipped": len(skipped), "jsonl": str(jsonl),
               "skipped_rows": [{"file": x["file"], "row": x["row"]} for x in skipped],
               "ignored_columns": sorted(ignored)}
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="parquet file paths or globs")
    ap.add_argument("--out", required=True, help="output folder (images/, grpo.jsonl)")
    ap.add_argument("--on_error", choices=["fail", "raise", "skip"], default="fail",
                    help="bad row (damaged / truncated / unconvertible image, qa_list, instruction): stop naming "
                         "file and row (fail or raise, the default) or skip, count and list it")
    ap.add_argument("--target_column", default=None,
                    help=f"target image column (default: the first of {', '.join(TARGET_COLUMNS)} present)")
    a = ap.parse_args(argv)
    try:
        prepare(a.input, a.out, a.on_error, a.target_column)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
