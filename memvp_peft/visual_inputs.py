"""Boundary checks for the visual inputs of a forward / generate call.

Everything a user can get wrong about `image_features` and `image_mask` is caught here, before any state changes,
with a `ValueError` that says what was expected and what arrived.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

VISUAL_INPUT_NAMES = ("image_features", "image_mask")


def infer_batch_size(args: tuple, kwargs: dict[str, Any]) -> Optional[int]:
    """Batch size of a HF forward call, from `input_ids`/`inputs_embeds` (keyword or first positional)."""
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


def validate_visual_inputs(
    image_features: Any,
    image_mask: Any,
    batch_size: Optional[int],
    visual_dim: int,
    num_memory_slots: int,
) -> Optional[torch.Tensor]:
    """Check the visual inputs; return `image_mask` as a `(B,)` bool tensor (or None)."""
    if image_features is None:
        if image_mask is not None:
            raise ValueError(
                "MemVP: `image_mask` was given without `image_features`; pass the features (B, N, visual_dim) "
                "together with the mask, or drop the mask for a text-only batch."
            )
        return None
    if not isinstance(image_features, torch.Tensor):
        raise ValueError(
            f"MemVP: `image_features` must be a torch.Tensor of shape (batch, tokens, {visual_dim}), "
            f"got {type(image_features).__name__}."
        )
    if image_features.dim() != 3:
        raise ValueError(
            f"MemVP: `image_features` must be 3-D (batch, tokens, {visual_dim}), got shape {tuple(image_features.shape)}."
        )
    if not image_features.is_floating_point():
        raise ValueError(f"MemVP: `image_features` must be a floating point tensor, got dtype {image_features.dtype}.")
    batch, tokens, width = image_features.shape
    if width != visual_dim:
        raise ValueError(
            f"MemVP: `image_features` width must equal MemVPConfig.visual_dim={visual_dim}, got {width} "
            f"(shape {tuple(image_features.shape)})."
        )
    if batch_size is not None and batch != batch_size:
        raise ValueError(
            f"MemVP: `image_features` batch ({batch}) must equal the input batch ({batch_size})."
        )
    if tokens > num_memory_slots:
        raise ValueError(
            f"MemVP: got {tokens} visual tokens per sample but MemVPConfig.num_memory_slots={num_memory_slots}; "
            f"num_memory_slots must be >= the number of visual tokens."
        )
    if tokens == 0:
        raise ValueError("MemVP: `image_features` has 0 visual tokens; pass at least one token or omit the features.")
    if not bool(torch.isfinite(image_features).all()):
        raise ValueError("MemVP: `image_features` contains NaN or inf values.")
    if image_mask is None:
        return None
    if not isinstance(image_mask, torch.Tensor):
        raise ValueError(f"MemVP: `image_mask` must be a torch.Tensor of shape ({batch},), got {type(image_mask).__name__}.")
    if tuple(image_mask.shape) != (batch,):
        raise ValueError(
            f"MemVP: `image_mask` must have shape ({batch},) (one flag per sample), got {tuple(image_mask.shape)}."
        )
    if image_mask.dtype != torch.bool:
        if image_mask.is_floating_point() or image_mask.is_complex():
            raise ValueError(f"MemVP: `image_mask` must be a bool (or 0/1 integer) tensor, got dtype {image_mask.dtype}.")
        if bool(((image_mask != 0) & (image_mask != 1)).any()):
            raise ValueError("MemVP: an integer `image_mask` may only contain 0 and 1.")
        image_mask = image_mask != 0
    return image_mask
