"""Tiny models of the Llava-layout VLM families (Llava, LLaVA-NeXT, LLaVA-OneVision) built from configs, with their
own processors built offline (a word tokenizer with the `<image>` token, the family's image processor from kwargs),
and the conversations the tests feed them. Nothing is downloaded.

Every tower is a 2-block CLIP reading 32x32 tiles as 4x4 patches of 8 pixels: 16 patch tokens per tile, width 32
(`VISUAL_DIM`). LLaVA-NeXT and OneVision tile an image onto the best of `GRID_PINPOINTS` (one or two tiles per side).

Imported by name (`from llava_family_fixtures import ...`), like tests/trainers/trl_fixtures.py, whose word tokenizer,
digit images and Llava chat template it shares.
"""

from __future__ import annotations

import torch
from trl_fixtures import LLAVA_TEMPLATE, NAMES, QUESTION, digit_images, word_tokenizer

from memvp_peft import MemVPConfig
from memvp_peft.demo_models import clip_image_processor

VISUAL_DIM = 32
TOKENS_PER_TILE = 16
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def vlm_tokenizer():
    """The word tokenizer with `<image>` and `<video>` as special tokens, as a VLM's tokenizer has them."""
    tokenizer = word_tokenizer(image_token=True)
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    return tokenizer


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=VISUAL_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8)


def _text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _ids(tokenizer):
    return {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}


def tiny_llava(tokenizer, seed: int = 0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=_vision_config(), text_config=_text_config(tokenizer), **_ids(tokenizer))
    return LlavaForConditionalGeneration(config).eval()


def tiny_llava_next(tokenizer, seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=_vision_config(), text_config=_text_config(tokenizer),
                             image_grid_pinpoints=GRID_PINPOINTS, **_ids(tokenizer))
    return LlavaNextForConditionalGeneration(config).eval()


def tiny_llava_onevision(tokenizer, seed: int = 0, vision_aspect_ratio: str = "anyres_max_9"):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaOnevisionConfig(
        vision_config=_vision_config(), text_config=_text_config(tokenizer), image_grid_pinpoints=GRID_PINPOINTS,
        vision_feature_select_strategy="default", vision_aspect_ratio=vision_aspect_ratio,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), **_ids(tokenizer))
    return LlavaOnevisionForConditionalGeneration(config).eval()


def llava_processor(tokenizer):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=clip_image_processor(32), tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)


def next_image_processor():
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_grid_pinpoints=GRID_PINPOINTS)


def llava_next_processor(tokenizer):
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(image_processor=next_image_processor(), tokenizer=tokenizer, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)


def onevision_image_processor():
    """OneVision's image processor (its processor needs a video processor, which needs torchvision)."""
    from transformers import LlavaOnevisionImageProcessor

    return LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=GRID_PINPOINTS)


def sized_images():
    """Two digit images padded onto canvases of other aspect ratios (wide, tall), so tiling differs per image."""
    from PIL import Image

    digits, _ = digit_images(2)
    wide, tall = Image.new("RGB", (50, 20)), Image.new("RGB", (30, 40))
    wide.paste(digits[0].resize((20, 20)), (15, 0))
    tall.paste(digits[1].resize((30, 30)), (0, 5))
    return [wide, tall]


#: A shorter question than QUESTION: rows of other lengths, so a batch without placeholders is padded too.
SHORT_QUESTION = "What digit ?"


def conversation(images: int, answer: str = "one", question: str = QUESTION):
    """One user turn (with `images` image entries) and the assistant's answer, as TRL hands them to a processor."""
    user = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def chat_texts(processor, images_per_row, answers=None, questions=None):
    """The rendered conversations of rows with the given images (a list per row, maybe empty)."""
    answers = answers or [NAMES[row % 10] for row in range(len(images_per_row))]
    questions = questions or [QUESTION] * len(images_per_row)
    return processor.apply_chat_template(
        [conversation(len(images), answer, question)
         for images, answer, question in zip(images_per_row, answers, questions)], tokenize=False)


def processor_batch(processor, images_per_row, padding_side: str = "right", answers=None, questions=None):
    """The family processor's batch for rows with the given images (a list per row, maybe empty)."""
    texts = chat_texts(processor, images_per_row, answers, questions)
    flat = [image for images in images_per_row for image in images]
    return processor(images=flat or None, text=texts, return_tensors="pt", padding=True, padding_side=padding_side)


def memvp_config(**overrides) -> MemVPConfig:
    """No memory dropout, lambda = 1 (so images move the logits far beyond float noise)."""
    fields = dict(visual_dim=VISUAL_DIM, num_memory_slots=TOKENS_PER_TILE, projector_hidden_dim=16,
                  memory_dropout=0.0, visual_scale=1.0, memory_scale=1.0, task_type="CAUSAL_LM")
    fields.update(overrides)
    return MemVPConfig(**fields)


def flipped(images):
    """The same images upside down: other pixels, same sizes."""
    from PIL import ImageOps

    return [ImageOps.flip(image) for image in images]


def image_token(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<image>")


__all__ = [name for name in dir() if not name.startswith("_") and name not in ("annotations", "torch")]
