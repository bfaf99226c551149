"""RL/prepare_data.py on hand-written ETCHR-GRPO-10K parquet files, and etchr_rl.data.read_jsonl on its output."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from etchr_rl.data import DataError, read_jsonl

RL_DIR = Path(__file__).resolve().parents[1]
IMAGE_CELL = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def _load_prepare():
    spec = importlib.util.spec_from_file_location("etchr_rl_prepare_data_script", RL_DIR / "prepare_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prep = _load_prepare()

JIGSAW_Q = ("The image has been divided into 3 shuffled horizontal strips labeled 0, 1, and 2. Based on visual clues "
            "such as continuity, alignment, and context, answer the correct arrangement of the strips to restore the "
            "original image, where the format is 'Left-Middle-Right'.")
ROWS = [  # (instruction, qa repr, extras)
    ("Draw the original image after restoring this jigsaw puzzle task. " + JIGSAW_Q,
     repr({"question": JIGSAW_Q, "answer": "1-2-0"})),
    ("Draw the shortest path of the maze in blue. Find the moves.",
     "{'question': 'Find the moves.', 'answer': 'D,R'}"),
    ("Draw a red box for the question. What colour is the small triangle?",
     "{'question': \"What colour is the small triangle? (it's tiny)\", 'answer': 'red'}"),
]


def png(colour=(0, 0, 255), size=(8, 8), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def write_parquet(path: Path, rows=ROWS, *, images=None, target=False, extras=True, qa_type="string", drop=()):
    """A GRPO-schema parquet: source_image list<struct<bytes,path>>, instruction, qa_list list<string>."""
    n = len(rows)
    images = images if images is not None else [png((40 * i, 0, 255)) for i in range(n)]
    cols = {"source_image": pa.array([[{"bytes": b, "path": f"{i}.png"}] for i, b in enumerate(images)], IMAGE_CELL),
            "instruction": pa.array([r[0] for r in rows], pa.string())}
    if qa_type == "string":
        cols["qa_list"] = pa.array([[r[1]] for r in rows], pa.list_(pa.string()))
    else:  # real dicts: list<struct<question, answer>>
        import ast

        cols["qa_list"] = pa.array([[ast.literal_eval(r[1])] for r in rows])
    if target:
        cols["target_image"] = pa.array([[{"bytes": png((0, 200, 0), fmt="JPEG"), "path": None}]] * n, IMAGE_CELL)
    if extras:
        cols["maze_map"] = pa.array([None, ["S.#", "..G"], None], pa.list_(pa.string()))[:n]
        cols["start"] = pa.array([None, [0, 0], None], pa.list_(pa.int64()))[:n]
        cols["layout"] = pa.array(["1x3", None, None], pa.string())[:n]
        cols["thumbnail"] = pa.array([b"x"] * n, pa.binary())  # binary extras are not copied
    for c in drop:
        cols.pop(c)
    pq.write_table(pa.table(cols), path)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_prepare_writes_images_and_jsonl(tmp_path):
    src = write_parquet(tmp_path / "train-00000.parquet")
    summary = prep.prepare([str(src)], str(tmp_path / "out"))
    out = tmp_path / "out"
    assert summary["rows"] == 3 and summary["skipped"] == 0 and summary["ignored_columns"] == ["thumbnail"]
    rows = lines(out / "grpo.jsonl")
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[0] == {"id": 0, "instruction": ROWS[0][0], "source_image": "images/0_input.png",
                       "qa_list": [{"question": JIGSAW_Q, "answer": "1-2-0"}], "maze_map": None, "start": None,
                       "layout": "1x3"}
    assert rows[1]["maze_map"] == ["S.#", "..G"] and rows[1]["start"] == [0, 0]
    assert rows[2]["qa_list"][0]["question"] == "What colour is the small triangle? (it's tiny)"
    assert "target_image" not in rows[0]
    assert (out / "images" / "1_input.png").read_bytes() == png((40, 0, 255))  # original bytes, not re-encoded
    assert not list(out.rglob("*.tmp"))


def test_target_column_real_dict_qa_and_the_reader(tmp_path):
    src = write_parquet(tmp_path / "a.parquet", target=True, qa_type="struct")
    prep.prepare([str(src)], str(tmp_path / "out"))
    rows = lines(tmp_path / "out" / "grpo.jsonl")
    assert rows[1]["target_image"] == "images/1_output.jpg" and rows[1]["qa_list"] == [{"question": "Find the moves.",
                                                                                         "answer": "D,R"}]
    prompts = read_jsonl(tmp_path / "out" / "grpo.jsonl")
    p = prompts[1]
    assert (p.id, p.question, p.answer) == ("1", "Find the moves.", "D,R")
    assert p.instruction == ROWS[1][0]
    assert p.source_image == str((tmp_path / "out" / "images" / "1_input.png").resolve())
    assert p.target_image == str((tmp_path / "out" / "images" / "1_output.jpg").resolve())
    assert p.meta == {"maze_map": ["S.#", "..G"], "start": [0, 0], "layout": None, "target_image": p.target_image}


def test_cli_subprocess_and_error_exit(tmp_path):
    src = write_parquet(tmp_path / "a.parquet")
    res = subprocess.run([sys.executable, str(RL_DIR / "prepare_data.py"), "--input", str(src), "--out",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["rows"] == 3
    bad = write_parquet(tmp_path / "bad.parquet", drop=("qa_list",))
    res = subprocess.run([sys.executable, str(RL_DIR / "prepare_data.py"), "--input", str(bad), "--out",
                          str(tmp_path / "out2")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "error:" in res.stderr and "missing column(s) qa_list" in res.stderr


def test_resume_skips_finished_files(tmp_path):
    a = write_parquet(tmp_path / "a.parquet")
    b = write_parquet(tmp_path / "b.parquet", drop=("instruction",))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="b.parquet: missing column"):
        prep.prepare([str(a), str(b)], str(out))
    part = out / "parts" / "a.jsonl"
    assert part.is_file() and not (out / "grpo.jsonl").exists()  # a finished, b not, no final file
    stamp = part.stat().st_mtime_ns
    write_parquet(b)  # fixed
    summary = prep.prepare([str(tmp_path / "*.parquet")], str(out))
    assert part.stat().st_mtime_ns == stamp  # not redone
    assert summary["rows"] == 6
    assert [r["id"] for r in lines(out / "grpo.jsonl")] == [0, 1, 2, 3, 4, 5]  # ids continue across files
    assert (out / "images" / "5_input.png").is_file()


@pytest.mark.parametrize("case,needle", [
    ("image", "row 1 source_image: image could not be decoded"),
    ("qa_syntax", "row 1 qa_list[0]: not a Python or JSON literal"),
    ("qa_missing", "row 1 qa_list[0]: missing answer"),
    ("prefix", "row 1: instruction 'Describe this picture.' has no known task prefix"),
    ("empty_qa", "row 1: qa_list must be a non-empty list"),
])
def test_bad_rows_name_file_and_row_and_can_be_skipped(tmp_path, case, needle):
    rows = [list(r) for r in ROWS]
    images = None
    if case == "image":
        images = [png(), b"not an image", png()]
    elif case == "qa_syntax":
        rows[1][1] = "{'question': 'q', 'answer': "
    elif case == "qa_missing":
        rows[1][1] = "{'question': 'q'}"
    elif case == "prefix":
        rows[1][0] = "Describe this picture."
    src = tmp_path / "g.parquet"
    write_parquet(src, [tuple(r) for r in rows], images=images)
    if case == "empty_qa":
        t = pq.read_table(src)
        qa = pa.array([[ROWS[0][1]], [], [ROWS[2][1]]], pa.list_(pa.string()))
        pq.write_table(t.set_column(t.schema.get_field_index("qa_list"), "qa_list", qa), src)
    with pytest.raises(DataError) as err:
        prep.prepare([str(src)], str(tmp_path / "out"))
    assert str(src) in str(err.value) and needle in str(err.value), str(err.value)
    summary = prep.prepare([str(src)], str(tmp_path / "skip"), on_error="skip")
    assert summary["rows"] == 2 and summary["skipped"] == 1
    assert [r["id"] for r in lines(tmp_path / "skip" / "grpo.jsonl")] == [0, 2]
    skipped = lines(tmp_path / "skip" / "skipped.jsonl")
    assert skipped[0]["row"] == 1 and needle in skipped[0]["error"]


def test_input_errors(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        prep.prepare([str(tmp_path / "nope.parquet")], str(tmp_path / "out"))
    src = write_parquet(tmp_path / "a.parquet")
    with pytest.raises(DataError, match="--target_column 'gt'"):
        prep.prepare([str(src)], str(tmp_path / "out"), target_column="gt")


def test_parse_qa_list_accepts_the_released_forms():
    where = "f row 0"
    assert prep.parse_qa_list(["{'question': 'q', 'answer': 3}"], where) == [{"question": "q", "answer": "3"}]
    assert prep.parse_qa_list([{"question": "q", "answer": "a"}], where) == [{"question": "q", "answer": "a"}]
    assert prep.parse_qa_list("[{'question': 'q', 'answer': 'a'}]", where) == [{"question": "q", "answer": "a"}]
    assert prep.parse_qa_list(['{"question": "q", "answer": true}'], where) == [{"question": "q", "answer": "True"}]
    with pytest.raises(DataError, match=r"f row 0 qa_list\[0\]: expected a dict"):
        prep.parse_qa_list(["[1, 2]"], where)


# ----------------------------------------------------------------------------------------------
# read_jsonl on hand-written files (the reference's key conventions)
# ----------------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_jsonl_key_lookup_and_path_fallback(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a_input.png").write_bytes(png())
    (tmp_path / "b.png").write_bytes(png())
    qa = [{"question": "q", "answer": "a"}, {"question": "q2", "answer": "a2"}]
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "x1", "prompt": "Draw a red box for the question. q", "image": "a_input.png", "qa_list": qa},
        "",
        {"caption": "cap", "instruction": "ins", "source_image": str(tmp_path / "b.png"), "qa_list": qa,
         "layout": "2x2"},
    ])
    p1, p2 = read_jsonl(f)
    assert p1.instruction == "Draw a red box for the question. q" and p1.id == "x1"
    assert p1.source_image == str((tmp_path / "images" / "a_input.png").resolve())  # <root>/images fallback
    assert (p1.question, p1.answer, p1.target_image, p1.meta) == ("q", "a", None, {})
    assert p2.instruction == "ins" and p2.id == "1" and p2.meta == {"layout": "2x2"}
    # An explicit root.
    other = tmp_path / "elsewhere"
    other.mkdir()
    g = write_jsonl(other / "d.jsonl", [{"instruction": "i", "image": "b.png", "qa_list": qa}])
    assert read_jsonl(g, root=tmp_path)[0].source_image == str((tmp_path / "b.png").resolve())


@pytest.mark.parametrize("row,needle", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ({"image": "ok.png", "qa_list": [{"question": "q", "answer": "a"}]}, "d.jsonl:2: no instruction"),
    ({"text": "t", "qa_list": [{"question": "q", "answer": "a"}]}, "d.jsonl:2: no source image"),
    ({"text": "t", "image": "missing.png", "qa_list": [{"question": "q", "answer": "a"}]},
     "d.jsonl:2 key 'image': image 'missing.png' not found"),
    ({"text": "t", "image": "ok.png", "qa_list": ["{'question': 'q', 'answer': 'a'}"]}, "qa_list[0] is a str"),
    ({"text": "t", "image": "ok.png", "qa_list": [{"question": "q"}]}, "d.jsonl:2: qa_list[0] has no answer"),
    ({"id": 0, "text": "t", "image": "ok.png", "qa_list": [{"question": "q", "answer": "a"}]},
     "d.jsonl:2: id '0' already used on line 1"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, row, needle):
    (tmp_path / "ok.png").write_bytes(png())
    good = {"id": 0, "text": "t", "image": "ok.png", "qa_list": [{"question": "q", "answer": "a"}]}
    f = write_jsonl(tmp_path / "d.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        read_jsonl(f)
    assert needle in str(err.value), str(err.value)
