"""Tiny VLMs of every family MemVP supports, each with the family's own processor, built offline.

One function per family returns `(model, processor)`. The model is the family's `...ForConditionalGeneration` from
a tiny config (text width 64, 2 text layers, 2 vision layers of width 32, a vocabulary of a few dozen words, images
of a few dozen pixels: a forward of two rows takes tens of milliseconds on a CPU), random but seeded, in eval mode.
The processor is the family's own processor class around the family's own image processor (sized for those images)
and a word-level tokenizer that holds the family's special tokens under the ids the model's config names, with a
chat template in the family's layout. So a batch is what the family's processor makes of a chat -- image
placeholders expanded to the number of tokens the model's tower gives an image -- and `model(**batch)` is the
family's own forward. Nothing is downloaded.

Where this machine lacks what a family's processor needs outside transformers, the builder skips the test that asked
for it, saying what is missing: SmolVLM's processor needs `num2words`. Mistral3's `PixtralProcessor` is built
without torchvision, which its module imports but it never uses (`pixtral_processor_class` says how). Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, SmolVLM and LLaVA-OneVision processors also hold a video processor, which needs torchvision:
without it they are built image-only (`image_only`), the same class without its video processor, which the image
path never touches.

Beside the builders (and `FAMILIES`, name -> builder): `digit_images` (real images of two sizes), `chat_batch` (a
batch as the family's processor makes it from TRL-layout chats), `mistral3_model` (Mistral3 without its processor),
`pixtral_processor_class`. Imported by name (`from vlm_fixtures import ...`), like tests/trainers/trl_fixtures.py.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

QUESTION = "What digit is shown ?"
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Two sizes (width, height), so that the families that read an image at its own size (Qwen's dynamic resolution,
# LLaVA-NeXT's and OneVision's AnyRes, Idefics3's and SmolVLM's splitting, Pixtral) give each a different number of
# visual tokens.
IMAGE_SIZES = ((32, 32), (48, 24))
# The words of the chats the tests write and of the families' templates; anything else is `<unk>`.
WORDS = [*QUESTION.split(), *DIGIT_NAMES, "Answer", ":", ".", "user", "assistant", "system", "model", "User",
         "Assistant", "USER", "ASSISTANT", "Look", "closely", "image", "the", "a", "an", "of", "and", "is", "it"]
BASE_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
TEXT_WIDTH = 64


# ----------------------------------------------------------------------------------------------------------- images


def digit_images(count: int = 2, sizes: tuple[tuple[int, int], ...] = IMAGE_SIZES, offset: int = 0):
    """Real images: scikit-learn's digit scans `offset`..`offset + count - 1`, upscaled to RGB PIL images, the i-th
    at `sizes[i % len(sizes)]` (width, height). Returns the images and their digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images, digits = [], []
    for i in range(count):
        scan = np.rint(data.images[offset + i] * (255 / 16)).astype(np.uint8)
        images.append(Image.fromarray(scan).convert("RGB").resize(sizes[i % len(sizes)], Image.BICUBIC))
        digits.append(int(data.target[offset + i]))
    return images, digits


# -------------------------------------------------------------------------------------------- tokenizer, template


