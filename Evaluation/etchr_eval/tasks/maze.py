"""Maze and FrozenLake: answer a move sequence, scored by simulating it (DATA.md sections 2 and 4.1).

FrozenLake follows its official rule: ThinkMorph's VLMEvalKit frozen_lake scorer (ThinkMorph/VLMEvalKit,
the frozen_lake dataset's evaluate). It takes the LAST match of
`\\\\{1,2}boxed\\{([RLUD](?:\\s*,\\s*[RLUD])*)\\}` in the response: upper-case single letters joined by
commas, nothing else inside the box. So lower case, words ("Right"), letters run together ("RRD"),
arrows, a leading/trailing space or a full stop inside the box, and an unboxed answer all fail; an
earlier well-formed box still counts when a later box is malformed. `extract_frozenlake_official`.
Maze follows the project's own rule, DATA.md 4.1: the last \\boxed{...} (fallback: the last
`[UDLR](,[UDLR])*` run, spaces around the commas allowed, not inside a word), whitespace stripped; the
content must then be U/D/L/R letters joined by commas, else it is no move list. `extract_maze`.
The old lenient extraction (words, arrows, "DDRR", lower-case words, unboxed runs) stays as
`extract_moves`; `scoring.frozenlake=lenient` selects it for FrozenLake (`scoring_variant`).
Scoring (both): walk from S; leaving the grid or entering a wall / hole fails at once; the walk is
valid iff it ends on G. score = valid (any valid path counts); the detail also says `optimal` (valid
and as long as the shortest path), which the summary reports as `<stage>_optimal_pass1`.

Data files (written by scripts/build_benchmark.py; see scripts/procedural/maze.py):
  maze:        id, question, answer, image (list<Image>), maze_map (rows of . # S G), start, goal
               ([row, col]), shortest_len
  frozenlake:  id, question, answer, image, maze_map (rows of S F H G), maze_size (optional)
`maze_map` may also be a list of character lists, one string with newlines, or such a list written
as a Python / JSON literal string (public FrozenLake dumps vary). This module keeps its own small
simulator and BFS: the Evaluation tree shares files with scripts/, never code.
"""

from __future__ import annotations

import ast
import json
import re
from collections import deque
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from ..extract import last_boxed
from .base import DataError, Item, Task, read_table, register, table_rows

STEP = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}
_WORDS = {"u": "U", "up": "U", "d": "D", "down": "D", "l": "L", "left": "L", "r": "R", "right": "R"}
_SEP = re.compile(r"(?:\\to|\\rightarrow|->|=>|[\s,;>|/→⇒-])+")
_RUN = re.compile(r"(?<![A-Za-z])[UDLR](?:\s*,\s*[UDLR])*(?![A-Za-z])")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")
_IMAGE_COLS = ("image", "images")
_OFFICIAL_FL = re.compile(r"\\{1,2}boxed\{([RLUD](?:\s*,\s*[RLUD])*)\}")
_MAZE_LIST = re.compile(r"[UDLR](?:,[UDLR])*")


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def parse_moves(text: str) -> Optional[list[str]]:
    """"D, R, R" / "D R R" / "down -> right" / "DRR" -> ["D", "R", "R"]; None if any token is no move."""
    s = _TEXT.sub(r"\1", text).strip().strip("[](){}.'\"`")
    tokens = [t.strip("[](){}.'\"`") for t in _SEP.split(s)]
    tokens = [t for t in tokens if t]
    if not tokens:
        return None
    out: list[str] = []
    for tok in tokens:
        if tok.lower() in _WORDS:
            out.append(_WORDS[tok.lower()])
        elif set(tok) <= set("UDLR"):  # run together: "DDRR" (upper case only, so no word matches)
            out.extend(tok)
        else:
            return None
    return out


def extract_moves(text: Optional[str]) -> Optional[str]:
    """Lenient (scoring.frozenlake=lenient): canonical "D,R,R" from a response; the raw boxed text if that is no move list; None if nothing."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        moves = parse_moves(boxed)
        return ",".join(moves) if moves is not None else boxed.strip()
    runs = _RUN.findall(text)
    if not runs:
        return None
    return ",".join(parse_moves(runs[-1]))



def extract_frozenlake_official(text: Optional[str]) -> Optional[str]:
    """ThinkMorph's rule: canonical "D,R,R" from the LAST `\\boxed{D, R, R}` match; None if there is none."""
    matches = _OFFICIAL_FL.findall(text or "")
    return ",".join(re.split(r"\s*,\s*", matches[-1])) if matches else None


