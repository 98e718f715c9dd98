"""Records rendered with a real Jinja chat template (ChatML) on a tiny local tokenizer: what the text is, which tokens
are supervised, the generation prompt, truncation, the rule that picks the template, and the templates refused."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import digits, image_processor, supervised_ids  # noqa: F401  (fixtures are used by name)

from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = ["system user assistant Reply Answer briefly . What digit is shown in the image ? seven three odd even "
          "Is it odd or even ? It is odd . Question: Answer:"]


def _tokenizer(template=CHATML):
    tokenizer = build_word_tokenizer(CORPUS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return _tokenizer()


@pytest.fixture
def collator(chatml, image_processor):  # noqa: F811
    return MemVPDataCollator(chatml, image_processor, max_length=64)


def _messages(*texts, system=None):
    roles = ["user", "assistant"] * len(texts)
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": role, "content": [{"type": "text", "text": t}]} for role, t in zip(roles, texts)]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


QUESTION = "What digit is shown in the image ?"
ONE_TURN = {"messages": _messages(QUESTION, "seven")}


def test_the_default_uses_the_tokenizers_chat_template(collator):
    assert collator.uses_chat_template


def test_a_row_is_the_chat_template_rendering_without_any_image_token(collator, chatml, digits):
    images, _ = digits
    record = {"images": [images[0]], "messages": [{"role": "user", "content": [{"type": "image"},
                                                                               {"type": "text", "text": QUESTION}]},
                                                  {"role": "assistant", "content": "seven"}]}
    rendered = chatml.apply_chat_template([{"role": "user", "content": QUESTION},
                                           {"role": "assistant", "content": "seven"}], tokenize=False)
    batch = collator([record])
    assert batch["input_ids"][0].tolist() == _ids(chatml, rendered) and batch["image_mask"].tolist() == [[True]]


def test_only_the_assistant_turn_and_its_end_of_turn_token_are_supervised(collator, chatml):
    assert supervised_ids(collator([ONE_TURN]), 0) == _ids(chatml, "seven<|im_end|>")


def test_every_assistant_turn_of_several_is_supervised(collator, chatml):
    batch = collator([{"messages": _messages(QUESTION, "seven", "Is it odd or even ?", "It is odd .")}])
    assert supervised_ids(batch, 0) == _ids(chatml, "seven<|im_end|>It is odd .<|im_end|>")


def test_a_system_message_is_rendered_by_the_template_and_not_supervised(collator, chatml):
    batch = collator([{"messages": _messages(QUESTION, "seven", system="Answer briefly .")}])
    assert batch["input_ids"][0].tolist()[:5] == _ids(chatml, "<|im_start|>system\nAnswer briefly .")
    assert supervised_ids(batch, 0) == _ids(chatml, "seven<|im_end|>")


def test_a_simple_record_is_rendered_as_one_user_and_one_assistant_message(collator):
    assert torch.equal(collator([{"question": QUESTION, "answer": "seven"}])["input_ids"],
                       collator([ONE_TURN])["input_ids"])


def test_the_generation_prompt_is_the_start_of_the_training_row(collator, chatml):
    prompt = collator.prompts([{"messages": _messages(QUESTION)[:1]}])["input_ids"][0].tolist()
    expected = _ids(chatml, chatml.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                                       add_generation_prompt=True))
    assert prompt == expected and collator([ONE_TURN])["input_ids"][0].tolist()[: len(prompt)] == prompt


def test_an_answer_prefix_follows_the_generation_prompt(collator, chatml):
    prompt = collator.prompts([{"question": QUESTION}], answer_prefix="It is")["input_ids"][0].tolist()
    assert prompt[-3:] == _ids(chatml, "assistant\nIt is")


def test_truncation_removes_question_tokens_and_keeps_the_header_and_the_answer(chatml, image_processor):  # noqa: F811
    record = {"messages": _messages("What digit is shown in the image ? " * 4, "seven")}
    full = MemVPDataCollator(chatml, image_processor)([record])["input_ids"][0].tolist()
    cut = MemVPDataCollator(chatml, image_processor, max_length=12)([record])
    row = cut["input_ids"][0].tolist()
    assert len(full) > 12 and len(row) == 12
    assert row[:2] == full[:2] == _ids(chatml, "<|im_start|>user")          # the template's header stays
    assert row[-5:] == full[-5:] and supervised_ids(cut, 0) == _ids(chatml, "seven<|im_end|>")


# ---------------------------------------------------------------------------------------------------------- the rule
def test_a_given_prompt_template_is_used_even_when_a_chat_template_exists(chatml, image_processor):  # noqa: F811
    templated = MemVPDataCollator(chatml, image_processor, prompt_template="Question: {question}\nAnswer:")
    assert not templated.uses_chat_template
    assert templated([ONE_TURN])["input_ids"][0].tolist() == (
        chatml("Question: " + QUESTION + "\nAnswer: seven")["input_ids"] + [chatml.eos_token_id])


def test_chat_template_false_keeps_the_default_prompt(chatml, image_processor):  # noqa: F811
    plain = MemVPDataCollator(chatml, image_processor, chat_template=False)
    without_template = MemVPDataCollator(_tokenizer(template=None), image_processor)
    assert not without_template.uses_chat_template
    assert torch.equal(plain([ONE_TURN])["input_ids"], without_template([ONE_TURN])["input_ids"])


def test_chat_template_true_without_a_template_is_refused(image_processor):  # noqa: F811
    with pytest.raises(ValueError, match=r"chat_template=True but neither the tokenizer nor the processor has"):
        MemVPDataCollator(_tokenizer(template=None), image_processor, chat_template=True)


def test_chat_template_true_with_a_prompt_template_is_refused(chatml, image_processor):  # noqa: F811
    with pytest.raises(ValueError, match=r"chat_template=True and a prompt_template were both given"):
        MemVPDataCollator(chatml, image_processor, chat_template=True, prompt_template="Q: {question}")


def test_a_processors_chat_template_is_used_when_the_tokenizer_has_none(image_processor):  # noqa: F811
    from transformers import LlavaProcessor

    tokenizer = _tokenizer(template=None)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=_tokenizer(template=None),
                               chat_template=CHATML, patch_size=8)
    assert MemVPDataCollator(tokenizer, processor).uses_chat_template


def test_seq2seq_never_uses_the_chat_template(chatml, image_processor):  # noqa: F811
    assert not MemVPDataCollator(chatml, image_processor, seq2seq=True).uses_chat_template


# ---------------------------------------------------------------------------------------------------------- refused
def test_a_template_whose_prefix_renders_differently_is_refused(image_processor):  # noqa: F811
    counting = "{{ messages | length }}" + CHATML  # the first character changes as the conversation grows
    collator = MemVPDataCollator(_tokenizer(counting), image_processor)
    with pytest.raises(ValueError, match=r"record 0: the chat template renders the conversation up to assistant "
                                         r"message 1 .* is not the start of the whole conversation's text"):
        collator([ONE_TURN])


def test_a_generation_prompt_that_tokenizes_differently_inside_the_row_is_refused(image_processor):  # noqa: F811
    glued = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] + ' Reply' }}{% else %}"
             "{{ m['content'] }}{% endif %}{% endfor %}")  # "Reply" + "seven" is one unknown word inside the row
    collator = MemVPDataCollator(_tokenizer(glued), image_processor)
    with pytest.raises(ValueError, match=r"tokenizes differently on its own .* than inside the whole conversation"):
        collator([ONE_TURN])


def test_a_template_that_drops_the_system_message_is_refused(image_processor):  # noqa: F811
    no_system = CHATML.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}")
    collator = MemVPDataCollator(_tokenizer(no_system), image_processor)
    with pytest.raises(ValueError, match=r"does not show the text of every message: system text 'Answer briefly \.'"):
        collator([{"messages": _messages(QUESTION, "seven", system="Answer briefly .")}])


def test_a_template_for_typed_content_only_gets_typed_content(chatml, image_processor):  # noqa: F811
    typed_only = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% for c in m['content'] %}"
                  "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    typed = MemVPDataCollator(_tokenizer(typed_only), image_processor)([ONE_TURN])
    assert torch.equal(typed["input_ids"], MemVPDataCollator(chatml, image_processor)([ONE_TURN])["input_ids"])


def test_a_trl_prompts_own_assistant_turns_are_rendered_but_only_the_completion_is_supervised(collator, chatml):
    messages = _messages(QUESTION, "seven", "Is it odd or even ?", "It is odd .")
    batch = collator([{"prompt": messages[:3], "completion": messages[3:]}])
    assert torch.equal(batch["input_ids"], collator([{"messages": messages}])["input_ids"])
    assert supervised_ids(batch, 0) == _ids(chatml, "It is odd .<|im_end|>")
