"""Task routing, the reward registry, and the failure policy (pure functions, no network)."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from etchr_rl.prompts import load_prompt
from etchr_rl.rewards import (REWARDS, RewardConfigError, RewardFailure, RewardInput, binary_verdict, check_failures,
                              check_routable, compute_rewards, correctness_images, failure_rate, family_of,
                              get_reward)

SHARED_PREFIXES = {  # the editor prefixes of the protocol (protocol/prompts/edit_prefix_*_v1.txt)
    "box": "Draw a red box for the question. ",
    "maze": "Draw the shortest path of the maze in blue. ",
    "jigsaw": "Draw the original image after restoring this jigsaw puzzle task. ",
    "3d": "Imagine a new perspective of the original image that helps answer the question. ",
}


@pytest.mark.parametrize("family", sorted(SHARED_PREFIXES))
def test_each_protocol_prefix_routes_to_its_family(family):
    assert family_of(SHARED_PREFIXES[family] + "What is shown?") == family


@pytest.mark.parametrize("text,family", [
    ("Draw a red box around the cat. What colour is it?", "box"),
    ("Please find the shortest path from green to red.", "maze"),
    ("Draw the original image after restoring this jigsaw puzzle task. The image has been divided into 3 "
     "shuffled horizontal strips labeled 0, 1, and 2.", "jigsaw"),
    ("Imagine a new perspective of the scene. Which object is left?", "3d"),
    # Substring order is the reference's: box wins over a later "jigsaw" mention.
    ("Draw a red box for the question. Is this a jigsaw?", "box"),
])
def test_routing_by_substring(text, family):
    assert family_of(text) == family


@pytest.mark.parametrize("bad", ["Describe the image.", "draw a red box (lower case)", "", None])
def test_unknown_instruction_is_a_clear_error(bad):
    with pytest.raises(ValueError) as err:
        family_of(bad)
    msg = str(err.value)
    assert "no known task prefix" in msg and "'Draw a red box' -> box" in msg and "'shortest path' -> maze" in msg
    assert repr(str(bad))[1:-1][:20] in msg


def test_check_routable_lists_the_first_bad_rows():
    rows = [SHARED_PREFIXES["box"] + "q"] + [f"bad instruction {i}" for i in range(7)]
    with pytest.raises(RewardConfigError) as err:
        check_routable(rows)
    msg = str(err.value)
    assert msg.startswith("7 of 8 instructions have no known task prefix")
    assert "row 1: 'bad instruction 0'" in msg and "row 5: 'bad instruction 4'" in msg
    assert "row 6" not in msg and "... and 2 more" in msg
    check_routable([SHARED_PREFIXES[f] + "q" for f in SHARED_PREFIXES])  # all good: no error


def test_registry_and_unknown_names():
    assert sorted(REWARDS) == ["correctness", "guidance", "jigsaw_restore", "maze_path", "maze_path_iou",
                               "target_similarity"]
    assert get_reward("guidance").needs_judge and not get_reward("maze_path").needs_judge
    with pytest.raises(RewardConfigError, match="unknown reward 'guidence'.*valid rewards: correctness, guidance, "
                                                "jigsaw_restore, maze_path, maze_path_iou, target_similarity"):
        get_reward("guidence")
    x = RewardInput("Draw a red box for the question. q", "q", "a", Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4)))
    with pytest.raises(RewardConfigError, match="unknown reward"):
        asyncio.run(compute_rewards([x], ["guidance", "nope"], None, None))
    with pytest.raises(RewardConfigError, match="needs a judge client"):
        asyncio.run(compute_rewards([x], ["correctness"], None, None))
    with pytest.raises(RewardConfigError, match="repeat"):
        asyncio.run(compute_rewards([x], ["maze_path", "maze_path"], None, None))


def test_binary_verdict():
    assert binary_verdict("1") == 1.0 and binary_verdict(" 1\n") == 1.0
    assert binary_verdict("0") == 0.0 and binary_verdict("yes") == 0.0 and binary_verdict("\\boxed{1}") == 0.0
    assert binary_verdict("11") == 0.0 and binary_verdict("") == 0.0
    assert binary_verdict(None) is None


def test_correctness_image_plan():
    for fam in ("box", "jigsaw", "3d"):
        assert correctness_images(fam, "original_and_edited") == ("original", "edited")
        assert correctness_images(fam, "edited_only") == ("edited",)
    assert correctness_images("maze", "original_and_edited") == ("edited",)
    assert correctness_images("maze", "edited_only") == ("edited",)
    with pytest.raises(RewardConfigError, match="correctness_images='both'"):
        correctness_images("box", "both")
    # The plan follows the prompts: "second image" in box / jigsaw / 3d, a single image for maze.
    for fam in ("box", "jigsaw", "3d"):
        assert "second image" in load_prompt(f"reward_correct_{fam}_v1")
    assert "second image" not in load_prompt("reward_correct_maze_v1")


def test_failure_rate_counts_none_of_judge_rewards_only():
    rewards = {"guidance": [1.0, None, 0.0, None], "correctness": [1.0, 1.0, 0.0, None],
               "maze_path": [None, None, None, None]}  # rule reward: None = not this family, not a failure
    assert failure_rate(rewards) == pytest.approx(3 / 8)
    assert failure_rate({"maze_path": [None, 1.0]}) == 0.0
    assert failure_rate({}) == 0.0
    assert failure_rate({"my_new_reward": [None, 1.0]}) == 0.5  # unknown names count as judge-backed


def test_check_failures_aborts_above_the_threshold():
    rewards = {"guidance": [1.0, None, 0.0, None], "correctness": [1.0, 1.0, 0.0, 1.0]}  # 2/8 = 25 %
    assert check_failures(rewards, 0.25) == 0.25  # at the threshold: carry on
    with pytest.raises(RewardFailure) as err:
        check_failures(rewards, 0.2)
    msg = str(err.value)
    assert "25.0%" in msg and "guidance: 2/4" in msg and "correctness: 0/4" in msg and "max_failure_rate=0.2" in msg
    assert check_failures({"guidance": [None] * 4}, 1.0) == 1.0
