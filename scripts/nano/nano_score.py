"""Held-out scoring of the editor's own edits with rule-based checks (DATA.md section 4.1 "Edit metrics").

Maze, by cell-centre colour: each cell's colour is the median of its central half; a cell is blue when
B >= 128 and B exceeds R and G by at least 80 (the path fill is (0, 0, 255); white, black, grey lines,
green start and red goal are not blue). With P = the cells strictly between start and goal on the
unique shortest path (the generator's BFS, scripts/procedural/maze.py):
    exact         every cell of P is blue and no other cell (wall or free) is: "path correctness"
    path_recall   fraction of P that is blue
    off_path_blue any blue cell outside P (walls included); wall_blue: any blue wall cell
Start and goal keep green and red; they are not scored. Jigsaw: PSNR of the edit (resized to the
target's size) against the restored original; share of items at >= 20 dB.
Edits are made by diffusers' Flux2KleinPipeline itself, one item at a time, seeded per item.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from build_benchmark import load_procedural  # noqa: E402

PSNR_PASS_DB = 20.0


def _maze():
    import importlib

    return importlib.import_module(f"{load_procedural().__name__}.maze")


def cell_centre_colours(image: Image.Image, n: int, m: int) -> np.ndarray:
    """(n, m, 3) median RGB of the central half of each cell of an image the n x m grid fills."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    out = np.zeros((n, m, 3), dtype=np.uint8)
    for i in range(n):
        y0, y1 = int((i + 0.25) * h / n), max(int((i + 0.25) * h / n) + 1, int(np.ceil((i + 0.75) * h / n)))
        for j in range(m):
            x0, x1 = int((j + 0.25) * w / m), max(int((j + 0.25) * w / m) + 1, int(np.ceil((j + 0.75) * w / m)))
            out[i, j] = np.median(arr[y0:y1, x0:x1].reshape(-1, 3), axis=0)
    return out


def blue_cells(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.int32)
    return (c[..., 2] >= 128) & (c[..., 2] - c[..., 0] >= 80) & (c[..., 2] - c[..., 1] >= 80)


def gt_path(maze_map: list, start, goal) -> set:
    """Cells strictly between start and goal on the unique shortest path (the generator's BFS)."""
    maze = _maze()
    walls = np.array([[ch == "#" for ch in row] for row in maze_map], dtype=bool)
    dist, cnt = maze.bfs_count(walls, tuple(start))
    if dist[tuple(goal)] < 0 or cnt[tuple(goal)] != 1:
        raise ValueError(f"maze {maze_map}: no unique shortest path from {start} to {goal}")
    return {tuple(c) for c in maze.backtrack(dist, tuple(goal))[1:-1]}


def maze_metrics(edit: Image.Image, maze_map: list, start, goal) -> dict:
    n, m = len(maze_map), len(maze_map[0])
    blue = blue_cells(cell_centre_colours(edit, n, m))
    blue[tuple(start)] = blue[tuple(goal)] = False
    path = np.zeros((n, m), dtype=bool)
    for c in gt_path(maze_map, start, goal):
        path[c] = True
    walls = np.array([[ch == "#" for ch in row] for row in maze_map], dtype=bool)
    hit = int((blue & path).sum())
    off = int((blue & ~path).sum())
    return {"exact": bool(hit == int(path.sum()) and off == 0), "path_recall": hit / max(1, int(path.sum())),
            "off_path_blue": off > 0, "wall_blue": bool((blue & walls).any()), "blue_cells": int(blue.sum())}


def psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB").resize(b.size, Image.BICUBIC) if a.size != b.size else a.convert("RGB"),
                   dtype=np.float64)
    mse = float(np.mean((x - np.asarray(b.convert("RGB"), dtype=np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(255.0 ** 2 / mse))


def read_rows(jsonl: Path, limit: int = 0) -> list[dict]:
    rows = []
    for k, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        for key in ("id", "instruction", "source_image"):
            if key not in row:
                raise ValueError(f"{jsonl}:{k}: no '{key}'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{jsonl}: no rows")
    return rows[:limit] if limit else rows


def aggregate(per_item: list[dict]) -> dict:
    out: dict = {}
    mazes = [r for r in per_item if r["family"] == "maze"]
    if mazes:
        mean = lambda k: round(float(np.mean([float(r[k]) for r in mazes])), 4)  # noqa: E731
        out["maze"] = {"n": len(mazes), "exact": mean("exact"), "path_recall": mean("path_recall"),
                       "off_path_blue_rate": mean("off_path_blue"), "wall_blue_rate": mean("wall_blue")}
        by_size: dict = {}
        for r in mazes:
            by_size.setdefault(str(r["size"]), []).append(float(r["exact"]))
        out["maze"]["exact_by_size"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(by_size.items())}
    jig = [r for r in per_item if r["family"] == "jigsaw"]
    if jig:
        vals = [r["psnr"] for r in jig]
        out["jigsaw"] = {"n": len(jig), "psnr_mean": round(float(np.mean(vals)), 3),
                         f"psnr_ge_{PSNR_PASS_DB:g}db": round(float(np.mean([v >= PSNR_PASS_DB for v in vals])), 4)}
    return out


def score(pipe_dir: str, jsonl: str, out_json: str, *, steps: int = 8, guidance: float = 1.0, seed: int = 126,
          limit: int = 0, max_sequence_length: int = 32, save_edits: int = 16, device: str = "auto",
          stage: str = "", log=print) -> dict:
    """Edit every held-out row with the pipeline at `pipe_dir`, score it; write `out_json` (summary +
    per-item rows) and the first `save_edits` edits as PNGs beside it. Returns the JSON's content."""
    import torch
    from diffusers import Flux2KleinPipeline

    jsonl, out_json = Path(jsonl), Path(out_json)
    rows = read_rows(jsonl, limit)
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    t0 = time.time()
    pipe = Flux2KleinPipeline.from_pretrained(pipe_dir, dtype=dtype).to(dev)
    pipe.set_progress_bar_config(disable=True)
    t_load = time.time() - t0
    edits_dir = out_json.parent / f"{out_json.stem}_edits"
    edits_dir.mkdir(parents=True, exist_ok=True)
    per_item = []
    t1 = time.time()
    for k, row in enumerate(rows):
        src_path = jsonl.parent / row["source_image"]
        with Image.open(src_path) as im:
            src = im.convert("RGB")
        with torch.inference_mode():
            edit = pipe(image=src, prompt=row["instruction"], height=src.height // 16 * 16,
                        width=src.width // 16 * 16, num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator(device=dev).manual_seed(seed + k),
                        max_sequence_length=max_sequence_length).images[0]
        if k < save_edits:
            edit.save(edits_dir / f"{row['id']}.png")
        rec = {"id": row["id"]}
        if "maze_map" in row:
            rec.update(family="maze", size=len(row["maze_map"]),
                       **maze_metrics(edit, row["maze_map"], row["start"], row["goal"]))
        elif "layout" in row:
            with Image.open(jsonl.parent / row["target_image"]) as im:
                rec.update(family="jigsaw", psnr=round(psnr(edit, im), 3))
        else:
            raise ValueError(f"{jsonl} row {row['id']}: neither maze_map (maze) nor layout (jigsaw)")
        per_item.append(rec)
    seconds = time.time() - t1
    result = {"stage": stage, "pipe": str(pipe_dir), "data": str(jsonl), "items": len(rows), "steps": steps,
              "guidance": guidance, "seed": seed, "device": dev, "load_s": round(t_load, 2),
              "edit_s": round(seconds, 2), "s_per_item": round(seconds / len(rows), 4), **aggregate(per_item),
              "per_item": per_item}
    tmp = out_json.with_name(f".{out_json.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out_json)
    summary = {k: v for k, v in result.items() if k in ("maze", "jigsaw")}
    log(f"[eval {stage}] {len(rows)} held-out items in {seconds:.1f} s ({seconds / len(rows):.3f} s/item): "
        f"{json.dumps(summary)}")
    return result
