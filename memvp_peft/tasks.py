"""Datasets the command line knows: the built-in `digits` task, LLaVA conversation JSON and simple JSONL.

`digits` is scikit-learn's 1,797 real 8x8 scans of handwritten digits, posed as visual question answering
("What digit is shown ?" -> "7"). With the embedded model it needs no vision encoder: each image becomes 16 visual
tokens, one per 2x2-pixel patch (the patch's 4 pixels plus its row/column), which play the role of CLIP patch
features -- `DigitPatchFeaturizer`. Give `--vision_model_name_or_path` and the same images go through that encoder
instead.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .data import GPT_ROLES, load_jsonl, load_llava_json

DIGIT_QUESTION = "What digit is shown ?"
DIGIT_PATCH_DIM = 6
DIGIT_PATCH_TOKENS = 16


def digit_patch_tokens(image: np.ndarray) -> np.ndarray:
    """(8, 8) grey image in [0, 1] -> (16, 6): each 2x2 patch's pixels followed by its (row, column) in [0, 1]."""
    patches = image.reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
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
    """An image-processor-shaped callable returning `image_features` (B, 16, 6) for any image (resized to 8x8)."""

    def __call__(self, images: list, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        from PIL import Image

        tokens = []
        for image in images:
            grey = image.convert("L").resize((8, 8), Image.BILINEAR)
            tokens.append(digit_patch_tokens(np.asarray(grey, dtype=np.float32) / 255.0))
        return {"pixel_values": torch.from_numpy(np.stack(tokens))}


@dataclass
class Task:
    name: str
    train: list[dict]
    eval: list[dict]
    array_value_range: Optional[tuple[float, float]] = None


def normalise_answer(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def _split(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}.")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(round(len(records) * eval_fraction)))
    if cut >= len(records):
        raise ValueError(f"the dataset has {len(records)} records: too few to hold out {eval_fraction:.0%}.")
    return [records[i] for i in order[cut:]], [records[i] for i in order[:cut]]


def load_digits_task(eval_fraction: float, seed: int) -> Task:
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


def load_task(dataset: str, image_folder: Optional[str], eval_fraction: float, seed: int) -> Task:
    """`digits`, a LLaVA `.json` or a `.jsonl`; errors name what was expected."""
    if dataset == "digits":
        return load_digits_task(eval_fraction, seed)
    if dataset.endswith(".json") or dataset.endswith(".jsonl"):
        if not os.path.isfile(dataset):
            raise ValueError(f"dataset file {dataset} does not exist.")
        folder = image_folder or os.path.dirname(os.path.abspath(dataset))
        loader = load_llava_json if dataset.endswith(".json") else load_jsonl
        records = loader(dataset, folder)
        if not records:
            raise ValueError(f"dataset file {dataset} holds no records.")
        train, held_out = _split(records, eval_fraction, seed)
        return Task(os.path.basename(dataset), train, held_out)
    raise ValueError(
        f"unknown dataset {dataset!r}: use 'digits' (built in), a LLaVA conversation .json or a .jsonl with "
        "image/question/answer fields."
    )


def reference_answer(record: dict[str, Any]) -> str:
    """The answer generation is scored against: the 'answer' field, or the first gpt turn of a conversation -- the
    turn that answers the first question, which is the prompt `MemVPDataCollator.prompts` builds."""
    if "answer" in record:
        return str(record["answer"])
    return next((t["value"] for t in record.get("conversations", []) if str(t.get("from")).lower() in GPT_ROLES), "")
