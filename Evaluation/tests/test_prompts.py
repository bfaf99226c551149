"""Protocol prompts are byte-identical to ../shared/protocol/prompts (the source of truth)."""

from pathlib import Path

import pytest

from etchr_eval.prompts import PROMPT_DIR, load_prompt

SHARED = Path(__file__).resolve().parents[3] / "shared" / "protocol" / "prompts"


def test_protocol_prompt_copies_are_byte_identical():
    if not SHARED.is_dir():
        pytest.skip("../shared/protocol/prompts is not beside this checkout")
    ours = sorted(PROMPT_DIR.glob("*.txt"))
    shared_names = {p.name for p in SHARED.glob("*.txt")}
    checked = 0
    for p in ours:
        if p.name in shared_names:
            assert p.read_bytes() == (SHARED / p.name).read_bytes(), p.name
            checked += 1
    assert checked >= 7


def test_known_texts_and_errors():
    assert load_prompt("edit_prefix_3d_v1") == ("Imagine a new perspective of the original image that helps answer the "
                                                "question. ")
    assert load_prompt("verify_dl3dv_v1").endswith("\\boxed{0} or \\boxed{1}.")
    with pytest.raises(KeyError, match="known: .*verify_dl3dv_v1"):
        load_prompt("verify_dl3dv_v9")
