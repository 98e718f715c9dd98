"""TRL `messages` (typed and plain-string content) and the_cauldron `texts`: each becomes the same training row as
the equivalent LLaVA conversation, from real `datasets.Dataset` rows with real digit images."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from data_fixtures import (  # noqa: F401  (fixtures are used by name)
    DIGIT_NAMES,
    collator,
    digits,
    image_processor,
    tokenizer,
)

datasets.disable_progress_bars()

QUESTION = "What digit is shown in the image ?"


def _pil(array):
    from PIL import Image

    return Image.fromarray(np.rint(array * (255.0 / 16.0)).astype(np.uint8), mode="L")


def _llava(*pairs):
    turns = []
    for question, answer in pairs:
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns}


def _typed(role, text, images=0):
    return {"role": role, "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def _same_text(batch_a, batch_b):
    return all(torch.equal(batch_a[key], batch_b[key]) for key in ("input_ids", "attention_mask", "labels"))


def test_typed_messages_from_a_dataset_row_train_like_the_llava_conversation(collator, digits):
    images, targets = digits
    answer = DIGIT_NAMES[targets[0]]
    row = datasets.Dataset.from_dict({
        "images": [[_pil(images[0])]],
        "messages": [[_typed("user", QUESTION, images=1), _typed("assistant", answer)]],
    }).cast_column("images", datasets.Sequence(datasets.Image()))[0]
    batch = collator([row])
    reference = collator([dict(_llava(("<image>\n" + QUESTION, answer)), image=[_pil(images[0])])])
    assert _same_text(batch, reference)
    assert torch.equal(batch["pixel_values"], reference["pixel_values"]) and batch["image_mask"].tolist() == [[True]]


def test_plain_string_content_is_read_like_typed_content(collator):
    typed = collator([{"messages": [_typed("user", QUESTION), _typed("assistant", "seven")]}])
    plain = collator([{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "seven"}]}])
    assert _same_text(typed, plain)


def test_several_turns_supervise_every_assistant_message(collator):
    messages = [_typed("user", QUESTION), _typed("assistant", "seven"),
                _typed("user", "Is the digit odd or even ?"), _typed("assistant", "It is odd .")]
    batch = collator([{"messages": messages}])
    assert _same_text(batch, collator([_llava((QUESTION, "seven"), ("Is the digit odd or even ?", "It is odd ."))]))


def test_several_images_fill_several_slots_in_order(collator, digits):
    images, _ = digits
    record = {"images": [_pil(images[0]), _pil(images[1])],
              "messages": [_typed("user", "Which image shows the larger digit ?", images=2),
                           _typed("assistant", "The second one .")]}
    batch = collator([record])
    one = collator([{"image": _pil(images[1]), "question": "q", "answer": "a"}])["pixel_values"][0]
    assert batch["pixel_values"].shape[:2] == (1, 2) and torch.equal(batch["pixel_values"][0, 1], one)


def test_a_system_message_is_a_line_before_the_first_prompt(collator, tokenizer):
    batch = collator([{"messages": [{"role": "system", "content": "Describe it ."}, _typed("user", QUESTION),
                                    _typed("assistant", "seven")]}])
    expected = tokenizer("Describe it .\nQuestion: " + QUESTION + "\nAnswer: seven")["input_ids"] + [tokenizer.eos_token_id]
    assert batch["input_ids"][0].tolist() == expected


def test_fewer_images_than_image_entries_is_refused(collator, digits):
    images, _ = digits
    record = {"images": [_pil(images[0])],
              "messages": [_typed("user", QUESTION, images=2), _typed("assistant", "seven")]}
    with pytest.raises(ValueError, match=r"record 0: its text marks 2 images \('<image>' placeholders and "
                                         r"\{'type': 'image'\} entries of typed content\) but the record gives 1"):
        collator([record])


def test_images_without_image_entries_are_refused(collator, digits):
    images, _ = digits
    record = {"images": [_pil(images[0])], "messages": [_typed("user", QUESTION), _typed("assistant", "seven")]}
    with pytest.raises(ValueError, match=r"marks 0 images .* but the record gives 1"):
        collator([record])


def test_plain_string_messages_without_placeholders_take_their_images_unchecked(collator, digits):
    images, _ = digits
    record = {"images": [_pil(images[0])], "messages": [{"role": "user", "content": QUESTION},
                                                        {"role": "assistant", "content": "seven"}]}
    assert collator([record])["image_mask"].tolist() == [[True]]


def test_placeholders_in_plain_string_messages_are_counted_against_the_images(collator, digits):
    images, _ = digits
    record = {"images": [_pil(images[0])], "messages": [{"role": "user", "content": "<image><image>" + QUESTION},
                                                        {"role": "assistant", "content": "seven"}]}
    with pytest.raises(ValueError, match=r"marks 2 images \('<image>' placeholders.* but the record gives 1"):
        collator([record])


def test_messages_that_do_not_alternate_are_refused(collator):
    with pytest.raises(ValueError, match=r"message 1: messages must alternate user/assistant.*'assistant' was expected"):
        collator([{"messages": [_typed("user", "q"), _typed("user", "q2"), _typed("assistant", "a")]}])


def test_messages_ending_with_the_user_are_refused_for_training(collator):
    with pytest.raises(ValueError, match=r"messages must end with an assistant message"):
        collator([{"messages": [_typed("user", "q"), _typed("assistant", "a"), _typed("user", "q2")]}])


def test_a_generation_prompt_from_messages_is_the_first_question(collator):
    record = {"messages": [_typed("user", QUESTION)]}
    assert torch.equal(collator.prompts([record])["input_ids"],
                       collator.prompts([{"question": QUESTION}])["input_ids"])


def test_the_cauldron_texts_from_an_undecoded_dataset_row_train_like_the_llava_conversation(collator, digits):
    images, targets = digits
    turns = [{"user": QUESTION, "assistant": DIGIT_NAMES[targets[2]], "source": "digits"},
             {"user": "Is the digit odd or even ?", "assistant": "It is even .", "source": "digits"}]
    dataset = datasets.Dataset.from_dict({"images": [[_pil(images[2])]], "texts": [turns]})
    row = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))[0]
    assert set(row["images"][0]) == {"bytes", "path"}  # undecoded: the collator decodes the bytes
    batch = collator([row])
    reference = collator([dict(_llava((QUESTION, DIGIT_NAMES[targets[2]]), ("Is the digit odd or even ?", "It is even .")),
                               image=[_pil(images[2])])])
    assert _same_text(batch, reference) and torch.equal(batch["pixel_values"], reference["pixel_values"])


def test_the_cauldron_empty_answer_is_refused(collator):
    with pytest.raises(ValueError, match=r"record 0: empty answer \(texts item 0\)"):
        collator([{"texts": [{"user": "q", "assistant": " ", "source": "x"}]}])


def test_a_record_with_two_text_layouts_is_refused(collator):
    with pytest.raises(ValueError, match=r"record 0: the record has several text layouts \(\['messages', 'question'\]"):
        collator([{"messages": [_typed("user", "q"), _typed("assistant", "a")], "question": "q", "answer": "a"}])


# ----------------------------------------------------------------------------- TRL's conversational prompt/completion
def test_a_prompt_completion_row_trains_like_the_messages_it_splits(collator, digits):
    images, targets = digits
    answer = DIGIT_NAMES[targets[0]]
    row = datasets.Dataset.from_dict({
        "images": [[_pil(images[0])]],
        "prompt": [[_typed("user", QUESTION, images=1)]],
        "completion": [[_typed("assistant", answer)]],
    }).cast_column("images", datasets.Sequence(datasets.Image()))[0]
    reference = {"images": [_pil(images[0])],
                 "messages": [_typed("user", QUESTION, images=1), _typed("assistant", answer)]}
    batch = collator([row])
    assert _same_text(batch, collator([reference])) and batch["image_mask"].tolist() == [[True]]


def test_assistant_turns_inside_a_prompt_are_context_and_not_supervised(collator, tokenizer):
    record = {"prompt": [_typed("user", QUESTION), _typed("assistant", "seven"),
                         _typed("user", "Is the digit odd or even ?")],
              "completion": [_typed("assistant", "It is odd .")]}
    batch = collator([record])
    whole = collator([{"messages": record["prompt"] + record["completion"]}])
    assert torch.equal(batch["input_ids"], whole["input_ids"])  # the same row ...
    supervised = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert supervised == tokenizer(" It is odd .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_prompt_completion_image_marks_are_counted_against_the_images(collator, digits):
    images, _ = digits
    record = {"images": [_pil(images[0])], "prompt": [_typed("user", QUESTION, images=2)],
              "completion": [_typed("assistant", "zero")]}
    with pytest.raises(ValueError, match=r"record 0: its text marks 2 images .* but the record gives 1"):
        collator([record])


def test_prompt_completion_errors_name_the_list_and_the_message(collator):
    with pytest.raises(ValueError, match=r"record 0: completion message 0: messages must alternate .*'assistant' was "
                                         r"expected"):
        collator([{"prompt": [_typed("user", "q")], "completion": [_typed("user", "a")]}])
    with pytest.raises(ValueError, match=r"'completion' must be a non-empty list of messages"):
        collator([{"prompt": [_typed("user", "q")], "completion": "seven"}])


def test_a_completion_without_a_conversational_prompt_is_refused(collator):
    with pytest.raises(ValueError, match=r"'completion' is read with a conversational 'prompt'"):
        collator([{"prompt": QUESTION, "completion": "seven"}])


def test_a_generation_prompt_needs_no_completion(collator):
    record = {"prompt": [_typed("user", QUESTION)]}
    assert torch.equal(collator.prompts([record])["input_ids"], collator.prompts([{"question": QUESTION}])["input_ids"])


def test_llava_instruct_mix_rows_from_a_parquet_source_collate_like_the_llava_conversation(tmp_path, collator, digits):
    """HuggingFaceH4/llava-instruct-mix-vsft's schema: typed contents with an `index` key, `images` a list of
    datasets.Image; read through memvp-train's parquet source."""
    from memvp_peft.tasks.catalogue import load_task

    images, targets = digits

    def entry(kind, text=None, index=None):
        return {"index": index, "text": text, "type": kind}

    content = datasets.List({"index": datasets.Value("int64"), "text": datasets.Value("string"),
                             "type": datasets.Value("string")})
    features = datasets.Features({"images": datasets.List(datasets.Image()), "messages": datasets.List(
        {"content": content, "role": datasets.Value("string")})})
    rows = [{"images": [_pil(images[i])], "messages": [
        {"role": "user", "content": [entry("image", index=0), entry("text", QUESTION)]},
        {"role": "assistant", "content": [entry("text", DIGIT_NAMES[targets[i]])]}]} for i in range(5)]
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "mix.parquet"))
    task = load_task(str(tmp_path / "mix.parquet"), None, 0.2, seed=0)
    row = task.train[0]
    i = int(row["memvp_origin"].rsplit(" ", 1)[1])
    reference = collator([dict(_llava(("<image>\n" + QUESTION, DIGIT_NAMES[targets[i]])), image=[_pil(images[i])])])
    batch = collator([row])
    assert _same_text(batch, reference) and torch.equal(batch["pixel_values"], reference["pixel_values"])
