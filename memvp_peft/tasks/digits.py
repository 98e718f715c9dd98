"""The command line's digit tasks, built from scikit-learn's 1,797 real 8x8 scans of handwritten digits: `digits`
and the long-context layouts `digits-grid`, `digits-grid-3x3`, `digits-sequence`, with the patch-token featurizer
that lets the embedded model (which has no vision encoder) read them.

`digits` poses the scans as visual question answering ("What digit is shown ?" -> "7"). With the embedded model it
needs no vision encoder: each image becomes 16 visual tokens, one per 2x2-pixel patch (the patch's 4 pixels plus its
row/column), which play the role of CLIP patch features -- `DigitPatchFeaturizer` for the collator (any image),
`digit_scan_tokens` for the raw scans (the benchmark and the example). Both go through `digit_patch_tokens`, so the
tokens are the same either way.

Polarity: the scans are light ink on a dark background (ink high), while a digit drawn or photographed on paper is
dark on light. The model only ever learns one polarity, so -- as any digit reader does -- `digit_patch_tokens` brings
every image to the scans' polarity first (`ink_high`): an image whose border (the background) is clearly brighter
than the image on average is inverted. No scikit-learn scan is inverted by this rule (their border is darker than
their mean by 0.18 or more of full scale; inverted, brighter by as much), nor any digits-grid overview.

The layout tasks need long visual context:

* `digits-grid` (2x2) and `digits-grid-3x3`: r x c digit scans side by side in one image, at the resolution where
  one tile of `image_grid` holds exactly one digit (8r x 8c pixels), and a question about one cell:
  "What digit is at the top right ?" -> "7". The model must find the tile the words point to.
* `digits-sequence`: 8 digit scans as the frames of a video: "Which digit comes third ?" -> "4". The model must
  find the frame the ordinal points to.

The answer is in one block of memory slots only (a tile, a frame), and the position slots of that block are what
the question has to select: a task that a single 16-slot image cannot solve. The held-out records are built only
from held-out scans (the scans are split stratified by digit, as for `digits`), so no held-out digit image was seen
in training.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

__all__ = [
    "DIGIT_LAYOUT_TASKS",
    "DIGIT_PATCH_DIM",
    "DIGIT_PATCH_TOKENS",
    "DIGIT_QUESTION",
    "GRID_CELLS",
    "ORDINALS",
    "DigitPatchFeaturizer",
    "digit_layout_task",
    "digit_patch_tokens",
    "digit_scan_tokens",
    "ink_high",
    "layout_of",
    "layout_prompts",
]

DIGIT_QUESTION = "What digit is shown ?"
DIGIT_PATCH_DIM = 6
DIGIT_PATCH_TOKENS = 16


#: How much brighter than the image's mean its border must be for `ink_high` to invert it: a flat image (a blank
#: frame, compression noise) has no polarity and is left as it is.
POLARITY_MARGIN = 0.05


def ink_high(image: np.ndarray) -> np.ndarray:
    """A grey image in [0, 1] in the scans' polarity, light ink on a dark background: inverted when the median of its
    border pixels (the background) is brighter than the whole image's mean by more than `POLARITY_MARGIN`, i.e. when
    it is drawn dark on light."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return 1.0 - image if np.median(border) > image.mean() + POLARITY_MARGIN else image


def digit_patch_tokens(image: np.ndarray) -> np.ndarray:
    """(8, 8) grey image in [0, 1] -> (16, 6): each 2x2 patch's pixels (in the scans' polarity, `ink_high`) followed
    by its (row, column) in [0, 1]."""
    patches = ink_high(image).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
    rows, cols = np.divmod(np.arange(16), 4)
    position = np.stack([rows, cols], axis=1) / 3.0
    return np.concatenate([patches, position], axis=1).astype(np.float32)


def digit_scan_tokens(scans: np.ndarray) -> torch.Tensor:
    """scikit-learn digit scans `(M, 8, 8)` with pixels in 0..16 -> visual tokens `(M, 16, 6)`.

    The patch position is part of each token (like a vision encoder's positional embedding), so the projector alone
    can tell where a stroke is; MemVP's per-slot position embeddings p_k/p_v add their own on top.
    """
    return torch.from_numpy(np.stack([digit_patch_tokens(scan.astype(np.float32) / 16.0) for scan in scans]))


