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


VERIFY_RULES = ("trimmed", "reference")


def verify_verdict(text: str | None, rule: str = "trimmed") -> bool:
    """Accept the edit iff the last \\boxed{} holds "1"; anything else (no box, "0", "1.") rejects.

    rule "trimmed" (ours, the default): spaces around the 1 are ignored, so `\\boxed{ 1 }` accepts.
    rule "reference": the box content must be exactly "1", as the ETCHR reference compares it, so
    `\\boxed{ 1 }` rejects (EvalConfig.scoring.verify_rule).
    """
    if rule not in VERIFY_RULES:
        raise ValueError(f"verify rule {rule!r}: use one of {', '.join(VERIFY_RULES)}")
    verdict = last_boxed(text)
    if verdict is None:
        return False
    return (verdict.strip() if rule == "trimmed" else verdict) == "1"
