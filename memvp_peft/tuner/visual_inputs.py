"""The visual inputs of one forward / `generate()` call, from what the caller passed to what each adapter's memory
reads.

A call brings `image_features` (computed elsewhere) or `pixel_values` (encoded here), and an optional `image_mask`.
For every active adapter they go one way, in `VisualInputs.for_adapter`, which the runtime (`runtime.py`) calls once
per adapter and whose result the memory (`memory.py`) reads as it is:

    pixel_values -> tiled for the adapter's image_grid (vision.tiling) -> checked -> encoded with the adapter's
    feature selection and vision adapters (vision.encoder) -> laid out (tiles, frames, compression) -> checked as the
    tokens the memory reads, (B, T, visual_dim) and a (B, T) mask

(`image_features` join at the layout); the memory's forward then casts the tokens to its projector's dtype with
`cast_checked` -- there, because ZeRO-3 gathers the projector only inside that forward. Everything a user can get
wrong about the visual inputs is caught on that way, before any state changes, with a `ValueError` that says what
was expected and what arrived.

**What a check may cost.** Shapes, dtypes and types are metadata: checking them is free. Checking *values* (NaN/inf
features, a 0/1 integer mask, placeholder tokens in the text) needs a reduction whose result the host reads -- on an
accelerator that is a host-device synchronisation, which on every training step stalls the GPU pipeline, and under
`torch.compile` a graph break. So value checks (`values_checkable`) run in eager mode on CPU tensors, where they cost
one cheap reduction and no sync (data pipelines and tests live there), and on accelerator tensors only when
`MEMVP_CHECK_VALUES=1` is set (a debugging switch: one sync per check). Under `torch.compile` they are skipped: the
traced graph stays whole.

**Long visual context.** MemVP's memory costs `4 * n * d` FLOPs per text token and layer: linear in the number of
slots n, and the sequence never grows. So long visual contexts -- a high-resolution image as tiles, a video as frames
-- are cheap, and shrinking n is the one lever left. Two compressions, both *before* the projector f, on each image's
own grid:

* **average pooling** (`pool_kernel=k`: k x k patches -> one slot, N -> N/k^2; or `pool_tokens=t`: adaptive pooling to
  a sqrt(t) x sqrt(t) grid), the usual token compression of LLaVA-style models;
* **multiscale slots** (`multiscale_tokens=[256, 64]`, ADEM-VL, arXiv 2410.17779): the grid at several scales,
  concatenated -- the 16x16 CLIP grid plus its 8x8 average pool (256 + 64 = 320 slots); an entry equal to the grid's
  own count keeps it as it is (the authors' `Avg2dSampler`).

Every image (tile, frame) is compressed on its own, so image boundaries and the slot blocks stay intact. The memory
then holds, per sample: images x blocks per image (`image_grid`: 1 + rows*cols) x compressed tokens per image
(`memory_tokens`).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..vision.encoder import feature_selection, pixel_features, unread_tower_message
from ..vision.tiling import blocks_per_image, tile_for_adapter

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


# ------------------------------------------------------------------------------------------ from a call to the memory


class AdapterInputs(NamedTuple):
    """What one adapter's memory reads from a call, checked (its forward casts them to its projectors' dtype, with
    `cast_checked`): the visual tokens
    `(B, T, visual_dim)` and their `(B, T)` bool mask (None and None without visual input), and the encoder's CLS
    features `(B, visual_dim)` for an adapter with `cls_token` (None otherwise, or without `pixel_values`)."""

    features: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    cls_features: Optional[torch.Tensor]


class VisualInputs:
    """One call's visual inputs on their way to each active adapter's memory (module docstring).

    `vision` is the attached `VisionEncoder` (None without one; `unread_vlm_class` names a VLM base whose tower
    MemVP cannot read). Adapters tiling alike and selecting the same features, without vision adapters of their own,
    share one encoding of the call's `pixel_values`.
    """

    def __init__(self, image_features: Any, image_mask: Any, pixel_values: Any, batch_size: Optional[int],
                 vision: Any, unread_vlm_class: Optional[str]) -> None:
        if pixel_values is not None and image_features is not None:
            raise ValueError("MemVP: pass either `pixel_values` or `image_features`, not both.")
        self.image_features = image_features
        self.image_mask = image_mask
        self.pixel_values = pixel_values
        self.batch_size = batch_size
        self.vision = vision
        self.unread_vlm_class = unread_vlm_class
        self._shared: dict[tuple, torch.Tensor] = {}  # one encoding per tiling and feature selection

    def for_adapter(self, name: str, active: list[str], config: Any, memory: nn.Module) -> AdapterInputs:
        """The visual input of adapter `name` (one of the call's `active` adapters) with `config`, for its `memory`
        (a `VisualMemory`: its vision adapters run in the encoder, its projectors' dtype is what the tokens are
        cast to)."""
        features, mask, cls = self.image_features, self.image_mask, None
        if getattr(config, "cls_token", False):
            features, cls = self._with_cls_token(name, active, config, memory)
        elif self.pixel_values is not None:
            pixels, mask = tile_for_adapter(self.pixel_values, self.image_mask, config, self.vision)
            if memory.vision_adapters is not None:
                features = self._encode(pixels, config, memory.vision_adapters)
            else:
                key = (tuple(config.image_grid or ()), *feature_selection(config).values())
                if key not in self._shared:
                    self._shared[key] = self._encode(pixels, config, None)
                features = self._shared[key]
        features, mask = arrange_visual_tokens(features, mask, config)  # frames, tiles, compression
        features, mask = validate_visual_inputs(
            features, mask, self.batch_size, config.visual_dim, config.num_memory_slots
        )
        return AdapterInputs(features, mask, cls)

    def _with_cls_token(self, name: str, active: list[str], config: Any,
                        memory: nn.Module) -> tuple[Any, Optional[torch.Tensor]]:
        """The patch features of an adapter with `cls_token` and its CLS features from the same encoding
        (`input_tokens.py`); (None, None) without visual inputs (every row then gets the text-only prefix)."""
        if len(active) > 1:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which changes the input sequence, and {len(active)} "
                f"adapters are active ({active}); their calls cannot share one input layout. Activate one adapter."
            )
        if self.image_features is not None:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which reads the encoder's CLS token; `image_features` "
                "carry patch features only. Pass `pixel_values` (with the vision encoder attached)."
            )
        pixel_values = self.pixel_values
        if pixel_values is None:
            return None, None
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5 and pixel_values.shape[1] != 1:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which places one image's CLS token per row; "
                f"pixel_values hold {pixel_values.shape[1]} images per row."
            )
        features, cls = self._encode(pixel_values, config, memory.vision_adapters, with_cls=True)
        return features, cls

    def _encode(self, pixel_values: Any, config: Any, adapters: Optional[nn.ModuleList],
                with_cls: bool = False) -> Any:
        """`config`'s features of `pixel_values`, checked first (`vision.encoder.pixel_features`: the hidden state,
        CLS selection and layernorm it names, with `adapters` -- its vision adapters -- at its scale)."""
        if self.vision is None and self.unread_vlm_class is not None:
            raise ValueError(f"MemVP: `pixel_values` were given, but no vision encoder reads them: "
                             f"{unread_tower_message(self.unread_vlm_class)}")
        if self.vision is None:
            raise ValueError(
                "MemVP: `pixel_values` were given but no vision encoder is attached. Set "
                "`MemVPConfig(vision_encoder=<CLIP/SigLIP model or local path>)`, call "
                "`memvp_peft.attach_vision_encoder(peft_model, encoder)`, or pass `image_features`."
            )
        check_pixel_values(pixel_values, self.batch_size)
        return pixel_features(self.vision, pixel_values, config, adapters, with_cls=with_cls)


# ------------------------------------------------------------------------------------------------------- the checks


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether a value check of `tensor` may run here (see the module docstring: never a hidden host-device sync)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type in ("cpu", "meta") or os.environ.get(CHECK_VALUES_ENV, "") == "1"


def _all_finite(tensor: torch.Tensor) -> bool:
    """One cheap reduction first; the exact elementwise check only runs when the sum is not finite."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`tensor` cast to the projector's compute `dtype`, where values that were finite in their own dtype may not be
    (1e39 in float64 is inf in float32). The checks before the cast cannot see that, so this one runs on what the
    projector really reads -- only when the cast changed the dtype, and only where value checks may run
    (`values_checkable`)."""
    cast = tensor.to(dtype)
    if cast.dtype == tensor.dtype or not values_checkable(cast) or _all_finite(cast):
        return cast
    raise ValueError(
        f"MemVP: `{name}` ({str(tensor.dtype).replace('torch.', '')}) holds values that are not finite in the "
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


def check_pixel_values(pixel_values: Any, batch_size: Optional[int]) -> None:
    """Refuse anything but a floating point `(B, C, H, W)` or `(B, I, C, H, W)` tensor of the call's batch, with
    finite values."""
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


# ------------------------------------------------------------------------------------- the layout in the memory


def square_side(count: int) -> Optional[int]:
    """The side g of a g x g grid of `count` tokens, or None when `count` is not a perfect square."""
    side = math.isqrt(count) if count > 0 else 0
    return side if side > 0 and side * side == count else None


def _grid_side(tokens: int, what: str) -> int:
    side = square_side(tokens)
    if side is None:
        raise ValueError(
            f"MemVP: {what} pools each image's square patch grid, but an image has {tokens} visual tokens, which is "
            "no g x g grid (a CLS token kept with vision_feature_select_strategy='full' adds one: use 'default')."
        )
    return side


def compressed_tokens(config: Any, tokens: int) -> int:
    """Slots one image of `tokens` patch features takes after the config's compression (checks the grid fits)."""
    kernel, target, scales = config.pool_kernel, config.pool_tokens, config.multiscale_tokens
    if kernel == 1 and target is None and not scales:
        return tokens
    side = _grid_side(tokens, _compression_name(config))
    if kernel > 1:
        if side % kernel:
            raise ValueError(
                f"MemVP: pool_kernel={kernel} needs a patch grid whose side is a multiple of {kernel}; an image's "
                f"{tokens} tokens form a {side}x{side} grid."
            )
        return (side // kernel) ** 2
    counts = [target] if target is not None else list(scales)
    too_big = [count for count in counts if square_side(count) > side]
    if too_big:
        raise ValueError(
            f"MemVP: {_compression_name(config)} pools each image's {side}x{side} grid ({tokens} tokens) to fewer "
            f"tokens, not more: {too_big} exceed {tokens}."
        )
    return sum(counts)


def memory_tokens(config: Any, tokens_per_image: int, images: int = 1) -> int:
    """Visual slots a sample fills: `images` x blocks per image (tiles) x compressed tokens per block.

    `num_memory_slots` must be at least this; `memvp-train` defaults to it + 25% (the authors' 256 -> 320)."""
    return images * blocks_per_image(config.image_grid) * compressed_tokens(config, tokens_per_image)


def _compression_name(config: Any) -> str:
    if config.pool_kernel > 1:
        return f"pool_kernel={config.pool_kernel}"
    if config.pool_tokens is not None:
        return f"pool_tokens={config.pool_tokens}"
    return f"multiscale_tokens={list(config.multiscale_tokens)}"


def compress_grid(features: torch.Tensor, config: Any) -> torch.Tensor:
    """`(..., N, D)` patch features -> `(..., N', D)` after the config's pooling / multiscale (row-major grids)."""
    kernel, target, scales = config.pool_kernel, config.pool_tokens, config.multiscale_tokens
    if kernel == 1 and target is None and not scales:
        return features
    *lead, tokens, width = features.shape
    side = _grid_side(tokens, _compression_name(config))
    compressed_tokens(config, tokens)  # the grid fits the compression
    grid = features.reshape(-1, side, side, width).permute(0, 3, 1, 2)  # (M, D, g, g)
    if kernel > 1:
        pooled = [F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)]
    else:
        sides = [square_side(target)] if target is not None else [square_side(count) for count in scales]
        pooled = [grid if s == side else F.adaptive_avg_pool2d(grid, s) for s in sides]
    flat = torch.cat([p.flatten(2).transpose(1, 2) for p in pooled], dim=1)  # (M, N', D)
    return flat.reshape(*lead, flat.shape[1], width)


