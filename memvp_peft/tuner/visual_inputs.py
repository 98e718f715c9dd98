"""Boundary checks for the visual inputs of a forward / generate call.

Everything a user can get wrong about `image_features` and `image_mask` is caught here, before any state changes,
with a `ValueError` that says what was expected and what arrived.

Shapes, dtypes and types are metadata: checking them is free. Checking *values* (NaN/inf features, a 0/1 integer
mask, placeholder tokens in the text) needs a reduction whose result the host reads -- on an accelerator that is a
host-device synchronisation, which on every training step stalls the GPU pipeline, and under `torch.compile` a graph
break. So value checks (`values_checkable`) run in eager mode on CPU tensors, where they cost one cheap reduction and
no sync (data pipelines and tests live there), and on accelerator tensors only when `MEMVP_CHECK_VALUES=1` is set (a
debugging switch: one sync per check). Under `torch.compile` they are skipped: the traced graph stays whole.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

CHECK_VALUES_ENV = "MEMVP_CHECK_VALUES"

VISUAL_INPUT_NAMES = ("image_features", "image_mask", "pixel_values")

#: Inputs of a VLM's own image path that MemVP never reads: what Qwen2-VL-style processors give besides
#: `pixel_values` (the patch grid of each image or video, the video pixels).
VLM_IMAGE_PATH_INPUT_NAMES = ("image_grid_thw", "pixel_values_videos", "video_grid_thw")


def reject_vlm_image_path_inputs(kwargs: dict[str, Any]) -> None:
    """Refuse a call that brings inputs of a VLM's own image path: MemVP would hand them to the language model,
    which drops them (and with them the images they describe) -- a batch built by a VLM's own processor."""
    given = [name for name in VLM_IMAGE_PATH_INPUT_NAMES if kwargs.get(name) is not None]
    if given:
        raise ValueError(
            f"MemVP: {given} came with the call: inputs of a VLM's own image path (a Qwen2-VL-style processor lays "
            "pixel_values out as flattened patches, with a grid per image), which MemVP does not run, so the images "
            "would be dropped. MemVP reads pixel_values as whole images, (batch, channels, height, width), through a "
            "CLIP/SigLIP encoder or a Llava-layout VLM's tower: build the batch with memvp_peft.MemVPDataCollator / "
            "MemVPProcessor and that encoder's image processor, or pass image_features."
        )


def infer_batch_size(args: tuple, kwargs: dict[str, Any]) -> Optional[int]:
    """Batch size of a HF forward call, from `input_ids`/`inputs_embeds` (keyword or first positional)."""
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether a value check of `tensor` may run here (see the module docstring: never a hidden host-device sync)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type in ("cpu", "meta") or os.environ.get(CHECK_VALUES_ENV, "") == "1"


