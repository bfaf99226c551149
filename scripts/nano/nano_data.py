"""Nano-recipe data: procedural mazes (and optionally jigsaws) at nano resolution, split by seed.

Mazes come from the real generator (scripts/procedural/maze.py: draw_grid, render; the same random
stream as maze.make_item, so the default sizes give exactly make_item's grids), rendered with 16 px
cells: an N x N maze is a (16 N)^2 image, and each 16 x 16 patch the DiT sees as one token (8x VAE,
2x2 patchify) is exactly one cell. Jigsaws are jigsaw.make_item's items downscaled 4x (128 x 128
for 2x2, 192 x 128 for 1x3).

    train/    sft.csv (+ image sizes) + sft.parquet (SFT export), grpo.jsonl + grpo.parquet (RL prompts: the first
              n_rl training items), images/<family>/<id>_input.png, _output.png
    heldout/  grpo.jsonl (+ images) for scoring, maze.parquet / coco_jigsaw.parquet (Evaluation schema)
    data.json counts, seeds, sizes, how many training draws were dropped as copies of held-out items

Held-out items use seed + HELDOUT_SEED_OFFSET; a training maze identical to a held-out one (same map,
start and goal) is dropped, so the held-out set is never seen in training.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from build_benchmark import load_procedural  # noqa: E402

PKG = load_procedural().__name__
HELDOUT_SEED_OFFSET = 1000
CELL_PX = 16  # = the DiT's token size in pixels (VAE 8x, patchify 2x)
JIGSAW_SCALE = 4  # 512 px canvases -> 128 px


def _modules():
    import importlib

    return (importlib.import_module(f"{PKG}.maze"), importlib.import_module(f"{PKG}.jigsaw"),
            importlib.import_module(f"{PKG}.export"), importlib.import_module(f"{PKG}.record"))


def maze_record(index: int, seed: int, sizes=(5, 6, 7, 8), cell: int = CELL_PX):
    """Maze item `index` of `seed` with N drawn from `sizes`, rendered with `cell`-pixel cells."""
    maze, _, _, record = _modules()
    rng = np.random.default_rng([seed, maze._STREAM["maze"], index])  # make_item's stream
    n, p, (blocked, s, g, path) = maze.draw_grid(rng, tuple(sizes), maze.MAZE_WALL_P)
    moves = maze.path_moves(path)
    question = maze.maze_question(n)
    rows = maze.grid_rows(blocked, s, g, ".", "#")
    meta = {"maze_map": rows, "size": n, "start": list(s), "goal": list(g), "path": [list(c) for c in path],
            "shortest_len": len(moves), "n_turns": sum(a != b for a, b in zip(moves, moves[1:])),
            "cell_px": cell, "block_prob": round(p, 4)}
    return record.Record(id=f"maze-{index:06d}", family="maze",
                         image=maze.render(maze._fills(blocked, s, g, maze.FREE, maze.WALL), cell),
                         question=question, candidates=None, answer=",".join(moves), answer_type="moves",
                         edit_prompt=maze.MAZE_PREFIX + question,
                         target_image=maze.render(maze._fills(blocked, s, g, maze.FREE, maze.WALL, path), cell),
                         meta=meta)


def jigsaw_record(index: int, seed: int, scale: int = JIGSAW_SCALE):
    """jigsaw.make_item's item, input and target downscaled by `scale` (box filter)."""
    _, jigsaw, _, record = _modules()
    rec = jigsaw.make_item(index, seed)

    def small(img: Image.Image) -> Image.Image:
        return img.resize((img.width // scale, img.height // scale), Image.BOX)

    return record.Record(id=rec.id, family="jigsaw", image=small(rec.image), question=rec.question,
                         candidates=None, answer=rec.answer, answer_type=rec.answer_type, edit_prompt=rec.edit_prompt,
                         target_image=small(rec.target_image), meta={**rec.meta, "scale": 1 / scale})


def maze_key(rec) -> tuple:
    """What makes two mazes the same puzzle: the map (with S and G marked)."""
    return tuple(rec.meta["maze_map"])


def add_sizes(csv_path: Path, records: list) -> None:
    """Rewrite the exported SFT CSV with the optional width, height, edit_width, edit_height columns
    (etchr_sft.data.read_csv then opens no image to learn its size: seconds saved on 10^5 rows)."""
    import csv
    import io

    _, _, export, _ = _modules()
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != len(records):
        raise RuntimeError(f"{csv_path}: {len(rows)} rows for {len(records)} records")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "edit_image", "prompt", "width", "height", "edit_width", "edit_height"])
    for row, rec in zip(rows, records):
        if not row["edit_image"].endswith(f"/{rec.id}_input.png"):
            raise RuntimeError(f"{csv_path}: row {row['edit_image']} is not record {rec.id}")
        w.writerow([row["image"], row["edit_image"], row["prompt"], *rec.target_image.size, *rec.image.size])
    export.atomic_write_text(csv_path, buf.getvalue())


