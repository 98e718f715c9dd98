"""AnyRes-style tiling of a record's image for the collator: the whole image plus a rows x cols grid of crops, each
then processed (resized to the encoder's input, or featurized) as an image of its own.

The layout is the one the model uses for high-resolution `pixel_values` (`memvp_peft.vision_tiling`): per image, the
overview first, then the tiles row by row (top left, top right, ..., bottom right for 2x2). Each becomes its own block
of memory slots, told apart by the per-slot position embeddings, so the model sees exactly what it would see from
tiling the pixels itself. The crops split the image into equal boxes (the last row/column takes the rounding), and the
image processor resizes each to its input size -- a fixed grid, without LLaVA-NeXT's choice of grid by aspect ratio.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["check_grid", "tile_boxes", "tile_image"]


def check_grid(grid: Any, owner: str) -> tuple[int, int]:
    """`(rows, cols)` from a pair of positive ints or an 'RxC' string, at least 2 tiles; else a ValueError."""
    value = grid
    if isinstance(value, str):
        parts = value.lower().replace(" ", "").split("x")
        value = [int(p) for p in parts] if len(parts) == 2 and all(p.isdigit() for p in parts) else value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        and value[0] * value[1] >= 2
    ):
        return int(value[0]), int(value[1])
    raise ValueError(f"{owner}: image_grid must be (rows, cols) or 'RxC' with at least 2 tiles, e.g. (2, 2); got {grid!r}.")


def tile_boxes(width: int, height: int, grid: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes `(left, upper, right, lower)` of a rows x cols grid over a `width` x `height` image, row by
    row."""
    rows, cols = grid
    return [
        (c * width // cols, r * height // rows, (c + 1) * width // cols, (r + 1) * height // rows)
        for r in range(rows)
        for c in range(cols)
    ]


def tile_image(image: Any, grid: Sequence[int]) -> list[Any]:
    """An RGB PIL image -> `[image, tile(0, 0), tile(0, 1), ...]`: 1 + rows x cols images. An image smaller than the
    grid (fewer pixels than tiles along a side) is a ValueError: a tile would be empty."""
    rows, cols = grid
    width, height = image.size
    if width < cols or height < rows:
        raise ValueError(f"an image of {width}x{height} pixels cannot be cut into {rows}x{cols} tiles.")
    return [image] + [image.crop(box) for box in tile_boxes(width, height, grid)]
