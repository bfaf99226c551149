"""scripts/procedural perception.py, chart.py, scene3d.py: the target edit is exactly the input plus red
boxes around the right pixels, the 3D answers follow from the cameras, generation is deterministic,
and the exports reload with pandas and `datasets`."""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import load_script
RED = (255, 0, 0)


def _procedural(name: str):
    """scripts/procedural/<name>.py, through build_benchmark's loader of the folder as `etchr_procedural`."""
    load_script("build_benchmark").load_procedural()
    return importlib.import_module(f"etchr_procedural.{name}")


@pytest.fixture(scope="module")
def perception():
    return _procedural("perception")


@pytest.fixture(scope="module")
def chart():
    return _procedural("chart")


@pytest.fixture(scope="module")
def scene3d():
    return _procedural("scene3d")


@pytest.fixture(scope="module")
def perception_records(perception):
    # generate(2) has V* attribute items only (items 3-4 of every 5 are relative): add V* item 3.
    return perception.generate(2, seed=7) + [perception.make_item("vstar", 3, 7)]


@pytest.fixture(scope="module")
def chart_records(chart):
    return chart.generate(4, seed=7)


@pytest.fixture(scope="module")
def scene_records(scene3d):
    return scene3d.generate(3, seed=7)


def test_families_are_registered():
    _procedural("record")
    pkg = sys.modules["etchr_procedural"]
    assert {"perception", "chart", "scene3d"} <= set(pkg.FAMILIES)


# ----------------------------------------------------------------------------------------------
# Red-box targets
# ----------------------------------------------------------------------------------------------
def _ring(shape, boxes, width) -> np.ndarray:
    """Pixels of the inclusive outline rectangles, `width` px thick, drawn inwards."""
    outer, inner = np.zeros(shape, bool), np.zeros(shape, bool)
    ring = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        outer[:], inner[:] = False, False
        outer[y0:y1 + 1, x0:x1 + 1] = True
        inner[y0 + width:y1 - width + 1, x0 + width:x1 - width + 1] = True
        ring |= outer & ~inner
    return ring


def _check_box_edit(rec) -> tuple[np.ndarray, np.ndarray]:
    inp, tgt = np.asarray(rec.image), np.asarray(rec.target_image)
    assert inp.shape == tgt.shape and inp.dtype == np.uint8
    width = rec.meta["line_width"]
    assert width == max(2, round(0.004 * min(inp.shape[:2])))
    ring = _ring(inp.shape[:2], rec.meta["boxes"], width)
    assert (tgt[ring] == RED).all(), "the outline is solid red"
    assert ((inp != tgt).any(-1) & ~ring).sum() == 0, "nothing but the outline changes"
    assert ((inp != tgt).any(-1)).any()
    for x0, y0, x1, y1 in rec.meta["boxes"]:
        assert 0 <= x0 < x1 < inp.shape[1] and 0 <= y0 < y1 < inp.shape[0]
    return inp, ring


def test_perception_red_box_encloses_the_target_and_nothing_else_changes(perception, perception_records):
    assert len(perception_records) == 7
    for rec in perception_records:
        inp, _ = _check_box_edit(rec)
        assert not (inp == RED).all(-1).any(), "no red in the input: the box is the only red"
        bg = np.array(perception.BACKGROUND)
        w = rec.meta["line_width"]
        for (x0, y0, x1, y1), target in zip(rec.meta["boxes"], rec.meta["targets"]):
            # Recompute the object's bbox from the input pixels under the box: only the target is there
            # (distractors keep clear), and it stays inside the outline's interior.
            region = (inp[y0:y1 + 1, x0:x1 + 1] != bg).any(-1)
            ys, xs = np.nonzero(region)
            bbox = [x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1]
            assert bbox == target["bbox_xyxy"]
            assert x0 + w <= bbox[0] and bbox[2] <= x1 - w + 1 and y0 + w <= bbox[1] and bbox[3] <= y1 - w + 1
            colours, counts = np.unique(inp[y0:y1 + 1, x0:x1 + 1][region], axis=0, return_counts=True)
            assert tuple(colours[counts.argmax()]) == perception.PALETTE[target["color"]]
            assert target["shape"] in rec.question
        choices, k = rec.meta["choices"], rec.meta["answer_index"]
        assert rec.answer == "ABCD"[k] and rec.candidates.split("; ")[k] == f"{rec.answer}: {choices[k]}"
        assert rec.edit_prompt == "Draw a red box for the question. " + rec.question
        t = rec.meta["targets"]
        if len(t) == 1:  # the answer is the colour read off the pixels above
            assert choices[k] == t[0]["color"] and len(choices) == 4
        else:  # recompute the relation of target 1 to target 2 from their centres
            dx, dy = t[0]["center"][0] - t[1]["center"][0], t[0]["center"][1] - t[1]["center"][1]
            if abs(dx) >= abs(dy) or len(choices) == 2:
                assert choices[k] == ("left" if dx < 0 else "right")
            else:
                assert choices[k] == ("above" if dy < 0 else "below")
    cats = [(r.meta["benchmark"], r.meta["category"]) for r in perception_records]
    assert ("vstar", "relative_position") in cats and ("hrbench_8k", "FCP") in cats and ("hrbench_4k", "FSP") in cats


