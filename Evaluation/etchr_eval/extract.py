"""Answer extraction: the last \\boxed{...} with balanced braces (PROTOCOL.md section 3)."""

from __future__ import annotations

BOXED = "\\boxed{"


def last_boxed(text: str | None) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, braces balanced; None if absent or unterminated.

    >>> last_boxed("a \\\\boxed{1} then \\\\boxed{\\\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    if not text:
        return None
    start = text.rfind(BOXED)
    if start < 0:
        return None
    i = start + len(BOXED)
    depth = 1
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unterminated: the reference raises and returns None too


def verify_verdict(text: str | None) -> bool:
    """Accept the edit iff the last \\boxed{} holds "1" (surrounding spaces ignored); anything else rejects."""
    verdict = last_boxed(text)
    return verdict is not None and verdict.strip() == "1"
