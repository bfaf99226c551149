"""Answer extraction and verify verdicts: golden table."""

import pytest

from etchr_eval.extract import last_boxed, verify_verdict


@pytest.mark.parametrize("text,expected", [
    ("The answer is \\boxed{C}.", "C"),
    ("\\boxed{A} no wait \\boxed{B}", "B"),  # the last one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces balanced
    ("\\boxed{ 1-2-0 }", " 1-2-0 "),
    ("\\boxed{}", ""),
    ("no box here", None),
    ("\\boxed{unterminated", None),
    ("\\boxed{a{b}", None),
    ("", None),
    (None, None),
    ("\\boxed{A}\\boxed{", None),  # the last \\boxed{ is unterminated, as in the reference
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text,accepted", [
    ("I can see it. \\boxed{1}", True),
    ("\\boxed{ 1 }", True),
    ("\\boxed{0}", False),
    ("\\boxed{1}\\boxed{0}", False),  # last verdict wins
    ("\\boxed{yes}", False),
    ("\\boxed{10}", False),
    ("1", False),  # no box -> reject
    (None, False),
])
def test_verdict(text, accepted):
    assert verify_verdict(text) is accepted
