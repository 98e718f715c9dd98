"""The tiny VLMs of tests/vlm_fixtures.py are faithful VLMs of their families, without MemVP: the family's own
processor expands the family's image marker into as many image tokens as the model's tower gives each image, with the
family's own image inputs beside them, and the model reads the image (its loss and logits follow the pixels).

Every other test of a VLM family trusts these fixtures; this file is what makes that trust earned. A family whose
processor needs a package this machine lacks is skipped by its builder, which says what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers

from vlm_fixtures import (FAMILIES, chat_batch, digit_images, mistral3_image_processor, mistral3_model,
                          pixtral_processor_class)

TEXT_INPUTS = {"input_ids", "attention_mask", "pixel_values"}


@dataclass(frozen=True)
class Family:
    model_type: str
    processor: str  # the family's processor class (an image-only subclass of it where torchvision is missing)
    image_inputs: frozenset  # what the processor returns beside input_ids, attention_mask and pixel_values
    tower: str  # where the vision tower sits under `model.model`
    tokens_per_image: tuple  # image tokens of the two images of `digit_images(2)`: 32 x 32, then 48 x 24


QWEN_INPUTS = frozenset({"image_grid_thw", "mm_token_type_ids"})
FAMILY = {
    # dynamic resolution: 8 x 8 patches merged 2 x 2 = 16 tokens; 48 x 24 -> 12 x 6 patches = 18 tokens
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLProcessor", QWEN_INPUTS, "visual", (16, 18)),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2_5_VLProcessor", QWEN_INPUTS, "visual", (16, 18)),
    "qwen3_vl": Family("qwen3_vl", "Qwen3VLProcessor", QWEN_INPUTS, "visual", (16, 18)),
    # a fixed number per image, pooled by the projector
    "gemma3": Family("gemma3", "Gemma3Processor", frozenset({"token_type_ids"}), "vision_tower", (4, 4)),
    # 4 tokens per crop: 2 x 2 crops + the global view = 20; 1 x 2 + the global view = 12
    "idefics3": Family("idefics3", "Idefics3Processor", frozenset({"pixel_attention_mask"}), "vision_model", (20, 12)),
    "smolvlm": Family("smolvlm", "SmolVLMProcessor", frozenset({"pixel_attention_mask"}), "vision_model", (20, 12)),
    # CLIP's 16 patches, CLS dropped
    "llava": Family("llava", "LlavaProcessor", frozenset(), "vision_tower", (16, 16)),
    # AnyRes: overview + unpadded tiles + a newline per row
    "llava_next": Family("llava_next", "LlavaNextProcessor", frozenset({"image_sizes"}), "vision_tower", (36, 52)),
    "llava_onevision": Family("llava_onevision", "LlavaOnevisionProcessor",
                              frozenset({"image_sizes", "batch_num_images"}), "vision_tower", (36, 52)),
    # Pixtral at the image's own size, merged 2 x 2: 4 x 4 and 4 x 2 tokens
    "mistral3": Family("mistral3", "PixtralProcessor", frozenset({"image_sizes"}), "vision_tower", (16, 8)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    """(name, model, processor), each family built once for the module."""
    model, processor = FAMILIES[request.param]()
    return request.param, model, processor


@pytest.fixture(scope="module")
def two_images():
    return digit_images(2)[0]


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch, labels=batch["input_ids"])


def _feature_rows(features) -> int:
    """How many vectors the language model receives for the images: the projected features (`pooler_output`) are a
    tensor or, per image, a tuple of tensors, depending on the family and the transformers version."""
    pooled = features.pooler_output
    pooled = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled]) if isinstance(pooled, (list, tuple)) else pooled
    return pooled.reshape(-1, pooled.shape[-1]).shape[0]


def test_every_family_has_an_expectation():
    assert sorted(FAMILY) == sorted(FAMILIES)


def test_the_fixture_is_the_familys_own_tiny_model_and_processor(family):
    name, model, processor = family
    expected = FAMILY[name]
    assert model.config.model_type == expected.model_type
    # transformers' PixtralProcessor is a placeholder without torchvision; the fixture imports the class itself
    own = pixtral_processor_class() if name == "mistral3" else getattr(transformers, expected.processor)
    assert isinstance(processor, own)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 300_000


def test_the_tokenizer_holds_the_image_token_under_the_configs_id(family):
    _, model, processor = family
    image_token_id = model.config.image_token_id
    assert image_token_id in processor.image_token_ids
    token = processor.tokenizer.convert_ids_to_tokens(image_token_id)
    assert processor.tokenizer(token, add_special_tokens=False)["input_ids"] == [image_token_id]


def test_the_processor_expands_each_image_into_as_many_tokens_as_the_tower_gives_it(family, two_images):
    name, model, processor = family
    batch = chat_batch(processor, two_images)
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    assert tuple(per_row) == FAMILY[name].tokens_per_image
    image_kwargs = {k: batch[k] for k in ("image_grid_thw", "image_sizes", "pixel_attention_mask") if k in batch}
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], **image_kwargs)
    assert _feature_rows(features) == sum(per_row)


def test_the_batch_carries_the_familys_image_inputs(family, two_images):
    name, _, processor = family
    batch = chat_batch(processor, two_images, answers=["zero", "one"])
    assert set(batch) - TEXT_INPUTS == FAMILY[name].image_inputs


def test_the_vision_tower_sits_where_the_family_puts_it(family):
    name, model, _ = family
    assert isinstance(getattr(model.model, FAMILY[name].tower), torch.nn.Module)


def test_the_model_reads_the_image(family, two_images):
    """Two other digits of the same sizes: the same ids, other pixels, so other logits and another loss."""
    _, model, processor = family
    batch = chat_batch(processor, two_images, answers=["zero", "one"])
    other = chat_batch(processor, digit_images(2, offset=2)[0], answers=["zero", "one"])
    assert torch.equal(batch["input_ids"], other["input_ids"])
    first, second = _outputs(model, batch), _outputs(model, other)
    assert torch.isfinite(first.loss)
    assert not torch.allclose(first.logits, second.logits)
    assert first.loss != second.loss


def test_the_model_generates_from_the_processors_prompt(family, two_images):
    _, model, processor = family
    batch = chat_batch(processor, two_images, padding_side="left")
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


def test_the_chat_template_marks_the_answer_as_the_assistants(family):
    _, _, processor = family
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit is shown ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]
    rendered = processor.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                       return_assistant_tokens_mask=True)
    marked = [i for i, m in zip(rendered["input_ids"], rendered["assistant_masks"]) if m]
    assert processor.tokenizer.convert_ids_to_tokens(marked)[0] == "seven"


def test_the_fixture_is_seeded(family):
    name, model, _ = family
    again, _ = FAMILIES[name]()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_mistral3_model_reads_pixtral_image_sizes_without_its_processor():
    """PixtralProcessor needs torchvision; the model and its image processor do not, and give each image its own
    number of merged tokens: 4 x 4 for 32 x 32, 4 x 2 for 48 x 24 (longest side resized to 32)."""
    model, _ = mistral3_model()
    pixels = mistral3_image_processor()(digit_images(2)[0], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    assert [f.shape[0] for f in features.pooler_output] == [16, 8]
