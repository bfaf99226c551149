"""Rewards for GRPO: a name -> reward registry, task routing, and the failure policy.

A reward maps a batch of rollouts to `list[float | None]`; None means "no signal" (the judge failed,
or a rule-based reward does not apply to that row's task family), never 0 (DESIGN.md).

Judge rewards (PROTOCOL.md section 2; prompts are the protocol files in etchr_rl/prompts/):
  guidance     round 1: the MLLM answers the question from [original, edited]
               (reward_guidance_answer_v1, temperature 0.7, top_p 0.8, top_k 20, max_tokens 1024);
               round 2: a text-only judge compares that answer with the ground truth
               (reward_guidance_judge_v1, temperature 0, max_tokens 4). 1.0 iff the reply is "1".
               (reward.guidance_answer_max_tokens overrides the 1024, for CPU smoke runs only.)
  correctness  a family-specific judge prompt (routed by the instruction's task prefix), temperature 0.7,
               max_tokens 4; images [original, edited] for box / jigsaw / 3d and [edited] for maze, or
               [edited] for every family with reward.correctness_images=edited_only (the reference).
Exact rule-based rewards for the procedural families (no network):
  maze_path       the blue cells drawn in the edit form a valid path (see maze_path_check).
  maze_path_iou   IoU of the blue cells with the cells of the unique shortest path (1.0 iff exactly that
                  path is drawn; a dense signal for GRPO groups where no edit is fully right).
  jigsaw_restore  PSNR of the edit against the target image >= reward.jigsaw_psnr_db (default 20 dB).
A smooth judge-free reward for any row with a target image (meta['target_image']):
  target_similarity  -MSE of the edit against the target in [0, 1] pixel space (target_similarity):
                  0 for a perfect edit, -1 at worst; None for rows without a target image.
Custom rewards come from reward.plugins (load_plugins): "module:attr" or "path/to/file.py:attr".

The trainer calls `check_routable` on the whole dataset before step 0, `compute_rewards` per step, and
`check_failures` on the result (which aborts the run when the judge fails too often).
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from .judge import JudgeClient, png_data_uri, user_message
from .prompts import load_prompt

Rewards = dict[str, list[Optional[float]]]


class RewardConfigError(ValueError):
    """A configuration or data problem found by the rewards (unknown name, unroutable instruction,
    missing meta key); the message names the row or key and the fix."""


class RewardFailure(RuntimeError):
    """The judge failed on more rollouts than judge.max_failure_rate allows; the trainer aborts."""


@dataclass
class RewardInput:
    """One rollout to score (the trainer builds one per sample of a group)."""

    instruction: str  # task prefix + question (the editor's prompt)
    question: str  # qa['question']
    answer: str  # qa['answer'] (ground truth)
    original: Image.Image  # the source image given to the editor
    edited: Image.Image  # the rollout's decoded edit
    meta: dict = field(default_factory=dict)  # extras of the JSONL row (maze_map/start/goal, target_image, ...)


# ----------------------------------------------------------------------------------------------
# Routing: task family from the instruction's prefix (DATA.md section 6, item 5)
# ----------------------------------------------------------------------------------------------
# Checked in this order, by substring, as the reference does.
TASK_ROUTES: tuple[tuple[str, str], ...] = (
    ("Draw a red box", "box"),
    ("shortest path", "maze"),
    ("jigsaw", "jigsaw"),
    ("Imagine a new perspective", "3d"),
)
FAMILIES = tuple(family for _, family in TASK_ROUTES)


def family_of(instruction: str) -> str:
    """"box" | "maze" | "jigsaw" | "3d" for an editor instruction; anything else is a configuration error.

    The reference calls exit() in a reward worker thread here (which hangs the other ranks); we raise,
    and check_routable lets the trainer find such rows before training starts.
    """
    if isinstance(instruction, str):
        for needle, family in TASK_ROUTES:
            if needle in instruction:
                return family
    routes = ", ".join(f"{needle!r} -> {family}" for needle, family in TASK_ROUTES)
    raise RewardConfigError(f"instruction {str(instruction)[:120]!r} has no known task prefix; the rewards route "
                            f"by substring: {routes}. Fix the data, or drop such rows (RL/prepare_data.py "
                            "--on_error skip)")


def check_routable(instructions: Sequence[str], show: int = 5) -> None:
    """Raise RewardConfigError listing the first `show` rows (index and text) that family_of rejects."""
    bad = []
    for i, text in enumerate(instructions):
        try:
            family_of(text)
        except RewardConfigError:
            bad.append(i)
    if bad:
        rows = "\n  ".join(f"row {i}: {str(instructions[i])[:120]!r}" for i in bad[:show])
        more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
        routes = ", ".join(repr(needle) for needle, _ in TASK_ROUTES)
        raise RewardConfigError(f"{len(bad)} of {len(instructions)} instructions have no known task prefix "
                                f"(expected one of {routes}):\n  {rows}{more}")


# ----------------------------------------------------------------------------------------------
# Protocol constants (PROTOCOL.md section 2): prompt files and sampling parameters
# ----------------------------------------------------------------------------------------------
GUIDANCE_ANSWER_PROMPT = "reward_guidance_answer_v1"
GUIDANCE_JUDGE_PROMPT = "reward_guidance_judge_v1"
CORRECTNESS_PROMPTS = {"box": "reward_correct_box_v1", "maze": "reward_correct_maze_v1",
                       "jigsaw": "reward_correct_jigsaw_v1", "3d": "reward_correct_3d_v1"}
# top_k is not an OpenAI field: vLLM reads it from the request body (extra_body).
GUIDANCE_ANSWER_SAMPLING = {"max_tokens": 1024, "temperature": 0.7, "top_p": 0.8, "extra_body": {"top_k": 20}}
GUIDANCE_JUDGE_SAMPLING = {"max_tokens": 4, "temperature": 0.0}
CORRECTNESS_SAMPLING = {"max_tokens": 4, "temperature": 0.7}
# The maze prompt speaks of one image; the others of "the first" and "the second" image.
CORRECTNESS_EDITED_ONLY_FAMILIES = frozenset({"maze"})
CORRECTNESS_IMAGE_MODES = ("original_and_edited", "edited_only")
DEFAULT_JIGSAW_PSNR_DB = 20.0


def binary_verdict(reply: Optional[str]) -> Optional[float]:
    """Judge reply -> reward: None if the request failed, 1.0 iff the stripped reply is "1", else 0.0."""
    if reply is None:
        return None
    return 1.0 if reply.strip() == "1" else 0.0


def correctness_images(family: str, mode: str) -> tuple[str, ...]:
    """Which images (in order) the correctness judge sees: ("original", "edited") or ("edited",)."""
    if mode not in CORRECTNESS_IMAGE_MODES:
        raise RewardConfigError(f"reward.correctness_images={mode!r}: use one of {', '.join(CORRECTNESS_IMAGE_MODES)}")
    if mode == "edited_only" or family in CORRECTNESS_EDITED_ONLY_FAMILIES:
        return ("edited",)
    return ("original", "edited")


def reward_option(cfg: Any, key: str, default: Any) -> Any:
    """cfg.reward.<key>, or `default` when cfg, its reward section or the key is absent.

    Works for the OmegaConf config (a missing key raises ConfigAttributeError, an AttributeError),
    the RLConfig dataclass and None (tests, tools).
    """
    section = getattr(cfg, "reward", None) if cfg is not None else None
    if section is None:
        return default
    return getattr(section, key, default)


# ----------------------------------------------------------------------------------------------
# Context shared by the rewards of one compute_rewards call
# ----------------------------------------------------------------------------------------------
class ImageURIs:
    """PNG data URIs, each image encoded once per batch (guidance and correctness send the same images),
    in worker threads so that encoding never stalls the requests in flight."""

    def __init__(self) -> None:
        self._tasks: dict[int, tuple[Image.Image, asyncio.Task]] = {}

    async def get(self, image: Image.Image) -> str:
        key = id(image)
        if key not in self._tasks:  # the image is kept in the dict, so its id cannot be reused meanwhile
            self._tasks[key] = (image, asyncio.ensure_future(asyncio.to_thread(png_data_uri, image)))
        return await self._tasks[key][1]


@dataclass
class RewardContext:
    judge: Optional[JudgeClient]
    cfg: Any
    images: ImageURIs
    extras: dict  # name -> list of per-row diagnostics (logged by the trainer, never optimised)

    def need_judge(self, reward: str) -> JudgeClient:
        if self.judge is None:
            raise RewardConfigError(f"reward {reward!r} needs a judge client, but none was given")
        return self.judge


# ----------------------------------------------------------------------------------------------
# Judge rewards
# ----------------------------------------------------------------------------------------------
def guidance_answer_request(question: str, image_uris: Sequence[str]) -> dict:
    """Round 1 of the guidance reward: messages + sampling for the answer from [original, edited]."""
    text = load_prompt(GUIDANCE_ANSWER_PROMPT).format(question=question)
    return {"messages": user_message(list(image_uris), text), **GUIDANCE_ANSWER_SAMPLING}


_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def strip_control_tokens(text: str) -> str:
    """Remove chat-template control tokens (`<|image_pad|>`, `<|im_end|>`, ...) from a model reply.

    A server that does not skip special tokens when detokenising can return them; pasted into the
    text-only judge prompt, `<|image_pad|>` makes the judge's processor expect an image and fail."""
    return _CONTROL_TOKEN.sub("", text)


