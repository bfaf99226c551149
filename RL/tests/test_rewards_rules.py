"""Rule-based rewards on hand-built images: maze_path (the drawn blue path), maze_path_iou (against the
unique shortest path) and jigsaw_restore (PSNR)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from etchr_rl.rewards import (RewardConfigError, RewardInput, compute_rewards, jigsaw_psnr, maze_grid,
                              maze_path_check, maze_path_iou, psnr, shortest_path_cells)

MAZE = "Draw the shortest path of the maze in blue. Find the path."
JIGSAW = "Draw the original image after restoring this jigsaw puzzle task. Restore it."
BOX = "Draw a red box for the question. What is it?"

# 5 x 5 maze: S top-left, G bottom-right; the only way round the walls is along the top and down the right.
MAP = ["S...#",
       ".##.#",
       ".##..",
       "####.",
       "....G"]
META = {"maze_map": MAP, "start": [0, 0], "goal": [4, 4]}
GOOD = [(0, 1), (0, 2), (0, 3), (1, 3), (2, 3), (2, 4), (3, 4)]  # cells between S and G
FREE, WALL, START, GOAL, BLUE, LINE = (255, 255, 255), (0, 0, 0), (0, 128, 0), (255, 0, 0), (0, 0, 255), (128, 128, 128)


def render(blue_cells, cell=32, rows=MAP) -> Image.Image:
    """The procedural maze look (DATA.md 4.1): filled cells, 2 px grey grid lines, blue path cells."""
    n, m = len(rows), len(rows[0])
    img = np.zeros((n * cell, m * cell, 3), np.uint8)
    for i, row in enumerate(rows):
        for j, ch in enumerate(row):
            colour = {"#": WALL, "S": START, "G": GOAL}.get(ch, FREE)
            if (i, j) in blue_cells:
                colour = BLUE
            img[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = colour
    for k in range(n + 1):
        y = min(max(k * cell - 1, 0), n * cell - 2)
        img[y:y + 2] = LINE
    for k in range(m + 1):
        x = min(max(k * cell - 1, 0), m * cell - 2)
        img[:, x:x + 2] = LINE
    return Image.fromarray(img)


def maze_reward(edited, meta=META, instruction=MAZE):
    x = RewardInput(instruction, "q", "R,R,R,D,D,R,D,D", render([]), edited, dict(meta))
    return asyncio.run(compute_rewards([x], ["maze_path"], None, None))["maze_path"][0]


def test_correct_path_scores_one():
    res = maze_path_check(render(GOOD), META)
    assert res == {"valid": True, "blue_cells": 7, "blue_on_wall": 0, "connected": True, "stray_blue": 0}
    assert maze_reward(render(GOOD)) == 1.0


def test_path_through_a_wall_scores_zero():
    # A shortcut: down the left column, then straight through the walls of row 3.
    through = [(1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3), (3, 4)]
    res = maze_path_check(render(through), META)
    assert res["connected"] and res["blue_on_wall"] == 4 and not res["valid"]
    assert maze_reward(render(through)) == 0.0


def test_a_gap_scores_zero():
    gap = [c for c in GOOD if c != (1, 3)]
    res = maze_path_check(render(gap), META)
    assert not res["connected"] and not res["valid"]
    assert maze_reward(render(gap)) == 0.0


def test_a_diagonal_step_scores_zero():
    # ... (0,3) -> (1,3) -> (2,4) diagonally, skipping (2,3).
    diagonal = [c for c in GOOD if c != (2, 3)]
    assert not maze_path_check(render(diagonal), META)["connected"]
    assert maze_reward(render(diagonal)) == 0.0


def test_stray_blue_and_empty_edit_score_zero():
    res = maze_path_check(render(GOOD + [(4, 0)]), META)
    assert res["connected"] and res["stray_blue"] == 1 and not res["valid"]
    assert maze_reward(render([])) == 0.0  # the unedited maze


def test_robust_to_resizing_and_noise():
    """The editor returns its own resolution and slightly off colours."""
    edit = render(GOOD).resize((333, 333), Image.BILINEAR)
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(edit, np.int16) + rng.normal(0, 12, (333, 333, 3)), 0, 255).astype(np.uint8)
    assert maze_reward(Image.fromarray(noisy)) == 1.0
    shaded = np.asarray(render(GOOD)).copy()
    shaded[np.all(shaded == BLUE, axis=-1)] = (40, 60, 200)  # a darker, greyer blue is still blue
    assert maze_reward(Image.fromarray(shaded)) == 1.0


def test_maze_meta_formats():
    walls, s, g = maze_grid(META)
    assert walls.sum() == 10 and s == (0, 0) and g == (4, 4)
    # Start and goal from the 'S' / 'G' marks, the map as one string, or as a 0/1 matrix.
    assert maze_grid({"maze_map": "\n".join(MAP)})[1:] == ((0, 0), (4, 4))
    ints = [[1 if ch == "#" else 0 for ch in row] for row in MAP]
    w2, _, _ = maze_grid({"maze_map": ints, "start": [0, 0], "goal": [4, 4]})
    assert (w2 == walls).all()
    assert maze_reward(render(GOOD), {"maze_map": MAP}) == 1.0


@pytest.mark.parametrize("meta,needle", [
    ({}, "no 'maze_map'"),
    ({"maze_map": ["..", "."]}, "rectangular"),
    ({"maze_map": ["...", "..."], "goal": [1, 2]}, "no maze start"),
    ({"maze_map": ["S..", "..."], "goal": [5, 0]}, "outside the 2x3 maze"),
])
def test_maze_meta_errors_name_the_key(meta, needle):
    with pytest.raises(RewardConfigError, match=needle):
        maze_reward(render(GOOD), meta)


def test_rule_rewards_do_not_apply_to_other_families():
    x = RewardInput(BOX, "q", "a", render([]), render(GOOD), {})
    out = asyncio.run(compute_rewards([x], ["maze_path", "maze_path_iou", "jigsaw_restore"], None, None))
    assert out == {"maze_path": [None], "maze_path_iou": [None], "jigsaw_restore": [None]}


# ----------------------------------------------------------------------------------------------
# Maze: IoU with the unique shortest path
# ----------------------------------------------------------------------------------------------
def iou_reward(edited, meta=META, extras=None):
    x = RewardInput(MAZE, "q", "R,R,R,D,D,R,D,D", render([]), edited, dict(meta))
    return asyncio.run(compute_rewards([x], ["maze_path_iou"], None, None, extras=extras))["maze_path_iou"][0]


def test_shortest_path_cells_of_the_test_maze():
    walls, s, g = maze_grid(META)
    assert shortest_path_cells(walls, s, g) == set(GOOD)
    # Two equally short ways round an open 3 x 3 square: no unique answer. A walled-off goal: none at all.
    assert shortest_path_cells(np.zeros((3, 3), bool), (0, 0), (2, 2)) is None
    assert shortest_path_cells(np.array([[0, 1, 0]], bool), (0, 0), (0, 2)) is None
    assert shortest_path_cells(np.zeros((1, 2), bool), (0, 0), (0, 1)) == set()  # adjacent: nothing between


def test_iou_golden_values():
    extras = {}
    assert iou_reward(render(GOOD), extras=extras) == 1.0 and extras["maze_path_iou/exact"] == [True]
    assert iou_reward(render([])) == 0.0  # the unedited maze draws nothing
    # 5 of the 7 path cells: 5 / 7. The path plus 2 stray cells (one a wall): 7 / 9.
    assert iou_reward(render(GOOD[:5])) == pytest.approx(5 / 7)
    assert iou_reward(render(GOOD + [(4, 0), (1, 1)])) == pytest.approx(7 / 9)
    # A valid but longer path (down the left, along the bottom, up to G) shares no cell with the shortest
    # one: maze_path accepts any valid path, this reward asks for THE path, as the held-out metric does.
    rows = ["S...#", ".##.#", ".##.G", ".###.", "....."]
    meta = {"maze_map": rows, "start": [0, 0], "goal": [2, 4]}
    assert shortest_path_cells(*maze_grid(meta)) == {(0, 1), (0, 2), (0, 3), (1, 3), (2, 3)}
    around = [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3), (4, 4), (3, 4)]
    assert maze_path_check(render(around, rows=rows), meta)["valid"]
    assert iou_reward(render(around, rows=rows), meta) == 0.0
    # Two equally short ways round the walls: no unique answer, no signal (None, not 0).
    rows = ["S....", ".###.", ".#.#.", ".###.", "....G"]
    assert iou_reward(render([], rows=rows), {"maze_map": rows}) is None


def test_iou_ignores_start_and_goal_colours_and_survives_resizing():
    img = np.asarray(render(GOOD)).copy()
    img[:32, :32] = BLUE  # the start cell painted blue: not counted either way
    assert maze_path_iou(Image.fromarray(img), META) == 1.0
    assert maze_path_iou(render(GOOD).resize((97, 97), Image.BILINEAR), META) == 1.0


# ----------------------------------------------------------------------------------------------
# Jigsaw
# ----------------------------------------------------------------------------------------------
def target_image(size=64) -> Image.Image:
    """A smooth picture with strokes (DATA.md 4.2 style): continuity across tile borders."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * x + 0.3), 0.5 + 0.5 * np.sin(2 * np.pi * 1.1 * y + 1.0),
                    0.5 + 0.5 * np.sin(4 * np.pi * (0.6 * x + 0.8 * y))], -1)
    img[size // 3: size // 3 + 3, :] = [1, 1, 1]
    img[:, size // 2: size // 2 + 3] = [0, 0, 0]
    return Image.fromarray((img * 255).astype(np.uint8))


def shuffle_2x2(image: Image.Image, order=(3, 0, 1, 2)) -> Image.Image:
    arr = np.asarray(image)
    h, w = arr.shape[0] // 2, arr.shape[1] // 2
    tiles = [arr[r * h:(r + 1) * h, c * w:(c + 1) * w] for r in range(2) for c in range(2)]
    t = [tiles[k] for k in order]
    return Image.fromarray(np.vstack([np.hstack(t[:2]), np.hstack(t[2:])]))


def jigsaw_rewards(edits, meta, threshold=None):
    config = SimpleNamespace(reward=SimpleNamespace(jigsaw_psnr_db=threshold)) if threshold is not None else None
    xs = [RewardInput(JIGSAW, "q", "0-1-2-3", shuffle_2x2(target_image()), e, dict(meta)) for e in edits]
    extras: dict = {}
    out = asyncio.run(compute_rewards(xs, ["jigsaw_restore"], None, config, extras=extras))
    return out["jigsaw_restore"], extras["jigsaw_restore/psnr"]


def test_jigsaw_identical_scores_one_and_shuffled_zero(tmp_path):
    target = target_image()
    path = tmp_path / "7_output.png"
    target.save(path)
    rewards, values = jigsaw_rewards([target.copy(), shuffle_2x2(target)], {"target_image": str(path)})
    assert rewards == [1.0, 0.0]
    assert values[0] == 100.0 and values[1] < 20.0  # identical -> capped PSNR; shuffled far below 20 dB
    # The same with the target given as a PIL image.
    assert jigsaw_rewards([target.copy(), shuffle_2x2(target)], {"target_image": target})[0] == [1.0, 0.0]


def test_jigsaw_edit_is_resized_to_the_target_and_the_threshold_is_configurable():
    target = target_image()
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(np.clip(np.asarray(target, np.int16) + rng.normal(0, 4, (64, 64, 3)), 0, 255)
                            .astype(np.uint8))
    larger = target.resize((128, 128), Image.BICUBIC)
    rewards, values = jigsaw_rewards([noisy, larger], {"target_image": target})
    assert rewards == [1.0, 1.0] and 30 < values[0] < 45 and values[1] > 25
    assert jigsaw_rewards([noisy], {"target_image": target}, threshold=50.0)[0] == [0.0]
    assert jigsaw_rewards([noisy], {"target_image": target}, threshold=30.0)[0] == [1.0]


def test_psnr_values():
    a = Image.new("RGB", (4, 4), (0, 0, 0))
    b = Image.new("RGB", (4, 4), (255, 255, 255))
    assert psnr(a, b) == 0.0 and psnr(a, a) == 100.0
    c = Image.new("RGB", (4, 4), (10, 10, 10))
    assert psnr(a, c) == pytest.approx(10 * np.log10(255 ** 2 / 100))
    with pytest.raises(ValueError, match="sizes differ"):
        psnr(a, Image.new("RGB", (5, 4)))


def test_jigsaw_meta_errors(tmp_path):
    with pytest.raises(RewardConfigError, match="no 'target_image'"):
        jigsaw_psnr(target_image(), {})
    with pytest.raises(RewardConfigError, match="does not exist"):
        jigsaw_psnr(target_image(), {"target_image": str(tmp_path / "missing.png")})
