"""Reward prompts are byte-identical to the project's canonical copy, protocol/prompts/ (and, in a team
checkout that has the team's reference prompts in a sibling folder, to that copy too), and load by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from etchr_rl.prompts import known_prompts, load_prompt, prompt_versions

HERE = Path(__file__).resolve().parent
# This tree's files by their place on disk (not the installed package): a plain clone tests its own copies.
PROMPT_DIR = HERE.parent / "etchr_rl" / "prompts"
CANONICAL = HERE.parents[1] / "protocol" / "prompts"
SHARED = HERE.parents[2] / "shared" / "protocol" / "prompts"  # optional: only beside the team checkout
OURS = ["reward_guidance_answer_v1", "reward_guidance_judge_v1", "reward_correct_box_v1", "reward_correct_maze_v1",
        "reward_correct_jigsaw_v1", "reward_correct_3d_v1"]


def test_the_reward_prompts_are_all_here():
    assert known_prompts() == sorted(OURS)


def test_protocol_prompt_copies_are_byte_identical():
    assert sorted(p.stem for p in PROMPT_DIR.glob("*.txt")) == sorted(OURS), PROMPT_DIR
    for name in OURS:
        assert (PROMPT_DIR / f"{name}.txt").read_bytes() == (CANONICAL / f"{name}.txt").read_bytes(), name
        if SHARED.is_dir():  # the canonical copy against the team's source, where it exists
            assert (CANONICAL / f"{name}.txt").read_bytes() == (SHARED / f"{name}.txt").read_bytes(), name


def test_known_texts_placeholders_and_errors():
    # Leading newline and trailing newline are part of the protocol text.
    assert load_prompt("reward_correct_maze_v1").startswith("\nPlease determine whether the following image")
    assert load_prompt("reward_correct_box_v1").endswith('Only output "1" or "0", nothing else.\n')
    assert load_prompt("reward_guidance_judge_v1").endswith("Model's Response: {response}\nYour Output: ")
    assert "{question}" in load_prompt("reward_guidance_answer_v1")
    # Only box and 3d ask about the question; jigsaw and maze have no placeholder at all.
    for name, fields in [("reward_correct_box_v1", 1), ("reward_correct_3d_v1", 1), ("reward_correct_jigsaw_v1", 0),
                         ("reward_correct_maze_v1", 0), ("reward_guidance_judge_v1", 3)]:
        text = load_prompt(name)
        assert text.count("{") == fields, name
        assert text.format(question="Q", gt_answer="A", response="R").count("{") == 0
    with pytest.raises(KeyError, match="known prompts: .*reward_guidance_judge_v1"):
        load_prompt("reward_guidance_judge_v9")


def test_versions_are_content_hashes():
    v = prompt_versions()
    assert sorted(v) == sorted(OURS) and all(len(h) == 16 for h in v.values())
    assert len(set(v.values())) == len(OURS)