def guidance_judge_request(question: str, gt_answer: str, response: str) -> dict:
    """Round 2: the text-only judge comparing the round-1 response with the ground truth."""
    text = load_prompt(GUIDANCE_JUDGE_PROMPT).format(question=question, gt_answer=gt_answer,
                                                     response=strip_control_tokens(response))
    return {"messages": user_message([], text), **GUIDANCE_JUDGE_SAMPLING}


def correctness_request(family: str, question: str, image_uris: Sequence[str]) -> dict:
    """The family's correctness judge request (prompts without {question} ignore it)."""
    text = load_prompt(CORRECTNESS_PROMPTS[family]).format(question=question)
    return {"messages": user_message(list(image_uris), text), **CORRECTNESS_SAMPLING}


class GuidanceReward:
    """Does the edit help the MLLM answer correctly? (two judge rounds per rollout)"""

    name = "guidance"
    needs_judge = True

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        judge = ctx.need_judge(self.name)
        # The protocol's 1024 unless reward.guidance_answer_max_tokens says otherwise (CPU smoke runs: a
        # random model never stops, and 1024 tokens cost half a minute per request there).
        max_tokens = int(reward_option(ctx.cfg, "guidance_answer_max_tokens",
                                       GUIDANCE_ANSWER_SAMPLING["max_tokens"]))
        responses: list[Optional[str]] = [None] * len(inputs)

        async def one(i: int, x: RewardInput) -> Optional[float]:
            uris = [await ctx.images.get(x.original), await ctx.images.get(x.edited)]
            req = guidance_answer_request(x.question, uris)
            req["max_tokens"] = max_tokens
            response = await judge.complete(req.pop("messages"), **req)
            responses[i] = response
            if response is None:
                return None  # no answer, no verdict: no signal
            req = guidance_judge_request(x.question, str(x.answer), response)
            return binary_verdict(await judge.complete(req.pop("messages"), **req))

        rewards = list(await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs))))
        ctx.extras[f"{self.name}/response"] = responses
        return rewards


