#!/usr/bin/env python
"""ETCHR-SFT-400K parquet shards (or our procedural SFT exports) -> image files + the training CSV.

    python SFT/prepare_data.py --input 'data/ETCHR-SFT-400K/data/*.parquet' --out data/sft [--on_error skip]

Rows are (prompt, edit_image = INPUT, image = TARGET), image cells list<struct<bytes, path>>
(DATA.md section 1.1). Writes out/images/<shard>/<row>_input.<ext> and _output.<ext> (original
bytes, never re-encoded) and out/sft_data.csv with columns image (target), edit_image (input),
prompt, width, height, edit_width, edit_height (DiffSynth reads the first three; the sizes spare the
trainer opening 400K images; they are the sizes after EXIF orientation, as training decodes them).

Streams record batches (the dataset is never held in memory), resumes (a shard whose part CSV exists
is skipped; image files already written are kept), writes atomically (temp + rename), shows progress.
Every image is checked by decoding all its pixels through the image rule (etchr_sft.images: 16-bit,
float, alpha, palette, CMYK, EXIF orientation), so a truncated or damaged file is caught here and not
at its first training batch. A missing column, empty prompt or bad image stops (--on_error fail, the
default; "raise" is the same) with the shard and row named, writing no part or final CSV for it, or,
with --on_error skip, is skipped, counted ("skipped" in the summary) and listed in out/skipped.jsonl.
(The reference's prepare_data.py reads a `source_image` column this dataset does not have.)
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import ImageFile  # noqa: E402

from etchr_sft.data import DataError  # noqa: E402
from etchr_sft.images import ImageError, check_encoded  # noqa: E402
from etchr_sft.runtime import atomic_write_bytes, atomic_write_text, progress  # noqa: E402

COLUMNS = ["prompt", "edit_image", "image"]
CSV_FIELDS = ["image", "edit_image", "prompt", "width", "height", "edit_width", "edit_height"]
EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def cell_bytes(cell, where: str) -> bytes:
    """The first image of a list<struct<bytes,path>> cell (a bare struct is accepted too)."""
    value = cell
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (dict, bytes, str))):
        if len(value) == 0:
            raise DataError(f"{where}: empty image list")
        value = value[0]
    if isinstance(value, dict) and value.get("bytes") is not None:
        return value["bytes"]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise DataError(f"{where}: no image bytes in the cell")


def check_image(data: bytes, where: str) -> tuple[str, int, int]:
    """(extension, width, height as training decodes it) of encoded image bytes; every pixel is decoded
    (etchr_sft.images.check_encoded), so damaged, truncated or unconvertible bytes raise DataError."""
    try:
        fmt, width, height = check_encoded(data, where)
    except ImageError as exc:
        raise DataError(str(exc)) from None
    return EXT.get(fmt, ".png"), width, height


def write_if_new(path: Path, data: bytes) -> None:
    if path.is_file() and path.stat().st_size == len(data):
        return  # written by an earlier, interrupted run
    atomic_write_bytes(path, data)


def process_shard(shard: str, out: Path, on_error: str, bar, skipped: list) -> list[dict]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(shard)
    names = pf.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataError(f"{shard}: missing column(s) {', '.join(missing)}; found {', '.join(names)} "
                        "(expected the ETCHR-SFT-400K schema: prompt, edit_image, image)")
    stem = Path(shard).stem
    rows, row = [], 0
    for batch in pf.iter_batches(batch_size=64, columns=COLUMNS):
        for rec in batch.to_pylist():
            where = f"{shard} row {row}"
            try:
                prompt = rec["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError(f"{where}: empty or missing prompt")
                src, tgt = cell_bytes(rec["edit_image"], where + " edit_image"), cell_bytes(rec["image"], where + " image")
                src_ext, sw, sh = check_image(src, where + " edit_image")
                tgt_ext, tw, th = check_image(tgt, where + " image")
            except DataError as exc:
                if on_error != "skip":
                    raise
                skipped.append({"shard": shard, "row": row, "error": str(exc)})
                row += 1
                bar.update(1)
                continue
            rel_in = f"images/{stem}/{row:07d}_input{src_ext}"
            rel_out = f"images/{stem}/{row:07d}_output{tgt_ext}"
            write_if_new(out / rel_in, src)
            write_if_new(out / rel_out, tgt)
            rows.append({"image": rel_out, "edit_image": rel_in, "prompt": prompt, "width": tw, "height": th,
                         "edit_width": sw, "edit_height": sh})
            row += 1
            bar.update(1)
    return rows


def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def prepare(inputs: list[str], out: str, on_error: str = "fail") -> dict:
    import pyarrow.parquet as pq

    if on_error not in ("fail", "raise", "skip"):
        raise ValueError(f"on_error {on_error!r}: use fail (= raise) or skip")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # PIL's default, stated: truncated files must fail the decode

    shards = sorted({p for pattern in inputs for p in (glob.glob(pattern) or [pattern])})
    for s in shards:
        if not os.path.isfile(s):
            raise DataError(f"input not found: {s}")
    out = Path(out)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    total = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
    done_rows = 0
    todo = []
    for s in shards:
        part = parts / f"{Path(s).stem}.csv"
        if part.is_file():
            done_rows += pq.ParquetFile(s).metadata.num_rows
        else:
            todo.append(s)
    bar = progress(total=total, desc="prepare", unit="row", initial=done_rows)
    for s in todo:
        skipped_here: list = []
        rows = process_shard(s, out, on_error, bar, skipped_here)
        atomic_write_text(parts / f"{Path(s).stem}.skipped.jsonl", "".join(json.dumps(x) + "\n" for x in skipped_here))
        atomic_write_text(parts / f"{Path(s).stem}.csv", csv_text(rows))  # written last: the shard is complete
    bar.close()
    skipped = [json.loads(line) for s in shards for line in
               (parts / f"{Path(s).stem}.skipped.jsonl").read_text().splitlines() if line.strip()]
    # The final CSV: every part, in shard order.
    import pandas as pd

    frames = [pd.read_csv(parts / f"{Path(s).stem}.csv", keep_default_na=False) for s in shards]
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CSV_FIELDS)
    atomic_write_text(out / "sft_data.csv", csv_text(merged.to_dict("records")))
    if skipped:
        atomic_write_text(out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    elif (out / "skipped.jsonl").is_file():
        (out / "skipped.jsonl").unlink()  # from an earlier run over other inputs: it would misreport this one
    summary = {"shards": len(shards), "rows": len(merged), "skipped": len(skipped), "csv": str(out / "sft_data.csv"),
               "skipped_rows": [{"shard": x["shard"], "row": x["row"]} for x in skipped]}
    print(json.dumps(summary))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="parquet shard paths or globs")
    ap.add_argument("--out", required=True, help="output folder (images/, sft_data.csv)")
    ap.add_argument("--on_error", choices=["fail", "raise", "skip"], default="fail",
                    help="bad image (damaged, truncated, unconvertible) / empty prompt: stop naming shard and row "
                         "(fail or raise, the default) or skip, count and list it")
    a = ap.parse_args(argv)
    try:
        prepare(a.input, a.out, a.on_error)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
