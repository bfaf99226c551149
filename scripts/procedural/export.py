"""Exporters from Records to the public file formats (DATA.md sections 1.1, 1.2 and 4).

Training sets, written by `export_sft` / `export_grpo` into one folder that shares `images/`:

    sft.parquet    prompt: string, edit_image: list<Image> (input), image: list<Image> (target)
                   = the ETCHR-SFT-400K schema (BeichenZhang/ETCHR-SFT-400K viewer)
    sft.csv        image,edit_image,prompt  (DiffSynth metadata; paths relative to the CSV's folder)
    grpo.parquet   source_image: list<Image>, instruction: string, qa_list: list<string>, each string
                   repr({'question': q, 'answer': a}) = the ETCHR-GRPO-10K schema
    grpo.jsonl     {"id", "instruction", "source_image", "target_image", "qa_list": [{question, answer}]}
                   (+ maze_map, start, goal, size, cell_px / layout when the record has them)
    images/<family>/<id>_input.png, <id>_output.png   (the RL code derives *_output from *_input)

`Image` is the Hugging Face image feature, stored as struct<bytes: binary, path: string>; the
`huggingface` schema metadata makes `datasets` decode these cells to PIL images (pandas ignores it).
Eval files of each benchmark go through `write_table`. Every file is written to a temporary name in
its folder, then renamed, so no half-written file is ever left behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))

# Column kind -> (arrow type, HF feature dict). "Sequence" (not datasets>=4's "List") so that both
# datasets 3.x and newer read it.
_VALUE = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}
KINDS: dict[str, tuple[pa.DataType, dict]] = {
    **{k: (t, {"dtype": k, "_type": "Value"}) for k, t in _VALUE.items()},
    **{f"{k}_list": (pa.list_(t), {"feature": {"dtype": k, "_type": "Value"}, "_type": "Sequence"})
       for k, t in _VALUE.items()},
    "image": (IMAGE_TYPE, {"feature": {"_type": "Image"}, "_type": "Sequence"}),
}


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_if_changed(path: Path, data: bytes) -> bool:
    """Atomic write, skipped when the file already holds exactly `data` (reruns touch nothing)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


# ----------------------------------------------------------------------------------------------
# Parquet with HF features
# ----------------------------------------------------------------------------------------------
def image_cell(data: bytes, path: str) -> list[dict]:
    """One HF `list<Image>` cell holding a single image."""
    return [{"bytes": data, "path": path}]


