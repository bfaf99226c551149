"""The GRPO prompt list: RL/prepare_data.py's JSONL (DATA.md section 1.2) -> Prompt records.

One JSON object per line:
    {"id": 17, "instruction": "<prefix + question>", "source_image": "images/17_input.jpg",
     "target_image": "images/17_output.jpg", "qa_list": [{"question": "...", "answer": "1-2-0"}], ...extras}
- instruction key lookup order: instruction, prompt, caption, text (the reference's order);
- image key: source_image, else image; `target_image` is optional;
- relative paths resolve against `root` (default: the JSONL's folder), falling back to <root>/images/<path>;
- qa_list: a list of {"question", "answer"} dicts; the first one is used (the reference's qa_num 1);
- every other key (maze_map, start, goal, layout, ...) goes into Prompt.meta, which is what the rewards
  receive as RewardInput.meta; meta also carries "target_image" (absolute path) when the row has one.
Errors name the file and the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

INSTRUCTION_KEYS = ("instruction", "prompt", "caption", "text")
IMAGE_KEYS = ("source_image", "image")
# Keys that become Prompt fields; everything else is meta.
CORE_KEYS = frozenset({"id", "qa_list", "target_image", *INSTRUCTION_KEYS, *IMAGE_KEYS})


class DataError(ValueError):
    """Bad input data; the message names the file and line (or row) and the key."""


@dataclass
class Prompt:
    id: str  # the row's "id" (as a string), or its 0-based line index when the row has none
    instruction: str  # task prefix + question: the editor's prompt
    question: str  # qa_list[0]["question"]
    answer: str  # qa_list[0]["answer"] (ground truth, for the guidance reward)
    source_image: str  # absolute path of the image to edit
    target_image: Optional[str] = None  # absolute path of the ground-truth edit, if the row has one
    meta: dict = field(default_factory=dict)  # the row's other keys (+ target_image): RewardInput.meta


def resolve_image(value: Any, root: Path, where: str) -> str:
    """A row's image path -> an existing absolute path: as given (absolute, or relative to root), else
    <root>/images/<path> (the reference's fallback)."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: image path must be a non-empty string, got {value!r}")
    path = Path(value)
    candidates = [path] if path.is_absolute() else [root / path, root / "images" / path]
    for c in candidates:
        if c.is_file():
            return str(c.resolve())
    raise DataError(f"{where}: image {value!r} not found (looked at {', '.join(str(c) for c in candidates)})")


def first_qa(qa_list: Any, where: str) -> tuple[str, str]:
    """(question, answer) of the first QA dict; the key must be a non-empty list of dicts."""
    if not isinstance(qa_list, list) or not qa_list:
        raise DataError(f"{where}: 'qa_list' must be a non-empty list of {{question, answer}} dicts, got "
                        f"{str(qa_list)[:80]!r} (RL/prepare_data.py writes it)")
    qa = qa_list[0]
    if not isinstance(qa, dict):
        raise DataError(f"{where}: qa_list[0] is a {type(qa).__name__}, not a dict (run RL/prepare_data.py, which "
                        "parses the parquet's Python-literal strings)")
    missing = [k for k in ("question", "answer") if qa.get(k) is None]
    if missing:
        raise DataError(f"{where}: qa_list[0] has no {' / '.join(missing)} (keys: {sorted(qa)})")
    return str(qa["question"]), str(qa["answer"])


def parse_row(row: Any, index: int, root: Path, where: str) -> Prompt:
    """One JSONL object -> Prompt (see the module docstring for the keys)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    instruction = next((row[k] for k in INSTRUCTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if instruction is None:
        raise DataError(f"{where}: no instruction (looked for {', '.join(INSTRUCTION_KEYS)}; keys: {sorted(row)})")
    image_key = next((k for k in IMAGE_KEYS if row.get(k) is not None), None)
    if image_key is None:
        raise DataError(f"{where}: no source image (looked for {', '.join(IMAGE_KEYS)}; keys: {sorted(row)})")
    source = resolve_image(row[image_key], root, f"{where} key '{image_key}'")
    target = None
    if row.get("target_image") is not None:
        target = resolve_image(row["target_image"], root, f"{where} key 'target_image'")
    question, answer = first_qa(row.get("qa_list"), where)
    meta = {k: v for k, v in row.items() if k not in CORE_KEYS}
    if target is not None:
        meta["target_image"] = target
    pid = row.get("id", index)
    return Prompt(id=str(pid), instruction=instruction, question=question, answer=answer, source_image=source,
                  target_image=target, meta=meta)


def read_jsonl(path: str | os.PathLike, root: str | os.PathLike = "") -> list[Prompt]:
    """All prompts of a GRPO JSONL; `root` = folder for relative image paths ("" = the JSONL's folder).

    Blank lines are skipped; a bad line raises DataError naming `path:line`; ids must be unique.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"GRPO JSONL not found: {path} (write it with RL/prepare_data.py)")
    base = Path(root) if str(root) else path.parent
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            prompt = parse_row(row, len(prompts), base, where)
            if prompt.id in seen:
                raise DataError(f"{where}: id {prompt.id!r} already used on line {seen[prompt.id]}")
            seen[prompt.id] = lineno
            prompts.append(prompt)
    if not prompts:
        raise DataError(f"{path}: no rows")
    return prompts
