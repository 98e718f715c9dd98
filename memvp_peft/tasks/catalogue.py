"""Datasets the command line knows: the built-in `digits` task, LLaVA conversation JSON, simple JSONL, and what the
`datasets` library reads (save_to_disk folders, parquet/arrow files, data folders, Hub ids: `.sources`).

`load_task` turns `--dataset` into train and held-out records; `reference_answer` and `normalise_answer` are how
generated answers are scored against them. Give `--vision_model_name_or_path` and the digits go through that
encoder; otherwise the embedded model reads them as patch tokens (`.digits`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..data.conversations import ORIGIN_FIELD, first_answer
from ..data.images import PRECOMPUTED_FIELDS, RAW_IMAGE_FIELDS
from ..data.video import FRAME_FIELDS
from .digits import DIGIT_LAYOUT_TASKS, DIGIT_QUESTION, digit_layout_task
from .files import load_jsonl, load_llava_json
from .scienceqa import is_scienceqa_dataset, load_scienceqa_training
from .sources import load_source, source_kind

#: The held-out fraction of a dataset without a held-out split of its own (`--eval_fraction`'s default).
DEFAULT_EVAL_FRACTION = 0.2

__all__ = ["DEFAULT_EVAL_FRACTION", "Task", "load_digits_task", "load_task", "normalise_answer", "reference_answer"]


@dataclass
class Task:
    """A dataset split for a run: `train` records, `eval` (held-out) records, and the value range of numpy images
    (`(0, 16)` for the digit scans) that the collator needs to turn them into pixels.

    The records are a list of dicts, or a `datasets.Dataset` for the sources `datasets` reads (rows are read, and
    images decoded, only when a batch needs them: a large Hub dataset is never held in memory as Python objects)."""

    name: str
    train: Any
    eval: Any
    array_value_range: Optional[tuple[float, float]] = None

    def held_out(self, count: int) -> list[dict]:
        """The first `count` held-out records as dicts (what is answered by generation at the end of a run)."""
        rows = self.held_out_rows(count)
        return [rows[i] for i in range(len(rows))]

    def held_out_rows(self, count: int) -> Any:
        """The first `count` held-out records, not read yet: a slice of the list, or a `datasets.Dataset` of them."""
        count = min(count, len(self.eval))
        return self.eval[:count] if isinstance(self.eval, list) else self.eval.select(range(count))


def normalise_answer(text: str) -> str:
    """Lower case, full stops as spaces, single spaces: what exact-match scoring compares (so "Seven." == "seven")."""
    return " ".join(text.lower().replace(".", " ").split())


def _held_out_order(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded shuffle of `count` record indices into (train, held-out); at least one record on each side."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    cut = max(1, int(round(count * eval_fraction)))
    if cut >= count:
        raise ValueError(f"the dataset has {count} records: too few to hold out {eval_fraction:.0%}.")
    return order[cut:], order[:cut]


def _split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of a file's records into (train, held-out); at least one record on each side."""
    train, held_out = _held_out_order(len(records), eval_fraction, seed)
    return [records[i] for i in train], [records[i] for i in held_out]