def _parse(pattern: str, text: str) -> tuple:
    m = re.fullmatch(pattern, text)
    assert m, text
    return m.groups()


def test_chart_red_boxes_and_answers_follow_the_table(chart_records):
    kinds = set()
    for rec in chart_records:
        inp, _ = _check_box_edit(rec)
        w = rec.meta["line_width"]
        for name, (x0, y0, x1, y1) in zip(rec.meta["targets"], rec.meta["boxes"]):
            ex0, ey0, ex1, ey1 = rec.meta["element_boxes"][name]
            assert x0 + w <= ex0 and ex1 <= x1 - w + 1 and y0 + w <= ey0 and ey1 <= y1 - w + 1
            assert (inp[ey0:ey1, ex0:ex1] != 255).any(), f"{name}: the box surrounds something drawn"
        t = rec.meta["table"]
        cats, vals = t["categories"], t["values"]
        value = dict(zip(cats, vals))
        q, a, kind = rec.question, rec.answer, rec.meta["kind"]
        kinds.add(kind)
        if kind == "value":
            (c,) = _parse(r"What is the value for (.+)\?", q)
            assert float(a) == value[c] and rec.meta["targets"] == [f"cat:{c}"]
        elif kind == "highest":
            assert a == cats[int(np.argmax(vals))]
        elif kind == "difference":
            x, y = _parse(r"What is the difference between the values of (.+) and (.+)\?", q)
            assert float(a) == pytest.approx(abs(value[x] - value[y]), abs=1e-9)
        elif kind == "title":
            assert a == t["title"]
        elif kind == "xlabel":
            assert a == t["xlabel"]
        elif kind == "count":
            assert int(a) == len(cats) == len(rec.meta["boxes"])
        elif kind == "max_value":
            assert float(a) == max(vals)
        elif kind == "second_lowest":
            assert a == sorted(cats, key=value.get)[1]
        elif kind == "sum":
            x, y = _parse(r"What is the sum of the values of (.+) and (.+)\?", q)
            assert float(a) == pytest.approx(value[x] + value[y], abs=1e-9)
        else:
            assert kind == "count_above"
            (threshold,) = _parse(r"How many \w+ values are above (\d+)\?", q)
            assert int(a) == sum(v > int(threshold) for v in vals) == len(rec.meta["boxes"]) >= 1
        assert len(set(vals)) == len(vals)  # distinct values: "highest" / "second-lowest" are unique
    assert len(kinds) >= 5
    splits = [r.meta["split"] for r in chart_records if r.meta["benchmark"] == "chartqa"]
    assert splits == ["human", "augmented", "human", "augmented"]