def interleave(a: list, b: list) -> list:
    """a[0], b[0], a[1], b[1], ... then the rest of the longer list."""
    out = [x for pair in zip(a, b) for x in pair]
    return out + a[len(b):] + b[len(a):]


def _make(job):
    family, indices, seed, sizes = job
    out = []
    for i in indices:
        rec = maze_record(i, seed, sizes) if family == "maze" else jigsaw_record(i, seed)
        rec.image_png(), rec.target_png()  # encode in the worker
        out.append(rec)
    return out


def generate(family: str, n: int, seed: int, sizes, workers: int) -> list:
    """n records of `family` (indices 0..n-1 of `seed`), built in `workers` processes, in index order."""
    if n <= 0:
        return []
    chunk = max(1, min(500, -(-n // max(1, workers * 4))))
    jobs = [(family, range(k, min(n, k + chunk)), seed, tuple(sizes)) for k in range(0, n, chunk)]
    if workers <= 1 or n < 500:  # a process pool costs more than it saves on a few hundred items
        return [r for job in jobs for r in _make(job)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(_make, jobs) for r in part]


def build(out: str | os.PathLike, *, n_train: int, n_heldout: int, n_rl: int, seed: int = 0, sizes=(5, 6, 7, 8),
          n_jigsaw_train: int = 0, n_jigsaw_heldout: int = 0, workers: int = 0, log=print) -> dict:
    """Write train/ and heldout/ under `out` (see the module docstring); returns data.json's content."""
    maze, jigsaw, export, _ = _modules()
    if n_train < 1 or n_heldout < 1:
        raise ValueError(f"n_train={n_train}, n_heldout={n_heldout}: need at least one maze in each split")
    bad = [s for s in sizes if int(s) < 2]
    if bad:
        raise ValueError(f"maze sizes {bad}: a maze needs at least 2 x 2 cells")
    workers = workers or min(16, os.cpu_count() or 1)
    out = Path(out)
    held_seed = seed + HELDOUT_SEED_OFFSET
    heldout = generate("maze", n_heldout, held_seed, sizes, workers)
    seen = {maze_key(r) for r in heldout}
    train = generate("maze", n_train, seed, sizes, workers)
    kept = [r for r in train if maze_key(r) not in seen]
    dropped = len(train) - len(kept)
    jig_train = generate("jigsaw", n_jigsaw_train, seed, sizes, workers)
    jig_held = generate("jigsaw", n_jigsaw_heldout, held_seed, sizes, workers)
    train_recs, held_recs = kept + jig_train, heldout + jig_held
    log(f"[data] {len(kept)} training mazes ({dropped} dropped: same puzzle as a held-out one), "
        f"{len(heldout)} held-out mazes, sizes {list(sizes)}; jigsaw {len(jig_train)} / {len(jig_held)}")
    export.export_sft(train_recs, out / "train")
    add_sizes(out / "train" / "sft.csv", train_recs)
    rl = interleave(kept[:n_rl], jig_train[:n_rl])  # RL reads prompts in file order: mix the families
    export.export_grpo(rl, out / "train", write_images=False)  # the SFT export wrote their images
    export.export_grpo(held_recs, out / "heldout")
    maze.export_eval(heldout, out / "heldout")
    if jig_held:
        jigsaw.export_eval(jig_held, out / "heldout")
    info = {"seed": seed, "heldout_seed": held_seed, "sizes": [int(s) for s in sizes], "cell_px": CELL_PX,
            "train": {"maze": len(kept), "jigsaw": len(jig_train)}, "rl_prompts": len(rl),
            "heldout": {"maze": len(heldout), "jigsaw": len(jig_held)}, "dropped_as_heldout_copies": dropped,
            "sft_csv": "train/sft.csv", "rl_jsonl": "train/grpo.jsonl", "heldout_jsonl": "heldout/grpo.jsonl"}
    export.atomic_write_text(out / "data.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info
