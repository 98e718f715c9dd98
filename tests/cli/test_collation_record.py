"""memvp-infer rebuilds the collator memvp-train used: the image normalisation, the prompt template and whether the
base's chat template rendered the rows come back from `memvp_cli.json`, so that a model is asked the way it was
trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
from peft import get_peft_model
from PIL import Image

import memvp_peft  # noqa: F401  (registers MEMVP)
from memvp_peft import MemVPConfig
from memvp_peft.cli.infer import load_for_inference
from memvp_peft.cli.model_loading import read_run_manifest, write_run_manifest
from memvp_peft.cli.options import InferOptions
from memvp_peft.cli.visual_input import (
    build_collator,
    chat_template_choice,
    collation_manifest,
    collator_from_manifest,
    encoder_image_processor,
)
from memvp_peft.tasks.digits import DIGIT_QUESTION
from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama
from memvp_peft.vision import IMAGENET_MEAN, IMAGENET_STD, imagenet_image_processor

WORDS = ["user", "assistant", "Question", "Answer", "What", "digit", "is", "shown", "?", ":", "Q", "A", "seven"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def word_tokenizer(chat: bool):
    tokenizer = build_word_tokenizer([" ".join(WORDS)])
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHATML
    return tokenizer


def collator_for(dataset: str, chat: bool = True, prompt_template=None):
    return build_collator(word_tokenizer(chat), None, input_name="pixel_values", kind="causal",
                          prompt_template=prompt_template, chat_template=chat_template_choice(dataset))


# ------------------------------------------------------------------------------------------------ prompts


def test_the_digits_task_keeps_its_prompt_on_a_base_with_a_chat_template():
    collator = collator_for("digits")
    assert not collator.uses_chat_template
    ids = collator.prompts([{"question": DIGIT_QUESTION}])["input_ids"][0].tolist()
    assert ids == collator.tokenizer(f"Question: {DIGIT_QUESTION}\nAnswer:")["input_ids"]


def test_scienceqa_keeps_the_authors_prompt_on_a_base_with_a_chat_template():
    assert not collator_for("scienceqa:data").uses_chat_template


def test_other_datasets_use_the_bases_chat_template():
    assert collator_for("data.jsonl").uses_chat_template
    assert not collator_for("data.jsonl", chat=False).uses_chat_template


def test_a_prompt_template_renders_the_questions_instead_of_the_chat_template():
    collator = collator_for("data.jsonl", prompt_template="Q: {question} A:")
    assert not collator.uses_chat_template
    ids = collator.prompts([{"question": "What digit is shown ?"}])["input_ids"][0].tolist()
    assert ids == collator.tokenizer("Q: What digit is shown ? A:")["input_ids"]


def test_the_record_keeps_the_template_the_chat_choice_and_the_normalization():
    record = collation_manifest(collator_for("data.jsonl", prompt_template="Q: {question} A:"), "Q: {question} A:",
                                "imagenet")
    assert {k: record[k] for k in ("prompt_template", "chat_template", "image_normalization")} == {
        "prompt_template": "Q: {question} A:", "chat_template": False, "image_normalization": "imagenet"}
    assert collation_manifest(collator_for("data.jsonl"), None, "encoder")["chat_template"] is True


@pytest.mark.parametrize("trained_with", [{"prompt_template": "Q: {question} A:", "chat_template": False},
                                          {"prompt_template": None, "chat_template": True},
                                          {"prompt_template": None, "chat_template": False}])
def test_memvp_infer_rebuilds_the_recorded_prompt(trained_with):
    tokenizer = word_tokenizer(chat=True)
    rebuilt = collator_from_manifest(tokenizer, None, trained_with, input_name="pixel_values", kind="causal")
    trained = build_collator(tokenizer, None, input_name="pixel_values", kind="causal", **trained_with)
    question = [{"question": "What digit is shown ?"}]
    assert rebuilt.uses_chat_template == trained_with["chat_template"]
    assert rebuilt.prompts(question)["input_ids"].tolist() == trained.prompts(question)["input_ids"].tolist()


def test_a_record_older_than_these_keys_keeps_the_collators_own_rule():
    assert collator_from_manifest(word_tokenizer(chat=True), None, {}, input_name="pixel_values",
                                  kind="causal").uses_chat_template
    assert not collator_from_manifest(word_tokenizer(chat=False), None, {}, input_name="pixel_values",
                                      kind="causal").uses_chat_template


def test_a_prompt_template_given_to_memvp_infer_wins_over_the_recorded_chat_template():
    rebuilt = collator_from_manifest(word_tokenizer(chat=True), None, {"chat_template": True}, input_name="pixel_values",
                                     kind="causal", prompt_template="Q: {question} A:")
    assert not rebuilt.uses_chat_template and rebuilt.prompt_template == "Q: {question} A:"


def test_a_recorded_chat_template_the_base_lacks_is_refused_naming_the_record():
    with pytest.raises(ValueError, match=r"memvp_cli.json says its rows were built with .*chat_template=True.*"
                                         r"neither the tokenizer nor the processor has a chat template"):
        collator_from_manifest(word_tokenizer(chat=False), None, {"chat_template": True}, input_name="pixel_values",
                               kind="causal")


@pytest.mark.parametrize("key, value, expected", [
    ("image_normalization", "clip", "'image_normalization' must be one of"),
    ("prompt_template", "no field", "'prompt_template' must be null or a str with a {question} field"),
    ("chat_template", "yes", "'chat_template' must be true, false or null"),
])
def test_a_damaged_record_value_is_refused_naming_the_file(tmp_path, key, value, expected):
    write_run_manifest(str(tmp_path), {key: value})
    with pytest.raises(ValueError, match=rf"memvp_cli.json: {expected}"):
        read_run_manifest(str(tmp_path))


# ------------------------------------------------------------------------------------------------ images


def authors_transform(image: Image.Image, size: int) -> np.ndarray:
    """The authors' Resize((size, size), BICUBIC) -> ToTensor -> Normalize(ImageNet), written out with PIL + numpy."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)).transpose(2, 0, 1)


