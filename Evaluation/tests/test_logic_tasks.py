"""Maze, FrozenLake and COCO-Jigsaw tasks: scorer tables, loader errors, and one end-to-end run of
scripts/build_benchmark.py + evaluate.py (subprocesses) on the tiny models against the test double."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etchr_eval.tasks import DataError, get_task
from etchr_eval.tasks.base import Item
from etchr_eval.tasks.jigsaw import extract_perm
from etchr_eval.tasks.jigsaw import score as score_jigsaw
from etchr_eval.tasks.maze import extract_frozenlake_official, extract_maze, extract_moves, scoring_variant, shortest_len
from etchr_eval.tasks.maze import score as score_maze

EVAL_DIR = Path(__file__).resolve().parents[1]
REPO = EVAL_DIR.parent
CONFIG = str(REPO / "configs" / "eval" / "tiny_demo.yaml")

# S at (0,0), G at (2,0); the unique shortest path is R,R,D,D,L,L (6 moves).
MAZE = ["S..#",
        "##..",
        "G..."]
LAKE = ["SFFF",
        "HHFF",
        "GFFF"]


def _maze_item(rows, blocked):
    return Item(id="0", question="q", answer="R,R,D,D,L,L", source="t row 0",
                meta={"rows": rows, "blocked": blocked, "shortest_len": shortest_len(rows, blocked)})


# The lenient extraction (scoring.frozenlake=lenient): response -> (extracted prediction, valid, optimal)
MOVE_TABLE = [
    ("\\boxed{R,R,D,D,L,L}", "R,R,D,D,L,L", True, True),
    ("So the moves are R, R, D, D, L, L.", "R,R,D,D,L,L", True, True),  # no box: last comma-separated run
    ("\\boxed{R R D D L L}", "R,R,D,D,L,L", True, True),
    ("\\boxed{RRDDLL}", "R,R,D,D,L,L", True, True),
    ("\\boxed{right, right, down, down, left, left}", "R,R,D,D,L,L", True, True),
    ("\\boxed{\\text{R, R, D, D, L, L}}", "R,R,D,D,L,L", True, True),
    ("\\boxed{R -> R -> D -> D -> L -> L}", "R,R,D,D,L,L", True, True),
    ("Thinking: D is blocked... \\boxed{D} no wait \\boxed{R,R,D,D,L,L}", "R,R,D,D,L,L", True, True),
    ("\\boxed{R,R,D,R,D,L,L,L}", "R,R,D,R,D,L,L,L", True, False),  # valid detour: counts, not optimal
    ("\\boxed{D,R,R}", "D,R,R", False, False),  # into a wall / hole at once
    ("\\boxed{U}", "U", False, False),  # off the grid
    ("\\boxed{R,R,D,D}", "R,R,D,D", False, False),  # ends short of the goal
    ("\\boxed{R,R,D,D,L,L,R}", "R,R,D,D,L,L,R", False, False),  # passes the goal, does not end on it
    ("I go R, R, D, D, then L, L", "L,L", False, False),  # the last run is what counts
    ("\\boxed{A}", "A", False, False),
    ("\\boxed{}", "", False, False),
    ("I cannot solve this maze.", None, False, False),
    ("", None, False, False),
    (None, None, False, False),
]


@pytest.mark.parametrize("rows,blocked", [(MAZE, "#"), (LAKE, "H")], ids=["maze", "frozenlake"])
@pytest.mark.parametrize("response,pred,valid,optimal", MOVE_TABLE)
def test_move_scorer_table(rows, blocked, response, pred, valid, optimal):
    got = extract_moves(response)
    assert got == pred
    detail = score_maze(got, _maze_item(rows, blocked))
    assert (detail["score"], detail["valid"], detail["optimal"]) == (float(valid), valid, optimal)


# response -> (FrozenLake official prediction, maze DATA.md 4.1 prediction); None = nothing extracted
STRICT_TABLE = [
    ("\\boxed{R,R,D,D,L,L}", "R,R,D,D,L,L", "R,R,D,D,L,L"),
    ("\\boxed{R, R ,D,D, L, L}", "R,R,D,D,L,L", "R,R,D,D,L,L"),
    ("\\boxed{ R,R,D,D,L,L }", None, "R,R,D,D,L,L"),  # official: no space after "{"; maze strips it
    ("So the moves are R, R, D, D, L, L.", None, "R,R,D,D,L,L"),  # maze falls back to the last run
    ("\\boxed{RRDDLL}", None, "RRDDLL"),
    ("\\boxed{right, right, down, down, left, left}", None, "right, right, down, down, left, left"),
    ("\\boxed{r,r,d,d,l,l}", None, "r,r,d,d,l,l"),
    ("\\boxed{R -> R -> D -> D -> L -> L}", None, "R -> R -> D -> D -> L -> L"),
    ("\\boxed{R,R,D,D,L,L.}", None, "R,R,D,D,L,L."),
    ("\\boxed{R,R,D,D,L,L} then \\boxed{R,R,D,D,L,L.}", "R,R,D,D,L,L", "R,R,D,D,L,L."),  # last MATCH vs last box
    ("\\\\boxed{D,R}", "D,R", "D,R"),
    ("I cannot solve this maze.", None, None),
    (None, None, None),
]


@pytest.mark.parametrize("response,official,maze", STRICT_TABLE)
def test_strict_move_extraction(response, official, maze):
    assert extract_frozenlake_official(response) == official
    assert extract_maze(response) == maze
    item = _maze_item(MAZE, "#")
    assert score_maze(maze, item)["score"] == float(maze == "R,R,D,D,L,L")  # anything not a comma list scores 0


def test_registered_move_tasks_and_the_lenient_switch():
    from types import SimpleNamespace

    lake, maze = get_task("frozenlake"), get_task("maze")
    assert lake.extract is extract_frozenlake_official and maze.extract is extract_maze
    assert scoring_variant(lake, None) is lake and scoring_variant(lake, SimpleNamespace(frozenlake="official")) is lake
    lenient = scoring_variant(lake, SimpleNamespace(frozenlake="lenient"))
    assert lenient.extract is extract_moves and lenient.name == "frozenlake" and lenient.score is lake.score
    assert get_task("frozenlake").extract is extract_frozenlake_official  # the registry is untouched
    assert scoring_variant(maze, SimpleNamespace(frozenlake="lenient")) is maze  # only FrozenLake has the switch
    with pytest.raises(ValueError, match="scoring.frozenlake='loose': use official or lenient"):
        scoring_variant(lake, SimpleNamespace(frozenlake="loose"))


def test_move_scorer_reasons():
    item = _maze_item(MAZE, "#")
    assert score_maze("D", item)["reason"] == "move 1 (D) enters a wall at (1, 0)"
    assert score_maze("D", _maze_item(LAKE, "H"))["reason"] == "move 1 (D) enters a hole at (1, 0)"
    assert score_maze("U", item)["reason"] == "move 1 (U) leaves the grid"
    assert score_maze("R,R,D,D", item)["reason"] == "ends at (2, 2), not on the goal (2, 0)"
    assert score_maze("R,R,D,D,L,L", item)["n_moves"] == 6


# response -> (extracted prediction, score, per-position accuracy) for ground truth "1-2-0"
PERM_TABLE = [
    ("1-2-0", "1-2-0", 1.0, 1.0),
    ("\\boxed{1-2-0}", "1-2-0", 1.0, 1.0),
    ("\\boxed{1, 2, 0}", "1-2-0", 1.0, 1.0),
    ("1→2→0", "1-2-0", 1.0, 1.0),
    ("[1,2,0]", "1-2-0", 1.0, 1.0),
    ("\\boxed{1 2 0}", "1-2-0", 1.0, 1.0),
    ("The strips go 1 -> 2 -> 0.", "1-2-0", 1.0, 1.0),
    ("\\boxed{\\text{1-2-0}}", "1-2-0", 1.0, 1.0),
    ("Left is 0? No: \\boxed{1-2-0}", "1-2-0", 1.0, 1.0),
    ("\\boxed{2-1-0}", "2-1-0", 0.0, 1 / 3),  # wrong permutation
    ("\\boxed{0-1-2}", "0-1-2", 0.0, 0.0),
    ("\\boxed{120}", "120", 0.0, 0.0),  # no separators: not read as three labels
    ("\\boxed{1-2}", "1-2", 0.0, 2 / 3),
    ("\\boxed{1-2-0-3}", "1-2-0-3", 0.0, 1.0),
    ("\\boxed{Left}", "Left", 0.0, 0.0),
    ("I am not sure.", None, 0.0, 0.0),
    # no box: only permutation-shaped runs of single digits; the answer's hyphen / arrow form first
    ("The answer is 1-2-0 (strips 0, 1, 2)", "1-2-0", 1.0, 1.0),
    ("Strips 0, 1, 2 are shuffled; the order is 1, 2, 0", "1-2-0", 1.0, 1.0),
    ("0-1-2 first, then 1-2-0", "1-2-0", 1.0, 1.0),  # the last hyphen run
    ("Strip 2 goes left, 1 of 3 strips", None, 0.0, 0.0),  # prose numbers are no run
    ("I'd say 10-2-1", None, 0.0, 0.0),  # part of a longer number
    ("1-1-2", None, 0.0, 0.0),  # not a permutation
    ("1 2 0", None, 0.0, 0.0),  # bare spaces without a box: too easily prose
    ("", None, 0.0, 0.0),
    (None, None, 0.0, 0.0),
]


@pytest.mark.parametrize("response,pred,expected,position_acc", PERM_TABLE)
def test_jigsaw_scorer_table(response, pred, expected, position_acc):
    got = extract_perm(response)
    assert got == pred
    detail = score_jigsaw(got, Item(id="0", question="q", answer="1-2-0"))
    assert detail["score"] == expected and detail["position_acc"] == pytest.approx(position_acc, abs=1e-4)


def test_jigsaw_2x2_answer():
    item = Item(id="0", question="q", answer="0-2-3-1")  # the ETCHR case figure
    assert score_jigsaw(extract_perm("TL, TR, BL, BR = \\boxed{0, 2, 3, 1}"), item)["score"] == 1.0
    assert score_jigsaw(extract_perm("\\boxed{0-2-1-3}"), item) == {"score": 0.0, "position_acc": 0.5}


def test_aggregates():
    maze, jig = get_task("maze"), get_task("coco_jigsaw")
    rows = [{"etchr_score": 1.0, "etchr_detail": {"optimal": True}, "baseline_score": 1.0,
             "baseline_detail": {"optimal": False}},
            {"etchr_score": 1.0, "etchr_detail": {"optimal": False}, "baseline_score": 0.0,
             "baseline_detail": {"optimal": False}}]
    assert maze.aggregate(rows) == {"etchr_optimal_pass1": 50.0, "baseline_optimal_pass1": 0.0}
    rows = [{"etchr_score": 0.0, "etchr_detail": {"position_acc": 0.5}},
            {"etchr_score": 1.0, "etchr_detail": {"position_acc": 1.0}}]
    assert jig.aggregate(rows) == {"etchr_position_acc": 75.0}


def test_tasks_use_the_family_prompt_files():
    from etchr_eval.prompts import load_prompt

    for name, prefix, verify in [("maze", "edit_prefix_maze_v1", "verify_maze_v1"),
                                 ("frozenlake", "edit_prefix_maze_v1", "verify_maze_v1"),
                                 ("coco_jigsaw", "edit_prefix_jigsaw_v1", "verify_jigsaw_v1")]:
        task = get_task(name)
        assert (task.edit_prefix, task.verify_prompt) == (prefix, verify)
        text = load_prompt(verify)
        assert "first image" in text and "second image" in text
        assert text.endswith("Output the final judgment in the form of \\boxed{0} or \\boxed{1}.")
    assert load_prompt("edit_prefix_maze_v1") == "Draw the shortest path of the maze in blue. "


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
IMG = [{"bytes": b"\x89PNG not decoded by the loader", "path": "x.png"}]


def _maze_row(**over):
    row = {"id": "m0", "question": "q", "answer": "R,R,D,D,L,L", "image": IMG, "maze_map": MAZE,
           "start": [0, 0], "goal": [2, 0], "shortest_len": 6}
    row.update(over)
    return row


def _write(tmp_path, rows, name="maze.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_maze_loader_reads_the_schema(tmp_path):
    items = get_task("maze").load(_write(tmp_path, [_maze_row(), _maze_row(id="m1", answer="R, R, D, D, L, L")]), None)
    assert [it.id for it in items] == ["m0", "m1"] and items[1].answer == "R,R,D,D,L,L"
    assert items[0].meta == {"rows": MAZE, "blocked": "#", "shortest_len": 6}
    assert len(get_task("maze").load(_write(tmp_path, [_maze_row(), _maze_row(id="m1")]), 1)) == 1


@pytest.mark.parametrize("over,message", [
    ({"maze_map": ["S..#", "##X.", "G..."]}, r"maze\.parquet row 1: column 'maze_map' has character\(s\) \['X'\]"),
    ({"maze_map": ["S..#", "##.", "G..."]}, "row 1: column 'maze_map' rows are empty or of unequal length"),
    ({"maze_map": ["S..#", "####", "G..."]}, "row 1: column 'maze_map' has no path from S to G"),
    ({"maze_map": ["S..#", "##..", "...."]}, "row 1: column 'maze_map' needs exactly one 'G', found 0"),
    ({"start": [0, 1]}, r"row 1: column 'start' = \[0, 1\] but 'S' is at \[0, 0\]"),
    ({"goal": [2]}, r"row 1: column 'goal' must be \[row, col\]"),
    ({"shortest_len": 7}, "row 1: column 'shortest_len' = 7 but the shortest path in column 'maze_map' has 6 moves"),
    ({"answer": "R,R,D"}, "row 1: column 'answer' = 'R,R,D' is no valid path from S to G"),
])
def test_maze_loader_errors_name_file_row_and_column(tmp_path, over, message):
    with pytest.raises(DataError, match=message):
        get_task("maze").load(_write(tmp_path, [_maze_row(), _maze_row(id="m1", **over)]), None)


def test_maze_loader_missing_columns_and_duplicate_ids(tmp_path):
    row = _maze_row()
    del row["shortest_len"], row["image"]
    with pytest.raises(DataError, match=r"maze\.parquet: missing column\(s\) shortest_len"):
        get_task("maze").load(_write(tmp_path, [row]), None)
    del row["start"], row["goal"]
    with pytest.raises(DataError, match=r"maze\.parquet: missing column\(s\) image"):
        get_task("frozenlake").load(_write(tmp_path, [row]), None)
    with pytest.raises(DataError, match="duplicate item ids"):
        get_task("maze").load(_write(tmp_path, [_maze_row(), _maze_row()]), None)


@pytest.mark.parametrize("cell", [LAKE, "\n".join(LAKE), str([list(r) for r in LAKE]), json.dumps(LAKE)],
                         ids=["rows", "text", "py-literal", "json"])
def test_frozenlake_map_variants(tmp_path, cell):
    row = {"id": "f0", "question": "q", "answer": "R,R,D,D,L,L", "image": IMG, "maze_map": cell, "maze_size": 3}
    item = get_task("frozenlake").load(_write(tmp_path, [row], "fl.parquet"), None)[0]
    assert item.meta == {"rows": LAKE, "blocked": "H", "shortest_len": 6}


def test_frozenlake_loader_errors(tmp_path):
    row = {"id": "f0", "question": "q", "answer": "R,R,D,D,L,L", "image": IMG, "maze_map": LAKE, "maze_size": 4}
    with pytest.raises(DataError, match="fl.parquet row 0: column 'maze_size' = 4 but 'maze_map' has 3 rows"):
        get_task("frozenlake").load(_write(tmp_path, [row], "fl.parquet"), None)
    row.update(maze_size=3, maze_map=["S.FF", "HHFF", "GFFF"])  # a maze character in a lake map
    with pytest.raises(DataError, match=r"row 0: column 'maze_map' has character\(s\) \['\.'\]; allowed: S, F, H, G"):
        get_task("frozenlake").load(_write(tmp_path, [row], "fl.parquet"), None)


def test_jigsaw_loader(tmp_path):
    rows = [{"id": "j0", "question": "q", "answer": "1-2-0", "image": IMG, "layout": "1x3"},
            {"id": "j1", "question": "q", "answer": "3, 0, 1, 2", "image": IMG, "layout": "2x2"}]
    items = get_task("coco_jigsaw").load(_write(tmp_path, rows, "cj.parquet"), None)
    assert [(it.answer, it.meta["layout"]) for it in items] == [("1-2-0", "1x3"), ("3-0-1-2", "2x2")]
    bad = dict(rows[0], answer="1-1-0")
    with pytest.raises(DataError, match="cj.parquet row 1: column 'answer' = '1-1-0' is not a permutation"):
        get_task("coco_jigsaw").load(_write(tmp_path, [rows[0], bad], "cj.parquet"), None)
    bad = dict(rows[0], layout="2x2")
    with pytest.raises(DataError, match="row 0: column 'layout' = '2x2' but column 'answer' has 3 labels"):
        get_task("coco_jigsaw").load(_write(tmp_path, [bad], "cj.parquet"), None)
    no_image = {k: v for k, v in rows[0].items() if k != "image"}
    with pytest.raises(DataError, match=r"cj\.parquet: missing column\(s\) image"):
        get_task("coco_jigsaw").load(_write(tmp_path, [no_image], "cj.parquet"), None)


# ----------------------------------------------------------------------------------------------
# End to end: build the embedded benchmark, then evaluate.py on it (tiny models, test double)
# ----------------------------------------------------------------------------------------------
def test_build_benchmark_then_evaluate_every_logic_task(tiny_models, tmp_path, make_double_server):
    bench = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "build_benchmark.py"), "--out", str(bench), "--n", "3",
                          "--seed", "1", "--families", "maze", "jigsaw"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((bench / "manifest.json").read_text())
    assert {t: v["items"] for t, v in manifest["tasks"].items()} == {"maze": 3, "frozenlake": 3, "coco_jigsaw": 3}
    # The verifier accepts every edit; jigsaw questions get "1, 0, 2", everything else "D, R".
    srv = make_double_server(rules=[("Please judge", "\\boxed{1}"), ("restore the original image", "\\boxed{1, 0, 2}")],
                             default_answer="The path is \\boxed{D, R}")
    run_dir = tmp_path / "run"
    args = ["--config", CONFIG, f"editor.pipe_path={tiny_models.flux}", "mllm.model=double",
            f"mllm.endpoints=[{srv.base_url}]", f"run_dir={run_dir}", "report_html=false",
            "scoring.frozenlake=lenient", "scoring.verify_rule=reference"]  # both switches reach the run
    args += [f"tasks.{t}.path={bench / (t + '.parquet')}" for t in ("maze", "frozenlake", "coco_jigsaw")]
    res = subprocess.run([sys.executable, str(EVAL_DIR / "evaluate.py"), *args], capture_output=True, text=True,
                         timeout=600, cwd=REPO, env=os.environ.copy())
    assert res.returncode == 0, f"STDOUT\n{res.stdout[-3000:]}\nSTDERR\n{res.stderr[-5000:]}"
    rows = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows), [r.get("errors") for r in rows]
    for r in rows:
        task = get_task(r["task"])
        item = next(it for it in task.load(str(bench / f"{r['task']}.parquet"), None) if it.id == r["id"])
        assert r["accepted"] is True and r["edit_prompt"] == load_edit_prefix(task) + item.question
        want = "1-0-2" if r["task"] == "coco_jigsaw" else "D,R"
        assert r["etchr_pred"] == r["baseline_pred"] == want
        assert r["etchr_score"] == task.score(want, item)["score"]  # scored against the file's answer
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["tasks"]) == {"maze", "frozenlake", "coco_jigsaw"}
    for name, s in summary["tasks"].items():
        assert (s["items"], s["scored"], s["failed"]) == (3, 3, 0), name
    assert "etchr_optimal_pass1" in summary["tasks"]["maze"] and "etchr_position_acc" in summary["tasks"]["coco_jigsaw"]
    assert {"verify_maze_v1", "verify_jigsaw_v1"} <= set(summary["meta"]["prompt_files"])
    assert {k: summary["meta"]["scoring"][k] for k in ("frozenlake", "verify_rule")} == \
        {"frozenlake": "lenient", "verify_rule": "reference"}


def load_edit_prefix(task) -> str:
    from etchr_eval.prompts import load_prompt

    return load_prompt(task.edit_prefix)
