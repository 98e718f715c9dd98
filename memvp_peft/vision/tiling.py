"""AnyRes-style tiling of high-resolution images for the vision encoder: the whole image downscaled plus a grid of
encoder-sized tiles, each encoded separately and each becoming its own block of memory slots.

LLaVA-NeXT ("AnyRes") splits a high-resolution image into tiles the encoder was trained on and adds the downscaled
whole image, so fine detail survives without retraining the encoder; in input space that costs ~2,880 tokens per
image in every layer. In MemVP's memory the tiles cost `4 * n * d` FLOPs per text token and layer, linear in n, and
the sequence (and the KV cache) never grows. The learned position embeddings p_k/p_v are per slot, so each tile's
block of slots has its own: that is what tells the tiles apart.

The layout is the same everywhere -- the model tiling `pixel_values` itself (`tile_pixel_values`, for the adapter's
`image_grid`: `tile_for_adapter`), the collator tiling a record's image (`tile_image`), the docs: per image, the
overview first, then the tiles row by row (top left, top right, ..., bottom right for 2x2) -- LLaVA-NeXT's order,
base image first, with a fixed grid rather than LLaVA-NeXT's choice of grid by aspect ratio. So the model sees
exactly what it would see from tiling the pixels itself, whichever side did the tiling.

A grid is given as `(rows, cols)` or as an 'RxC' string ('2x2'), with at least 2 tiles; `parse_grid` reads both
forms and `is_grid` judges the result, for `MemVPConfig(image_grid=...)` and for the collator (`check_grid`) alike.

A record's image (a PIL image) is made square piece by piece before the image processor sees it, because a processor
that resizes the short side and center-crops (CLIP's, SigLIP's at crop size) keeps only the middle of a non-square
piece: with `image_grid=(1, 4)` on a square image, each tile would be a 1:4 strip of which only the middle quarter
reached the encoder. So, as LLaVA-NeXT does, the image is first padded (centred on black, its aspect kept) to a canvas
of the grid's aspect (`grid_canvas`), whose rows x cols tiles are equal squares, each carrying its whole region. The
overview is that canvas resized to a square, as the model's own tiling downscales the whole `rows*S x cols*S` input
(LLaVA-NeXT likewise resizes the whole image to the encoder's square).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------------- the grid


def parse_grid(value: Any) -> Any:
    """A grid as `[rows, cols]`: from a list/tuple or an 'RxC' string ('2x2'); None stays None. Anything else (a
    string that is no 'RxC') is returned as it is, for `is_grid` to judge."""
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            return [int(p) for p in parts]
        return value
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def is_grid(value: Any) -> bool:
    """Whether `value` is `(rows, cols)`: two positive ints (bools are not) making at least 2 tiles."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        and value[0] * value[1] >= 2
    )


def check_grid(grid: Any, owner: str) -> tuple[int, int]:
    """`(rows, cols)` from a pair of positive ints or an 'RxC' string, at least 2 tiles; else a ValueError naming
    `owner` (the collator, a command-line flag)."""
    value = parse_grid(grid)
    if is_grid(value):
        return int(value[0]), int(value[1])
    raise ValueError(f"{owner}: image_grid must be (rows, cols) or 'RxC' with at least 2 tiles, e.g. (2, 2); got {grid!r}.")


def blocks_per_image(grid: Optional[Sequence[int]]) -> int:
    """Memory blocks one image becomes: 1 without tiling, else the overview plus rows x cols tiles."""
    return 1 if not grid else 1 + int(grid[0]) * int(grid[1])


# ------------------------------------------------------------------------------------- tiling pixel_values (model)


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


def tile_for_adapter(pixel_values: Any, image_mask: Any, config: Any, vision: Any) -> tuple[Any, Any]:
    """`pixel_values` (and a per-image mask) as the adapter's `config.image_grid` wants them: high-resolution images
    tiled into the overview plus rows x cols tiles of the size of `vision`'s encoder (`tile_pixel_values`), each
    image's mask entry repeated for its blocks. Without a grid, or without an encoder (refused later), nothing
    changes. What the tuner's runtime and the feature cache both do before encoding (`encoder.pixel_features`)."""
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


# --------------------------------------------------------------------------------- tiling a record's image (data)


def tile_boxes(width: int, height: int, grid: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes `(left, upper, right, lower)` of a rows x cols grid over a `width` x `height` image, row by
    row."""
    rows, cols = grid
    return [
        (c * width // cols, r * height // rows, (c + 1) * width // cols, (r + 1) * height // rows)
        for r in range(rows)
        for c in range(cols)
    ]


def grid_canvas(image: Any, grid: Sequence[int]) -> Any:
    """An RGB PIL image centred on a black canvas of `cols*T x rows*T` pixels, the smallest whose equal square tiles
    (side `T`) hold the whole image without resizing it; the image itself when it already has that size."""
    from PIL import Image

    rows, cols = grid
    width, height = image.size
    side = max(-(-width // cols), -(-height // rows))
    if (width, height) == (cols * side, rows * side):
        return image
    canvas = Image.new("RGB", (cols * side, rows * side))
    canvas.paste(image, ((cols * side - width) // 2, (rows * side - height) // 2))
    return canvas


def tile_image(image: Any, grid: Sequence[int]) -> list[Any]:
    """An RGB PIL image -> `[overview, tile(0, 0), tile(0, 1), ...]`: 1 + rows x cols square images (module
    docstring), each then processed (resized to the encoder's input, or featurized) as an image of its own. An image
    smaller than the grid (fewer pixels than tiles along a side) is a ValueError: it has no detail to tile."""
    from PIL import Image

    rows, cols = grid
    width, height = image.size
    if width < cols or height < rows:
        raise ValueError(f"an image of {width}x{height} pixels cannot be cut into {rows}x{cols} tiles.")
    canvas = grid_canvas(image, grid)
    width, height = canvas.size
    side = max(width, height)
    overview = canvas if width == height else canvas.resize((side, side), Image.BICUBIC)
    return [overview] + [canvas.crop(box) for box in tile_boxes(width, height, grid)]
