"""Model replies pasted into the text-only guidance judge lose chat-template control tokens."""

from etchr_rl.rewards import guidance_judge_request, strip_control_tokens


def test_control_tokens_are_removed():
    assert strip_control_tokens("red<|image_pad|> box<|im_end|>") == "red box"
    assert strip_control_tokens("a | b < c > d {x}") == "a | b < c > d {x}"  # ordinary text untouched


def test_judge_request_carries_no_control_token():
    req = guidance_judge_request("What colour?", "red", "It is red<|image_pad|><|vision_start|>")
    text = req["messages"][0]["content"][-1]["text"]
    assert "<|" not in text and "Model's Response: It is red\n" in text