class CorrectnessReward:
    """Is the edit a correct edit of its task family? (one judge request per rollout)"""

    name = "correctness"
    needs_judge = True

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        judge = ctx.need_judge(self.name)
        mode = reward_option(ctx.cfg, "correctness_images", "original_and_edited")
        families = [family_of(x.instruction) for x in inputs]  # raises before any request is sent
        plans = [correctness_images(f, mode) for f in families]

        async def one(x: RewardInput, family: str, which: tuple[str, ...]) -> Optional[float]:
            uris = [await ctx.images.get(x.original if w == "original" else x.edited) for w in which]
            req = correctness_request(family, x.question, uris)
            return binary_verdict(await judge.complete(req.pop("messages"), **req))

        return list(await asyncio.gather(*(one(x, f, p) for x, f, p in zip(inputs, families, plans))))


# ----------------------------------------------------------------------------------------------
# Rule-based rewards: maze
# ----------------------------------------------------------------------------------------------
WALL_CHARS = frozenset("#HX1")  # '#' maze wall, 'H' FrozenLake hole, 'X' / '1' common alternatives


def maze_grid(meta: dict, where: str = "row") -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """(walls (N, M) bool, start (row, col), goal (row, col)) from a row's meta.

    Meta keys (as written by scripts/procedural/maze.py and copied by RL/prepare_data.py):
      maze_map  list of N strings of M characters ('#' wall, 'H' hole, 'X'/'1' also walls, anything else
                free; 'S' / 'G' mark start and goal), a single newline-joined string, or an N x M list of
                0/1 (1 = wall).
      start, goal  [row, col] counted from the top-left cell; optional when maze_map holds 'S' and 'G'.
    """
    if "maze_map" not in meta:
        raise RewardConfigError(f"{where}: meta has no 'maze_map' (keys: {sorted(meta)}); maze_path needs "
                                "maze_map, start and goal (see etchr_rl.rewards.maze_grid)")
    rows = meta["maze_map"]
    if isinstance(rows, str):
        rows = [r for r in rows.splitlines() if r.strip()]
    cells = [list(r) for r in rows]
    if not cells or any(len(r) != len(cells[0]) for r in cells) or not cells[0]:
        raise RewardConfigError(f"{where}: meta 'maze_map' is not a non-empty rectangular grid")
    walls = np.array([[str(c) in WALL_CHARS or c is True for c in r] for r in cells], dtype=bool)

    def find(ch: str) -> Optional[tuple[int, int]]:
        hits = [(i, j) for i, r in enumerate(cells) for j, c in enumerate(r) if c == ch]
        return hits[0] if hits else None

    ends = []
    for key, ch in (("start", "S"), ("goal", "G")):
        value = meta.get(key)
        try:
            pos = tuple(int(v) for v in value) if value is not None else find(ch)
        except (TypeError, ValueError):
            pos = ()
        if pos is None or len(pos) != 2:
            raise RewardConfigError(f"{where}: no maze {key}: give meta '{key}' as [row, col] or mark it '{ch}' "
                                    "in maze_map")
        if not (0 <= pos[0] < walls.shape[0] and 0 <= pos[1] < walls.shape[1]):
            raise RewardConfigError(f"{where}: meta '{key}' {list(pos)} lies outside the "
                                    f"{walls.shape[0]}x{walls.shape[1]} maze")
        ends.append(pos)
    return walls, ends[0], ends[1]


