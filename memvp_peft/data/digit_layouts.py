"""Two real-image tasks that need long visual context, built from scikit-learn's handwritten digits like `digits`:

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

__all__ = [
    "DIGIT_LAYOUT_TASKS",
    "GRID_CELLS",
    "ORDINALS",
    "digit_layout_task",
    "layout_of",
    "layout_prompts",
]

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