def load_digits_task(eval_fraction: float, seed: int) -> Task:
    """The 1,797 scikit-learn digit scans as records, split stratified by digit so every digit is held out alike."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    records = [
        {"id": int(i), "image": digits.images[i], "question": DIGIT_QUESTION, "answer": str(int(digits.target[i]))}
        for i in range(len(digits.images))
    ]
    train_idx, eval_idx = train_test_split(
        np.arange(len(records)), test_size=eval_fraction, random_state=seed, stratify=digits.target
    )
    return Task(
        "digits", [records[i] for i in train_idx], [records[i] for i in eval_idx], array_value_range=(0.0, 16.0)
    )


def load_task(
    dataset: str,
    image_folder: Optional[str],
    eval_fraction: Optional[float],
    seed: int,
    *,
    allow_outside_image_folder: bool = False,
    decode_images: bool = True,
    split: Optional[str] = None,
    config: Optional[str] = None,
    train_split: Optional[str] = None,
    use_caption: bool = False,
    image_column: Optional[str] = None,
) -> Task:
    """`digits`, a LLaVA `.json`, a `.jsonl`, or a source `datasets` reads (`.sources.source_kind`); errors name
    what was expected.

    A file's images are checked as it loads (see `load_llava_json`): `--allow_outside_image_folder` and
    `--no-decode_images` of `memvp-train` arrive here. `split` / `config` (`--dataset_split`, `--dataset_config`)
    choose the rows of a `datasets` source; the held-out records are drawn from those rows, as for a file.
    `scienceqa:DIR` trains on `train_split` (`--train_split`, default `train`) with or without captions
    (`--use_caption`) and holds out ScienceQA's own validation split (`scienceqa.load_scienceqa_training`).
    `image_column` (`--image_column`) names the field of a file's records or the column of a `datasets` source that
    holds the images, when it is not `image`/`images`.

    Every memvp-train run feeds images to the model, so training records that give no image at all are refused
    here, before anything is built: their images, if any, are somewhere the collator does not read them.
    """
    if is_scienceqa_dataset(dataset):
        if image_column is not None:
            raise ValueError("--image_column does not apply to --dataset scienceqa:DIR: its images are in DIR/images "
                             "(or the parquet rows' 'image'): drop it.")
        return _scienceqa_task(dataset, image_folder, eval_fraction, split, config, train_split, use_caption,
                               allow_outside_image_folder)
    given = [flag for flag, value in (("--train_split", train_split), ("--use_caption", use_caption)) if value]
    if given:
        raise ValueError(f"{' and '.join(given)} apply to --dataset scienceqa:DIR; dataset {dataset!r} is not "
                         "ScienceQA: drop them.")
    eval_fraction = DEFAULT_EVAL_FRACTION if eval_fraction is None else eval_fraction
    if dataset == "digits" or dataset in DIGIT_LAYOUT_TASKS or dataset.endswith((".json", ".jsonl")):
        given = [flag for flag, value in (("--dataset_split", split), ("--dataset_config", config)) if value]
        if given:
            raise ValueError(f"{' and '.join(given)} choose the rows of a datasets source (a Hub id, a save_to_disk "
                             f"folder, parquet/arrow files); dataset {dataset!r} has none: drop them.")
    if image_column is not None and (dataset == "digits" or dataset in DIGIT_LAYOUT_TASKS):
        raise ValueError(f"--image_column does not apply to the built-in {dataset!r} task: drop it.")
    if dataset == "digits":
        return load_digits_task(eval_fraction, seed)
    if dataset in DIGIT_LAYOUT_TASKS:  # digits-grid, digits-grid-3x3, digits-sequence (digits.py)
        return Task(dataset, *digit_layout_task(dataset, eval_fraction, seed), array_value_range=(0.0, 16.0))
    if dataset.endswith(".json") or dataset.endswith(".jsonl"):
        if not os.path.isfile(dataset):
            raise ValueError(f"dataset file {dataset} does not exist.")
        folder = image_folder or os.path.dirname(os.path.abspath(dataset))
        loader = load_llava_json if dataset.endswith(".json") else load_jsonl
        records = loader(dataset, folder, allow_outside_image_folder=allow_outside_image_folder,
                         decode_images=decode_images, image_column=image_column)
        if not records:
            raise ValueError(f"dataset file {dataset} holds no records.")
        train, held_out = _split(records, eval_fraction, seed)
        _refuse_without_images(train, f"dataset file {dataset}", sorted({key for record in train for key in record}))
        return Task(os.path.basename(dataset), train, held_out)
    if source_kind(dataset) is not None:
        if image_folder is not None:
            raise ValueError(f"--image_folder resolves the image paths of a .json/.jsonl dataset; dataset {dataset!r} "
                             "gives its images in its own columns (datasets.Image, bytes, or paths read as they are): "
                             "drop --image_folder.")
        rows = load_source(dataset, split, config, image_column=image_column,
                           allow_outside_image_folder=allow_outside_image_folder, decode_images=decode_images)
        _refuse_without_images(rows, f"dataset {dataset!r}", sorted(rows.column_names))
        train, held_out = _held_out_order(len(rows), eval_fraction, seed)
        return Task(dataset, rows.select(train), rows.select(held_out))
    raise ValueError(
        f"unknown dataset {dataset!r}: use 'digits', 'digits-grid', 'digits-grid-3x3', 'digits-sequence' (built in), 'scienceqa:DIR' (a ScienceQA folder), a LLaVA conversation .json, a .jsonl with "
        "image/question/answer fields, a datasets.save_to_disk folder, .parquet/.arrow files (or a glob of them), a "
        "folder of data files, or a Hub dataset id ('org/name'). A path must exist."
    )


def _scienceqa_task(dataset: str, image_folder: Optional[str], eval_fraction: Optional[float], split: Optional[str],
                    config: Optional[str], train_split: Optional[str], use_caption: bool,
                    allow_outside_image_folder: bool) -> Task:
    """ScienceQA's training split and its own held-out split; the options of other datasets are refused by name."""
    given = [flag for flag, value in (("--image_folder", image_folder), ("--eval_fraction", eval_fraction),
                                      ("--dataset_split", split), ("--dataset_config", config)) if value is not None]
    if given:
        raise ValueError(f"{' and '.join(given)} do not apply to --dataset scienceqa:DIR: its images are in "
                         "DIR/images (or the parquet rows), it trains on --train_split (default train) and holds out "
                         "its own validation split: drop them.")
    train, held_out, _ = load_scienceqa_training(dataset, train_split or "train", use_caption,
                                                 allow_outside_image_folder=allow_outside_image_folder)
    return Task("scienceqa", train, held_out)