# ----------------------------------------------------------------------------------------------
# 3D: cameras, answers from the geometry, target = render from B
# ----------------------------------------------------------------------------------------------
def _cam_coords(c2w, points):
    """World points -> camera frame (OpenGL: x right, y up, -z forward) and pixel u."""
    c2w = np.asarray(c2w)
    cam = (np.linalg.inv(c2w) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    return cam


def test_scene3d_cameras_are_an_orbit_in_nerfstudio_convention(scene_records):
    for rec in scene_records:
        m = rec.meta
        look = np.array(m["look_at"])
        for key in ("c2w_a", "c2w_b"):
            c2w = np.array(m[key])
            rot, pos = c2w[:3, :3], c2w[:3, 3]
            assert c2w.shape == (4, 4) and np.allclose(c2w[3], [0, 0, 0, 1])
            assert np.allclose(rot.T @ rot, np.eye(3), atol=1e-9) and np.isclose(np.linalg.det(rot), 1.0)
            assert np.allclose(-rot[:, 2], (look - pos) / np.linalg.norm(look - pos))  # looks at the centre
            assert abs(rot[1, 0]) < 1e-9 and rot[1, 1] > 0  # no roll, y up
        pa, pb = np.array(m["c2w_a"])[:3, 3] - look, np.array(m["c2w_b"])[:3, 3] - look
        assert np.isclose(pa[1], pb[1]) and np.isclose(np.hypot(pa[0], pa[2]), np.hypot(pb[0], pb[2]))
        turn = np.degrees(np.arctan2(pb[2], pb[0]) - np.arctan2(pa[2], pa[0]))
        assert m["orbit_deg"] in (90, -90, 180) and np.isclose((turn - m["orbit_deg"] + 180) % 360 - 180, 0, atol=1e-6)
        k = m["intrinsics"]
        assert (k["w"], k["h"]) == rec.image.size == rec.target_image.size and k["cx"] == k["w"] / 2


def test_scene3d_answers_follow_from_the_geometry(scene3d, scene_records):
    seen = set()
    for rec in scene_records:
        m = rec.meta
        objects = m["objects"]
        centres = np.array([o["center"] for o in objects])
        cam = _cam_coords(m["c2w_b"], centres)
        k = m["intrinsics"]
        u = k["cx"] + k["fl_x"] * cam[:, 0] / -cam[:, 2]
        options = dict(part.split(": ", 1) for part in rec.candidates.split("; "))
        if m["benchmark"] == "dl3dv":
            names = [o["name"] for o in objects]
            assert sorted(options.values()) == sorted(names)
            picked = names.index(options[rec.answer])
            if m["kind"] == "leftmost":
                assert picked == int(np.argmin(u)) and "far left" in rec.question
            elif m["kind"] == "rightmost":
                assert picked == int(np.argmax(u)) and "far right" in rec.question
            else:
                dist = np.linalg.norm(centres - np.array(m["c2w_b"])[:3, 3], axis=1)
                assert picked == int(np.argmin(dist)) and "closest" in rec.question
            seen.add(m["kind"])
        else:
            a, b = m["object"], m["reference"]
            assert objects[a]["name"] in rec.question and objects[b]["name"] in rec.question
            dx, ahead = cam[a, 0] - cam[b, 0], (-cam[a, 2]) - (-cam[b, 2])
            want = ("right" if dx > 0 else "left") if abs(dx) > abs(ahead) else ("back" if ahead > 0 else "front")
            assert options[rec.answer] == want == m["relation"]
        # target = the render from B, input = the render from A; every object visible in both
        img_a, ids_a = scene3d.render(objects, np.array(m["c2w_a"]))
        img_b, ids_b = scene3d.render(objects, np.array(m["c2w_b"]))
        assert np.array_equal(np.asarray(img_a), np.asarray(rec.image))
        assert np.array_equal(np.asarray(img_b), np.asarray(rec.target_image))
        assert all((ids == i).sum() >= 30 for ids in (ids_a, ids_b) for i in range(len(objects)))
        assert not np.array_equal(np.asarray(rec.image), np.asarray(rec.target_image))
    assert {r.meta["benchmark"] for r in scene_records} == {"dl3dv", "viewspatial"}


def test_scene3d_renderer_on_a_hand_built_scene(scene3d):
    # One red box straight ahead of a camera on the +x axis: it covers the image centre, nothing covers
    # the top-left corner (sky or ground), and its top face (facing the light) is brighter than its front.
    box = {"name": "red box", "color": "red", "center": [0.0, 0.5, 0.0], "size": [1.0, 1.0, 1.0], "yaw": 0.0}
    c2w = scene3d.orbit_c2w(0.0, np.radians(30), 5.0)
    img, ids = scene3d.render([box], c2w)
    w, h = scene3d.SIZE
    assert ids[h // 2, w // 2] == 0 and ids[0, 0] == -1
    col = np.asarray(img)[:, w // 2]
    rows = np.nonzero(ids[:, w // 2] == 0)[0]
    top, front = col[rows[0] + 1].astype(int), col[rows[-1] - 1].astype(int)
    assert top[0] > front[0] and top[1] == top[2] and top[0] > 2 * top[1]  # red, shaded


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["perception", "chart", "scene3d"])
def test_generation_is_deterministic_and_prefix_stable(family):
    module = _procedural(family)
    one, again = module.generate(1, seed=11), module.generate(1, seed=11)
    two = {r.id: r for r in module.generate(2, seed=11)}
    other = module.generate(1, seed=12)
    for a, b in zip(one, again):
        assert a.id == b.id and a.image_png() == b.image_png() and a.target_png() == b.target_png()
        assert (a.question, a.candidates, a.answer, json.dumps(a.meta)) == (b.question, b.candidates, b.answer,
                                                                             json.dumps(b.meta))
        assert two[a.id].image_png() == a.image_png() and two[a.id].answer == a.answer  # generate(1) is a prefix
    assert [r.id for r in one] == [r.id for r in other]
    assert all(a.image_png() != b.image_png() for a, b in zip(one, other))
    assert len({r.id for r in one}) == len(one) and all(r.answer_type in ("letter", "text", "int") for r in one)


# ----------------------------------------------------------------------------------------------
# Exports: public schemas, readable by pandas and datasets
# ----------------------------------------------------------------------------------------------
def _load_dataset(path: Path, cache: Path, kind="parquet"):
    import datasets

    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache))


def test_perception_exports(perception, perception_records, tmp_path):
    paths = perception.export_eval(perception_records, tmp_path)
    assert {k: v.name for k, v in paths.items()} == {"vstar": "vstar.parquet", "hrbench_4k": "hrbench_4k.parquet",
                                                     "hrbench_8k": "hrbench_8k.parquet"}
    vstar = pd.read_parquet(paths["vstar"])
    assert list(vstar.columns) == ["image", "category", "question_id", "question", "choices", "answer"]
    recs = {r.id: r for r in perception_records}
    for row in vstar.itertuples():
        rec = recs[row.question_id]
        assert list(row.choices)[row.answer] == rec.meta["choices"][rec.meta["answer_index"]]
        assert row.image["bytes"] == rec.image_png()
    ds = _load_dataset(paths["vstar"], tmp_path / "cache")
    assert len(ds) == 3 and isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (640, 480)
    hr = pd.read_parquet(paths["hrbench_8k"])
    assert list(hr.columns) == ["index", "question", "answer", "category", "A", "B", "C", "D", "cycle_category",
                                "image"]
    assert len(hr) == 4 * 2 and sorted(set(hr.cycle_category)) == ["cycle_1", "cycle_2", "cycle_3", "cycle_4"]
    hr_recs = [r for r in perception_records if r.meta["benchmark"] == "hrbench_8k"]
    for i, rec in enumerate(hr_recs):
        rows = hr[hr.question == rec.question].sort_values("index")
        correct = rec.meta["choices"][rec.meta["answer_index"]]
        assert [r[r.answer] for _, r in rows.iterrows()] == [correct] * 4  # every cycle: same option text
        assert len({tuple(r[list("ABCD")]) for _, r in rows.iterrows()}) == 4  # 4 distinct rotations
        first = rows.iloc[0]
        assert base64.b64decode(first.image) == rec.image_png()
        assert list(rows.image.iloc[1:]) == [str(first["index"])] * 3  # VLMEvalKit-style image references
    assert len(_load_dataset(paths["hrbench_4k"], tmp_path / "cache")) == 8


def test_chart_exports(chart, chart_records, tmp_path):
    paths = chart.export_eval(chart_records, tmp_path)
    assert sorted(paths) == ["chartqa", "charxiv_dq", "charxiv_rq"]
    qa = pd.read_parquet(paths["chartqa"])
    assert list(qa.columns) == ["image", "query", "label", "human_or_machine"]
    assert list(qa.human_or_machine) == [0, 1, 0, 1] and all(len(x) == 1 for x in qa.label)
    dq = pd.read_parquet(paths["charxiv_dq"])
    assert list(dq.columns) == ["image", "id", "question", "answer", "grading_instruction", "category"]
    assert dq.grading_instruction.str.len().min() > 0
    ds = _load_dataset(paths["chartqa"], tmp_path / "cache")
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["label"] == [chart_records[0].answer]
    assert len(_load_dataset(paths["charxiv_rq"], tmp_path / "cache")) == 4


def test_scene3d_exports(scene3d, scene_records, tmp_path):
    paths = scene3d.export_eval(scene_records, tmp_path)
    assert {k: v.name for k, v in paths.items()} == {"dl3dv": "dl3dv.parquet", "viewspatial": "viewspatial.parquet"}
    dl = pd.read_parquet(paths["dl3dv"])
    assert list(dl.columns) == ["question", "candidates", "answer", "images"]
    assert all(isinstance(c, str) and c.startswith("A: ") for c in dl.candidates)
    ds = _load_dataset(paths["dl3dv"], tmp_path / "cache")
    assert isinstance(ds[0]["images"][0], Image.Image) and ds[0]["images"][0].size == scene3d.SIZE
    entries = json.loads((tmp_path / "viewspatial.json").read_text())
    assert len(entries) == 3 and set(entries[0]) == {"question_type", "image_path", "question", "answer", "choices"}
    views = [r for r in scene_records if r.meta["benchmark"] == "viewspatial"]
    for entry, rec in zip(entries, views):
        assert entry["question_type"] == "Person perspective - Relative Direction"
        assert (tmp_path / entry["image_path"][0]).read_bytes() == rec.image_png()
        letter, text = entry["answer"].split(". ", 1)
        assert letter == rec.answer and f"{letter}. {text}" in entry["choices"].split("\n")
    table = pd.read_parquet(paths["viewspatial"])
    assert table.question.tolist() == [e["question"] for e in entries]
    assert len(_load_dataset(tmp_path / "viewspatial.json", tmp_path / "cache", kind="json")) == 3
