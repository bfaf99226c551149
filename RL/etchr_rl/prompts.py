"""Reward prompts as versioned data files (etchr_rl/prompts/<name>_v<N>.txt).

They are byte-identical copies of the project's canonical protocol/prompts/ (a test checks): the rewards are
comparable with the paper only while these texts stay exactly as the reference wrote them, leading and
trailing newlines included. Placeholders are `str.format` fields ({question}, {gt_answer}, {response}).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"


def known_prompts() -> list[str]:
    """The names (file stems, version included) of every prompt shipped with this tree."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))


@lru_cache(maxsize=None)
def load_prompt(name: str) -> str:
    """The exact text of prompt `name`, e.g. "reward_guidance_answer_v1" (the file stem).

    Read as bytes and decoded, so no newline translation can alter the protocol text.
    """
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise KeyError(f"unknown prompt {name!r}; known prompts: {', '.join(known_prompts())} "
                       f"(files in {PROMPT_DIR})")
    return path.read_bytes().decode("utf-8")


def prompt_versions() -> dict[str, str]:
    """name -> first 16 hex digits of the file's sha256 (recorded with runs, so a changed text shows)."""
    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(PROMPT_DIR.glob("*.txt"))}