#: where a record gives its images: raw images, video, precomputed tensors (what `MemVPDataCollator` reads)
IMAGE_GIVING_FIELDS = RAW_IMAGE_FIELDS + FRAME_FIELDS + PRECOMPUTED_FIELDS


def _refuse_without_images(records: Any, label: str, fields: list[str]) -> None:
    """Refuse training records (a list of dicts, or a whole `datasets` split) none of which gives an image.

    A `datasets` split is read from its Arrow columns' null counts and list lengths: no row is decoded."""
    if isinstance(records, list):
        found = any(_gives_image(record.get(field)) for record in records for field in IMAGE_GIVING_FIELDS)
    else:
        found = any(_column_gives_image(records.data.column(name)) for name in IMAGE_GIVING_FIELDS
                    if name in records.column_names)
    if not found:
        shown = [name for name in fields if name != ORIGIN_FIELD]
        raise ValueError(
            f"{label}: no training record gives an image ({'/'.join(IMAGE_GIVING_FIELDS)} are all missing or empty), "
            f"so MemVP would train text-only and its memory learn nothing from images. If the images are under another "
            f"name, name it with --image_column (the records' fields: {shown})."
        )


def _gives_image(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(item is not None for item in value)
    return value is not None


def _column_gives_image(column: Any) -> bool:
    """Whether an Arrow column holds a non-null value (for a list column: a non-empty list)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count == len(column):
        return False
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        return bool(pc.sum(pc.list_value_length(column)).as_py() or 0)
    return True


def reference_answer(record: dict[str, Any]) -> str:
    """The answer generation is scored against: the answer to the record's first question as training renders it
    (`data.first_answer`) -- the 'answer' field, the first assistant turn of `conversations` / `messages` / `texts`,
    or `The answer is B.` for a multiple-choice record -- which is what follows the prompt `MemVPDataCollator.prompts`
    builds."""
    return first_answer(record)
