"""The authors' ScienceQA prompt (QCM-A) for multiple-choice records, and how the collator renders and supervises it;
the other answer types of a simple record (int without choices, bool, float)."""

from __future__ import annotations

import pytest
from data_fixtures import image_processor, supervised_ids  # noqa: F401  (fixtures are used by name)

from memvp_peft.data import MemVPDataCollator, first_answer, multiple_choice_prompt, multiple_choice_target
from memvp_peft.data.multiple_choice import format_choices, multiple_choice_context
from memvp_peft.demo_models import build_word_tokenizer

SQA_WORDS = ("Question: Which digit is shown ? Context: N/A The picture is a scan . Options: (A) (B) (C) (D) (E) "
             "three seven one four zero Response: The answer is A B C D E .")


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([SQA_WORDS])


@pytest.fixture
def collator(tokenizer, image_processor):  # noqa: F811
    return MemVPDataCollator(tokenizer, image_processor, max_length=64)


MC = {"question": "Which digit is shown ?", "choices": ["three", "seven", "one"], "answer": 1, "hint": ""}


# ---------------------------------------------------------------------------------------------------------- prompt
def test_the_prompt_is_question_context_options_then_response():
    assert multiple_choice_prompt("Which digit?", ["three", "seven"], hint="A scan.") == (
        "Question: Which digit?\nContext: A scan.\nOptions: (A) three (B) seven\nResponse:")


def test_an_empty_hint_gives_the_context_n_a():
    assert multiple_choice_context("", None) == "N/A" and multiple_choice_context(None, "  ") == "N/A"


def test_the_caption_follows_the_hint_after_a_space():
    assert multiple_choice_context("Look at the map.", "A map of Europe.") == "Look at the map. A map of Europe."


def test_a_caption_alone_is_the_context():
    assert multiple_choice_context("", "A map.") == "A map."


@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_options_are_lettered_in_order_and_joined_by_spaces(count):
    choices = [f"c{i}" for i in range(count)]
    assert format_choices(choices) == " ".join(f"({'ABCDE'[i]}) c{i}" for i in range(count))


def test_double_spaces_are_collapsed_once_as_the_authors_do():
    prompt = multiple_choice_prompt("Which  digit?", ["a  b", "c"], hint="x   y")
    assert prompt == "Question: Which digit?\nContext: x  y\nOptions: (A) a b (B) c\nResponse:"  # 3 spaces -> 2


def test_the_target_names_the_letter_of_the_answer_index():
    assert multiple_choice_target(2, ["a", "b", "c"]) == "The answer is C."


@pytest.mark.parametrize("index", [3, -1])
def test_an_answer_index_outside_the_choices_is_refused(index):
    with pytest.raises(ValueError, match=rf"answer index {index} is outside the 3 choices"):
        multiple_choice_target(index, ["a", "b", "c"])


# ---------------------------------------------------------------------------------------------------------- collator
def test_a_multiple_choice_record_trains_on_the_prompt_with_the_target_appended_directly(collator, tokenizer):
    batch = collator([MC])
    text = multiple_choice_prompt(MC["question"], MC["choices"]) + "The answer is B."
    expected = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # BOS ... EOS
    assert batch["input_ids"][0].tolist() == expected and expected[0] == tokenizer.bos_token_id


def test_only_the_target_and_eos_of_a_multiple_choice_record_are_supervised(collator, tokenizer):
    target = tokenizer("The answer is B.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert supervised_ids(collator([MC]), 0) == target


def test_the_prompt_template_does_not_wrap_a_multiple_choice_prompt(tokenizer, image_processor):  # noqa: F811
    plain = MemVPDataCollator(tokenizer, image_processor)([MC])
    templated = MemVPDataCollator(tokenizer, image_processor, prompt_template="USER: {question} ASSISTANT:")([MC])
    assert plain["input_ids"].tolist() == templated["input_ids"].tolist()


def test_a_generation_prompt_ends_at_response_and_takes_an_answer_prefix(collator, tokenizer):
    prompt = multiple_choice_prompt(MC["question"], MC["choices"])
    assert collator.prompts([MC])["input_ids"][0].tolist() == tokenizer(prompt)["input_ids"]
    forced = collator.prompts([MC], answer_prefix="The answer is")["input_ids"][0].tolist()
    assert forced == tokenizer(prompt + "The answer is")["input_ids"]


def test_the_caption_field_joins_the_context(collator, tokenizer):
    batch = collator([dict(MC, hint="The picture is a scan .", caption="three")])
    prompt = multiple_choice_prompt(MC["question"], MC["choices"], hint="The picture is a scan .", caption="three")
    assert "Context: The picture is a scan . three\n" in prompt
    assert batch["input_ids"][0].tolist()[: len(tokenizer(prompt)["input_ids"])] == tokenizer(prompt)["input_ids"]


def test_first_answer_of_a_multiple_choice_record_is_its_target():
    assert first_answer(MC) == "The answer is B."


def test_a_multiple_choice_answer_outside_the_choices_names_the_record(collator):
    with pytest.raises(ValueError, match=r"record 0 \(id='p7'\): answer index 3 is outside the 3 choices"):
        collator([dict(MC, id="p7", answer=3)])


def test_a_string_answer_with_choices_is_refused(collator):
    with pytest.raises(ValueError, match=r"has 'choices' but its 'answer' is a str \('seven'\)"):
        collator([dict(MC, answer="seven")])


def test_an_integer_answer_without_choices_is_its_decimal_text(collator, tokenizer):
    batch = collator([{"question": "Which digit is shown ?", "answer": 7}])
    as_text = collator([{"question": "Which digit is shown ?", "answer": "7"}])
    assert batch["input_ids"].tolist() == as_text["input_ids"].tolist()


@pytest.mark.parametrize("answer, kind", [(True, "bool"), (2.0, "float")])
def test_bool_and_float_answers_are_refused(collator, answer, kind):
    with pytest.raises(ValueError, match=rf"record 0: 'answer' is a {kind}"):
        collator([{"question": "Which digit is shown ?", "answer": answer}])
