"""Protocol prompts are byte-identical to the project's canonical copy, protocol/prompts/ (and, in a team
checkout that has the team's reference prompts in a sibling folder, to that copy too)."""

from pathlib import Path

import pytest

from etchr_eval.prompts import load_prompt

HERE = Path(__file__).resolve().parent
# This tree's files by their place on disk (not the installed package): a plain clone tests its own copies.
PROMPT_DIR = HERE.parent / "etchr_eval" / "prompts"
CANONICAL = HERE.parents[1] / "protocol" / "prompts"
SHARED = HERE.parents[2] / "shared" / "protocol" / "prompts"  # optional: only beside the team checkout


def test_protocol_prompt_copies_are_byte_identical():
    ours = sorted(PROMPT_DIR.glob("*.txt"))
    assert len(ours) >= 11, PROMPT_DIR
    for p in ours:
        canonical = CANONICAL / p.name
        assert canonical.is_file(), f"{p.name}: not in protocol/prompts/ (every package prompt has a canonical copy)"
        assert p.read_bytes() == canonical.read_bytes(), p.name
    if SHARED.is_dir():  # the canonical copy itself against the team's source, where it exists
        shared = sorted(SHARED.glob("*.txt"))
        assert len(shared) >= 7
        for s in shared:
            assert (CANONICAL / s.name).read_bytes() == s.read_bytes(), s.name


def test_known_texts_and_errors():
    assert load_prompt("edit_prefix_3d_v1") == ("Imagine a new perspective of the original image that helps answer the "
                                                "question. ")
    assert load_prompt("verify_dl3dv_v1").endswith("\\boxed{0} or \\boxed{1}.")
    with pytest.raises(KeyError, match="known: .*verify_dl3dv_v1"):
        load_prompt("verify_dl3dv_v9")
