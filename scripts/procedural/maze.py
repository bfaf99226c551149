"""Maze and FrozenLake generators (DATA.md section 4.1): grids with a unique shortest path.

Generation (per item, from its own seed, so generate(3) is a prefix of generate(200)):
  1. walls/holes with probability p; start s != goal g, both cleared (opposite corners or random cells);
  2. BFS from s with shortest-path counting; reject unless g is reachable, dist[g] >= N and exactly one
     shortest path exists: then the blue target and the answer string are both unique;
  3. input: N x N cells, 2 px grey grid lines; target: the same with the path cells between s and g
     filled blue (0,0,255); s and g keep their colours.

Eval files written by `export_eval` (the paper's own sets; our schemas):

    maze.parquet        id: string, question: string, answer: string ("D,R,R,U"), image: list<Image>,
                        maze_map: list<string> (rows of '.' free, '#' wall, 'S' start, 'G' goal),
                        start: list<int64> [row, col], goal: list<int64> [row, col],
                        shortest_len: int64 (moves of the unique shortest path)
    frozenlake.parquet  id, question, answer, image as above, maze_map: list<string> (rows of S/F/H/G,
                        the VSP / ThinkMorph convention: F frozen, H hole), maze_size: int64 (N)

Rows and columns count from the top-left cell; U/D/L/R move one cell up/down/left/right.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
import numpy as np
from PIL import Image

from .export import image_cell, write_table
from .record import Record

MAZE_PREFIX = "Draw the shortest path of the maze in blue. "  # verbatim ETCHR (SFT-400K rows)
MOVES = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}

# RGB fills (DATA.md section 3.2 / 4.1); the judge and the scorer's edit metrics rely on them.
FREE, WALL, START, GOAL, PATH = (255, 255, 255), (0, 0, 0), (0, 128, 0), (255, 0, 0), (0, 0, 255)
ICE, HOLE = (214, 234, 248), (40, 40, 40)  # FrozenLake: pale ice, dark holes (never blue: blue is the path)
GRID_LINE, GRID_PX = (128, 128, 128), 2

MAZE_SIZES, MAZE_WALL_P = (5, 6, 7, 8), (0.25, 0.40)
LAKE_SIZES, LAKE_HOLE_P = (4, 5, 6, 7, 8), (0.20, 0.35)
MIN_IMAGE_PX = 512
_STREAM = {"maze": 1, "frozenlake": 2}  # separate random streams per benchmark


def maze_question(n: int) -> str:
    # Verbatim up to "directions left" (SFT-400K viewer); the rest is reconstructed (DATA.md 4.1).
    return (f"You are a maze solver. Your goal is to find the shortest path on this {n} by {n} maze, starting from "
            "the green grid while ending to the red grid. You can move on the white grids while black grids "
            "represent impassable grids. You can move one square at a time in the directions left (L), right (R), "
            "up (U), or down (D). Output the sequence of moves, separated by commas, within \\boxed{}.")


def frozenlake_question(n: int) -> str:
    return (f"You are a maze solver. Your goal is to guide the player across this {n} by {n} frozen lake, starting "
            "from the green grid while ending to the red grid and avoiding the holes. You can walk on the light "
            "ice grids, while dark grids are holes in the ice: stepping into a hole or off the lake fails. You "
            "can move one square at a time in the directions left (L), right (R), up (U), or down (D). Output "
            "the sequence of moves, separated by commas, within \\boxed{}.")


# ----------------------------------------------------------------------------------------------
# Grid search
# ----------------------------------------------------------------------------------------------
def bfs_count(blocked: np.ndarray, start: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """BFS distances and shortest-path counts from `start`, 4-neighbourhood.

    blocked: (N, M) bool. Returns dist (N, M) int (-1 = unreachable) and cnt (N, M) int, the number of
    shortest paths capped at 2 (only "one" vs "more than one" matters).
    """
    n, m = blocked.shape
    dist = np.full((n, m), -1, dtype=np.int64)
    cnt = np.zeros((n, m), dtype=np.int64)
    dist[start], cnt[start] = 0, 1
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if not (0 <= nr < n and 0 <= nc < m) or blocked[nr, nc]:
                continue
            if dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
            if dist[nr, nc] == dist[r, c] + 1:
                cnt[nr, nc] = min(2, cnt[nr, nc] + cnt[r, c])
    return dist, cnt


def backtrack(dist: np.ndarray, goal: tuple[int, int]) -> list[tuple[int, int]]:
    """Cells [start, ..., goal] of a shortest path, stepping from goal to a neighbour at dist - 1."""
    path = [goal]
    r, c = goal
    while dist[r, c] > 0:
        for dr, dc in MOVES.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < dist.shape[0] and 0 <= nc < dist.shape[1] and dist[nr, nc] == dist[r, c] - 1:
                r, c = nr, nc
                break
        path.append((r, c))
    return path[::-1]


def path_moves(path: list[tuple[int, int]]) -> list[str]:
    inverse = {v: k for k, v in MOVES.items()}
    return [inverse[(b[0] - a[0], b[1] - a[1])] for a, b in zip(path, path[1:])]


def sample_grid(rng: np.random.Generator, n: int, p: float, min_len: int):
    """One candidate grid; (blocked (n, n) bool, start, goal, path) if it has a unique shortest path of
    at least `min_len` moves, else None (the caller draws again)."""
    blocked = rng.random((n, n)) < p
    if rng.random() < 0.5:  # opposite corners, like the ETCHR case figure
        corners = [(0, 0), (0, n - 1), (n - 1, n - 1), (n - 1, 0)]
        k = int(rng.integers(4))
        s, g = corners[k], corners[(k + 2) % 4]
    else:
        a, b = rng.choice(n * n, size=2, replace=False)
        s, g = divmod(int(a), n), divmod(int(b), n)
    blocked[s] = blocked[g] = False
    dist, cnt = bfs_count(blocked, s)
    if dist[g] < min_len or cnt[g] != 1:  # unreachable (-1), too short, or not unique
        return None
    return blocked, s, g, backtrack(dist, g)


def draw_grid(rng: np.random.Generator, sizes, p_range, max_tries: int = 10_000):
    """(N, p, sample_grid result) for the first accepted candidate. N is drawn once, before rejection,
    so that sizes stay uniform (small grids would otherwise be accepted more often)."""
    size = int(rng.choice(sizes))
    for _ in range(max_tries):
        p = float(rng.uniform(*p_range))
        found = sample_grid(rng, size, p, min_len=size)
        if found is not None:
            return size, p, found
    raise RuntimeError(f"no grid with a unique shortest path after {max_tries} tries")


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def cell_px(n: int) -> int:
    """64 px cells, larger for small grids so that the (square) image is at least 512 px."""
    return max(64, math.ceil(MIN_IMAGE_PX / n))


def render(fills: np.ndarray, cell: int) -> Image.Image:
    """fills: (N, M, 3) uint8 cell colours -> (N*cell, M*cell) image with 2 px grey lines on all borders."""
    n, m, _ = fills.shape
    img = np.repeat(np.repeat(fills, cell, axis=0), cell, axis=1)
    h, w = n * cell, m * cell
    for i in range(n + 1):  # a border at i*cell covers rows i*cell-1 and i*cell (inside the image)
        y = min(max(i * cell - 1, 0), h - GRID_PX)
        img[y:y + GRID_PX, :] = GRID_LINE
    for j in range(m + 1):
        x = min(max(j * cell - 1, 0), w - GRID_PX)
        img[:, x:x + GRID_PX] = GRID_LINE
    return Image.fromarray(img, "RGB")


def _fills(blocked: np.ndarray, s, g, free, wall, path=None) -> np.ndarray:
    fills = np.where(blocked[..., None], np.array(wall, np.uint8), np.array(free, np.uint8)).astype(np.uint8)
    for cell in (path or [])[1:-1]:
        fills[cell] = PATH
    fills[s], fills[g] = START, GOAL
    return fills


def grid_rows(blocked: np.ndarray, s, g, free: str, wall: str) -> list[str]:
    rows = [[wall if b else free for b in row] for row in blocked]
    rows[s[0]][s[1]], rows[g[0]][g[1]] = "S", "G"
    return ["".join(r) for r in rows]


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def make_item(kind: str, index: int, seed: int) -> Record:
    """Item `index` of benchmark `kind` ("maze" | "frozenlake"), from its own random stream."""
    rng = np.random.default_rng([seed, _STREAM[kind], index])
    lake = kind == "frozenlake"
    n, p, (blocked, s, g, path) = draw_grid(rng, LAKE_SIZES if lake else MAZE_SIZES,
                                            LAKE_HOLE_P if lake else MAZE_WALL_P)
    free, wall = (ICE, HOLE) if lake else (FREE, WALL)
    cell = cell_px(n)
    moves = path_moves(path)
    question = frozenlake_question(n) if lake else maze_question(n)
    rows = grid_rows(blocked, s, g, *("F", "H") if lake else (".", "#"))
    meta = {"maze_map": rows, "size": n, "start": list(s), "goal": list(g), "path": [list(c) for c in path],
            "shortest_len": len(moves), "n_turns": sum(a != b for a, b in zip(moves, moves[1:])),
            "cell_px": cell, "block_prob": round(p, 4)}
    return Record(id=f"{kind}-{index:06d}", family=kind, image=render(_fills(blocked, s, g, free, wall), cell),
                  question=question, candidates=None, answer=",".join(moves), answer_type="moves",
                  edit_prompt=MAZE_PREFIX + question,
                  target_image=render(_fills(blocked, s, g, free, wall, path), cell), meta=meta)


def generate(n: int, seed: int) -> list[Record]:
    """n Maze items then n FrozenLake items (same seed -> same records, pixel for pixel)."""
    from tqdm import tqdm

    return [make_item(kind, i, seed) for kind in ("maze", "frozenlake")
            for i in tqdm(range(n), desc=kind, unit="item", disable=None, leave=False)]


def export_eval(records: list[Record], out_dir: str | Path) -> dict[str, Path]:
    """<out_dir>/maze.parquet and <out_dir>/frozenlake.parquet (schemas in the module docstring)."""
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    mazes = [r for r in records if r.family == "maze"]
    lakes = [r for r in records if r.family == "frozenlake"]
    common = {"id": "string", "question": "string", "answer": "string", "image": "image", "maze_map": "string_list"}

    def base(r: Record) -> dict:
        return {"id": r.id, "question": r.question, "answer": r.answer,
                "image": image_cell(r.image_png(), f"{r.id}.png"), "maze_map": r.meta["maze_map"]}

    if mazes:
        rows = [{**base(r), "start": r.meta["start"], "goal": r.meta["goal"], "shortest_len": r.meta["shortest_len"]}
                for r in mazes]
        out["maze"] = write_table(out_dir / "maze.parquet", rows, {**common, "start": "int64_list",
                                                                    "goal": "int64_list", "shortest_len": "int64"})
    if lakes:
        rows = [{**base(r), "maze_size": r.meta["size"]} for r in lakes]
        out["frozenlake"] = write_table(out_dir / "frozenlake.parquet", rows, {**common, "maze_size": "int64"})
    return out