def is_blue(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) bool: a path-blue (0,0,255)-ish colour, tolerant of the shading an editor
    produces, but not of the grey grid lines, green start, red goal, black walls or white cells."""
    rgb = rgb.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return (b >= 128) & (b - r >= 80) & (b - g >= 80)


def cell_colours(image: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """(N, M, 3) median colour of the central half of each cell, the maze filling the whole image.

    The geometry comes from the image size, so the edit may come back at any resolution; the central
    patch keeps the grid lines and anti-aliased borders out of the vote.
    """
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    n, m = shape
    out = np.zeros((n, m, 3), dtype=np.uint8)
    for i in range(n):
        y0, y1 = (i + 0.25) * h / n, (i + 0.75) * h / n
        for j in range(m):
            x0, x1 = (j + 0.25) * w / m, (j + 0.75) * w / m
            patch = arr[int(y0):max(int(y0) + 1, int(math.ceil(y1))), int(x0):max(int(x0) + 1, int(math.ceil(x1)))]
            out[i, j] = np.median(patch.reshape(-1, 3), axis=0)
    return out


def maze_path_check(edited: Image.Image, meta: dict, where: str = "row") -> dict:
    """Read the blue path from an edited maze and judge it exactly.

    Valid iff (1) no blue cell is a wall, (2) start and goal are joined by 4-neighbour steps through
    blue cells (a diagonal step or a gap breaks the chain), (3) every blue cell belongs to that chain
    (no stray blue). Start and goal count as path cells whatever their colour (they keep green / red).
    Returns {"valid", "blue_cells", "blue_on_wall", "connected", "stray_blue"}.
    """
    walls, start, goal = maze_grid(meta, where)
    blue = is_blue(cell_colours(edited, walls.shape))
    on_path = blue.copy()
    on_path[start] = on_path[goal] = True
    blue_on_wall = int((blue & walls).sum())
    # Flood fill from start through path cells; walls are judged separately (blue_on_wall), so each
    # diagnostic says one thing.
    seen = np.zeros_like(on_path)
    stack = [start]
    seen[start] = True
    while stack:
        r, c = stack.pop()
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < walls.shape[0] and 0 <= cc < walls.shape[1] and on_path[rr, cc] and not seen[rr, cc]:
                seen[rr, cc] = True
                stack.append((rr, cc))
    connected = bool(seen[goal])
    stray = int((on_path & ~seen).sum())
    return {"valid": blue_on_wall == 0 and connected and stray == 0, "blue_cells": int(blue.sum()),
            "blue_on_wall": blue_on_wall, "connected": connected, "stray_blue": stray}


def shortest_path_cells(walls: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> Optional[set]:
    """Cells strictly between start and goal on the shortest 4-neighbour path, or None when the goal is
    unreachable or more than one shortest path exists (then no single path is "the" answer).

    walls: (N, M) bool. BFS from start counting shortest paths (capped at 2), then a walk back from the goal.
    """
    n, m = walls.shape
    dist = np.full((n, m), -1, dtype=np.int64)
    count = np.zeros((n, m), dtype=np.int64)
    dist[start], count[start] = 0, 1
    queue = [start]
    for r, c in queue:  # the list grows while it is read: a FIFO queue
        for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            rr, cc = r + dr, c + dc
            if not (0 <= rr < n and 0 <= cc < m) or walls[rr, cc]:
                continue
            if dist[rr, cc] < 0:
                dist[rr, cc] = dist[r, c] + 1
                queue.append((rr, cc))
            if dist[rr, cc] == dist[r, c] + 1:
                count[rr, cc] = min(2, count[rr, cc] + count[r, c])
    if dist[goal] < 0 or count[goal] != 1:
        return None
    cells, (r, c) = set(), goal
    while dist[r, c] > 1:
        r, c = next((r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
                    if 0 <= r + dr < n and 0 <= c + dc < m and dist[r + dr, c + dc] == dist[r, c] - 1)
        cells.add((r, c))
    return cells


def maze_path_iou(edited: Image.Image, meta: dict, where: str = "row") -> Optional[float]:
    """|blue & path| / |blue | path| over the cells other than start and goal, where path = the unique
    shortest path's cells (shortest_path_cells) and blue = the cells whose centre is path-blue (cell_colours,
    is_blue). 1.0 iff exactly the path is blue; None when the maze has no unique shortest path."""
    walls, start, goal = maze_grid(meta, where)
    path = shortest_path_cells(walls, start, goal)
    if path is None:
        return None
    blue = is_blue(cell_colours(edited, walls.shape))
    blue[start] = blue[goal] = False  # they keep green / red; never part of the comparison
    truth = np.zeros_like(blue)
    for cell in path:
        truth[cell] = True
    union = int((blue | truth).sum())
    return 1.0 if union == 0 else int((blue & truth).sum()) / union


class MazePathReward:
    """1.0 iff the edit draws a valid blue path (maze_path_check); None for rows of other families."""

    name = "maze_path"
    needs_judge = False

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        def run() -> tuple[list[Optional[float]], list[Optional[int]]]:
            rewards: list[Optional[float]] = []
            blue: list[Optional[int]] = []
            for i, x in enumerate(inputs):
                if family_of(x.instruction) != "maze":
                    rewards.append(None)  # not applicable: no signal for this row
                    blue.append(None)
                    continue
                res = maze_path_check(x.edited, x.meta, where=f"batch row {i} ({x.instruction[:60]!r})")
                rewards.append(1.0 if res["valid"] else 0.0)
                blue.append(res["blue_cells"])
            return rewards, blue

        rewards, blue = await asyncio.to_thread(run)
        ctx.extras[f"{self.name}/blue_cells"] = blue
        return rewards


class MazePathIoUReward:
    """maze_path_iou of the edit (None for rows of other families, or mazes without a unique shortest path)."""

    name = "maze_path_iou"
    needs_judge = False

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        def run() -> list[Optional[float]]:
            return [maze_path_iou(x.edited, x.meta, where=f"batch row {i} ({x.instruction[:60]!r})")
                    if family_of(x.instruction) == "maze" else None for i, x in enumerate(inputs)]

        values = await asyncio.to_thread(run)
        ctx.extras[f"{self.name}/exact"] = [None if v is None else v == 1.0 for v in values]
        return values


# ----------------------------------------------------------------------------------------------
# Rule-based rewards: jigsaw
# ----------------------------------------------------------------------------------------------
PSNR_CAP_DB = 100.0  # identical images have infinite PSNR; a finite cap keeps metrics JSON-clean


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB of two RGB images of the same size (8-bit peak 255), capped at PSNR_CAP_DB."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"psnr: image sizes differ ({a.size} vs {b.size})")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, 10.0 * math.log10(255.0 ** 2 / mse))


def target_and_edit(edited: Image.Image, meta: dict, where: str = "row") -> Optional[tuple[Image.Image, Image.Image]]:
    """(target, edit resized to the target's size), both RGB, from meta['target_image'] (a path, loaded by the
    image rule, or a PIL image); None when the row has no target image."""
    from .images import open_rgb8  # the image rule (16-bit, alpha, EXIF, ...); ImageError names the file

    target = meta.get("target_image")
    if target is None:
        return None
    if not isinstance(target, Image.Image):
        path = Path(target)
        if not path.is_file():
            raise RewardConfigError(f"{where}: meta 'target_image' {str(path)!r} does not exist")
        target = open_rgb8(path, f"{where} meta 'target_image' {path}")
    target = target.convert("RGB")
    edit = edited.convert("RGB")
    if edit.size != target.size:
        edit = edit.resize(target.size, Image.BICUBIC)
    return target, edit


def jigsaw_psnr(edited: Image.Image, meta: dict, where: str = "row") -> float:
    """PSNR of the edit, resized to the target's size, against meta['target_image'] (a path or a PIL image)."""
    pair = target_and_edit(edited, meta, where)
    if pair is None:
        raise RewardConfigError(f"{where}: meta has no 'target_image' (keys: {sorted(meta)}); jigsaw_restore needs "
                                "the restored original (RL/prepare_data.py writes it when the parquet has a "
                                "target column)")
    return psnr(pair[1], pair[0])


