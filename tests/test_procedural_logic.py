"""Procedural Maze / FrozenLake / Jigsaw generators, the exporters and scripts/build_benchmark.py.

The invariants are checked with the test's own BFS, replay and seam costs, not the generators' code.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import itertools
import json
from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, load_script

bb = load_script("build_benchmark")
bb.load_procedural()
maze = importlib.import_module("etchr_procedural.maze")
jigsaw = importlib.import_module("etchr_procedural.jigsaw")
export = importlib.import_module("etchr_procedural.export")

STEP = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
BLUE, GREEN, RED = (0, 0, 255), (0, 128, 0), (255, 0, 0)
N_MAZE, N_JIGSAW = 12, 8


@pytest.fixture(scope="module")
def maze_records():
    return maze.generate(N_MAZE, seed=11)


@pytest.fixture(scope="module")
def jigsaw_records():
    return jigsaw.generate(N_JIGSAW, seed=11)


# ----------------------------------------------------------------------------------------------
# Maze and FrozenLake
# ----------------------------------------------------------------------------------------------
def count_shortest(rows: list[str], blocked: str) -> tuple[int, int]:
    """(shortest S->G length, number of shortest paths), by BFS over the map."""
    start = next((r, c) for r, row in enumerate(rows) for c, v in enumerate(row) if v == "S")
    goal = next((r, c) for r, row in enumerate(rows) for c, v in enumerate(row) if v == "G")
    dist, ways = {start: 0}, {start: 1}
    queue = deque([start])
    while queue:
        cur = queue.popleft()
        for dr, dc in STEP.values():
            nxt = (cur[0] + dr, cur[1] + dc)
            if not (0 <= nxt[0] < len(rows) and 0 <= nxt[1] < len(rows[0])) or rows[nxt[0]][nxt[1]] in blocked:
                continue
            if nxt not in dist:
                dist[nxt], ways[nxt] = dist[cur] + 1, 0
                queue.append(nxt)
            if dist[nxt] == dist[cur] + 1:
                ways[nxt] += ways[cur]
    return dist.get(goal, -1), ways.get(goal, 0)


def replay(rows: list[str], moves: list[str], blocked: str) -> list[tuple[int, int]]:
    """Cells visited from S; asserts every step stays on the grid and off blocked cells."""
    r, c = next((r, c) for r, row in enumerate(rows) for c, v in enumerate(row) if v == "S")
    cells = [(r, c)]
    for m in moves:
        r, c = r + STEP[m][0], c + STEP[m][1]
        assert 0 <= r < len(rows) and 0 <= c < len(rows[0]), "leaves the grid"
        assert rows[r][c] not in blocked, f"enters a blocked cell at {(r, c)}"
        cells.append((r, c))
    return cells


def test_both_benchmarks_have_n_items_with_unique_ids(maze_records):
    fams = [r.family for r in maze_records]
    assert fams.count("maze") == fams.count("frozenlake") == N_MAZE
    assert len({r.id for r in maze_records}) == 2 * N_MAZE
    assert {r.meta["size"] for r in maze_records if r.family == "maze"} <= {5, 6, 7, 8}


def test_every_maze_has_a_unique_shortest_path_and_its_answer_replays_to_the_goal(maze_records):
    for rec in maze_records:
        rows, blocked = rec.meta["maze_map"], "#" if rec.family == "maze" else "H"
        assert set("".join(rows)) <= (set(".#SG") if rec.family == "maze" else set("SFHG")), rec.id
        length, ways = count_shortest(rows, blocked)
        moves = rec.answer.split(",")
        assert ways == 1, f"{rec.id}: {ways} shortest paths"
        assert length == len(moves) == rec.meta["shortest_len"] >= len(rows), rec.id
        cells = replay(rows, moves, blocked)
        assert rows[cells[-1][0]][cells[-1][1]] == "G", rec.id
        assert [list(c) for c in cells] == rec.meta["path"]
        assert rec.edit_prompt == "Draw the shortest path of the maze in blue. " + rec.question
        assert f"{len(rows)} by {len(rows)}" in rec.question and "\\boxed{}" in rec.question


def _centre(img: np.ndarray, cell: int, r: int, c: int) -> tuple:
    return tuple(int(v) for v in img[r * cell + cell // 2, c * cell + cell // 2])


def test_target_is_blue_exactly_on_the_path_cells(maze_records):
    for rec in maze_records:
        rows, cell = rec.meta["maze_map"], rec.meta["cell_px"]
        n = len(rows)
        inp, tgt = np.asarray(rec.image), np.asarray(rec.target_image)
        assert inp.shape == tgt.shape == (n * cell, n * cell, 3) and n * cell >= 512  # square, >= 512 px
        interior = {tuple(c) for c in rec.meta["path"][1:-1]}
        path_mask = np.zeros(inp.shape[:2], bool)
        for r in range(n):
            for c in range(n):
                ch = rows[r][c]
                want_in = {"S": GREEN, "G": RED, ".": (255, 255, 255), "#": (0, 0, 0), "F": maze.ICE,
                           "H": maze.HOLE}[ch]
                assert _centre(inp, cell, r, c) == want_in, (rec.id, r, c)
                assert (_centre(tgt, cell, r, c) == BLUE) == ((r, c) in interior), (rec.id, r, c)
                if (r, c) not in interior:
                    assert _centre(tgt, cell, r, c) == want_in, (rec.id, r, c)
                else:
                    path_mask[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = True
        blue = np.all(tgt == BLUE, axis=-1)
        assert not np.all(inp == BLUE, axis=-1).any(), f"{rec.id}: blue in the input"
        assert not (blue & ~path_mask).any(), f"{rec.id}: blue outside the path cells"
        assert np.array_equal(inp[~path_mask], tgt[~path_mask]), f"{rec.id}: target changed off the path"
        assert blue.sum() >= len(interior) * (cell - 4) ** 2  # the whole cell is filled, not a dot


def test_prefixes_are_the_protocol_files():
    prompts = REPO / "Evaluation" / "etchr_eval" / "prompts"
    assert (prompts / "edit_prefix_maze_v1.txt").read_bytes() == maze.MAZE_PREFIX.encode()
    assert (prompts / "edit_prefix_jigsaw_v1.txt").read_bytes() == jigsaw.JIGSAW_PREFIX.encode()


# ----------------------------------------------------------------------------------------------
# Jigsaw
# ----------------------------------------------------------------------------------------------
def _tiles(img: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    h, w = img.shape[0] // rows, img.shape[1] // cols
    return [img[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]


def _decoration_mask(h: int, w: int) -> np.ndarray:
    """Pixels of a displayed tile that its border or label may cover: 2 px edges, top-left label box."""
    m = np.zeros((h, w), bool)
    m[:2], m[-2:], m[:, :2], m[:, -2:] = True, True, True, True
    font = h // 6
    m[:6 + int(1.6 * font), :8 + int(1.2 * font)] = True
    return m


def _restore(rec, answer: str) -> tuple[np.ndarray, np.ndarray]:
    """Place displayed slot ans[p] at original position p; returns (restored, mask of comparable px)."""
    rows, cols = rec.meta["grid"]
    shown = _tiles(np.asarray(rec.image), rows, cols)
    labels = [int(v) for v in answer.split("-")]
    h, w = shown[0].shape[:2]
    restored = np.zeros_like(np.asarray(rec.target_image))
    comparable = np.zeros(restored.shape[:2], bool)
    for p, k in enumerate(labels):
        r, c = divmod(p, cols)
        restored[r * h:(r + 1) * h, c * w:(c + 1) * w] = shown[k]
        comparable[r * h:(r + 1) * h, c * w:(c + 1) * w] = ~_decoration_mask(h, w)
    return restored, comparable


def test_every_jigsaw_answer_restores_the_target_pixel_for_pixel(jigsaw_records):
    for rec in jigsaw_records:
        rows, cols = rec.meta["grid"]
        n = rows * cols
        labels = [int(v) for v in rec.answer.split("-")]
        assert sorted(labels) == list(range(n)) and labels != list(range(n)), rec.id
        restored, comparable = _restore(rec, rec.answer)
        tgt = np.asarray(rec.target_image)
        assert comparable.mean() > 0.85
        assert np.array_equal(restored[comparable], tgt[comparable]), rec.id
        wrong = labels[:]
        wrong[0], wrong[1] = wrong[1], wrong[0]
        restored_wrong, _ = _restore(rec, "-".join(map(str, wrong)))
        assert not np.array_equal(restored_wrong[comparable], tgt[comparable]), rec.id  # the check can fail


def test_jigsaw_layouts_sizes_question_and_rendering(jigsaw_records):
    assert [r.meta["layout"] for r in jigsaw_records[:4]] == ["2x2", "1x3", "2x2", "1x3"]
    for rec in jigsaw_records:
        size = {"2x2": (512, 512), "1x3": (768, 512)}[rec.meta["layout"]]
        assert rec.image.size == rec.target_image.size == size
        rows, cols = rec.meta["grid"]
        inp = np.asarray(rec.image)
        h, w = inp.shape[0] // rows, inp.shape[1] // cols
        for k in range(rows * cols):  # blue 2 px border on every displayed tile, none on the target
            r, c = divmod(k, cols)
            tile = inp[r * h:(r + 1) * h, c * w:(c + 1) * w]
            assert np.all(tile[:2] == BLUE) and np.all(tile[:, -2:] == BLUE), (rec.id, k)
        assert not np.all(np.asarray(rec.target_image)[:2] == BLUE)
        assert rec.edit_prompt == "Draw the original image after restoring this jigsaw puzzle task. " + rec.question
        assert ("4 shuffled patches" if rows == 2 else "3 shuffled horizontal strips") in rec.question


def test_solvability_filter_holds(jigsaw_records):
    for rec in jigsaw_records:
        rows, cols = rec.meta["grid"]
        tiles = [t.astype(np.float64) for t in _tiles(np.asarray(rec.target_image), rows, cols)]
        costs = {}
        for a in itertools.permutations(range(rows * cols)):
            diffs = []
            for p in range(rows * cols):
                r, c = divmod(p, cols)
                if c + 1 < cols:
                    diffs.append(np.abs(tiles[a[p]][:, -1] - tiles[a[p + 1]][:, 0]).ravel())
                if r + 1 < rows:
                    diffs.append(np.abs(tiles[a[p]][-1] - tiles[a[p + cols]][0]).ravel())
            costs[a] = np.concatenate(diffs).mean()
        ident = tuple(range(rows * cols))
        others = sorted(v for k, v in costs.items() if k != ident)
        assert costs[ident] < others[0] and others[0] >= 1.15 * costs[ident], rec.id
        assert costs[ident] == pytest.approx(rec.meta["seam_identity"], abs=1e-3)


def test_a_constant_image_fails_the_filter():
    flat = [np.full((8, 8, 3), 100, np.uint8)] * 4
    assert jigsaw.solvability(flat, 2, 2)[0] is False


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
def _digest(records) -> list[tuple]:
    return [(r.id, r.answer, hashlib.sha256(r.image_png()).hexdigest(), hashlib.sha256(r.target_png()).hexdigest())
            for r in records]


def test_same_seed_same_bytes_and_items_do_not_depend_on_n():
    a = _digest(maze.generate(3, seed=4) + jigsaw.generate(3, seed=4))
    b = _digest(maze.generate(3, seed=4) + jigsaw.generate(3, seed=4))
    assert a == b
    c = _digest(maze.generate(3, seed=5) + jigsaw.generate(3, seed=5))
    assert all(x[2] != y[2] for x, y in zip(a, c))
    assert _digest(jigsaw.generate(2, seed=4)) == a[-3:-1]  # item i comes from its own stream


# ----------------------------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, maze_records, jigsaw_records):
    records = maze_records[:2] + maze_records[N_MAZE:N_MAZE + 2] + jigsaw_records[:2]
    out = tmp_path_factory.mktemp("export")
    return records, out, export.export_sft(records, out), export.export_grpo(records, out, write_images=False)


def _png(img) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.open(img)


def test_sft_parquet_and_csv_reload(exported, tmp_path):
    import datasets

    records, out, sft, _ = exported
    ds = datasets.load_dataset("parquet", data_files=str(sft["parquet"]), cache_dir=str(tmp_path / "hf"))["train"]
    assert ds.column_names == ["prompt", "edit_image", "image"] and len(ds) == len(records)
    for rec, row in zip(records, ds):
        assert row["prompt"] == rec.edit_prompt
        assert isinstance(row["image"][0], Image.Image)  # decoded by datasets thanks to the schema metadata
        assert np.array_equal(np.asarray(row["edit_image"][0].convert("RGB")), np.asarray(rec.image))
        assert np.array_equal(np.asarray(row["image"][0].convert("RGB")), np.asarray(rec.target_image))
    df = pd.read_parquet(sft["parquet"])
    assert df.loc[0, "image"][0]["path"] == f"images/{records[0].family}/{records[0].id}_output.png"
    assert df.loc[0, "edit_image"][0]["bytes"] == records[0].image_png()
    csv = pd.read_csv(sft["csv"])
    assert list(csv.columns) == ["image", "edit_image", "prompt"] and not csv.prompt.isna().any()
    assert list(csv.prompt) == [r.edit_prompt for r in records]  # commas and \boxed{} survive quoting
    for rec, (_, row) in zip(records, csv.iterrows()):
        assert (out / row["image"]).read_bytes() == rec.target_png()
        assert (out / row["edit_image"]).read_bytes() == rec.image_png()


def test_grpo_parquet_and_jsonl_reload(exported, tmp_path):
    import datasets

    records, out, _, grpo = exported
    ds = datasets.load_dataset("parquet", data_files=str(grpo["parquet"]), cache_dir=str(tmp_path / "hf"))["train"]
    assert ds.column_names == ["source_image", "instruction", "qa_list"]
    df = pd.read_parquet(grpo["parquet"])
    for rec, row, df_row in zip(records, ds, df.itertuples()):
        assert row["instruction"] == rec.edit_prompt and isinstance(row["source_image"][0], Image.Image)
        assert len(row["qa_list"]) == 1 and row["qa_list"][0].startswith("{'question': ")  # a repr, not JSON
        qa = ast.literal_eval(df_row.qa_list[0])
        assert qa == {"question": rec.question, "answer": rec.answer}
    lines = [json.loads(x) for x in grpo["jsonl"].read_text().splitlines()]
    assert [x["id"] for x in lines] == [r.id for r in records]
    for rec, x in zip(records, lines):
        assert x["source_image"].endswith("_input.png")
        assert x["target_image"] == x["source_image"].replace("input", "output")  # what the RL code derives
        assert (out / x["source_image"]).read_bytes() == rec.image_png()
        assert (out / x["target_image"]).read_bytes() == rec.target_png()
        assert x["qa_list"] == [{"question": rec.question, "answer": rec.answer}]
        assert x["instruction"] == rec.edit_prompt
    assert not list(out.rglob(".*tmp*")), "temporary files left behind"


def test_eval_parquets_reload(tmp_path, maze_records, jigsaw_records):
    import datasets

    paths = {**maze.export_eval(maze_records[:3] + maze_records[N_MAZE:N_MAZE + 3], tmp_path),
             **jigsaw.export_eval(jigsaw_records[:3], tmp_path)}
    assert {k: v.name for k, v in paths.items()} == {"maze": "maze.parquet", "frozenlake": "frozenlake.parquet",
                                                     "coco_jigsaw": "coco_jigsaw.parquet"}
    cols = {"maze": ["id", "question", "answer", "image", "maze_map", "start", "goal", "shortest_len"],
            "frozenlake": ["id", "question", "answer", "image", "maze_map", "maze_size"],
            "coco_jigsaw": ["id", "question", "answer", "image", "layout"]}
    for task, path in paths.items():
        df = pd.read_parquet(path)
        assert list(df.columns) == cols[task] and len(df) == 3
        ds = datasets.load_dataset("parquet", data_files=str(path), cache_dir=str(tmp_path / "hf"))["train"]
        assert isinstance(ds[0]["image"][0], Image.Image)
    df = pd.read_parquet(paths["frozenlake"])
    rec = maze_records[N_MAZE]
    assert list(df.maze_map[0]) == rec.meta["maze_map"] and df.maze_size[0] == len(rec.meta["maze_map"])
    assert set("".join(df.maze_map[0])) <= set("SFHG")


def test_write_table_errors_name_row_and_column(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 has missing column\(s\) \['b'\]"):
        export.write_table(tmp_path / "t.parquet", [{"a": "x", "b": 1}, {"a": "y"}], {"a": "string", "b": "int64"})
    with pytest.raises(ValueError, match="column 'b' is not int64"):
        export.write_table(tmp_path / "t.parquet", [{"a": "x", "b": "seven"}], {"a": "string", "b": "int64"})
    assert not (tmp_path / "t.parquet").exists()


# ----------------------------------------------------------------------------------------------
# build_benchmark.py
# ----------------------------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_benchmark_is_complete_and_idempotent(tmp_path, capsys):
    out = tmp_path / "bench"
    manifest = bb.build(out, n=2, seed=3, families=["maze", "jigsaw"], progress=False)
    assert {t: v["items"] for t, v in manifest["tasks"].items()} == {"maze": 2, "frozenlake": 2, "coco_jigsaw": 2}
    assert manifest["train"]["records"] == 6 and manifest["seed"] == 3
    assert json.loads((out / "manifest.json").read_text()) == manifest
    first = _tree(out)
    assert len([k for k in first if k.startswith("train/images/")]) == 12
    assert {"maze.parquet", "frozenlake.parquet", "coco_jigsaw.parquet", "train/sft.parquet", "train/sft.csv",
            "train/grpo.parquet", "train/grpo.jsonl", "manifest.json"} <= set(first)
    bb.build(out, n=2, seed=3, families=["maze", "jigsaw"], progress=False)
    assert _tree(out) == first  # same arguments, same bytes
    bb.build(out, n=1, seed=3, families=["maze", "jigsaw"], progress=False)
    assert len([k for k in _tree(out) if k.startswith("train/images/")]) == 6  # stale images pruned
    with pytest.raises(ValueError, match="unknown family nope; known: maze, jigsaw(,|$)"):
        bb.build(out, n=1, families=["nope"])


def test_absent_family_module_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
    pkg = bb.load_procedural()
    monkeypatch.setattr(pkg, "FAMILIES", pkg.FAMILIES + ["not_written_yet"])
    manifest = bb.build(tmp_path, n=1, families=["jigsaw", "not_written_yet"], progress=False)
    assert "not_written_yet: skipped, scripts/procedural/not_written_yet.py does not exist" in capsys.readouterr().out
    assert manifest["families"]["not_written_yet"]["status"].startswith("skipped")
    assert list(manifest["tasks"]) == ["coco_jigsaw"]


def test_cli_bad_arguments_exit_2(capsys, tmp_path):
    assert bb.main(["--out", str(tmp_path), "--n", "0"]) == 2
    assert "need at least 1 item" in capsys.readouterr().err
