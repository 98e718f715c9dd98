"""Long visual context in the memory: how many images a call may bring (tiles, frames), and compressing each image's
patch grid before the projector (average pooling, ADEM-VL's multiscale slots).

MemVP's memory costs `4 * n * d` FLOPs per text token and layer: linear in the number of slots n, and the sequence
never grows. So long visual contexts -- a high-resolution image as tiles, a video as frames -- are cheap, and
shrinking n is the one lever left. Two compressions, both *before* the projector f, on each image's own grid:

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
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..vision_tiling import blocks_per_image, encoder_image_size, tile_pixel_values
from .layer import MEMORY_READS


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


def tile_for_adapter(pixel_values: Any, image_mask: Any, config: Any, vision: Any) -> tuple[Any, Any]:
    """`pixel_values` (and a per-image mask) as the adapter's `image_grid` wants them: high-resolution images tiled
    into the overview plus rows x cols encoder-sized tiles (`vision_tiling.tile_pixel_values`), each image's mask
    entry repeated for its blocks. Without a grid, or without an encoder (refused later), nothing changes."""
    if config.image_grid is None or vision is None or not isinstance(pixel_values, torch.Tensor):
        return pixel_values, image_mask
    size = encoder_image_size(vision.model)
    if size is None:
        raise ValueError(
            f"MemVP: image_grid={list(config.image_grid)} tiles pixel_values to the encoder's input size, but "
            f"{type(vision.model).__name__} has no square `config.image_size`; pass the tiles yourself, "
            "(B, images x blocks, C, H, W)."
        )
    tiled = tile_pixel_values(pixel_values, config.image_grid, size)
    if tiled is pixel_values:
        return pixel_values, image_mask
    if isinstance(image_mask, torch.Tensor) and image_mask.dim() == 2 and pixel_values.dim() == 5:
        image_mask = image_mask.repeat_interleave(blocks_per_image(config.image_grid), dim=1)
    return tiled, image_mask


def positive_ints(value: Any, length: Optional[int] = None) -> bool:
    """Whether `value` is a list/tuple of positive ints (of `length` items when given)."""
    return (
        isinstance(value, (list, tuple))
        and (length is None or len(value) == length)
        and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def parse_grid(value: Any) -> Optional[list[int]]:
    """`image_grid` as `[rows, cols]`: from a list/tuple of two ints or a 'RxC' string ('2x2'); None stays None.
    Anything else is returned as it is, for the config's check to refuse."""
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
        return value
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def check_long_context(config: Any) -> None:
    """`MemVPConfig`'s checks of tiling, frames, compression and the read form."""
    if config.image_grid is not None and (
        not positive_ints(config.image_grid, 2) or config.image_grid[0] * config.image_grid[1] < 2
    ):
        raise ValueError(
            "MemVPConfig.image_grid must be None or [rows, cols] (or 'RxC') of positive integers with at least "
            f"2 tiles, e.g. [2, 2]; got {config.image_grid!r}."
        )
    if config.num_frames is not None and not positive_ints([config.num_frames]):
        raise ValueError(f"MemVPConfig.num_frames must be None or a positive integer, got {config.num_frames!r}.")
    if config.image_grid is not None and config.num_frames is not None:
        raise ValueError(
            "MemVPConfig: image_grid and num_frames were both set; a sample is either tiled images or video "
            "frames: set one of them."
        )
    if not positive_ints([config.pool_kernel]):
        raise ValueError(f"MemVPConfig.pool_kernel must be a positive integer (1 = no pooling), got {config.pool_kernel!r}.")
    target = config.pool_tokens
    if target is not None and (not positive_ints([target]) or square_side(target) is None):
        raise ValueError(f"MemVPConfig.pool_tokens must be None or a perfect square token count (e.g. 64), got {target!r}.")
    scales = config.multiscale_tokens
    if scales is not None and (not positive_ints(scales) or any(square_side(count) is None for count in scales)):
        raise ValueError(
            "MemVPConfig.multiscale_tokens must be None or a list of perfect square token counts, e.g. [256, 64] "
            f"(ADEM-VL), got {scales!r}."
        )
    compressions = [name for name, on in (("pool_kernel", config.pool_kernel != 1),
                                           ("pool_tokens", config.pool_tokens is not None),
                                           ("multiscale_tokens", scales is not None)) if on]
    if len(compressions) > 1:
        raise ValueError(
            f"MemVPConfig: {' and '.join(compressions)} were both set; they are alternative compressions of the "
            "patch grid: set one."
        )
    if config.memory_read not in MEMORY_READS:
        raise ValueError(f"MemVPConfig.memory_read must be one of {MEMORY_READS}, got {config.memory_read!r}.")
    if config.memory_read == "adem" and config.activation is not None:
        raise ValueError(
            f"MemVPConfig: memory_read='adem' reads silu(x) silu(K)^T, so activation={config.activation!r} would "
            "not be used: leave activation None."
        )
    value = config.drop_ratio
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"MemVPConfig.drop_ratio must be a number in [0, 1), got {value!r}.")
