"""AnyRes-style tiling of high-resolution `pixel_values` for the vision encoder: the whole image downscaled plus a
grid of encoder-sized tiles, each encoded separately and each becoming its own block of memory slots.

LLaVA-NeXT ("AnyRes") splits a high-resolution image into tiles the encoder was trained on and adds the downscaled
whole image, so fine detail survives without retraining the encoder; in input space that costs ~2,880 tokens per
image in every layer. In MemVP's memory the tiles cost `4 * n * d` FLOPs per text token and layer, linear in n, and
the sequence (and the KV cache) never grows. The learned position embeddings p_k/p_v are per slot, so each tile's
block of slots has its own: that is what tells the tiles apart.

Layout (the same everywhere: this module, `memvp_peft.data.tiling` for the collator, the docs): per image, the
overview first, then the tiles row by row (top left, top right, ... for a 2x2 grid) -- LLaVA-NeXT's order, base
image first.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def blocks_per_image(grid: Optional[Sequence[int]]) -> int:
    """Memory blocks one image becomes: 1 without tiling, else the overview plus rows x cols tiles."""
    return 1 if not grid else 1 + int(grid[0]) * int(grid[1])


def tile_pixel_values(pixel_values: torch.Tensor, grid: Sequence[int], tile_size: int) -> torch.Tensor:
    """`(B, C, rows*S, cols*S)` or `(B, I, C, rows*S, cols*S)` -> `(B, I*(1 + rows*cols), C, S, S)`.

    Inputs already of the encoder's size `S` (e.g. tiles a collator made, `(B, I, C, S, S)`) are returned as they
    are. Any other size is a ValueError saying which sizes are accepted. Non-tensors and other ranks are returned
    untouched, for the input checks to refuse with their own message.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() not in (4, 5):
        return pixel_values
    rows, cols = int(grid[0]), int(grid[1])
    height, width = pixel_values.shape[-2:]
    if (height, width) == (tile_size, tile_size):
        return pixel_values
    if (height, width) != (rows * tile_size, cols * tile_size):
        raise ValueError(
            f"MemVP: image_grid={[rows, cols]} tiles `pixel_values` of {rows * tile_size}x{cols * tile_size} pixels "
            f"(height x width: {rows}x{cols} tiles of the encoder's {tile_size}x{tile_size}) into the overview plus "
            f"{rows * cols} tiles, or takes {tile_size}x{tile_size} tiles as they are; got {height}x{width}."
        )
    batch = pixel_values.shape[0]
    images = pixel_values.reshape(-1, *pixel_values.shape[-3:])  # (B*I, C, H, W)
    channels = images.shape[1]
    overview = F.interpolate(images, size=(tile_size, tile_size), mode="bilinear", align_corners=False, antialias=True)
    tiles = (
        images.reshape(-1, channels, rows, tile_size, cols, tile_size)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(-1, rows * cols, channels, tile_size, tile_size)
    )
    blocks = torch.cat([overview[:, None], tiles], dim=1)  # (B*I, 1 + r*c, C, S, S)
    return blocks.reshape(batch, -1, channels, tile_size, tile_size)


def encoder_image_size(model: torch.nn.Module) -> Optional[int]:
    """The square input size of a vision tower (`config.image_size` of CLIP/SigLIP and of VLM towers), else None."""
    size = getattr(getattr(model, "config", None), "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    return int(size) if isinstance(size, int) and size > 0 else None