def target_similarity(edited: Image.Image, meta: dict, where: str = "row") -> Optional[float]:
    """-mean((edit - target)^2) over all pixels and channels, both scaled to [0, 1] (the edit resized to the
    target's size, bicubic): 0 for an exact edit, -1 at worst (e.g. black vs white). None without a target.

    (Equivalently PSNR = -10 log10(-reward); the MSE is used because it stays smooth and bounded near a
    perfect edit, where PSNR grows without bound.)"""
    pair = target_and_edit(edited, meta, where)
    if pair is None:
        return None
    target = np.asarray(pair[0], dtype=np.float64) / 255.0
    edit = np.asarray(pair[1], dtype=np.float64) / 255.0
    return -float(np.mean((edit - target) ** 2))


class JigsawRestoreReward:
    """1.0 iff PSNR(edit, target) >= reward.jigsaw_psnr_db; raw PSNR in extras; None for other families."""

    name = "jigsaw_restore"
    needs_judge = False

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        threshold = float(reward_option(ctx.cfg, "jigsaw_psnr_db", DEFAULT_JIGSAW_PSNR_DB))

        def run() -> tuple[list[Optional[float]], list[Optional[float]]]:
            rewards: list[Optional[float]] = []
            values: list[Optional[float]] = []
            for i, x in enumerate(inputs):
                if family_of(x.instruction) != "jigsaw":
                    rewards.append(None)
                    values.append(None)
                    continue
                value = jigsaw_psnr(x.edited, x.meta, where=f"batch row {i} ({x.instruction[:60]!r})")
                values.append(value)
                rewards.append(1.0 if value >= threshold else 0.0)
            return rewards, values

        rewards, values = await asyncio.to_thread(run)
        ctx.extras[f"{self.name}/psnr"] = values
        return rewards


