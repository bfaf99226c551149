"""results.jsonl: torn tails repaired, failures dropped before a retry, merge rule across files."""

import json

import pytest

from etchr_eval.results import ResultStore, merge_rows, read_rows


def row(i, status="ok", t=1.0, task="dl3dv"):
    return {"task": task, "id": str(i), "status": status, "time": t}


def test_append_and_reload(tmp_path):
    s = ResultStore(tmp_path)
    s.append(row(0))
    s.append(row(1, "failed"))
    s.close()
    s2 = ResultStore(tmp_path)
    assert s2.finished("dl3dv/0") and not s2.finished("dl3dv/1") and not s2.finished("dl3dv/2")


def test_torn_last_line_is_cut(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(row(0)) + "\n" + '{"task": "dl3dv", "id": "1", "sta')
    s = ResultStore(tmp_path)
    assert p.read_text() == json.dumps(row(0)) + "\n"
    s.append(row(1))
    s.close()
    assert [r["id"] for r in read_rows(p)] == ["0", "1"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_text(json.dumps(row(0)) + "\n{oops\n" + json.dumps(row(2)) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        read_rows(p)


def test_drop_failures_keeps_one_row_per_item(tmp_path):
    s = ResultStore(tmp_path)
    for i in range(3):
        s.append(row(i, "failed" if i == 1 else "ok"))
    s.close()
    s = ResultStore(tmp_path)
    assert s.drop_failures() == 1
    s.append(row(1, "ok", t=2.0))
    s.close()
    rows = read_rows(tmp_path / "results.jsonl")
    assert sorted(r["id"] for r in rows) == ["0", "1", "2"] and all(r["status"] == "ok" for r in rows)


def test_merge_prefers_success_then_newer():
    merged = merge_rows([row(0, "ok", 1), row(0, "failed", 5), row(1, "failed", 1), row(1, "failed", 3),
                         row(2, "ok", 1), row(2, "ok", 4)])
    assert merged["dl3dv/0"]["status"] == "ok"
    assert merged["dl3dv/1"]["time"] == 3 and merged["dl3dv/2"]["time"] == 4


def test_sees_rows_of_other_rank_files(tmp_path):
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps(row(5)) + "\n")
    s = ResultStore(tmp_path, "results.rank0.jsonl")
    assert s.finished("dl3dv/5")