def write_table(path: str | os.PathLike, rows: Sequence[dict[str, Any]], kinds: dict[str, str]) -> Path:
    """Write `rows` as parquet with the column order and kinds of `kinds` (see KINDS); atomic.

    Rows missing a column or holding one not in `kinds` raise ValueError naming the row and column.
    """
    path = Path(path)
    unknown = sorted(set(kinds.values()) - set(KINDS))
    if unknown:
        raise ValueError(f"{path}: unknown column kind(s) {unknown}; use {sorted(KINDS)}")
    for i, row in enumerate(rows):
        missing, extra = set(kinds) - set(row), set(row) - set(kinds)
        if missing or extra:
            raise ValueError(f"{path}: row {i} has missing column(s) {sorted(missing)} / unexpected {sorted(extra)}")
    arrays, fields = [], []
    for col, kind in kinds.items():
        typ = KINDS[kind][0]
        try:
            arrays.append(pa.array([row[col] for row in rows], typ))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise ValueError(f"{path}: column {col!r} is not {kind}: {exc}") from None
        fields.append(pa.field(col, typ))
    features = {col: KINDS[kind][1] for col, kind in kinds.items()}
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})
    table = pa.Table.from_arrays(arrays, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------
# Training exports
# ----------------------------------------------------------------------------------------------
def image_paths(rec) -> tuple[str, str]:
    """(input, output) image paths of a record, relative to the export folder."""
    base = f"images/{rec.family}/{rec.id}"
    return f"{base}_input.png", f"{base}_output.png"


def _check(records: Sequence) -> None:
    from collections import Counter

    dup = sorted(i for i, c in Counter(r.id for r in records).items() if c > 1)
    if dup:
        raise ValueError(f"duplicate record ids: {dup[:5]}")
    for r in records:
        if r.target_image is None:
            raise ValueError(f"record {r.id}: no target image; SFT and GRPO exports need one")


def write_image_files(records: Iterable, out_dir: str | os.PathLike, progress: bool = False) -> int:
    """images/<family>/<id>_input.png and _output.png under out_dir; returns how many files changed."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    records = list(records)
    changed = 0
    # disable=None shows the bar only on a terminal, so logs and test output stay clean.
    for rec in tqdm(records, desc="image files", unit="rec", disable=None if progress else True):
        inp, outp = image_paths(rec)
        changed += write_if_changed(out_dir / inp, rec.image_png())
        changed += write_if_changed(out_dir / outp, rec.target_png())
    return changed


def export_sft(records: Sequence, out_dir: str | os.PathLike, stem: str = "sft", *, write_images: bool = True,
               progress: bool = False) -> dict[str, Path]:
    """<out_dir>/<stem>.parquet (ETCHR-SFT-400K schema) and <stem>.csv (DiffSynth) + image files."""
    _check(records)
    out_dir = Path(out_dir)
    rows, lines = [], io.StringIO()
    writer = csv.writer(lines, lineterminator="\n")  # quotes prompts with commas / newlines
    writer.writerow(["image", "edit_image", "prompt"])
    for rec in records:
        inp, outp = image_paths(rec)
        rows.append({"prompt": rec.edit_prompt, "edit_image": image_cell(rec.image_png(), inp),
                     "image": image_cell(rec.target_png(), outp)})
        writer.writerow([outp, inp, rec.edit_prompt])
    if write_images:
        write_image_files(records, out_dir, progress=progress)
    paths = {"parquet": write_table(out_dir / f"{stem}.parquet", rows,
                                    {"prompt": "string", "edit_image": "image", "image": "image"}),
             "csv": atomic_write_text(out_dir / f"{stem}.csv", lines.getvalue())}
    return paths


GRPO_META_KEYS = ("maze_map", "start", "goal", "size", "cell_px", "layout")  # what RL's rule rewards read


def export_grpo(records: Sequence, out_dir: str | os.PathLike, stem: str = "grpo", *, write_images: bool = True,
                progress: bool = False) -> dict[str, Path]:
    """<out_dir>/<stem>.parquet (ETCHR-GRPO-10K schema) and <stem>.jsonl (RL loader) + image files."""
    _check(records)
    out_dir = Path(out_dir)
    rows, lines = [], []
    for rec in records:
        inp, outp = image_paths(rec)
        qa = {"question": rec.qa_question(), "answer": rec.answer}
        # qa_list strings are Python reprs (single quotes), exactly like the released dataset.
        rows.append({"source_image": image_cell(rec.image_png(), inp), "instruction": rec.edit_prompt,
                     "qa_list": [repr(qa)]})
        # Extra keys travel to RL/prepare_data / the rule-based rewards (maze_path replays the grid).
        extra = {k: rec.meta[k] for k in GRPO_META_KEYS if k in rec.meta}
        lines.append(json.dumps({"id": rec.id, "instruction": rec.edit_prompt, "source_image": inp,
                                 "target_image": outp, "qa_list": [qa], **extra}, ensure_ascii=False))
    if write_images:
        write_image_files(records, out_dir, progress=progress)
    return {"parquet": write_table(out_dir / f"{stem}.parquet", rows,
                                   {"source_image": "image", "instruction": "string", "qa_list": "string_list"}),
            "jsonl": atomic_write_text(out_dir / f"{stem}.jsonl", "".join(line + "\n" for line in lines))}