def word_tokenizer(named_specials: dict[str, str], specials: tuple[str, ...] = (), chat_template: str = ""):
    """A word-level `PreTrainedTokenizerFast` with fixed ids: `<pad>` 0, `<bos>` 1, `<eos>` 2, `<unk>` 3, then
    `WORDS`, then the family's special tokens -- first `named_specials` (exposed as attributes, as the families'
    processors read them: `tokenizer.image_token`, `tokenizer.image_token_id`, `tokenizer.boi_token` ...), then
    `specials` -- each one token wherever it stands in a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(dict.fromkeys([*BASE_SPECIALS, *WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        extra_special_tokens=dict(named_specials),
    )
    tokenizer.add_tokens([token for token in specials if token not in tokenizer.get_vocab()], special_tokens=True)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def chat_template(image: str, user: tuple[str, str], assistant: tuple[str, str],
                  system: Optional[tuple[str, str]] = None, start: str = "") -> str:
    """A chat template in a family's layout: `start`, then each turn between its role's (opening, closing) text, an
    image entry of a typed content written as the family's `image` marker (what its processor expands), the
    assistant turns inside `{% generation %}` (so `return_assistant_tokens_mask` works), and the assistant's opening
    as the generation prompt."""
    system = system or user
    say = json.dumps  # a JSON string is a Jinja string literal, escapes included
    return (
        "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
        "{%- for part in content -%}{%- if part['type'] == 'image' -%}{{ " + say(image) + " }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
        "{{ " + say(start) + " }}{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}{{ " + say(assistant[0]) + " }}"
        "{% generation %}{{ render(message['content']) }}{{ " + say(assistant[1]) + " }}{% endgeneration %}"
        "{%- elif message['role'] == 'system' -%}{{ " + say(system[0]) + " }}{{ render(message['content']) }}"
        "{{ " + say(system[1]) + " }}"
        "{%- else -%}{{ " + say(user[0]) + " }}{{ render(message['content']) }}{{ " + say(user[1]) + " }}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + say(assistant[0]) + " }}{%- endif -%}"
    )


class NoVideoProcessor:
    """The video processor of an image-only processor: no frame count, no frame rate. SmolVLM's `apply_chat_template`
    reads both from its video processor whatever the chat holds; anything else asked of it is an AttributeError."""

    num_frames = None
    fps = None


def image_only(processor_class):
    """`processor_class` without its video processor, for a machine without torchvision (which every transformers
    video processor needs). The subclass only leaves `video_processor` out of the processor's parts (a
    `NoVideoProcessor` stands in): images, text, chat templates, padding and `save_pretrained` are the family's own
    code. With torchvision the builders use the family's class itself."""

    class ImageOnly(processor_class):
        video_processor = NoVideoProcessor()

        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


def _with_video_processor(processor_class, video_processor: Callable[[], Any], **parts):
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return processor_class(video_processor=video_processor(), **parts)
    return image_only(processor_class)(video_processor=None, **parts)


def _image_processor(name: str):
    """The family's image processor class, its PIL backend where transformers has one: the same pixels with or without
    torchvision, and no warning about the missing backend."""
    import transformers

    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def _text(tokenizer, **fields) -> dict:
    """The tiny text model's fields: width 64, 2 layers, 4 heads of 16 over 2 key/value heads, the tokenizer's
    vocabulary and special ids."""
    return dict(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, **fields)


def _build(model_class, config, seed: int):
    torch.manual_seed(seed)
    return model_class(config).eval()


def _transformers_class(name: str):
    import transformers

    if not hasattr(transformers, name):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {name}")
    return getattr(transformers, name)


# ------------------------------------------------------------------------------------------------------------- Qwen

QWEN_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
QWEN_TEMPLATE = chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                              user=("<|im_start|>user\n", "<|im_end|>\n"),
                              assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
                              system=("<|im_start|>system\n", "<|im_end|>\n"))
# Patches of 4 pixels merged 2 x 2 into one token: a 32 x 32 image is 8 x 8 patches, 16 tokens; 48 x 24 is 18.
QWEN_PATCH = 4


def _qwen_tokenizer():
    return word_tokenizer(QWEN_SPECIALS, ("<|im_start|>", "<|im_end|>"), QWEN_TEMPLATE)


def _qwen_image_processor():
    return _image_processor("Qwen2VLImageProcessor")(
        patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=48 * 48)


def _qwen_ids(tokenizer) -> dict:
    return {name + "_id": tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_SPECIALS.items()}


def _qwen_processor(processor_name: str, tokenizer, video_processor_name: str):
    import transformers

    return _with_video_processor(
        _transformers_class(processor_name),
        lambda: getattr(transformers, video_processor_name)(patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2),
        image_processor=_qwen_image_processor(), tokenizer=tokenizer, chat_template=QWEN_TEMPLATE,
    )


def qwen2_vl(seed: int = 0):
    """Qwen2-VL: a ViT over 4-pixel patches merged 2 x 2 (`model.model.visual`, its merger is the projector), M-RoPE
    text positions over the image's grid (`mrope_section` 2 + 3 + 3 = head_dim / 2)."""
    config_class = _transformers_class("Qwen2VLConfig")
    tokenizer = _qwen_tokenizer()
    config = config_class(
        text_config=_text(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=TEXT_WIDTH, num_heads=2, mlp_ratio=2,
                           patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2),
        **_qwen_ids(tokenizer),
    )
    model = _build(_transformers_class("Qwen2VLForConditionalGeneration"), config, seed)
    return model, _qwen_processor("Qwen2VLProcessor", tokenizer, "Qwen2VLVideoProcessor")