def arrange_visual_tokens(
    features: Any, image_mask: Any, config: Any
) -> tuple[Any, Any]:
    """A call's `image_features` laid out for the adapter: the image count checked against `image_grid` (whole
    images of 1 + rows*cols blocks) and `num_frames` (at most that many frames), then each image compressed.

    Runs before `validate_visual_inputs`: anything that is not a 3-D/4-D tensor is handed on untouched for it to
    refuse with its own message; the mask is per sample or per image, so compression leaves it as it is.
    """
    if not isinstance(features, torch.Tensor) or features.dim() not in (3, 4):
        return features, image_mask
    images = features.shape[1] if features.dim() == 4 else 1
    blocks = blocks_per_image(config.image_grid)
    if blocks > 1 and images % blocks:
        rows, cols = config.image_grid
        raise ValueError(
            f"MemVP: image_grid={[rows, cols]} makes every image {blocks} blocks of slots (the overview, then "
            f"{rows * cols} tiles row by row); the visual input holds {images} image(s) per sample, not a multiple of "
            f"{blocks}. Pass high-resolution pixel_values (tiled here), or tiles from "
            f"MemVPDataCollator(image_grid={(rows, cols)})."
        )
    if config.num_frames is not None and images > config.num_frames:
        raise ValueError(
            f"MemVP: the adapter reads num_frames={config.num_frames} frames per sample but the visual input holds "
            f"{images}; sample them first (MemVPDataCollator(num_frames={config.num_frames}) or "
            "memvp_peft.data.sample_frame_indices)."
        )
    compressed = compress_grid(features, config)
    needed = images * compressed.shape[-2]
    if compressed is not features and needed > config.num_memory_slots:
        raise ValueError(
            f"MemVP: {images} image(s) x {features.shape[-2]} tokens become {images} x {compressed.shape[-2]} = "
            f"{needed} slots after {_compression_name(config)}, but MemVPConfig.num_memory_slots="
            f"{config.num_memory_slots}; num_memory_slots must be >= the compressed visual tokens."
        )
    return compressed, image_mask
