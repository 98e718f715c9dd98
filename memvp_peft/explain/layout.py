"""Where each memory slot of a row lies in the row's images: the inverse of the visual layout.

The memory of a row is laid out (`tuner.visual_inputs`, `vision.tiling`) as: its images in order (several images per
row; a video's frames), each image as one block of slots -- or, with `image_grid` (rows, cols), the overview then the
rows x cols tiles row by row, each tile a square of the padded canvas `vision.tiling.grid_canvas` made --, each
block's encoder patches as a g x g grid (row-major; a CLS token first when the encoder keeps it), compressed per block
(`pool_kernel` k: the (g/k)^2 cells of k x k patches; `pool_tokens` t: adaptive pooling to sqrt(t)^2 cells;
`multiscale_tokens`: those grids concatenated, finest first as given), then the slots past the row's visual tokens:
learned memory, no image at all (as are all slots of a text-only row and the slots of an image its `image_mask`
switches off).

`slot_layout` builds, per row, one `SlotRegion` (an image, and a box in that image's own coordinates as fractions
of its width and height) or None per slot. Boxes may overlap (the overview and a tile, two scales): a map spreads each
slot's weight uniformly over its box (`image_maps`, `box_share`), so the weight on an image is conserved and a share
of it is a share of what the row read.

What a processor does to a non-square image matters: CLIP-style processors resize the short side and crop the centre
square (only that square is read: `view="crop"`), SigLIP-style ones and the digit featurizer resize the whole image
to a square (`view="stretch"`). A tile is always square, so this only concerns untiled images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

VIEWS = ("stretch", "crop")


class ImageGeometry(NamedTuple):
    """A source image as the layout needs it: its size in pixels and how its processor fits it to a square."""

    width: int
    height: int
    view: str = "stretch"


class SlotRegion(NamedTuple):
    """Where one slot reads: image `image` of the row, box `(top, bottom, left, right)` in fractions of its height and
    width, and the block it belongs to ('image', 'overview', 'tile r,c', with 'frame k' / 'image k' in front when the
    row has several images)."""

    image: int
    top: float
    bottom: float
    left: float
    right: float
    block: str
    inside: float = 1.0  # the share of the slot's patch that lies on the image, not on the canvas's padding

    @property
    def area(self) -> float:
        return (self.bottom - self.top) * (self.right - self.left)


@dataclass
class SlotLayout:
    """One row's slots -> regions (None: the slot reads no image), and the geometry of the row's images."""

    regions: list[Optional[SlotRegion]]
    images: list[Optional[ImageGeometry]]

    @property
    def num_slots(self) -> int:
        return len(self.regions)

    def image_slots(self) -> np.ndarray:
        """(n,) bool: the slots that read some image."""
        return np.array([region is not None for region in self.regions])


def image_view_for(processor: Any) -> str:
    """'crop' for a processor that center-crops (CLIP's `do_center_crop`), else 'stretch' (SigLIP, the digits)."""
    return "crop" if getattr(processor, "do_center_crop", False) else "stretch"


def grid_sides(tokens: int, config: Any) -> tuple[bool, int, list[int]]:
    """(cls_first, g, [side of each scale]) of a block of `tokens` encoder tokens under the config's compression: a
    g x g grid (g*g + 1 tokens: a CLS token first), pooled to the listed grid sides."""
    side = math.isqrt(tokens)
    cls_first = False
    if side * side != tokens:
        side = math.isqrt(tokens - 1)
        if tokens < 2 or side * side != tokens - 1:
            raise ValueError(f"a block of {tokens} visual tokens is no g x g patch grid (nor one plus a CLS token): "
                             "its slots cannot be placed on the image.")
        cls_first = True
    kernel, target, scales = config.pool_kernel, config.pool_tokens, config.multiscale_tokens
    if kernel > 1:
        return cls_first, side, [side // kernel]
    if target is not None:
        return cls_first, side, [math.isqrt(int(target))]
    if scales:
        return cls_first, side, [math.isqrt(int(count)) for count in scales]
    return cls_first, side, [side]


def _cells(side: int, cells: int) -> list[tuple[float, float]]:
    """The spans of `cells` pooled cells over `side` patches, as fractions: adaptive pooling's floor/ceil bounds
    (exact k x k blocks when `cells` divides `side`)."""
    return [(math.floor(i * side / cells) / side, math.ceil((i + 1) * side / cells) / side) for i in range(cells)]


def _block_boxes(geometry: ImageGeometry, grid: Optional[Sequence[int]]) -> list[tuple[str, tuple[float, ...]]]:
    """The blocks of one image as (name, box in canvas-free image fractions, possibly beyond [0, 1] where a tile
    covers the canvas's padding)."""
    width, height = geometry.width, geometry.height
    if not grid:
        if geometry.view == "crop" and width != height:
            side = min(width, height)
            top, left = (height - side) / 2 / height, (width - side) / 2 / width
            return [("image", (top, top + side / height, left, left + side / width))]
        return [("image", (0.0, 1.0, 0.0, 1.0))]
    rows, cols = int(grid[0]), int(grid[1])
    tile = max(-(-width // cols), -(-height // rows))  # vision.tiling.grid_canvas
    canvas_w, canvas_h = cols * tile, rows * tile
    off_x, off_y = (canvas_w - width) // 2, (canvas_h - height) // 2

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, ...]:
        return ((y0 - off_y) / height, (y1 - off_y) / height, (x0 - off_x) / width, (x1 - off_x) / width)

    blocks = [("overview", box(0, 0, canvas_w, canvas_h))]
    for r in range(rows):
        for c in range(cols):
            blocks.append((f"tile {r},{c}", box(c * canvas_w // cols, r * canvas_h // rows,
                                                (c + 1) * canvas_w // cols, (r + 1) * canvas_h // rows)))
    return blocks


def _clip(image: int, box: tuple[float, ...], block: str) -> Optional[SlotRegion]:
    """The part of `box` on the image, keeping the share of the patch it is; None for a patch of padding only."""
    top, bottom, left, right = max(box[0], 0.0), min(box[1], 1.0), max(box[2], 0.0), min(box[3], 1.0)
    if bottom <= top or right <= left:
        return None
    inside = (bottom - top) * (right - left) / ((box[1] - box[0]) * (box[3] - box[2]))
    return SlotRegion(image, top, bottom, left, right, block, inside)


def slot_layout(config: Any, images: Sequence[Optional[ImageGeometry]], tokens_per_block: int,
                num_slots: Optional[int] = None, frames: bool = False) -> SlotLayout:
    """The layout of one row (module docstring): `images` its images in memory order (None for an empty image slot
    of the batch: its slots read no image), `tokens_per_block` the encoder's tokens per image or tile, `num_slots`
    the memory's size (default `config.num_memory_slots`); `frames` names blocks 'frame k'."""
    num_slots = int(config.num_memory_slots if num_slots is None else num_slots)
    for geometry in images:
        if geometry is not None and geometry.view not in VIEWS:
            raise ValueError(f"ImageGeometry.view must be one of {VIEWS}, got {geometry.view!r}.")
    cls_first, side, sides = grid_sides(tokens_per_block, config)
    grid = config.image_grid
    blocks_per_image = 1 + int(grid[0]) * int(grid[1]) if grid else 1
    per_block = sum(s * s for s in sides) + (1 if cls_first else 0)
    regions: list[Optional[SlotRegion]] = []
    for index, geometry in enumerate(images):
        prefix = f"frame {index}: " if frames else (f"image {index}: " if len(images) > 1 else "")
        if geometry is None:
            regions += [None] * (blocks_per_image * per_block)
            continue
        for name, (top, bottom, left, right) in _block_boxes(geometry, grid):
            height, width = bottom - top, right - left
            if cls_first:
                regions.append(_clip(index, (top, bottom, left, right), prefix + name + " CLS"))
            for cells in sides:
                spans = _cells(side, cells)
                for y0, y1 in spans:
                    for x0, x1 in spans:
                        regions.append(_clip(index, (top + y0 * height, top + y1 * height, left + x0 * width,
                                                     left + x1 * width), prefix + name))
    if len(regions) > num_slots:
        raise ValueError(f"the row's images take {len(regions)} slots but the memory has {num_slots}.")
    return SlotLayout(regions + [None] * (num_slots - len(regions)), list(images))


# ------------------------------------------------------------------------------------------------------- the maps


def _coverage(start: float, end: float, pixels: int) -> np.ndarray:
    """(pixels,): how much of each pixel of a [0, 1] axis cut into `pixels` the span [start, end] covers (0..1)."""
    edges = np.arange(pixels + 1) / pixels
    return np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], start), 0.0, None) * pixels


def image_maps(weights: np.ndarray, layout: SlotLayout, sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Per image of the layout, an (H, W) map for `sizes[i] = (H, W)`: each slot's weight spread uniformly over its
    box, so a map sums to the weight of the slots on that image (exactly, whatever the resolution; a tile's patch
    partly on the canvas's padding brings only the share of its weight that lies on the image)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (layout.num_slots,):
        raise ValueError(f"weights of shape {weights.shape} for a layout of {layout.num_slots} slots.")
    maps = [np.zeros(size, dtype=np.float64) for size in sizes]
    for weight, region in zip(weights, layout.regions):
        if region is None or weight == 0 or region.image >= len(maps):
            continue
        height, width = maps[region.image].shape
        rows, cols = _coverage(region.top, region.bottom, height), _coverage(region.left, region.right, width)
        maps[region.image] += weight * region.inside * np.outer(rows, cols) / (rows.sum() * cols.sum())
    return maps


def box_share(weights: np.ndarray, layout: SlotLayout, image: int, box: tuple[float, float, float, float]) -> float:
    """The share of the weight on the row's images that lies in `box` (top, bottom, left, right) of image `image`,
    each slot's weight spread over its region (module docstring); 0 when no image slot has weight."""
    weights = np.abs(np.asarray(weights, dtype=np.float64))
    total = inside = 0.0
    for weight, region in zip(weights, layout.regions):
        if region is None:
            continue
        total += weight * region.inside
        if region.image == image:
            overlap_h = max(0.0, min(region.bottom, box[1]) - max(region.top, box[0]))
            overlap_w = max(0.0, min(region.right, box[3]) - max(region.left, box[2]))
            inside += weight * region.inside * overlap_h * overlap_w / region.area
    return inside / total if total > 0 else 0.0