def _all_finite(tensor: torch.Tensor) -> bool:
    """One cheap reduction first; the exact elementwise check only runs when the sum is not finite."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def check_cast_finite(cast: torch.Tensor, source_dtype: torch.dtype, name: str) -> None:
    """After a cast to the compute dtype: values that were finite in `source_dtype` may not be (1e39 in float64 is inf
    in float32). The check before the cast cannot see that, so this one runs on what the projector really reads --
    only when the cast changed the dtype, and only where value checks may run (`values_checkable`)."""
    if cast.dtype == source_dtype or not values_checkable(cast) or _all_finite(cast):
        return
    raise ValueError(
        f"MemVP: `{name}` ({str(source_dtype).replace('torch.', '')}) holds values that are not finite in the "
        f"projector's dtype {str(cast.dtype).replace('torch.', '')} (magnitudes above "
        f"{torch.finfo(cast.dtype).max:.3g} overflow to inf); rescale the features."
    )


def _check_mask(image_mask: Any, batch: int, images: int) -> Optional[torch.Tensor]:
    """`image_mask` as a (B, images) bool tensor; accepts (B,) (one flag per sample) and, for several images, (B, I)."""
    if image_mask is None:
        return None
    allowed = f"({batch},)" if images == 1 else f"({batch},) or ({batch}, {images})"
    if not isinstance(image_mask, torch.Tensor):
        raise ValueError(f"MemVP: `image_mask` must be a torch.Tensor of shape {allowed}, got {type(image_mask).__name__}.")
    shape = tuple(image_mask.shape)
    if shape not in {(batch,), (batch, images)}:
        raise ValueError(
            f"MemVP: `image_mask` must have shape {allowed} (one flag per sample{'' if images == 1 else ' or image'}), "
            f"got {shape}."
        )
    if image_mask.dtype != torch.bool:
        if image_mask.is_floating_point() or image_mask.is_complex():
            raise ValueError(f"MemVP: `image_mask` must be a bool (or 0/1 integer) tensor, got dtype {image_mask.dtype}.")
        if values_checkable(image_mask) and bool(((image_mask != 0) & (image_mask != 1)).any()):
            raise ValueError("MemVP: an integer `image_mask` may only contain 0 and 1.")
        image_mask = image_mask != 0
    if image_mask.dim() == 1:
        image_mask = image_mask[:, None].expand(batch, images)
    return image_mask


def validate_pixel_values(pixel_values: Any, batch_size: Optional[int]) -> tuple[torch.Tensor, int]:
    """(B, C, H, W) or (B, I, C, H, W) -> (B*I, C, H, W) and I."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"MemVP: `pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() not in (4, 5):
        raise ValueError(
            "MemVP: `pixel_values` must be (batch, channels, height, width) or (batch, images, channels, height, "
            f"width), got shape {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"MemVP: `pixel_values` must be a floating point tensor, got dtype {pixel_values.dtype}.")
    if batch_size is not None and pixel_values.shape[0] != batch_size:
        raise ValueError(f"MemVP: `pixel_values` batch ({pixel_values.shape[0]}) must equal the input batch ({batch_size}).")
    if values_checkable(pixel_values) and not _all_finite(pixel_values):
        raise ValueError("MemVP: `pixel_values` contains NaN or inf values.")
    if pixel_values.dim() == 4:
        return pixel_values, 1
    batch, images = pixel_values.shape[:2]
    return pixel_values.reshape(batch * images, *pixel_values.shape[2:]), images


def validate_visual_inputs(
    image_features: Any,
    image_mask: Any,
    batch_size: Optional[int],
    visual_dim: int,
    num_memory_slots: int,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Check the visual inputs; return features as (B, T, visual_dim) and a (B, T) bool token mask (or None).

    Several images per sample come as (B, I, N, visual_dim): their tokens are concatenated in order (T = I*N), and a
    (B, I) mask switches single images off (a (B,) mask switches whole samples off).
    """
    if image_features is None:
        if image_mask is not None:
            raise ValueError(
                "MemVP: `image_mask` was given without `image_features`/`pixel_values`; pass the images together with "
                "the mask, or drop the mask for a text-only batch."
            )
        return None, None
    if not isinstance(image_features, torch.Tensor):
        raise ValueError(
            f"MemVP: `image_features` must be a torch.Tensor of shape (batch, tokens, {visual_dim}), "
            f"got {type(image_features).__name__}."
        )
    if image_features.dim() not in (3, 4):
        raise ValueError(
            f"MemVP: `image_features` must be 3-D (batch, tokens, {visual_dim}) or 4-D (batch, images, tokens, "
            f"{visual_dim}), got shape {tuple(image_features.shape)}."
        )
    if not image_features.is_floating_point():
        raise ValueError(f"MemVP: `image_features` must be a floating point tensor, got dtype {image_features.dtype}.")
    batch, width = image_features.shape[0], image_features.shape[-1]
    images = image_features.shape[1] if image_features.dim() == 4 else 1
    tokens = image_features.shape[-2]
    if width != visual_dim:
        raise ValueError(
            f"MemVP: `image_features` width must equal MemVPConfig.visual_dim={visual_dim}, got {width} "
            f"(shape {tuple(image_features.shape)})."
        )
    if batch_size is not None and batch != batch_size:
        raise ValueError(f"MemVP: `image_features` batch ({batch}) must equal the input batch ({batch_size}).")
    if images * tokens > num_memory_slots:
        raise ValueError(
            f"MemVP: got {images * tokens} visual tokens per sample ({images} image(s) x {tokens}) but "
            f"MemVPConfig.num_memory_slots={num_memory_slots}; num_memory_slots must be >= the number of visual tokens."
        )
    if tokens == 0:
        raise ValueError("MemVP: `image_features` has 0 visual tokens; pass at least one token or omit the features.")
    if values_checkable(image_features) and not _all_finite(image_features):
        raise ValueError("MemVP: `image_features` contains NaN or inf values.")
    mask = _check_mask(image_mask, batch, images)
    features = image_features.reshape(batch, images * tokens, width)
    if mask is not None:
        mask = mask.repeat_interleave(tokens, dim=1)
    return features, mask
