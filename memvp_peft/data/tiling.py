"""AnyRes-style tiling of a record's image for the collator: the whole image plus a rows x cols grid of crops, each
then processed (resized to the encoder's input, or featurized) as an image of its own.

The layout is the one the model uses for high-resolution `pixel_values` (`memvp_peft.vision_tiling`): per image, the
overview first, then the tiles row by row (top left, top right, ..., bottom right for 2x2). Each becomes its own block
of memory slots, told apart by the per-slot position embeddings, so the model sees exactly what it would see from
tiling the pixels itself -- a fixed grid, without LLaVA-NeXT's choice of grid by aspect ratio.

Every piece is square before the image processor sees it, because a processor that resizes the short side and
center-crops (CLIP's, SigLIP's at crop size) keeps only the middle of a non-square piece: with `image_grid=(1, 4)` on a
square image, each tile would be a 1:4 strip of which only the middle quarter reached the encoder. So, as LLaVA-NeXT
does, the image is first padded (centred on black, its aspect kept) to a canvas of the grid's aspect (`grid_canvas`),
whose rows x cols tiles are equal squares, each carrying its whole region. The overview is that canvas resized to a
square, as the model's own tiling downscales the whole `rows*S x cols*S` input (LLaVA-NeXT likewise resizes the whole
image to the encoder's square).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["check_grid", "grid_canvas", "tile_boxes", "tile_image"]


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
    docstring). An image smaller than the grid (fewer pixels than tiles along a side) is a ValueError: it has no
    detail to tile."""
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
