"""Records' images -> the ``pixel_values`` (or ``image_features``) and ``image_mask`` columns of a batch.

A batch may mix rows with one image, several images and none (ScienceQA has text-only questions).  Every row still
needs a tensor of the same shape, so empty rows and empty slots are zeros and ``image_mask`` says which rows/slots
really hold an image -- the memory is switched off where it is False.  Layouts:

* no record gives a *list* of images (and ``num_images`` is None): ``(B, C, H, W)`` and ``(B,)``;
* otherwise ``(B, I, C, H, W)`` and ``(B, I)``, with ``I = num_images`` or the longest list in the batch.

(``image_features`` likewise, with ``(tokens, dim)`` per image.)  A record's images come from exactly one field
(:func:`image_field`): raw ones from ``image``/``images`` (:func:`record_images`, processed for the whole batch at once
by :func:`process_images`) or precomputed tensors (:mod:`.precomputed`, where ``(I, ...)`` counts as a list).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from .images import PathLike, pillow_image_module, to_rgb_image

__all__ = [
    "PRECOMPUTED_FIELDS",
    "RAW_IMAGE_FIELDS",
    "UNREAD_IMAGE_FIELDS",
    "assemble_images",
    "blank_image_shape",
    "image_field",
    "stray_image_fields",
    "process_images",
    "record_images",
]


#: The fields a record's images are read from: raw images (one, or a list) and precomputed tensors.
RAW_IMAGE_FIELDS = ("image", "images")
PRECOMPUTED_FIELDS = ("pixel_values", "image_features")
# Image-carrying fields of video: read (as `video.FRAME_FIELDS`) by a collator with `num_frames`, refused by one
# without -- a record holding one is never silently trained text-only. `videos` (several videos) is never read.
UNREAD_IMAGE_FIELDS = ("video", "videos", "frames")
#: What a path to an image file ends with (any case): a field of such paths that is not read is a lost image.
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def image_field(record: Mapping[str, Any], where: str, read_video: bool = False) -> Optional[str]:
    """The one field a record's images come from, or None for a text-only record.

    A record with images in two fields (``image`` and ``images``, or raw images and precomputed tensors) is refused:
    reading one would drop the other without a word.  Video fields are read only with ``read_video`` (a collator with
    ``num_frames``): ``video`` (a file or a list of frames) and ``frames``; otherwise they are refused.
    """
    video_fields = ("video", "frames") if read_video else ()
    unread = [key for key in UNREAD_IMAGE_FIELDS if key not in video_fields and record.get(key) is not None]
    if unread:
        # A column the collator would not read means a batch that trains text-only while the user believes it sees
        # the images: refuse instead.
        how = ("several videos per record are not read" if read_video else
               "set num_frames to read 'video' (a video file or a list of frames) or 'frames', sampled to that many")
        raise ValueError(
            f"{where}: has {unread} but MemVPDataCollator does not read video (video/videos/frames) as configured: "
            f"{how}; it reads images from 'image' or 'images' (paths, PIL images, arrays, bytes, datasets.Image "
            "values) and precomputed 'pixel_values'/'image_features' tensors. Drop the column, or give frames as "
            "'images'."
        )
    present = [key for key in RAW_IMAGE_FIELDS + video_fields + PRECOMPUTED_FIELDS if record.get(key) is not None]
    if len(present) > 1:
        raise ValueError(
            f"{where}: has images in several fields {present}; give them in one: 'image' or 'images' (one image or "
            "a list), or precomputed 'pixel_values' / 'image_features'."
        )
    stray = stray_image_fields(record, gives_images=bool(present))
    if stray:
        raise ValueError(
            f"{where}: {stray} hold images (or image file paths) that MemVPDataCollator does not read: it reads a "
            "record's images from 'image' or 'images' only (or precomputed 'pixel_values' / 'image_features'). Put "
            "them under 'image' (memvp-train: --image_column NAME), or drop the field."
        )
    if present == ["images"] and isinstance(record["images"], (str, os.PathLike)):
        raise ValueError(
            f"{where}: 'images' holds one path ({record['images']!r}) where a list is expected (TRL's layout; code "
            "that iterates it reads it character by character): give ['path'], or put one image under 'image'."
        )
    return present[0] if present else None


def stray_image_fields(record: Mapping[str, Any], gives_images: bool) -> list[str]:
    """The fields other than the ones read for images that still hold one: a PIL image or an undecoded
    ``datasets.Image`` value (``{"bytes": ...}``), or a list of them -- always an image lost -- and, in a record that
    gives no image otherwise (`gives_images` False), a path to an image file (or a list of paths), such as an
    ``image_path`` or ``img`` column: the image the text was written for, which would never reach the model."""
    Image = pillow_image_module()
    read = RAW_IMAGE_FIELDS + PRECOMPUTED_FIELDS + UNREAD_IMAGE_FIELDS

    def holds_image(value: Any) -> bool:
        return isinstance(value, Image.Image) or (isinstance(value, Mapping) and bool(value.get("bytes")))

    def names_image_file(value: Any) -> bool:
        return isinstance(value, str) and value.lower().endswith(IMAGE_FILE_SUFFIXES)

    stray = []
    for key, value in record.items():
        if key in read or value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        items = [item for item in items if item is not None]
        if not items:
            continue
        if any(holds_image(item) for item in items) or (not gives_images and all(map(names_image_file, items))):
            stray.append(key)
    return stray


def record_images(
    raw: Any,
    where: str,
    *,
    image_processor: Any,
    image_folder: Optional[PathLike],
    array_value_range: Optional[tuple[float, float]],
) -> tuple[list[Optional[Any]], bool]:
    """The raw images of a record's ``image``/``images`` field as RGB PIL images, and whether the field is a list
    (the multi-image layout).

    A ``None`` entry of a list stays in it, as ``None``: its slot stays empty (zeros, ``image_mask`` False) and the
    images after it keep theirs -- the k-th image is read in the k-th block of memory slots, with that block's
    position embeddings, whether or not an earlier one is missing.  A missing or unreadable image is a
    ``ValueError`` naming the record, the image's index in its list and the ``image_folder`` paths were resolved
    against.
    """
    if raw is None:
        return [], False
    is_list = isinstance(raw, (list, tuple))
    items = list(raw) if is_list else [raw]
    images = []
    for k, item in enumerate(items):
        if item is None:
            images.append(None)
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


def assemble_images(
    per_record: list[list[Optional[torch.Tensor]]],
    any_list: bool,
    *,
    num_images: Optional[int],
    blank: Optional[tuple[torch.Size, torch.dtype]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tensor and ``image_mask`` of a batch (layouts in the module docstring) from each record's per-image
    tensors (processed images or precomputed ones); a ``None`` leaves its slot empty.

    ``blank`` is the per-image shape and dtype to use when no record of the batch has an image.  Per-image tensors of
    different shapes (precomputed ones can differ) are refused, naming the records.
    """
    batch_size = len(per_record)
    shaped = [(row, tensor) for row, tensors in enumerate(per_record) for tensor in tensors if tensor is not None]
    if shaped:
        first_row, first = shaped[0]
        for row, tensor in shaped:
            if tensor.shape != first.shape:
                raise ValueError(
                    f"MemVPDataCollator: the images of one batch must have one shape; record {first_row} gives "
                    f"{tuple(first.shape)} and record {row} gives {tuple(tensor.shape)}."
                )
        image_shape = first.shape
        dtype = functools.reduce(torch.promote_types, [tensor.dtype for _row, tensor in shaped])
    else:
        assert blank is not None
        image_shape, dtype = blank

    multi = num_images is not None or any_list
    slots = num_images if num_images is not None else max([len(t) for t in per_record] + [1])
    if multi:
        pixel_values = torch.zeros((batch_size, slots, *image_shape), dtype=dtype)
        image_mask = torch.zeros((batch_size, slots), dtype=torch.bool)
    else:
        pixel_values = torch.zeros((batch_size, *image_shape), dtype=dtype)
        image_mask = torch.zeros((batch_size,), dtype=torch.bool)
    for row, tensors in enumerate(per_record):
        for slot, tensor in enumerate(tensors):
            if tensor is None:
                continue
            if multi:
                pixel_values[row, slot] = tensor
                image_mask[row, slot] = True
            else:
                pixel_values[row] = tensor
                image_mask[row] = True
    return pixel_values, image_mask
