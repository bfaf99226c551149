"""Protocol prompts as versioned data files (etchr_eval/prompts/<name>_v<N>.txt), byte-identical to
the project's canonical protocol/prompts/ (a test checks). Results record the file names, i.e. the versions."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"


@lru_cache(maxsize=None)
def load_prompt(name: str) -> str:
    """`name` is the file stem with its version, e.g. "verify_dl3dv_v1"."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))
        raise KeyError(f"unknown prompt {name!r}; known: {', '.join(known)}")
    return path.read_bytes().decode("utf-8")


def prompt_versions() -> dict[str, str]:
    """name -> sha256 of every prompt file (recorded with results)."""
    import hashlib

    return {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(PROMPT_DIR.glob("*.txt"))}