class TargetSimilarityReward:
    """target_similarity of the edit (any task family); None for rows without a target image."""

    name = "target_similarity"
    needs_judge = False

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        def run() -> list[Optional[float]]:
            return [target_similarity(x.edited, x.meta, where=f"batch row {i} ({x.instruction[:60]!r})")
                    for i, x in enumerate(inputs)]

        return await asyncio.to_thread(run)


# ----------------------------------------------------------------------------------------------
# Registry and the trainer's entry points
# ----------------------------------------------------------------------------------------------
REWARDS: dict[str, Any] = {r.name: r for r in (GuidanceReward(), CorrectnessReward(), MazePathReward(),
                                               MazePathIoUReward(), JigsawRestoreReward(),
                                               TargetSimilarityReward())}
BUILTIN_REWARDS = frozenset(REWARDS)


def register_reward(reward: Any) -> None:
    """Add a reward object (attributes `name`, `needs_judge`, async `score(inputs, ctx)`)."""
    if reward.name in REWARDS:
        raise RewardConfigError(f"reward {reward.name!r} is already registered")
    REWARDS[reward.name] = reward


# ----------------------------------------------------------------------------------------------
# Plugins: custom rewards named in reward.plugins (RL.md "Custom rewards")
# ----------------------------------------------------------------------------------------------
class PluginReward:
    """A reward loaded from reward.plugins, with the built-ins' interface (`name`, `needs_judge`, async
    `score`). It runs the plugin's callable (a sync one in a worker thread, so the judge loop keeps going) and
    checks what comes back: one float or None per input, finite. Errors name the plugin entry."""

    def __init__(self, spec: str, fn: Any, name: str, needs_judge: bool, takes_ctx: bool):
        self.spec, self.fn, self.name, self.needs_judge, self.takes_ctx = spec, fn, name, needs_judge, takes_ctx

    async def score(self, inputs: Sequence[RewardInput], ctx: RewardContext) -> list[Optional[float]]:
        import inspect

        args = (list(inputs), ctx) if self.takes_ctx else (list(inputs),)
        if inspect.iscoroutinefunction(self.fn):
            values = await self.fn(*args)
        else:
            values = await asyncio.to_thread(self.fn, *args)
        return self.check(values, len(inputs))

    def check(self, values: Any, n: int) -> list[Optional[float]]:
        where = f"reward plugin {self.spec!r} (reward {self.name!r})"
        if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise RewardConfigError(f"{where} returned {type(values).__name__}; it must return a list of "
                                    f"{n} values (float, or None for no signal), one per input")
        if len(values) != n:
            raise RewardConfigError(f"{where} returned {len(values)} values for {n} inputs; it must return one "
                                    "value (float, or None for no signal) per input")
        out: list[Optional[float]] = []
        for i, v in enumerate(values):
            if v is not None:
                try:
                    if isinstance(v, (str, bytes)):  # "1" would convert: a contract slip, not a number
                        raise TypeError
                    v = float(v)
                except (TypeError, ValueError):
                    raise RewardConfigError(f"{where}: value {i} is {v!r}; use a float, or None for no "
                                            "signal") from None
                if not math.isfinite(v):
                    raise RewardConfigError(f"{where}: value {i} is {v}; return None (no signal) instead of "
                                            "NaN / inf")
            out.append(v)
        return out


