"""A ScienceQA-format dataset built in the test from real images (scikit-learn's digits), in both layouts.

Image problems ask "Which digit is shown?" with 4 choices (the digit and three others); text-only problems, with and
without a hint, cover the other two subjects; grades span both bands. `write_repository_layout` writes what the
ScienceQA repository ships (problems.json, pid_splits.json, images/<split>/<pid>/image.png, captions.json) and
`write_hub_layout` what the Hub export ships (one parquet file per split, the image as PNG bytes).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

SUBJECTS = ("natural science", "social science", "language science")
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEXT_QUESTIONS = [  # (question, hint, choices, answer, subject)
    ("Which word is a color?", "", ["table", "red", "run"], 1, "language science"),
    ("Which is a country?", "Countries have borders.", ["France", "apple"], 0, "social science"),
    ("Which word rhymes with cat?", "", ["dog", "sun", "hat", "cup"], 2, "language science"),
    ("Which is a continent?", "There are seven continents.", ["river", "Asia"], 1, "social science"),
]


def digit_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.rint(image * (255.0 / 16.0)).astype(np.uint8), mode="L").convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def digit_choices(label: int, rng: random.Random, shuffled: bool) -> list[int]:
    """The 4 digits offered for an image of `label`: the label and three others in random order (`shuffled`), or the
    block of four consecutive digits holding it (0-3, 4-7, 6-9), in order -- the letter then follows from the image
    alone, which a tiny random base can learn; matching an image to shuffled option texts it cannot in a few hundred
    steps."""
    if shuffled:
        options = rng.sample([d for d in range(10) if d != label], 3) + [label]
        rng.shuffle(options)
        return options
    start = min(4 * (label // 4), 6)
    return list(range(start, start + 4))


def scienceqa_problems(num_image: int, num_text: int, seed: int = 0, shuffled: bool = True) -> dict[str, dict]:
    """{pid: problem} in the repository's problems.json format; `_png` holds an image problem's PNG bytes.

    Image problem k shows scikit-learn digit k; its choices come from `digit_choices`. Splits cycle train/val/test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    splits = ["train", "val", "test"]
    problems: dict[str, dict] = {}
    for k in range(num_image):
        label = int(digits.target[k])
        options = digit_choices(label, rng, shuffled)
        problems[str(1000 + k)] = {
            "question": "Which digit is shown?", "choices": [DIGIT_WORDS[d] for d in options],
            "answer": options.index(label), "hint": "" if k % 3 else "Look at the image.", "image": "image.png",
            "subject": "natural science", "grade": f"grade{1 + k % 12}", "split": splits[k % 3],
            "lecture": "", "solution": "", "_png": digit_png(digits.images[k]),
        }
    for k in range(num_text):
        question, hint, choices, answer, subject = TEXT_QUESTIONS[k % len(TEXT_QUESTIONS)]
        problems[str(5000 + k)] = {
            "question": question, "choices": choices, "answer": answer, "hint": hint, "image": None,
            "subject": subject, "grade": f"grade{12 - k % 12}", "split": splits[k % 3], "lecture": "", "solution": "",
        }
    return problems


def write_repository_layout(folder: Path, problems: dict[str, dict], captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    clean = {}
    for pid, problem in problems.items():
        splits[problem["split"]].append(pid)
        clean[pid] = {k: v for k, v in problem.items() if k != "_png"}
        if problem.get("image"):
            image_dir = folder / "images" / problem["split"] / pid
            image_dir.mkdir(parents=True, exist_ok=True)
            (image_dir / "image.png").write_bytes(problem["_png"])
    splits["trainval"] = splits["train"] + splits["val"]
    (folder / "problems.json").write_text(json.dumps(clean))
    (folder / "pid_splits.json").write_text(json.dumps(splits))
    if captions:
        text = {pid: "A handwritten digit." for pid, p in problems.items() if p.get("image")}
        (folder / "captions.json").write_text(json.dumps({"captions": text}))
    return folder


def write_hub_layout(folder: Path, problems: dict[str, dict]) -> Path:
    """The Hub export: data/<split>-00000-of-00001.parquet, `val` named `validation`, images as {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True, exist_ok=True)
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = [
            {"image": {"bytes": p["_png"], "path": None} if p.get("image") else None, "question": p["question"],
             "choices": p["choices"], "answer": p["answer"], "hint": p["hint"], "task": "closed choice",
             "grade": p["grade"], "subject": p["subject"], "topic": "", "category": "", "skill": "",
             "lecture": "", "solution": ""}
            for p in problems.values() if p["split"] == split
        ]
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{name}-00000-of-00001.parquet")
    return folder


def fixture_tokenizer(problems: dict[str, dict]):
    """A word-level tokenizer knowing every word of the fixture's prompts and targets (a tiny local base's)."""
    from memvp_peft.data.multiple_choice import multiple_choice_prompt
    from memvp_peft.demo_models import build_word_tokenizer

    corpus = [multiple_choice_prompt(p["question"], p["choices"], p["hint"], "A handwritten digit.")
              for p in problems.values()]
    return build_word_tokenizer(corpus + ["The answer is A B C D E ."])


def write_fixture_base(folder: Path, problems: dict[str, dict], hidden_size: int = 128, seed: int = 0) -> Path:
    """A tiny random Llama with `fixture_tokenizer`, saved as a local checkpoint folder (`--model_name_or_path`)."""
    from memvp_peft.demo_models import tiny_llama

    tokenizer = fixture_tokenizer(problems)
    # initializer_range 0.1 and untied embeddings, as the embedded digits base: a random lm_head with LlamaConfig's
    # 0.02 caps every answer probability well below 1
    model = tiny_llama(tokenizer, hidden_size=hidden_size, layers=2, seed=seed, initializer_range=0.1,
                       tie_word_embeddings=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # the fixture docs/benchmarks.md measures: python tests/tasks/scienceqa_fixture.py OUT
    import sys

    out = Path(sys.argv[1])
    fixture = scienceqa_problems(num_image=600, num_text=24, shuffled=False)
    write_repository_layout(out / "scienceqa", fixture)
    write_fixture_base(out / "base", fixture)
    print(f"wrote {out / 'scienceqa'} (ScienceQA repository layout) and {out / 'base'} (tiny Llama + tokenizer)")


@pytest.fixture(scope="module")
def problems():
    """The problems the ScienceQA tests share: 9 image problems and 6 text-only ones."""
    return scienceqa_problems(num_image=9, num_text=6)


@pytest.fixture
def repository(tmp_path, problems):
    """`problems` written in the repository layout (a fresh copy per test: tests may damage it)."""
    return write_repository_layout(tmp_path / "sqa", problems)
