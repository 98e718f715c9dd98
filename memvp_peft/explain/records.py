"""Explaining answers to records: the batch a collator makes of the records and their answers, what was read for
every answer token (`answers.explain`), and where each slot lies on the record's own images (`layout.slot_layout`).

What a record's images are here is what the user gave, before any tiling or resizing: its `image` / `images` (each
to RGB as the collator reads it), or a video's sampled `frames`. The memory's order of them is the collator's: a
row's images (tiles, frames) in order, a row with fewer than the batch's longest padded with empty ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..data.images import RAW_IMAGE_FIELDS, image_field, record_images
from ..data.video import FRAME_FIELDS, record_frames
from ..vision.encoder import pixel_features
from ..vision.tiling import blocks_per_image, encoder_image_size, tile_pixel_values
from .answers import AnswerReads, explain
from .layout import ImageGeometry, SlotLayout, image_view_for, slot_layout


@dataclass
class ExplainedAnswer:
    """One record's answer explained: its source `images` (RGB PIL, None for an empty slot), which are a video's
    frames (`frames`), the `layout` of its memory on them, the `reads` and each answer token's text."""

    record: Mapping[str, Any]
    answer: str
    token_texts: list[str]
    images: list[Optional[Any]]
    frames: bool
    layout: SlotLayout
    reads: AnswerReads


def adapter_config(model: nn.Module, adapter: Optional[str] = None) -> Any:
    """The `MemVPConfig` of `adapter` (default: the model's active adapter)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise ValueError(f"{type(model).__name__} is no peft model with a MemVP adapter.")
    name = adapter if adapter is not None else getattr(model, "active_adapter", next(iter(configs)))
    if name not in configs:
        raise ValueError(f"no adapter {name!r}; the model has {sorted(configs)}.")
    return configs[name]


def record_sources(record: Mapping[str, Any], collator: Any, where: str = "record") -> tuple[list[Optional[Any]], bool]:
    """The record's images as the user gave them (module docstring) and whether they are a video's frames; none for
    a record of precomputed `pixel_values` / `image_features`, whose pixels are not at hand."""
    field = image_field(record, where, read_video=collator.num_frames is not None)
    if field is None or collator.image_processor is None:  # a text-only collator puts no image into the memory
        return [], False
    if field in FRAME_FIELDS:
        return record_frames(record[field], where, collator.num_frames, image_folder=collator.image_folder,
                             array_value_range=collator.array_value_range), True
    if field not in RAW_IMAGE_FIELDS:  # precomputed features: no pixels to draw a map on
        return [], False
    images, _ = record_images(record[field], where, image_processor=collator.image_processor,
                              image_folder=collator.image_folder, array_value_range=collator.array_value_range)
    return images, False


def tokens_per_block(model: nn.Module, batch: Mapping[str, Any], config: Any) -> int:
    """The encoder's tokens per image or tile of `batch`: the features' token axis, or (pixel values) one tile
    through the attached encoder."""
    features = batch.get("image_features")
    if isinstance(features, torch.Tensor):
        return int(features.shape[-2])
    pixels = batch.get("pixel_values")
    vision = getattr(getattr(model, "base_model", None), "vision_encoder", None)
    if not isinstance(pixels, torch.Tensor) or vision is None:
        raise ValueError("explain needs the batch's image_features, or pixel_values and an attached vision encoder.")
    one = pixels.reshape(-1, *pixels.shape[-3:])[:1]
    size = encoder_image_size(vision.model)
    if config.image_grid and size is not None and tuple(one.shape[-2:]) != (size, size):
        one = tile_pixel_values(one, config.image_grid, size)[:, 0]
    with torch.no_grad():
        return int(pixel_features(vision, one, config).shape[-2])


def images_in_memory(model: nn.Module, batch: Mapping[str, Any], config: Any) -> int:
    """How many images a row of `batch` holds in the memory: its blocks (a collator's tiles, or images of the
    encoder's size) over the blocks per image, or its high-resolution images when the model tiles them itself."""
    features, pixels = batch.get("image_features"), batch.get("pixel_values")
    blocks = blocks_per_image(config.image_grid)
    if isinstance(features, torch.Tensor):
        return (features.shape[1] if features.dim() == 4 else 1) // blocks
    if not isinstance(pixels, torch.Tensor):
        return 0
    entries = pixels.shape[1] if pixels.dim() == 5 else 1
    vision = getattr(getattr(model, "base_model", None), "vision_encoder", None)
    size = encoder_image_size(vision.model) if vision is not None else None
    if config.image_grid and size is not None and tuple(pixels.shape[-2:]) != (size, size):
        return entries
    return entries // blocks


def explain_records(model: nn.Module, collator: Any, records: Sequence[Mapping[str, Any]], answers: Sequence[str],
                    tokenizer: Any, adapter: Optional[str] = None) -> list[ExplainedAnswer]:
    """Each record with its answer (`answers[i]`, e.g. what `generate()` said) explained (module docstring)."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers.")
    config = adapter_config(model, adapter)
    with_answers = [{**{k: v for k, v in record.items() if k != "answer"}, "answer": answer}
                    for record, answer in zip(records, answers)]
    device = next(model.parameters()).device
    batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value
             for key, value in collator(with_answers).items()}
    reads = explain(model, batch, adapter)
    slots = images_in_memory(model, batch, config)
    tokens = tokens_per_block(model, batch, config) if slots else 0
    view = image_view_for(collator.image_processor)
    explained = []
    for index, (record, answer, read) in enumerate(zip(records, answers, reads)):
        images, frames = record_sources(record, collator, f"record {index}")
        geometries = [None if image is None else ImageGeometry(image.width, image.height, view) for image in images]
        geometries += [None] * (slots - len(geometries))
        layout = (slot_layout(config, geometries, tokens, frames=frames) if tokens and images
                  else SlotLayout([None] * int(config.num_memory_slots), []))
        texts = [tokenizer.decode([token]) for token in read.tokens]
        explained.append(ExplainedAnswer(record, answer, texts, images, frames, layout, read))
    return explained
