"""Tests of memvp_peft.data.conversations: the prompt template and the removal of LLaVA's `<image>` placeholder."""

from __future__ import annotations

import pytest

from memvp_peft.data import DEFAULT_PROMPT_TEMPLATE, build_prompt, strip_image_placeholder


def test_build_prompt():
    assert build_prompt("What digit?") == "Question: What digit?\nAnswer:"
    assert build_prompt("What digit?", "seven") == "Question: What digit?\nAnswer: seven"
    assert build_prompt("Q", template="USER: {question} ASSISTANT:") == "USER: Q ASSISTANT:"
    assert DEFAULT_PROMPT_TEMPLATE.format(question="x") == build_prompt("x")
    with pytest.raises(ValueError, match="question"):
        build_prompt("Q", template="no field here")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<image>\nWhat digit is shown?", "What digit is shown?"),
        ("What digit is shown?\n<image>", "What digit is shown?"),
        ("Compare <image> and <image> please", "Compare and please"),
        ("<image>", ""),
        ("no placeholder", "no placeholder"),
    ],
)
def test_strip_image_placeholder(text, expected):
    assert strip_image_placeholder(text) == expected