def qwen2_5_vl(seed: int = 0):
    """Qwen2.5-VL: Qwen2-VL's layout with a windowed-attention ViT (window of 2 x 2 merged tokens, block 1 full)."""
    config_class = _transformers_class("Qwen2_5_VLConfig")
    tokenizer = _qwen_tokenizer()
    config = config_class(
        text_config=_text(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                       "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=4 * QWEN_PATCH, fullatt_block_indexes=[1]),
        **_qwen_ids(tokenizer),
    )
    model = _build(_transformers_class("Qwen2_5_VLForConditionalGeneration"), config, seed)
    return model, _qwen_processor("Qwen2_5_VLProcessor", tokenizer, "Qwen2VLVideoProcessor")


def qwen3_vl(seed: int = 0):
    """Qwen3-VL: learned position embeddings in the ViT (an 8 x 8 grid, interpolated), DeepStack features from
    vision block 0 added to the first text layers, interleaved M-RoPE."""
    config_class = _transformers_class("Qwen3VLConfig")
    tokenizer = _qwen_tokenizer()
    config = config_class(
        text_config=_text(tokenizer, head_dim=TEXT_WIDTH // 4,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                           "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0]),
        **_qwen_ids(tokenizer),
    )
    model = _build(_transformers_class("Qwen3VLForConditionalGeneration"), config, seed)
    return model, _qwen_processor("Qwen3VLProcessor", tokenizer, "Qwen3VLVideoProcessor")


# ----------------------------------------------------------------------------------------------------------- Gemma 3

GEMMA3_SPECIALS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
GEMMA3_TEMPLATE = chat_template("<start_of_image>", start="<bos>", user=("<start_of_turn>user\n", "<end_of_turn>\n"),
                                assistant=("<start_of_turn>model\n", "<end_of_turn>\n"))
GEMMA3_TOKENS_PER_IMAGE = 4  # SigLIP's 4 x 4 patches of a 32-pixel image, average-pooled to 2 x 2


def gemma3(seed: int = 0):
    """Gemma 3: SigLIP (`model.model.vision_tower`), its patches pooled to a fixed `mm_tokens_per_image` by the
    projector; the processor writes `\\n\\n<boi>` + that many image tokens + `<eoi>\\n\\n` for each `<boi>` and
    returns `token_type_ids` (1 on image tokens: bidirectional attention among them)."""
    config_class = _transformers_class("Gemma3Config")
    tokenizer = word_tokenizer(GEMMA3_SPECIALS, ("<start_of_turn>", "<end_of_turn>"), GEMMA3_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_SPECIALS.items()}
    config = config_class(
        text_config=_text(tokenizer, head_dim=TEXT_WIDTH // 4, query_pre_attn_scalar=TEXT_WIDTH // 4,
                          sliding_window=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE, image_token_index=ids["image_token"],
        boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
    )
    model = _build(_transformers_class("Gemma3ForConditionalGeneration"), config, seed)
    # Gemma 3 initialises its projector's matrix to zeros (a checkpoint brings trained weights): every image would be
    # the same zero embedding, so the fixture draws it at random, at the scale of the normalised vision features.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=32 ** -0.5)
    processor = _transformers_class("Gemma3Processor")(
        image_processor=_image_processor("Gemma3ImageProcessor")(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, image_seq_length=GEMMA3_TOKENS_PER_IMAGE, chat_template=GEMMA3_TEMPLATE,
    )
    return model, processor


# -------------------------------------------------------------------------------------------- Idefics3, SmolVLM

IDEFICS3_SPECIALS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                     "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
IDEFICS3_GRID_TOKENS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
IDEFICS3_TEMPLATE = chat_template("<image>", start="<|im_start|>", user=("User:", "<end_of_utterance>\n"),
                                  assistant=("Assistant:", "<end_of_utterance>\n"))
# 32-pixel crops of 4 x 4 patches of 8 pixels, pixel-shuffled 2 x 2: 4 tokens per crop. An image's longest side is
# resized to 64, so a 32 x 32 image is 2 x 2 crops + the global one, 48 x 24 is 1 x 2 + the global one.
IDEFICS3_CROP = 32
IDEFICS3_TOKENS_PER_CROP = 4


def _idefics3_parts(config_name: str):
    tokenizer = word_tokenizer(IDEFICS3_SPECIALS, ("<|im_start|>", *IDEFICS3_GRID_TOKENS, "<video>"),
                               IDEFICS3_TEMPLATE)
    config = _transformers_class(config_name)(
        text_config=dict(_text(tokenizer), model_type="llama"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IDEFICS3_CROP, patch_size=8),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, config


def _idefics3_image_processor(name: str):
    return _image_processor(name)(size={"longest_edge": 2 * IDEFICS3_CROP},
                                  max_image_size={"longest_edge": IDEFICS3_CROP}, do_image_splitting=True)


def idefics3(seed: int = 0):
    """Idefics3: SigLIP-like tower (`model.model.vision_model`), the connector's pixel shuffle + linear as the
    projector; the processor splits an image into crops + a global view (`pixel_values` batch x crops x 3 x H x W,
    `pixel_attention_mask` for the padded crops) and writes `<fake_token_around_image><row_i_col_j>` + image tokens
    per crop."""
    tokenizer, config = _idefics3_parts("Idefics3Config")
    model = _build(_transformers_class("Idefics3ForConditionalGeneration"), config, seed)
    processor = _transformers_class("Idefics3Processor")(
        image_processor=_idefics3_image_processor("Idefics3ImageProcessor"), tokenizer=tokenizer,
        image_seq_len=IDEFICS3_TOKENS_PER_CROP, chat_template=IDEFICS3_TEMPLATE,
    )
    return model, processor


def smolvlm(seed: int = 0):
    """SmolVLM: Idefics3's architecture and image layout under its own classes (`SmolVLMProcessor` writes the grid
    markers the same way; it needs `num2words`, for video frame timestamps)."""
    try:
        import num2words  # noqa: F401
    except ImportError:
        pytest.skip("SmolVLMProcessor needs the num2words package, which is not installed")
    import transformers

    tokenizer, config = _idefics3_parts("SmolVLMConfig")
    model = _build(_transformers_class("SmolVLMForConditionalGeneration"), config, seed)
    processor = _with_video_processor(
        _transformers_class("SmolVLMProcessor"), lambda: transformers.SmolVLMVideoProcessor(),
        image_processor=_idefics3_image_processor("SmolVLMImageProcessor"), tokenizer=tokenizer,
        image_seq_len=IDEFICS3_TOKENS_PER_CROP, chat_template=IDEFICS3_TEMPLATE,
    )
    return model, processor


# ------------------------------------------------------------------------------------------------------------ LLaVA

LLAVA_TEMPLATE = chat_template("<image>\n", user=("USER: ", " "), assistant=("ASSISTANT: ", "<eos>"))
MISTRAL_TEMPLATE = chat_template("<image>\n", start="<bos>", user=("[INST] ", " [/INST]"), assistant=(" ", "<eos>"))
QWEN_LLAVA_TEMPLATE = chat_template("<image>\n", user=("<|im_start|>user\n", "<|im_end|>\n"),
                                    assistant=("<|im_start|>assistant\n", "<|im_end|>\n"))
# CLIP over 32-pixel images in 8-pixel patches: 16 patch tokens + CLS
CLIP_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
SIGLIP_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, image_size=32, patch_size=8)
# AnyRes grids of 32-pixel tiles: 1 x 1, 1 x 2, 2 x 1, 2 x 2 (height, width in pixels)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _llava_tokenizer(template: str, *specials: str):
    return word_tokenizer({"image_token": "<image>"}, specials, template)


def llava(seed: int = 0):
    """LLaVA-1.5: CLIP (`model.model.vision_tower`), the penultimate layer's patches without CLS ('default'), a
    2-layer MLP projector; one `<image>` becomes 16 image tokens."""
    tokenizer = _llava_tokenizer(LLAVA_TEMPLATE)
    config = _transformers_class("LlavaConfig")(
        text_config=dict(_text(tokenizer), model_type="llama"), vision_config=CLIP_VISION,
        image_token_index=tokenizer.image_token_id, vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    model = _build(_transformers_class("LlavaForConditionalGeneration"), config, seed)
    processor = _transformers_class("LlavaProcessor")(
        image_processor=_image_processor("CLIPImageProcessor")(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor


def llava_next(seed: int = 0):
    """LLaVA-NeXT: CLIP over the overview + the AnyRes tiles of the best-fitting grid (`pixel_values` batch x tiles x
    3 x 32 x 32, `image_sizes` the original height and width); the model unpads the tiles' features to the image's
    aspect ratio and adds an `image_newline` per row, so the token count depends on the image's size."""
    tokenizer = _llava_tokenizer(MISTRAL_TEMPLATE, "[INST]", "[/INST]")
    config = _transformers_class("LlavaNextConfig")(
        text_config=dict(_text(tokenizer), model_type="mistral", head_dim=TEXT_WIDTH // 4, sliding_window=None),
        vision_config=CLIP_VISION, image_grid_pinpoints=PINPOINTS, image_token_index=tokenizer.image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    model = _build(_transformers_class("LlavaNextForConditionalGeneration"), config, seed)
    processor = _transformers_class("LlavaNextProcessor")(
        image_processor=_image_processor("LlavaNextImageProcessor")(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=MISTRAL_TEMPLATE,
    )
    return model, processor


def llava_onevision(seed: int = 0):
    """LLaVA-OneVision: SigLIP (no CLS: 'full'), AnyRes tiles as LLaVA-NeXT with `image_sizes`, a Qwen2 text model,
    the Qwen chat layout with `<image>`."""
    import transformers

    tokenizer = _llava_tokenizer(QWEN_LLAVA_TEMPLATE, "<|im_start|>", "<|im_end|>", "<video>")
    config = _transformers_class("LlavaOnevisionConfig")(
        text_config=dict(_text(tokenizer), model_type="qwen2"), vision_config=SIGLIP_VISION,
        image_grid_pinpoints=PINPOINTS, image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    model = _build(_transformers_class("LlavaOnevisionForConditionalGeneration"), config, seed)
    processor = _with_video_processor(
        _transformers_class("LlavaOnevisionProcessor"), lambda: transformers.LlavaOnevisionVideoProcessor(),
        image_processor=_image_processor("LlavaOnevisionImageProcessor")(
            size={"height": 32, "width": 32}, image_grid_pinpoints=PINPOINTS),
        tokenizer=tokenizer, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=QWEN_LLAVA_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------------------- Mistral3

MISTRAL3_SPECIALS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
MISTRAL3_TEMPLATE = chat_template("[IMG]", start="<bos>", user=("[INST]", "[/INST]"), assistant=("", "<eos>"))
MISTRAL3_PATCH = 4  # Pixtral's 4-pixel patches, merged 2 x 2 by the projector


def mistral3_model(seed: int = 0):
    """Mistral 3's model and tokenizer without the processor: Pixtral (`model.model.vision_tower`) over the image at
    its own size (`image_sizes`), 4-pixel patches merged 2 x 2 by the projector. Builds without torchvision, for
    tests of the tower alone."""
    tokenizer = word_tokenizer({"image_token": "[IMG]"}, MISTRAL3_SPECIALS, MISTRAL3_TEMPLATE)
    config = _transformers_class("Mistral3Config")(
        text_config=dict(_text(tokenizer), model_type="mistral", head_dim=TEXT_WIDTH // 4, sliding_window=None),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=MISTRAL3_PATCH, head_dim=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )
    return _build(_transformers_class("Mistral3ForConditionalGeneration"), config, seed), tokenizer


def mistral3_image_processor():
    """Pixtral's image processor for `mistral3_model`: longest side 32, sides rounded to the merged patch (8)."""
    return _image_processor("PixtralImageProcessor")(
        size={"longest_edge": 32}, patch_size={"height": 2 * MISTRAL3_PATCH, "width": 2 * MISTRAL3_PATCH})


def pixtral_processor_class():
    """transformers' own `PixtralProcessor` class, also without torchvision.

    Its module imports `get_resize_output_image_size` from the torchvision image processor's module, which imports
    torchvision, so without it `transformers.PixtralProcessor` is only a placeholder. The processor itself never
    needs torchvision: it uses that function only to count tokens for serving engines (`_get_num_multimodal_tokens`),
    and the PIL backend's module defines the same function. So the processor's module is imported once with the PIL
    module standing in for its torchvision sibling in `sys.modules` (put back right after): the class is
    transformers' own code, unchanged, and it runs with `PixtralImageProcessorPil`. With torchvision, the class is
    imported as usual."""
    import importlib
    import sys

    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return _transformers_class("PixtralProcessor")
    sibling = "transformers.models.pixtral.image_processing_pixtral"
    saved = sys.modules.get(sibling)
    sys.modules[sibling] = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
    try:
        return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor
    finally:
        if saved is None:
            sys.modules.pop(sibling, None)
        else:
            sys.modules[sibling] = saved


def mistral3(seed: int = 0):
    """Mistral 3 (Mistral-Small-3.1) with its own `PixtralProcessor` (`pixtral_processor_class`), which writes
    `[IMG]` per merged token, `[IMG_BREAK]` after each row but the last and `[IMG_END]` after it, and returns
    `image_sizes`: a 32 x 32 image is 4 x 4 merged tokens, 48 x 24 (resized to 32 x 16) 4 x 2."""
    model, tokenizer = mistral3_model(seed)
    processor = pixtral_processor_class()(
        image_processor=mistral3_image_processor(), tokenizer=tokenizer, patch_size=MISTRAL3_PATCH,
        spatial_merge_size=2, chat_template=MISTRAL3_TEMPLATE,
    )
    return model, processor


# ------------------------------------------------------------------------------------------------------------ batches

FAMILIES: dict[str, Callable[..., tuple]] = {
    "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "gemma3": gemma3, "idefics3": idefics3,
    "smolvlm": smolvlm, "llava": llava, "llava_next": llava_next, "llava_onevision": llava_onevision,
    "mistral3": mistral3,
}


def image_messages(question: str = QUESTION, answer: Optional[str] = None, images: int = 1) -> list[dict]:
    """One conversation in TRL's typed layout: a user turn of `images` image entries and `question`, then the
    assistant's `answer` if given."""
    messages = [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def chat_batch(processor, images: list, answers: Optional[list[str]] = None, question: str = QUESTION,
               **processor_kwargs) -> dict:
    """A padded batch as a VLM's processor makes it from chats: one row per image, `question` about it (and its
    answer when `answers` is given, else the generation prompt), rendered by the processor's chat template, then
    `processor(text=..., images=..., **processor_kwargs)` (e.g. `padding_side="left"` to generate)."""
    conversations = [image_messages(question, None if answers is None else answers[i]) for i in range(len(images))]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=answers is None)
             for c in conversations]
    texts = [text[0] if isinstance(text, list) else text for text in texts]
    return processor(text=texts, images=[[image] for image in images], padding=True, return_tensors="pt",
                     **processor_kwargs)


def rows_batch(processor, images_per_row: list, answers: Optional[list[str]] = None, padding_side: str = "right",
               question: str = QUESTION) -> dict:
    """The processor's own batch of chats whose row b shows `images_per_row[b]` (a list, maybe empty: a text-only
    row), answered with `answers` when given, else ending on the generation prompt."""
    texts = []
    for row, row_images in enumerate(images_per_row):
        messages = image_messages(question, None if answers is None else answers[row], images=len(row_images))
        if not row_images:
            messages[0]["content"] = messages[0]["content"][-1:]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=answers is None))
    flat = [image for row_images in images_per_row for image in row_images]
    out = processor(text=texts, images=flat or None, padding=True, padding_side=padding_side, return_tensors="pt")
    return dict(out)


def text_batch(processor, answers: Optional[list[str]] = None, rows: int = 2, padding_side: str = "right"):
    """The chats of `chat_batch` without their image entries: the text alone, the sequence the language model must
    see when MemVP takes the images out of a processor's batch."""
    texts = [processor.apply_chat_template(image_messages(QUESTION, None if answers is None else answers[i], images=0),
                                           tokenize=False, add_generation_prompt=answers is None)
             for i in range(rows)]
    return processor.tokenizer(texts, padding=True, return_tensors="pt", padding_side=padding_side,
                               add_special_tokens=False)


def with_labels(inputs: dict) -> dict:
    """`inputs` with every attended token as a label (padding -100)."""
    return {**inputs, "labels": inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)}


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits
