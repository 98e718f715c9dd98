"""Precomputed visual inputs in a record: ``pixel_values`` or ``image_features`` columns -> per-image tensors.

Datasets prepared once (images already resized and normalised, or encoder features already extracted) carry the
model input itself.  A row holds one image or several:

* ``pixel_values``: ``(C, H, W)`` or ``(I, C, H, W)``;
* ``image_features``: ``(tokens, dim)`` or ``(I, tokens, dim)``;

as a ``torch`` tensor, a numpy array or nested lists (what a ``datasets`` row gives without a format; those are
read as float32).  The tensor goes into the batch under the model input name it is, so it must be the kind the
collator was built for (``image_input_name``): ``image_features`` handed to a collator whose model wants
``pixel_values`` would otherwise reach the wrong input, or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["precomputed_images"]

# dimensions of ONE image's tensor, per model input
_IMAGE_DIMS = {"pixel_values": (3, "(C, H, W)"), "image_features": (2, "(tokens, dim)")}


def _as_tensor(value: Any, field: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if value and all(isinstance(item, torch.Tensor) for item in value):
            try:
                return torch.stack(list(value))
            except RuntimeError as exc:
                raise ValueError(f"{where}: the '{field}' tensors of one record differ in shape: {exc}") from exc
        try:
            tensor = torch.from_numpy(np.asarray(value, dtype=np.float32))
        except (ValueError, TypeError) as exc:  # ragged nesting, or something that is not a number
            raise ValueError(f"{where}: '{field}' is not a rectangular array of numbers: {exc}") from exc
    else:
        raise ValueError(
            f"{where}: '{field}' must be a tensor, a numpy array or nested lists of numbers, got {type(value).__name__}."
        )
    if not tensor.is_floating_point():
        raise ValueError(f"{where}: '{field}' must hold floating point values, got dtype {tensor.dtype}.")
    return tensor


def precomputed_images(value: Any, field: str, where: str, image_input_name: str) -> tuple[list[torch.Tensor], bool]:
    """One record's precomputed ``field`` as a list of per-image tensors, and whether it gave several (the
    multi-image layout, like a list of raw images).  An empty list is a record without images."""
    if field != image_input_name:
        raise ValueError(
            f"{where}: has precomputed '{field}' but this collator builds '{image_input_name}' (its "
            f"image_input_name); the model takes each as a different input. Build the collator with "
            f"image_input_name={field!r}, or give raw images in 'image'/'images'."
        )
    if isinstance(value, (list, tuple)) and not value:
        return [], True
    tensor = _as_tensor(value, field, where)
    dims, layout = _IMAGE_DIMS[field]
    if tensor.dim() == dims:
        return [tensor], False
    if tensor.dim() == dims + 1:
        return list(tensor.unbind(0)), True
    raise ValueError(
        f"{where}: '{field}' has shape {tuple(tensor.shape)}; one row holds {layout} for one image or "
        f"(I, {layout[1:-1]}) for I images."
    )