def _plugin_target(spec: str) -> Any:
    """The object named by "module.sub:attr" (imported from sys.path) or "path/to/file.py:attr" (relative to
    the working directory)."""
    import importlib
    import importlib.util
    import hashlib

    left, sep, attr = spec.rpartition(":")
    if not sep or not left or not attr.isidentifier():
        raise RewardConfigError(f"reward.plugins entry {spec!r}: write it as module:function or "
                                "path/to/file.py:function")
    try:
        if left.endswith(".py") or "/" in left or "\\" in left:
            path = Path(left).resolve()
            if not path.is_file():
                raise RewardConfigError(f"reward.plugins entry {spec!r}: file {str(path)!r} does not exist")
            # a unique module name per file, so two plugin files called rewards.py do not collide
            mod_name = f"etchr_rl_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            mod_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(left)
    except RewardConfigError:
        raise
    except BaseException as exc:  # SystemExit / SyntaxError in a plugin are its errors, reported as such
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RewardConfigError(f"reward.plugins entry {spec!r}: importing {left!r} failed: "
                                f"{type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:20]
        raise RewardConfigError(f"reward.plugins entry {spec!r}: {left!r} has no attribute {attr!r} "
                                f"(it has: {', '.join(public)})")
    return getattr(module, attr)


def _accepts(fn: Any, n: int) -> bool:
    import inspect

    try:
        inspect.signature(fn).bind(*([None] * n))
        return True
    except TypeError:
        return False
    except ValueError:  # no signature (some builtins): let the call decide
        return n == 1


def make_plugin_reward(spec: str, target: Any) -> PluginReward:
    """Wrap what a reward.plugins entry names. Accepted (RL.md "Custom rewards"):
      - a function f(inputs) or f(inputs, ctx), sync or async, returning one float | None per input; the reward
        is named f.reward_name if set, else f.__name__; f.needs_judge (default False) marks judge use;
      - a reward object with `name`, optional `needs_judge` (default False) and async score(inputs, ctx);
      - a class of such objects, instantiated without arguments.
    `inputs` is a list of RewardInput, `ctx` a RewardContext (ctx.judge, ctx.cfg, ctx.extras)."""
    import inspect

    where = f"reward.plugins entry {spec!r}"
    if inspect.isclass(target):
        try:
            target = target()
        except Exception as exc:
            raise RewardConfigError(f"{where}: the class could not be instantiated without arguments: "
                                    f"{type(exc).__name__}: {exc}") from exc
    if hasattr(target, "score"):
        name = getattr(target, "name", None)
        if not inspect.iscoroutinefunction(target.score) or not _accepts(target.score, 2):
            raise RewardConfigError(f"{where}: a reward object needs an async method score(inputs, ctx)")
        fn, takes_ctx = target.score, True
    elif callable(target):
        name = getattr(target, "reward_name", None) or getattr(target, "__name__", None)
        if _accepts(target, 1):
            takes_ctx = False
        elif _accepts(target, 2):
            takes_ctx = True
        else:
            raise RewardConfigError(f"{where}: {name} takes neither (inputs) nor (inputs, ctx); a reward function "
                                    "is f(inputs: list[RewardInput]) -> list[float | None]")
        fn = target
    else:
        raise RewardConfigError(f"{where} names a {type(target).__name__}, not a function, a reward object or a "
                                "class")
    if not isinstance(name, str) or not name.isidentifier():
        raise RewardConfigError(f"{where}: reward name {name!r} must be an identifier (it is the key in "
                                "reward.weights and metrics.jsonl)")
    return PluginReward(spec, fn, name, bool(getattr(target, "needs_judge", False)), takes_ctx)


def load_plugins(specs: Sequence[str]) -> list[PluginReward]:
    """Import every reward.plugins entry, wrap it (make_plugin_reward) and register it under its name.

    A name of a built-in reward, or one that two entries share, is an error. Loading the same entries again
    in one process (tests) replaces the earlier registration."""
    plugins: list[PluginReward] = []
    for spec in specs:
        plugin = make_plugin_reward(str(spec), _plugin_target(str(spec)))
        if plugin.name in BUILTIN_REWARDS:
            raise RewardConfigError(f"reward.plugins entry {spec!r}: the name {plugin.name!r} is a built-in reward; "
                                    "give the plugin another name (a function's reward_name attribute)")
        clash = next((p for p in plugins if p.name == plugin.name), None)
        if clash is not None:
            raise RewardConfigError(f"reward.plugins entries {clash.spec!r} and {spec!r} both define reward "
                                    f"{plugin.name!r}")
        REWARDS[plugin.name] = plugin
        plugins.append(plugin)
    return plugins


def probe_plugins(plugins: Sequence[PluginReward], inputs: list[RewardInput], cfg: Any) -> None:
    """Call each judge-free plugin once on `inputs` (the trainer passes copies of the first prompt with its
    source image as the edit), before any GPU work: a plugin that raises or returns the wrong number or kind
    of values stops the run here with its name. Plugins that use the judge are checked on their first step."""
    for p in plugins:
        if p.needs_judge:
            continue
        ctx = RewardContext(judge=None, cfg=cfg, images=ImageURIs(), extras={})
        try:
            asyncio.run(p.score(inputs, ctx))
        except RewardConfigError:
            raise
        except Exception as exc:
            raise RewardConfigError(f"reward plugin {p.spec!r} (reward {p.name!r}) failed on a probe batch of "
                                    f"{len(inputs)} inputs: {type(exc).__name__}: {exc}") from exc


def get_reward(name: str) -> Any:
    """The registered reward `name`; an unknown name lists the valid ones."""
    if name not in REWARDS:
        raise RewardConfigError(f"unknown reward {name!r} (check reward.weights); valid rewards: "
                                f"{', '.join(sorted(REWARDS))}")
    return REWARDS[name]


async def compute_rewards(inputs: list[RewardInput], names: list[str], judge: Optional[JudgeClient], cfg: Any,
                          *, extras: Optional[dict] = None) -> Rewards:
    """name -> one reward per input (float, or None for no signal), all requests of the batch concurrent.

    `cfg` is the RL config (reads reward.correctness_images and reward.jigsaw_psnr_db; None = defaults).
    `judge` may be None when only rule-based rewards are asked for. If `extras` is a dict it receives
    per-row diagnostics ("guidance/response", "jigsaw_restore/psnr", ...) for logging.
    Configuration errors (unknown name, unroutable instruction, missing meta) raise RewardConfigError.
    """
    if len(set(names)) != len(names):
        raise RewardConfigError(f"reward names repeat: {list(names)}")
    rewards = [get_reward(n) for n in names]
    ctx = RewardContext(judge=judge, cfg=cfg, images=ImageURIs(), extras=extras if extras is not None else {})
    for r in rewards:
        if r.needs_judge:
            ctx.need_judge(r.name)
    scored = await asyncio.gather(*(r.score(inputs, ctx) for r in rewards))
    out: Rewards = {}
    for name, values in zip(names, scored):
        if len(values) != len(inputs):  # a registered reward that breaks the contract is a bug, loudly
            raise RuntimeError(f"reward {name!r} returned {len(values)} values for {len(inputs)} inputs")
        out[name] = [None if v is None else float(v) for v in values]
    return out


def compute_rewards_sync(inputs: list[RewardInput], names: list[str], judge: Optional[JudgeClient], cfg: Any,
                         *, extras: Optional[dict] = None) -> Rewards:
    """compute_rewards from synchronous code (one event loop per call; the judge rebinds to it)."""

    async def run() -> Rewards:
        try:
            return await compute_rewards(inputs, names, judge, cfg, extras=extras)
        finally:
            if judge is not None:
                await judge.aclose()

    return asyncio.run(run())


def _judge_backed(name: str) -> bool:
    # Unregistered names count as judge-backed: better to over-count failures than to hide them.
    return getattr(REWARDS.get(name), "needs_judge", True)


def failure_rate(rewards: Rewards) -> float:
    """Fraction of None among the judge-backed rewards' values (0.0 when there are none).

    Rule-based rewards are left out: their None means "not this row's task family", not a failure.
    """
    values = [v for name, vals in rewards.items() if _judge_backed(name) for v in vals]
    if not values:
        return 0.0
    return sum(v is None for v in values) / len(values)


def check_failures(rewards: Rewards, max_failure_rate: float, judge: Optional[JudgeClient] = None) -> float:
    """Return the failure rate; raise RewardFailure when it exceeds `max_failure_rate` (judge.max_failure_rate).

    With `judge`, the message carries its most recent errors, which usually name the cause.
    """
    rate = failure_rate(rewards)
    if rate > max_failure_rate:
        counts = ", ".join(f"{n}: {sum(v is None for v in vals)}/{len(vals)}" for n, vals in rewards.items()
                           if _judge_backed(n))
        recent = ""
        if judge is not None and judge.errors:
            recent = "\nrecent judge errors:\n  " + "\n  ".join(list(judge.errors)[-5:])
        raise RewardFailure(f"judge failed on {rate:.1%} of rewards ({counts}), above judge.max_failure_rate="
                            f"{max_failure_rate:g}; check the judge servers (judge.endpoints) or raise "
                            f"judge.timeout_s / judge.max_retries{recent}")
    return rate


__all__ = ["RewardInput", "RewardConfigError", "RewardFailure", "TASK_ROUTES", "FAMILIES", "family_of",
           "check_routable", "compute_rewards", "compute_rewards_sync", "failure_rate", "check_failures",
           "get_reward", "register_reward", "REWARDS", "maze_path_check", "maze_path_iou", "shortest_path_cells",
           "jigsaw_psnr", "psnr", "target_similarity", "load_plugins", "probe_plugins", "make_plugin_reward",
           "binary_verdict", "correctness_images"]
