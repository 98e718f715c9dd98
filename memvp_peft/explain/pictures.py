"""Read maps as pictures: heat maps of what was read, over the record's own images, one PNG per answer token and one
for the answer's average.

A panel per image of the row (a video's frames side by side), all panels of one picture on one colour scale, so a
frame that was hardly read looks it. The map is `layout.image_maps` of the slot weights (contributions summed over the
chosen layers), in weight per unit of image area; the caption says which share of the weight fell on the images at
all -- the rest went to the learned slots past the visual tokens, which have no place on an image.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from .layout import SlotLayout, image_maps

#: the long side of a map in pixels: fine enough for the smallest patch of an 8x8 digit's overview
MAP_SIDE = 256


def panel_width(panels: int) -> float:
    """Inches per image panel: narrower for a video's many frames, so a picture stays a screen wide."""
    return 2.6 if panels <= 4 else 1.5


def map_size(image: Any) -> tuple[int, int]:
    """(H, W) of the map drawn over `image`: its aspect, the long side `MAP_SIDE`."""
    width, height = image.size
    scale = MAP_SIDE / max(width, height)
    return max(1, round(height * scale)), max(1, round(width * scale))


def weight_maps(weights: np.ndarray, layout: SlotLayout, images: Sequence[Optional[Any]]) -> list[Optional[np.ndarray]]:
    """The map of each present image (None for an empty image slot), each normalised to weight per unit area (so
    maps of images of different sizes compare)."""
    sizes = [map_size(image) if image is not None else (1, 1) for image in images]
    maps = image_maps(weights, layout, sizes)
    return [None if image is None else grid * grid.size for image, grid in zip(images, maps)]


def image_share(weights: np.ndarray, layout: SlotLayout) -> float:
    """The share of the weight on slots that read an image (the rest: learned memory)."""
    weights = np.abs(np.asarray(weights, dtype=np.float64))
    total = weights.sum()
    return float(weights[layout.image_slots()].sum() / total) if total > 0 else 0.0


def save_read_map(path: str, weights: np.ndarray, layout: SlotLayout, images: Sequence[Optional[Any]],
                  title: str, labels: Optional[Sequence[str]] = None) -> str:
    """Write the picture of one map (module docstring) to `path` (PNG); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [index for index, image in enumerate(images) if image is not None]
    if not present:
        raise ValueError("save_read_map: the row has no image to draw a map on.")
    maps = weight_maps(weights, layout, images)
    top = max(float(maps[index].max()) for index in present) or 1.0
    figure, axes = plt.subplots(1, len(present), figsize=(panel_width(len(present)) * len(present) + 0.8, 3.0), squeeze=False)
    colours = plt.get_cmap("inferno")
    for axis, index in zip(axes[0], present):
        image = np.asarray(images[index].convert("L"), dtype=np.float32)
        height, width = image.shape
        axis.imshow(image, cmap="gray", extent=(0, width, height, 0), interpolation="nearest")
        level = maps[index] / top
        overlay = colours(level)
        overlay[..., 3] = 0.8 * level ** 0.5  # where little was read the image shows through
        axis.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        if labels is not None:
            axis.set_title(labels[index], fontsize=8)
    shown = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0.0, top), colours)
    figure.colorbar(shown, ax=list(axes[0]), fraction=0.03, pad=0.02, label="read per unit area")
    figure.suptitle(f"{title}\n{100 * image_share(weights, layout):.0f}% of the read on the image", fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def save_answer_maps(folder: str, stem: str, explained: Any, layers: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """The pictures of one `records.ExplainedAnswer` in `folder`: `STEM-image.png` (the images alone), `STEM-tokenK.png`
    per answer token and `STEM-mean.png`; returns the file names (relative to `folder`) and each token's text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = explained.images
    present = [image for image in images if image is not None]
    labels = [f"frame {index + 1}" if explained.frames else f"image {index + 1}" for index in range(len(images))]
    labels = labels if len(present) > 1 else None
    figure, axes = plt.subplots(1, len(present), figsize=(panel_width(len(present)) * len(present), 2.6), squeeze=False)
    for axis, image in zip(axes[0], present):
        axis.imshow(np.asarray(image), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
    os.makedirs(folder, exist_ok=True)
    figure.savefig(os.path.join(folder, f"{stem}-image.png"), dpi=100, bbox_inches="tight")
    plt.close(figure)
    weights = explained.reads.slot_weights(layers)
    tokens = []
    for position, text in enumerate(explained.token_texts):
        name = f"{stem}-token{position}.png"
        save_read_map(os.path.join(folder, name), weights[position], explained.layout, images,
                      f"token {position + 1}: {text!r}", labels)
        tokens.append({"text": text, "picture": name})
    mean = f"{stem}-mean.png"
    save_read_map(os.path.join(folder, mean), weights.mean(axis=0), explained.layout, images,
                  f"answer {explained.answer!r}: mean of its {len(tokens)} tokens", labels)
    return {"image": f"{stem}-image.png", "tokens": tokens, "mean": mean}
