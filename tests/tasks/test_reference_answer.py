"""`tasks.reference_answer`: what a generated answer is scored against, for every text layout the collator reads."""

from __future__ import annotations

import pytest

from memvp_peft.cli.answering import accuracy
from memvp_peft.tasks.catalogue import reference_answer


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"question": "What digit is shown ?", "answer": "7"}, "7"),
        ({"question": "How many?", "answer": 3}, "3"),
        ({"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
                            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}, "A cat."),
        ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                       {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}]}, "A dog."),
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"},
                       {"role": "assistant", "content": "A bird."}]}, "A bird."),
        ({"texts": [{"user": "What is it?", "assistant": "A fish.", "source": "x"},
                    {"user": "Where?", "assistant": "In water.", "source": "x"}]}, "A fish."),
        ({"question": "Which digit is shown?", "choices": ["three", "seven", "one"], "answer": 1}, "The answer is B."),
    ],
    ids=["simple", "int-answer", "llava-conversations", "messages-typed", "messages-system", "the-cauldron-texts",
         "multiple-choice"],
)
def test_the_reference_is_the_answer_to_the_first_question_as_training_renders_it(record, expected):
    assert reference_answer(record) == expected


def test_a_generated_multiple_choice_target_scores_as_correct():
    record = {"question": "Which digit is shown?", "choices": ["three", "seven"], "answer": 0}
    assert accuracy(["The answer is A."], [record]) == 1.0
    assert accuracy(["The answer is B."], [record]) == 0.0


def test_a_generated_messages_answer_scores_as_correct():
    record = {"messages": [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A dog."}]}
    assert accuracy(["a dog"], [record]) == 1.0
