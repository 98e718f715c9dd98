"""MemVPProcessor: a tokenizer + image processor pair whose batches carry no image placeholder tokens."""

import pytest
import torch
from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor
from trl_fixtures import LLAVA_TEMPLATE, QUESTION, digit_images, save_tiny_llava, word_tokenizer

from memvp_peft import MemVPProcessor
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import clip_image_processor


def _conversation(image, answer="seven"):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def test_image_tokens_are_removed_from_the_text_and_images_come_as_pixel_values_with_a_mask():
    tokenizer = word_tokenizer(image_token=True)  # a VLM tokenizer: `<image>` would be one token
    processor = MemVPProcessor(clip_image_processor(32), tokenizer)
    images, _ = digit_images(2)
    out = processor(images=[[images[0]], []], text=["<image>\n" + QUESTION, QUESTION], padding=True, return_tensors="pt")
    assert tokenizer.convert_tokens_to_ids("<image>") not in out["input_ids"].tolist()[0]
    assert out["input_ids"][0].tolist() == out["input_ids"][1].tolist()  # the same text once the token is gone
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    assert out["image_mask"].tolist() == [True, False]
    torch.testing.assert_close(out["pixel_values"][0], clip_image_processor(32)(images[0], return_tensors="pt")[
        "pixel_values"][0])


def test_a_text_with_several_images_gives_the_multi_image_layout():
    processor = MemVPProcessor(clip_image_processor(32), word_tokenizer())
    images, _ = digit_images(3)
    out = processor(images=[[images[0], images[1]], [images[2]]], text=[QUESTION, QUESTION], return_tensors="pt")
    assert out["pixel_values"].shape == (2, 2, 3, 32, 32)
    assert out["image_mask"].tolist() == [[True, True], [True, False]]


def test_a_text_naming_a_different_number_of_images_than_it_has_is_refused():
    processor = MemVPProcessor(clip_image_processor(32), word_tokenizer())
    images, _ = digit_images(1)
    with pytest.raises(ValueError, match=r"text 0 has 2 '<image>' token\(s\) but 1 image\(s\)"):
        processor(images=[[images[0]]], text=["<image> <image> " + QUESTION])


def test_the_default_template_renders_a_conversation_as_the_collator_lays_out_the_record():
    """TRL-trained and collator-trained models see the same rows, and answer the same prompts."""
    tokenizer, image_processor = word_tokenizer(), clip_image_processor(32)
    processor = MemVPProcessor(image_processor, tokenizer)
    images, _ = digit_images(1)
    rendered = processor.apply_chat_template(_conversation(images[0]), tokenize=True, return_dict=True,
                                             return_tensors="pt")
    collated = MemVPDataCollator(tokenizer, image_processor)([{"image": images[0], "question": QUESTION,
                                                               "answer": "seven"}])
    assert rendered["input_ids"].tolist() == collated["input_ids"].tolist()
    torch.testing.assert_close(rendered["pixel_values"], collated["pixel_values"])
    assert rendered["image_mask"].tolist() == collated["image_mask"].tolist() == [True]


def test_assistant_masks_line_up_with_the_answer_after_the_image_token_is_removed():
    tokenizer = word_tokenizer()
    processor = MemVPProcessor(clip_image_processor(32), tokenizer)
    images, _ = digit_images(1)
    out = processor.apply_chat_template(_conversation(images[0]), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    supervised = [i for i, m in zip(out["input_ids"][0], out["assistant_masks"][0]) if m]
    assert tokenizer.convert_ids_to_tokens(supervised) == ["seven", tokenizer.eos_token]


def test_a_text_only_llm_template_reads_typed_contents_with_images_rendering_to_nothing():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = ("{%- for m in messages -%}{{ m['role'] | upper }}: {{ m['content'] }}"
                               "{{ eos_token if m['role'] == 'assistant' else ' ' }}{%- endfor -%}")
    processor = MemVPProcessor(clip_image_processor(32), tokenizer)
    images, _ = digit_images(1)
    text = processor.apply_chat_template(_conversation(images[0], "seven"))
    assert text == f"USER: <image>{QUESTION} ASSISTANT: seven[EOS]"  # the image token is removed before tokenizing
    ids = processor.apply_chat_template(_conversation(images[0], "seven"), tokenize=True, return_dict=True)["input_ids"]
    # a template that writes no BOS gets the tokenizer's special tokens, as with any ProcessorMixin
    assert ids[0] == tokenizer(f"USER: {QUESTION} ASSISTANT: seven[EOS]")["input_ids"]


def test_each_named_template_of_a_tokenizer_is_made_to_read_typed_contents():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = {"default": "{{ messages[0]['content'] }}", "terse": "{{ messages[0]['content'][:5] }}"}
    processor = MemVPProcessor(clip_image_processor(32), tokenizer)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(conversation) == "<image>" + QUESTION
    assert processor.apply_chat_template(conversation, chat_template="terse") == "<imag"


def test_saved_processor_reloads_through_automodel_processor_with_identical_batches(tmp_path):
    processor = MemVPProcessor(clip_image_processor(32), word_tokenizer(), num_images=2)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, MemVPProcessor)
    assert reloaded.chat_template == processor.chat_template and reloaded.num_images == 2
    images, _ = digit_images(1)
    a = processor.apply_chat_template(_conversation(images[0]), tokenize=True, return_dict=True, return_tensors="pt")
    b = reloaded.apply_chat_template(_conversation(images[0]), tokenize=True, return_dict=True, return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["pixel_values"].shape == (1, 2, 3, 32, 32)  # num_images slots survive the round trip


def test_from_pretrained_of_a_llava_folder_takes_its_tokenizer_image_processor_and_template(tmp_path):
    save_tiny_llava(tmp_path)
    processor = MemVPProcessor.from_pretrained(tmp_path)
    llava = LlavaProcessor.from_pretrained(tmp_path)
    assert processor.chat_template == LLAVA_TEMPLATE and processor.image_token == "<image>"
    assert processor.image_processor.to_dict() == llava.image_processor.to_dict()
    images, _ = digit_images(1)
    out = processor.apply_chat_template(_conversation(images[0]), tokenize=True, return_dict=True)
    expanded = llava.apply_chat_template(_conversation(images[0]), tokenize=True, return_dict=True)
    image_id = llava.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id not in out["input_ids"][0] and expanded["input_ids"][0].count(image_id) == 16
    assert out["input_ids"][0] == [i for i in expanded["input_ids"][0] if i != image_id]


def test_from_pretrained_of_a_language_model_folder_with_the_encoders_image_processor(tmp_path):
    word_tokenizer().save_pretrained(tmp_path / "llm")
    saved = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    saved.save_pretrained(tmp_path / "clip")
    processor = MemVPProcessor.from_pretrained(tmp_path / "llm", image_processor=tmp_path / "clip")
    assert tuple(processor.image_processor.image_mean) == pytest.approx((0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="holds a tokenizer but no image processor; pass the vision encoder's folder"):
        MemVPProcessor.from_pretrained(tmp_path / "llm")


def test_registering_memvp_processor_leaves_other_models_processors_as_they_were(tmp_path):
    save_tiny_llava(tmp_path)
    assert type(AutoProcessor.from_pretrained(tmp_path)) is LlavaProcessor

