"""DL3DV task: loader errors name file/row/column; scorer table of realistic and malformed outputs."""

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etchr_eval.tasks import DataError, ItemError, get_task
from etchr_eval.tasks.dl3dv import parse_options, score, to_letter

CAND = "A: red box; B: blue ball; C: the green cone; D: none of them"


@pytest.mark.parametrize("pred,expected", [
    ("C", 1.0), ("c", 0.0), ("C.", 1.0), ("C. the green cone", 1.0), ("C: text", 1.0), ("(C)", 1.0),
    ("C) the green cone", 1.0), ("the green cone", 1.0), ("The Green Cone.", 1.0), ("\\text{C}", 1.0),
    ("B", 0.0), ("blue ball", 0.0), ("E", 0.0), ("green", 0.0), ("", 0.0), (None, 0.0),
    # VLMEvalKit can_infer: upper-case letters only; one letter among words names it, two name nothing
    ("C or D", 0.0), ("I think it is C", 1.0), ("\\boxed{Option C}", 1.0), ("A: I think C", 0.0),
])
def test_score_table(pred, expected):
    from etchr_eval.tasks.base import Item

    item = Item(id="0", question="q", answer="C", meta={"options": parse_options(CAND)}, source="t row 0")
    assert score(pred, item)["score"] == expected


@pytest.mark.parametrize("cand,expected", [
    ("A: the U.S. flag; B: a tree", {"A": "the U.S. flag", "B": "a tree"}),  # no phantom option U
    ("A. left B. right C. front", {"A": "left", "B": "right", "C": "front"}),
    ("(A) Dr. X; (B) Mr. Y. Z", {"A": "Dr. X", "B": "Mr. Y. Z"}),
    ("B: out of order; C: no A", {}),
])
def test_parse_options_takes_only_labels_in_order(cand, expected):
    assert parse_options(cand) == expected


@pytest.mark.parametrize("gt", ["C", "C. the green cone", "C: the green cone", "the green cone"])
def test_ground_truth_forms(gt):
    from etchr_eval.tasks.base import Item

    item = Item(id="0", question="q", answer=gt, meta={"options": parse_options(CAND)})
    assert score("C", item)["score"] == 1.0


def test_ground_truth_that_names_no_option_is_an_error():
    from etchr_eval.tasks.base import Item

    item = Item(id="7", question="q", answer="Z", meta={"options": parse_options(CAND)}, source="d.parquet row 7")
    with pytest.raises(DataError, match="row 7"):
        score("A", item)


def test_question_text_is_built_exactly_as_the_reference(dl3dv_parquet):
    items = get_task("dl3dv").load(str(dl3dv_parquet), None)
    df = pd.read_parquet(dl3dv_parquet)
    assert len(items) == len(df) == 6
    assert items[2].question == "Question: " + df.question[2] + "Candidates: " + df.candidates[2]
    assert items[2].image().size == (128, 96)
    assert len(get_task("dl3dv").load(str(dl3dv_parquet), 2)) == 2


def _write(tmp_path, table):
    p = tmp_path / "bad.parquet"
    pq.write_table(table, p)
    return str(p)


def test_missing_column_names_file_and_column(tmp_path):
    path = _write(tmp_path, pa.table({"question": ["q"], "answer": ["A"], "images": [[{"bytes": b"x", "path": "p"}]]}))
    with pytest.raises(DataError, match=r"bad\.parquet: missing column\(s\) candidates"):
        get_task("dl3dv").load(path, None)


def test_non_string_candidates_names_the_row(tmp_path):
    t = pa.table({"question": ["q", "q"], "candidates": [["A: x"], ["A: y"]], "answer": ["A", "A"],
                  "images": [[{"bytes": b"x", "path": "p"}]] * 2})
    with pytest.raises(DataError, match="row 0: column 'candidates' must be a string"):
        get_task("dl3dv").load(_write(tmp_path, t), None)


def test_undecodable_image_is_an_item_error(tmp_path):
    t = pa.table({"question": ["q"], "candidates": [CAND], "answer": ["A"],
                  "images": [[{"bytes": b"not an image", "path": "p.png"}]]})
    item = get_task("dl3dv").load(_write(tmp_path, t), None)[0]
    with pytest.raises(ItemError, match="bad.parquet row 0: image could not be decoded"):
        item.image()


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError, match="registered tasks: .*dl3dv"):
        get_task("vstar_typo")