def test_the_imagenet_processor_is_the_authors_transform_on_a_wide_image():
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 70, 3), dtype=np.uint8))
    pixels = imagenet_image_processor(32)(images=[wide], return_tensors="pt")["pixel_values"][0].numpy()
    np.testing.assert_allclose(pixels, authors_transform(wide, 32), atol=1e-6)


def test_encoder_normalization_keeps_the_encoders_saved_processor(tmp_path):
    saved = clip_image_processor(32)
    saved.image_mean = [0.1, 0.2, 0.3]
    saved.save_pretrained(tmp_path)
    config = tiny_clip().config
    assert list(encoder_image_processor(str(tmp_path), config, "encoder").image_mean) == [0.1, 0.2, 0.3]
    assert list(encoder_image_processor(str(tmp_path), config, "imagenet").image_mean) == list(IMAGENET_MEAN)


@pytest.fixture
def adapter_with_clip(tmp_path):
    """An adapter folder as memvp-train leaves it (base, encoder, adapter, memvp_cli.json), without training."""
    tokenizer = word_tokenizer(chat=False)
    base = tiny_llama(tokenizer, hidden_size=64)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    tiny_clip(hidden_size=32).save_pretrained(tmp_path / "clip")
    base.name_or_path = str(tmp_path / "base")
    config = MemVPConfig(visual_dim=32, num_memory_slots=20, vision_encoder=str(tmp_path / "clip"),
                         task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    record = {"featurizer": None, "vision_model_name_or_path": str(tmp_path / "clip"), "kind": "causal"}
    return tmp_path / "adapter", record


@pytest.mark.parametrize("normalization", ["imagenet", "encoder"])
def test_memvp_infer_feeds_pixels_with_the_recorded_normalization(adapter_with_clip, normalization):
    adapter, record = adapter_with_clip
    write_run_manifest(str(adapter), {**record, "image_normalization": normalization})
    _, _, collator, _ = load_for_inference(InferOptions(adapter=str(adapter)))
    digit = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pixels = collator.prompts([{"question": "What digit is shown ?", "image": digit}])["pixel_values"][0].numpy()
    expected = (authors_transform(digit, 32) if normalization == "imagenet"
                else clip_image_processor(32)(images=[digit], return_tensors="pt")["pixel_values"][0].numpy())
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_memvp_infer_prompts_with_the_recorded_template(adapter_with_clip):
    adapter, record = adapter_with_clip
    write_run_manifest(str(adapter), {**record, "prompt_template": "Q: {question} A:", "chat_template": False})
    _, tokenizer, collator, _ = load_for_inference(InferOptions(adapter=str(adapter)))
    ids = collator.prompts([{"question": "What digit is shown ?"}])["input_ids"][0].tolist()
    assert ids == tokenizer("Q: What digit is shown ? A:")["input_ids"]


def test_a_converted_authors_checkpoint_records_their_image_normalization(tmp_path):
    import torch

    from memvp_peft.cli.convert import convert_authors_checkpoint

    torch.save({"model": {"adapter_proj.fc1.weight": torch.randn(8, 32), "adapter_proj.fc1.bias": torch.zeros(8),
                          "adapter_proj.fc2.weight": torch.randn(64, 8), "adapter_proj.fc2.bias": torch.zeros(64),
                          "adapter_emb1": torch.randn(1, 20, 64), "adapter_emb2": torch.zeros(1, 20, 64)}},
               tmp_path / "memvp.pth")
    tiny_clip(hidden_size=32).save_pretrained(tmp_path / "clip")
    convert_authors_checkpoint(str(tmp_path / "memvp.pth"), str(tmp_path / "adapter"),
                               vision_encoder=str(tmp_path / "clip"))
    record = json.loads((tmp_path / "adapter" / "memvp_cli.json").read_text())
    assert record["image_normalization"] == "imagenet" and record["chat_template"] is False
    assert record["vision_model_name_or_path"] == str(tmp_path / "clip") and record["kind"] == "causal"
    assert read_run_manifest(str(tmp_path / "adapter")) == record  # valid as memvp-infer reads it


# ------------------------------------------------------------------------------------------------ real runs


@pytest.mark.slow
def test_memvp_train_records_a_prompt_template_and_memvp_infer_prompts_with_it(tmp_path):
    from memvp_peft.cli.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--quick", "--prompt_template", "Q: {question}\nA:", "--output_dir", str(out)]) == 0
    record = json.loads((out / "memvp_cli.json").read_text())
    assert (record["prompt_template"], record["chat_template"]) == ("Q: {question}\nA:", False)
    _, tokenizer, collator, _ = load_for_inference(InferOptions(adapter=str(out)))
    ids = collator.prompts([{"question": DIGIT_QUESTION}])["input_ids"][0].tolist()
    assert ids == tokenizer(f"Q: {DIGIT_QUESTION}\nA:")["input_ids"]


@pytest.mark.slow
def test_digits_on_a_base_with_a_chat_template_trains_and_answers_with_todays_prompt(tmp_path):
    from memvp_peft.cli.train import PROMPT_CORPUS, main as train_main

    tokenizer = build_word_tokenizer(PROMPT_CORPUS, [str(d) for d in range(10)])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tiny_llama(tokenizer, hidden_size=64).save_pretrained(tmp_path / "chat-base")
    tokenizer.save_pretrained(tmp_path / "chat-base")
    out = tmp_path / "run"
    assert train_main(["--model_name_or_path", str(tmp_path / "chat-base"), "--quick", "--output_dir", str(out)]) == 0
    assert json.loads((out / "memvp_cli.json").read_text())["chat_template"] is False
    _, tokenizer, collator, _ = load_for_inference(InferOptions(adapter=str(out)))
    assert not collator.uses_chat_template
    ids = collator.prompts([{"question": DIGIT_QUESTION}])["input_ids"][0].tolist()
    assert ids == tokenizer(f"Question: {DIGIT_QUESTION}\nAnswer:")["input_ids"]
