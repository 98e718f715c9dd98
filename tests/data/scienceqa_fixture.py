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


def scienceqa_problems(num_image: int, num_text: int, seed: int = 0) -> dict[str, dict]:
    """{pid: problem} in the repository's problems.json format; `_png` holds an image problem's PNG bytes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    splits = ["train", "val", "test"]
    problems: dict[str, dict] = {}
    for k in range(num_image):
        label = int(digits.target[k])
        others = rng.sample([d for d in range(10) if d != label], 3)
        options = others + [label]
        rng.shuffle(options)
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