class DigitPatchFeaturizer:
    """An image-processor-shaped callable returning `image_features` (B, 16, 6) for any image (resized to 8x8; a
    digit drawn dark on light is read like a scan, light on dark: `ink_high`)."""

    def __call__(self, images: list, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        from PIL import Image

        tokens = []
        for image in images:
            grey = image.convert("L").resize((8, 8), Image.BILINEAR)
            tokens.append(digit_patch_tokens(np.asarray(grey, dtype=np.float32) / 255.0))
        return {"pixel_values": torch.from_numpy(np.stack(tokens))}


#: dataset name -> (image_grid, num_frames)
DIGIT_LAYOUT_TASKS: dict[str, tuple[Optional[tuple[int, int]], Optional[int]]] = {
    "digits-grid": ((2, 2), None),
    "digits-grid-3x3": ((3, 3), None),
    "digits-sequence": (None, 8),
}

_ROWS = {2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}
_COLS = {2: ["left", "right"], 3: ["left", "middle", "right"]}


def _cell_name(row: str, col: str) -> str:
    return "center" if row == col == "middle" else f"{row} {col}"


#: (rows, cols) -> the cells' names, row by row (the order of the tiles in memory)
GRID_CELLS = {(n, n): [_cell_name(r, c) for r in _ROWS[n] for c in _COLS[n]] for n in (2, 3)}
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]


def grid_question(cell: str) -> str:
    return f"What digit is at the {cell} ?"


def sequence_question(ordinal: str) -> str:
    return f"Which digit comes {ordinal} ?"


def layout_of(dataset: str) -> Optional[dict[str, Any]]:
    """`{"image_grid": ..., "num_frames": ...}` of a digit-layout task (what the collator and MemVPConfig need), or
    None for any other dataset."""
    if dataset not in DIGIT_LAYOUT_TASKS:
        return None
    grid, frames = DIGIT_LAYOUT_TASKS[dataset]
    return {"image_grid": grid, "num_frames": frames}


def layout_prompts(dataset: str) -> list[str]:
    """Every question of the task (the embedded base's word tokenizer needs their words in its vocabulary)."""
    grid, frames = DIGIT_LAYOUT_TASKS[dataset]
    if grid is not None:
        return [grid_question(cell) for cell in GRID_CELLS[grid]]
    return [sequence_question(ordinal) for ordinal in ORDINALS[:frames]]


def _records(dataset: str, scans: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator) -> list[dict]:
    grid, frames = DIGIT_LAYOUT_TASKS[dataset]
    cells = grid[0] * grid[1] if grid is not None else frames
    records = []
    for index in range(count):
        chosen = rng.integers(0, len(scans), size=cells)
        asked = int(rng.integers(0, cells))
        record: dict[str, Any] = {"id": index, "answer": str(int(labels[chosen[asked]])), "digits": labels[chosen].tolist()}
        if grid is not None:
            rows, cols = grid
            tiles = scans[chosen].reshape(rows, cols, 8, 8)
            record["image"] = tiles.transpose(0, 2, 1, 3).reshape(rows * 8, cols * 8)  # 8r x 8c: one digit per tile
            record["question"] = grid_question(GRID_CELLS[grid][asked])
        else:
            record["frames"] = list(scans[chosen])
            record["question"] = sequence_question(ORDINALS[asked])
        records.append(record)
    return records


def digit_layout_task(dataset: str, eval_fraction: float, seed: int, train_records: int = 6000,
                      eval_records: int = 400) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records of `dataset` (a key of `DIGIT_LAYOUT_TASKS`): `train_records` composites of the
    training scans, `eval_records` of the held-out ones, each asking about one random cell or frame."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if dataset not in DIGIT_LAYOUT_TASKS:
        raise ValueError(f"unknown digit layout task {dataset!r}: one of {sorted(DIGIT_LAYOUT_TASKS)}.")
    digits = load_digits()
    train_idx, eval_idx = train_test_split(
        np.arange(len(digits.images)), test_size=eval_fraction, random_state=seed, stratify=digits.target
    )
    rng = np.random.default_rng(seed)
    train = _records(dataset, digits.images[train_idx], digits.target[train_idx], train_records, rng)
    held_out = _records(dataset, digits.images[eval_idx], digits.target[eval_idx], eval_records, rng)
    return train, held_out