def extract_maze(text: Optional[str]) -> Optional[str]:
    """DATA.md 4.1: last \\boxed{} (fallback: last U/D/L/R comma run), whitespace stripped; the boxed
    text as given when it is no comma-separated move list (scored as no moves); None if nothing."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is None:
        runs = _RUN.findall(text)
        if not runs:
            return None
        boxed = runs[-1]
    flat = re.sub(r"\s+", "", boxed)
    return flat if _MAZE_LIST.fullmatch(flat) else boxed.strip()


# ----------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------
def find(rows: list[str], ch: str) -> tuple[int, int]:
    return next((r, c) for r, row in enumerate(rows) for c, v in enumerate(row) if v == ch)


def simulate(rows: list[str], moves: list[str], blocked: str) -> tuple[bool, str]:
    """Walk `moves` from S on `rows`; (valid, reason). Out of bounds or a `blocked` cell fails at once."""
    r, c = find(rows, "S")
    for k, m in enumerate(moves, start=1):
        dr, dc = STEP[m]
        r, c = r + dr, c + dc
        if not (0 <= r < len(rows) and 0 <= c < len(rows[0])):
            return False, f"move {k} ({m}) leaves the grid"
        if rows[r][c] in blocked:
            return False, f"move {k} ({m}) enters {'a hole' if rows[r][c] == 'H' else 'a wall'} at ({r}, {c})"
    if rows[r][c] != "G":
        return False, f"ends at ({r}, {c}), not on the goal {find(rows, 'G')}"
    return True, "reaches the goal"


def shortest_len(rows: list[str], blocked: str) -> Optional[int]:
    """BFS length of the shortest S -> G path; None if G is unreachable."""
    start, goal = find(rows, "S"), find(rows, "G")
    dist = {start: 0}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            return dist[goal]
        for dr, dc in STEP.values():
            nr, nc = r + dr, c + dc
            if 0 <= nr < len(rows) and 0 <= nc < len(rows[0]) and rows[nr][nc] not in blocked \
                    and (nr, nc) not in dist:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return None


def score(pred: Optional[str], item: Item) -> dict:
    rows, blocked, best = item.meta["rows"], item.meta["blocked"], item.meta["shortest_len"]
    # Extractors hand over canonical "D,R,R" (the lenient one normalises words and runs itself).
    moves = pred.split(",") if pred and _MAZE_LIST.fullmatch(pred) else None
    if moves is None:
        return {"score": 0.0, "valid": False, "optimal": False, "n_moves": None,
                "reason": "no moves" if not pred else "not a move sequence"}
    valid, reason = simulate(rows, moves, blocked)
    return {"score": float(valid), "valid": valid, "optimal": valid and len(moves) == best,
            "n_moves": len(moves), "reason": reason}


def aggregate(rows: list[dict]) -> dict:
    """Pass@1 of optimal (shortest) paths per stage, over the same items as Pass@1."""
    out = {}
    for stage in ("etchr", "baseline"):
        if any(f"{stage}_score" in r for r in rows):
            hits = sum(bool((r.get(f"{stage}_detail") or {}).get("optimal")) for r in rows)
            out[f"{stage}_optimal_pass1"] = round(100.0 * hits / len(rows), 2)
    return out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def parse_map(cell: Any, where: str, alphabet: str) -> list[str]:
    """A maze_map cell in any accepted form -> rows of equal length over `alphabet`, one S and one G."""
    value = cell
    if isinstance(value, str) and value.strip()[:1] in "[(":
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise DataError(f"{where}: column 'maze_map' is a string but not a list literal") from None
    if isinstance(value, str):
        rows = [line.strip() for line in value.strip().splitlines() if line.strip()]
    elif isinstance(value, (list, tuple, np.ndarray)):
        rows = ["".join(str(ch) for ch in row) if isinstance(row, (list, tuple, np.ndarray)) else str(row)
                for row in value]
    else:
        raise DataError(f"{where}: column 'maze_map' must be a list of row strings, got {type(cell).__name__}")
    if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
        raise DataError(f"{where}: column 'maze_map' rows are empty or of unequal length: {rows!r}")
    bad = sorted({ch for r in rows for ch in r} - set(alphabet))
    if bad:
        raise DataError(f"{where}: column 'maze_map' has character(s) {bad}; allowed: {', '.join(alphabet)}")
    for ch in "SG":
        count = sum(r.count(ch) for r in rows)
        if count != 1:
            raise DataError(f"{where}: column 'maze_map' needs exactly one {ch!r}, found {count}")
    return rows


def _int_pair(value: Any, where: str, col: str) -> tuple[int, int]:
    try:
        pair = [int(v) for v in (ast.literal_eval(value) if isinstance(value, str) else value)]
    except (ValueError, SyntaxError, TypeError):
        pair = []
    if len(pair) != 2:
        raise DataError(f"{where}: column {col!r} must be [row, col], got {value!r}")
    return pair[0], pair[1]


def _load(path: str, limit: Optional[int], *, kind: str) -> list[Item]:
    import pandas as pd

    base = ["question", "answer", "maze_map"] + (["start", "goal", "shortest_len"] if kind == "maze" else [])
    df = read_table(path, base)
    image_col = next((c for c in _IMAGE_COLS if c in df.columns), None)
    if image_col is None:
        raise DataError(f"{path}: missing column(s) image; found {', '.join(map(str, df.columns))}")
    alphabet, blocked = (".#SG", "#") if kind == "maze" else ("SFHG", "H")
    items = []
    for row, rec, where in table_rows(df, path, limit):
        rows = parse_map(rec["maze_map"], where, alphabet)
        best = shortest_len(rows, blocked)
        if best is None:
            raise DataError(f"{where}: column 'maze_map' has no path from S to G")
        if kind == "maze":
            for col, ch in (("start", "S"), ("goal", "G")):
                pair = _int_pair(rec[col], where, col)
                if pair != find(rows, ch):
                    raise DataError(f"{where}: column {col!r} = {list(pair)} but {ch!r} is at "
                                    f"{list(find(rows, ch))} in column 'maze_map'")
            if int(rec["shortest_len"]) != best:
                raise DataError(f"{where}: column 'shortest_len' = {int(rec['shortest_len'])} but the shortest "
                                f"path in column 'maze_map' has {best} moves")
        elif "maze_size" in df.columns and not pd.isna(rec["maze_size"]) and int(rec["maze_size"]) != len(rows):
            raise DataError(f"{where}: column 'maze_size' = {int(rec['maze_size'])} but 'maze_map' has "
                            f"{len(rows)} rows")
        gt = parse_moves(str(rec["answer"]))
        if gt is None or not simulate(rows, gt, blocked)[0]:
            raise DataError(f"{where}: column 'answer' = {rec['answer']!r} is no valid path from S to G")
        item_id = str(rec["id"]) if "id" in df.columns else str(row)
        items.append(Item(id=item_id, question=str(rec["question"]), answer=",".join(gt), image_cell=rec[image_col],
                          meta={"rows": rows, "blocked": blocked, "shortest_len": best}, source=where))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate item ids in column 'id'")
    return items


def load_maze(path: str, limit: Optional[int] = None) -> list[Item]:
    return _load(path, limit, kind="maze")


def load_frozenlake(path: str, limit: Optional[int] = None) -> list[Item]:
    return _load(path, limit, kind="frozenlake")


MAZE = register(Task(
    name="maze", family="maze", edit_prefix="edit_prefix_maze_v1", verify_prompt="verify_maze_v1",
    load=load_maze, extract=extract_maze, score=score, aggregate=aggregate,
    description="Maze shortest path (id, question, answer, image, maze_map, start, goal, shortest_len); "
                "score = valid path, plus optimal Pass@1",
))

FROZENLAKE = register(Task(
    name="frozenlake", family="maze", edit_prefix="edit_prefix_maze_v1", verify_prompt="verify_maze_v1",
    load=load_frozenlake, extract=extract_frozenlake_official, score=score, aggregate=aggregate,
    description="Frozen Lake (id, question, answer, image, maze_map of S/F/H/G, maze_size); score = any valid "
                "path, plus optimal Pass@1",
))


def scoring_variant(task: Task, scoring: Any) -> Task:
    """`task` as cfg.scoring selects it: FrozenLake with the lenient extraction when
    scoring.frozenlake == "lenient"; any other task (or scoring None) unchanged."""
    mode = getattr(scoring, "frozenlake", "official") if scoring is not None else "official"
    if mode not in ("official", "lenient"):
        raise ValueError(f"scoring.frozenlake={mode!r}: use official or lenient")
    if task.name == FROZENLAKE.name and mode == "lenient":
        return replace(task, extract=extract_moves)
    return task
