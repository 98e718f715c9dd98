"""Records' images -> the ``pixel_values`` (or ``image_features``) and ``image_mask`` columns of a batch.

A batch may mix rows with one image, several images and none (ScienceQA has text-only questions).  Every row still
needs a tensor of the same shape, so empty rows and empty slots are zeros and ``image_mask`` says which rows/slots
really hold an image -- the memory is switched off where it is False.  Layouts:

* no record gives a *list* of images (and ``num_images`` is None): ``(B, C, H, W)`` and ``(B,)``;
* otherwise ``(B, I, C, H, W)`` and ``(B, I)``, with ``I = num_images`` or the longest list in the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import numpy as np
import torch

from .images import PathLike, pillow_image_module, to_rgb_image

__all__ = ["batch_images", "blank_image_shape", "process_images", "record_images"]


# Image-carrying fields of other dataset layouts (the Hub/TRL `images` list, precomputed tensors, video) that this
# collator does not read: a record holding one is refused rather than silently trained text-only.
UNREAD_IMAGE_FIELDS = ("images", "pixel_values", "image_features", "video", "videos", "frames")


def record_images(
    record: Mapping[str, Any],
    where: str,
    *,
    image_processor: Any,
    image_folder: Optional[PathLike],
    array_value_range: Optional[tuple[float, float]],
) -> tuple[list[Any], bool]:
    """Images of a record as RGB PIL images, and whether the record gave a list (multi-image layout).

    ``None`` entries of a list are skipped (their slot stays empty).  A missing or unreadable image is a
    ``ValueError`` naming the record, the image's index in its list and the ``image_folder`` paths were resolved
    against.
    """
    unread = [key for key in UNREAD_IMAGE_FIELDS if record.get(key) is not None]
    if unread:
        # A column the collator would not read means a batch that trains text-only while the user believes it sees
        # the images: refuse instead.
        raise ValueError(
            f"{where}: has {unread} but MemVPDataCollator reads a record's images from its 'image' field only (a "
            "path, PIL image, array or bytes, or a list of them for several images). Rename the column to 'image' "
            "(e.g. `dataset.rename_column('images', 'image')`); precomputed features go to the model as "
            "`image_features=` directly, not through this collator."
        )
    raw = record.get("image")
    if raw is None:
        return [], False
    is_list = isinstance(raw, (list, tuple))
    items = list(raw) if is_list else [raw]
    images = []
    for k, item in enumerate(items):
        if item is None:
            continue
        label = f"{where}, image {k}" if is_list else where
        if image_processor is None:
            raise ValueError(f"{label}: the record has an image but the collator has no image_processor.")
        try:
            images.append(to_rgb_image(item, image_folder, array_value_range))
        except FileNotFoundError as exc:
            folder = f" (image_folder={os.fspath(image_folder)!r})" if image_folder is not None else ""
            raise ValueError(f"{label}: missing image file: {exc}{folder}") from exc
        except ValueError as exc:
            raise ValueError(f"{label}: unreadable image: {exc}") from exc
    return images, is_list


def process_images(image_processor: Any, images: list[Any], image_input_name: str) -> torch.Tensor:
    """Run the image processor on all images of a batch at once; check it gave one fixed-size tensor per image.

    ``pixel_values`` must come back as ``(N, C, H, W)``; a featurizer producing ``image_features`` (the model input
    name) returns ``(N, tokens, dim)``.
    """
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor):
        pixel_values = torch.as_tensor(np.asarray(pixel_values))
    expected_dims = 4 if image_input_name == "pixel_values" else 3  # (N, C, H, W) or (N, tokens, dim)
    if pixel_values.dim() != expected_dims or pixel_values.shape[0] != len(images):
        raise ValueError(
            f"MemVPDataCollator: the image processor returned pixel_values of shape {tuple(pixel_values.shape)} "
            f"for {len(images)} images; expected ({len(images)}, C, H, W) (one fixed size for all images)."
        )
    return pixel_values


def blank_image_shape(image_processor: Any, image_input_name: str) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of one processed image, found by processing a black image (for all-text-only batches)."""
    Image = pillow_image_module()
    dummy = process_images(image_processor, [Image.new("RGB", (64, 64))], image_input_name)
    return dummy.shape[1:], dummy.dtype


def batch_images(
    per_record_images: list[list[Any]],
    any_list: bool,
    *,
    image_processor: Any,
    image_input_name: str,
    num_images: Optional[int],
    blank_shape: Callable[[], tuple[torch.Size, torch.dtype]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tensor and ``image_mask`` of a batch (layouts in the module docstring).

    ``blank_shape`` gives the processed shape when no row of the batch has an image; it is only called then, so a
    caller can compute it once and cache it.
    """
    batch_size = len(per_record_images)
    flat = [image for images in per_record_images for image in images]
    if flat:
        processed = process_images(image_processor, flat, image_input_name)
        image_shape, dtype = processed.shape[1:], processed.dtype
    else:
        processed = None
        image_shape, dtype = blank_shape()

    multi = num_images is not None or any_list
    slots = num_images if num_images is not None else max([len(i) for i in per_record_images] + [1])
    if multi:
        pixel_values = torch.zeros((batch_size, slots, *image_shape), dtype=dtype)
        image_mask = torch.zeros((batch_size, slots), dtype=torch.bool)
    else:
        pixel_values = torch.zeros((batch_size, *image_shape), dtype=dtype)
        image_mask = torch.zeros((batch_size,), dtype=torch.bool)
    cursor = 0
    for row, images in enumerate(per_record_images):
        for slot in range(len(images)):
            assert processed is not None
            if multi:
                pixel_values[row, slot] = processed[cursor]
                image_mask[row, slot] = True
            else:
                pixel_values[row] = processed[cursor]
                image_mask[row] = True
            cursor += 1
    return pixel_values, image_mask
