"""Fixtures and helpers shared by the tests of memvp_peft.data and memvp_peft.tasks (imported by name: pytest finds
fixtures in a test module's namespace).  A module rather than a second conftest.py, so that `from conftest import
...` keeps meaning tests/conftest.py everywhere.

Everything is local: the tokenizer is trained in-test (`demo_models.build_word_tokenizer`), the image processor is a
`CLIPImageProcessor` built from arguments, the images are scikit-learn digits written to PNG files.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import pytest

from memvp_peft.data import IGNORE_INDEX, MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor

IMAGE_SIDE = 32
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def tokenizer():
    """Word-level, and it prepends BOS like Llama does, to check that BOS is kept and never supervised."""
    return build_word_tokenizer([
        "Question: What digit is shown in the image ?\nAnswer: " + " ".join(DIGIT_NAMES),
        "Is the digit odd or even ? It is odd . It is even . yes no",
        "Which image shows the larger digit ? The first one . The second one .",
        "What color is the sky ? blue . Describe it . A handwritten digit on a dark background .",
    ])


@pytest.fixture(scope="module")
def image_processor():
    return clip_image_processor(IMAGE_SIDE)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images[:12], data.target[:12]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, digits):
    """Digits as 8-bit grayscale PNG files: digit_0.png ... digit_11.png."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    images, _ = digits
    for i, image in enumerate(images):
        Image.fromarray(np.rint(image * (255.0 / 16.0)).astype(np.uint8), mode="L").save(folder / f"digit_{i}.png")
    (folder / "broken.png").write_bytes(b"this is not a png file at all")
    return folder


@pytest.fixture
def collator(tokenizer, image_processor):
    return MemVPDataCollator(tokenizer, image_processor, max_length=64)


def digit_scans(count: int, question: str, answer: Callable[[int], str]):
    """The first `count` scikit-learn digit scans as a `datasets.Dataset` with a `datasets.Image` column (PNG bytes),
    as Hub datasets store images (what the parquet sources and the offline Hub cache of tests/cli read), each row
    with `question` and `answer(its digit)`."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(buffer, format="PNG")
        rows.append({"image": {"bytes": buffer.getvalue(), "path": None}, "question": question,
                     "answer": answer(int(digits.target[i]))})
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    return datasets.Dataset.from_list(rows, features=features)


def supervised_ids(batch, row):
    labels = batch["labels"][row]
    return labels[labels != IGNORE_INDEX].tolist()


def answer_ids(tokenizer, answer):
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
