"""ScienceQA (Lu et al. 2022): its problems -> multiple-choice records, from either of the two layouts it is
distributed in, and the answers to them -> the paper's table `NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg`.

MemVP's headline result is ScienceQA, so `--dataset scienceqa:DIR` reads the data exactly as the authors' code does
(github JieShibo/MemVP, ``util/datasets.py``) and hands the collator *multiple-choice records* --
``question``, ``choices``, integer ``answer``, ``hint`` (and ``caption`` when asked) -- which
:mod:`memvp_peft.data.multiple_choice` renders with the paper's QCM-A prompt. Keeping the rendering there (not here)
means a ScienceQA problem and any other multiple-choice record are prompted the same way, at training and at
answering time.

The two layouts:

* the ScienceQA repository (``problems.json`` = {pid: {question, choices, answer, hint, image, subject, grade, ...,
  split}}, ``pid_splits.json`` = {split: [pid, ...]}, ``images/<split>/<pid>/image.png``, optional
  ``captions.json`` = {"captions": {pid: text}});
* the Hub parquet export (one row per problem: ``image`` as ``{"bytes", "path"}`` or null, ``question``,
  ``choices``, integer ``answer``, ``hint``, ``subject``, ``grade``, ...), as files ``<split>-*.parquet`` or
  ``<split>.parquet`` in DIR or ``DIR/data``. It has no problem ids: a row's id is ``<split>-<index>``.

Each record also carries what scoring needs (``subject``, ``grade``, ``has_image``, ``has_hint``) -- the columns of
the paper's table are computed from these, never re-derived from the prompt.

Image paths follow the loaders' one rule (:func:`memvp_peft.data.images.resolve_image_path`): a repository
problem's ``image`` names a file of its own folder ``images/<split>/<pid>/``, a Hub row's image without bytes a path
relative to its parquet file's folder; one leading outside (``..``, an absolute path) is refused unless
``allow_outside_image_folder``.  A Hub row's embedded bytes need no rule.

Scoring: the columns are the ones ScienceQA papers report (MemVP's Table 1 among them) and the authors' ``eval.py``
computes: accuracy on the natural / social / language science subjects, on problems with a text context (a hint),
with an image, with neither, on grades 1-6 and 7-12, and on all. A prediction is the first capital letter of the
generated text; a letter beyond the problem's choices (or none at all) is wrong, as in the authors' scoring.
"""

from __future__ import annotations

import glob
import json
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from ..data.conversations import ORIGIN_FIELD
from ..data.images import PathLike, resolve_image_path

__all__ = ["HELD_OUT_SPLITS", "SCIENCEQA_COLUMNS", "SCIENCEQA_PREFIX", "SCIENCEQA_SPLITS", "answer_letter",
           "format_scores_table", "is_scienceqa_dataset", "load_scienceqa", "load_scienceqa_training",
           "predicted_letter", "scienceqa_scores"]

#: `--dataset scienceqa:DIR` names a ScienceQA folder in either layout.
SCIENCEQA_PREFIX = "scienceqa:"

#: The splits of the repository layout (`pid_splits.json`); the Hub export calls `val` `validation`.
SCIENCEQA_SPLITS = ("train", "val", "test", "trainval", "minitrain", "minival", "minitest")
_HUB_NAMES = {"val": "validation", "validation": "validation", "train": "train", "test": "test"}
_FIELDS = ("question", "choices", "answer")


#: The split `memvp-train` answers at the end of a run for each split it can train on: one sharing no problem with it.
HELD_OUT_SPLITS = {"train": "val", "minitrain": "minival", "trainval": "test"}


def is_scienceqa_dataset(dataset: str) -> bool:
    """Whether a `--dataset` value names ScienceQA (``scienceqa:DIR``)."""
    return isinstance(dataset, str) and dataset.startswith(SCIENCEQA_PREFIX)


def load_scienceqa(folder: PathLike, split: str, use_caption: bool = False, *,
                   allow_outside_image_folder: bool = False) -> list[dict[str, Any]]:
    """The problems of one split of a ScienceQA folder as multiple-choice records (layouts in the module docstring).

    Args:
        folder: the folder (``scienceqa:`` prefix allowed): ``problems.json`` there means the repository layout,
            parquet files the Hub export.
        split: ``train``, ``val``, ``test`` (and the repository's ``trainval``/``mini*``).
        use_caption: add the problem's caption from ``captions.json`` to the context, as the authors' ``--use_caption``
            does (their training script leaves it off; their ``eval.py`` turns it on). A ``captions.json`` that is
            missing, is not ``{"captions": {pid: text}}``, or lacks the caption of an image problem of the split is
            then an error (every image problem would otherwise be prompted without its caption, silently); a
            problem without an image and without a caption gets an empty one.
        allow_outside_image_folder: accept image paths leading outside their folder (module docstring).

    Problems without an image are text-only records (no ``image``): they train and answer with the memory off.
    Every problem is checked (question text, 2+ choices, an answer index among them, an existing image file) and a
    bad one is a ``ValueError`` naming the file and the problem.
    """
    folder = os.fspath(folder)
    if folder.startswith(SCIENCEQA_PREFIX):
        folder = folder[len(SCIENCEQA_PREFIX):]
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"ScienceQA: {folder!r} is not a folder; expected the ScienceQA repository layout "
                         "(problems.json, pid_splits.json, images/) or a folder of the Hub export's parquet files.")
    if not isinstance(split, str) or not split:
        raise ValueError(f"ScienceQA: split must be a split name such as 'train' or 'test', got {split!r}.")
    if os.path.isfile(os.path.join(folder, "problems.json")):
        records = _load_repository_layout(folder, split, use_caption, allow_outside_image_folder)
    else:
        if use_caption:
            raise ValueError("ScienceQA: use_caption needs captions.json, which only the repository layout has "
                             f"({folder!r} holds the Hub export).")
        records = _load_hub_layout(folder, split, allow_outside_image_folder)
    if not records:
        raise ValueError(f"ScienceQA: split {split!r} of {folder!r} holds no problems.")
    return records


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise ValueError(f"ScienceQA: {path} is missing (the repository layout needs problems.json and "
                         "pid_splits.json).") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"ScienceQA: {path} is not valid JSON: {exc}.") from exc


def _load_repository_layout(folder: str, split: str, use_caption: bool, allow_outside: bool) -> list[dict[str, Any]]:
    problems = _read_json(os.path.join(folder, "problems.json"))
    splits = _read_json(os.path.join(folder, "pid_splits.json"))
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"ScienceQA: {folder}: problems.json and pid_splits.json must each hold a JSON object.")
    if split not in splits:
        raise ValueError(f"ScienceQA: unknown split {split!r}; pid_splits.json has {sorted(splits)}.")
    captions: Mapping[str, str] = {}
    if use_caption:
        captions = _read_captions(folder, problems, [str(pid) for pid in splits[split]], split)
    image_split = "val" if split == "validation" else split
    records = []
    for pid in splits[split]:
        pid = str(pid)
        where = f"{os.path.join(folder, 'problems.json')}: problem {pid!r}"
        problem = problems.get(pid)
        if not isinstance(problem, dict):
            raise ValueError(f"{where}: listed in pid_splits.json[{split!r}] but not in problems.json.")
        image = None
        if problem.get("image"):
            # the authors read images/<split>/<pid>/image.png; the split folder is the problem's own for trainval/mini*
            own_split = str(problem.get("split") or image_split)
            image = resolve_image_path(str(problem["image"]), os.path.join(folder, "images", own_split, pid),
                                       allow_outside, where)
            if not os.path.isfile(image):
                raise ValueError(f"{where}: its image file {image} is missing.")
        caption = captions.get(pid, "") if use_caption else None
        records.append(_record(pid, problem, image, caption, where))
    return records


def _read_captions(folder: str, problems: Mapping[str, Any], pids: list[str], split: str) -> Mapping[str, str]:
    """`captions.json`'s {pid: caption}, checked: the repository's `{"captions": {pid: text}}` layout, text captions,
    and one for every image problem of the split (what `use_caption` is asked for)."""
    path = os.path.join(folder, "captions.json")
    if not os.path.isfile(path):
        raise ValueError(f"ScienceQA: use_caption reads the image captions from {path}, which is missing; it ships "
                         "with the ScienceQA repository (data/captions.json). Add it, or train without use_caption.")
    data = _read_json(path)
    captions = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(captions, dict):
        held = (f"an object with the keys {sorted(data)[:5]}" if isinstance(data, dict)
                else f"a JSON {type(data).__name__}")
        raise ValueError(f'ScienceQA: {path} must hold {{"captions": {{problem id: caption text}}}}, the '
                         f"repository's layout; it holds {held}.")
    wrong = next((pid for pid, text in captions.items() if not isinstance(text, str)), None)
    if wrong is not None:
        raise ValueError(f"ScienceQA: {path}: the caption of problem {wrong!r} must be a str, got "
                         f"{type(captions[wrong]).__name__}.")
    with_image = [pid for pid in pids if isinstance(problems.get(pid), dict) and problems[pid].get("image")]
    missing = [pid for pid in with_image if pid not in captions]
    if missing:
        raise ValueError(f"ScienceQA: {path} has no caption for {len(missing)} of the {len(with_image)} image problems "
                         f"of split {split!r} (e.g. {missing[:3]}); with use_caption every image problem is prompted "
                         "with its caption. Pass the captions.json of this copy of ScienceQA, or train without "
                         "use_caption.")
    return captions


def _hub_files(folder: str, split: str) -> list[str]:
    name = _HUB_NAMES.get(split, split)
    found: list[str] = []
    for base in (folder, os.path.join(folder, "data")):
        found += sorted(glob.glob(os.path.join(base, f"{name}-*.parquet")))
        found += sorted(glob.glob(os.path.join(base, f"{name}.parquet")))
    return found


def _load_hub_layout(folder: str, split: str, allow_outside: bool) -> list[dict[str, Any]]:
    files = _hub_files(folder, split)
    if not files:
        present = sorted({os.path.basename(p).split("-")[0].split(".")[0]
                          for base in (folder, os.path.join(folder, "data"))
                          for p in glob.glob(os.path.join(base, "*.parquet"))})
        if not present:
            raise ValueError(f"ScienceQA: {folder!r} has neither problems.json (the repository layout) nor parquet "
                             "files (the Hub export).")
        raise ValueError(f"ScienceQA: no parquet files for split {split!r} in {folder!r}; splits present: {present}.")
    import pyarrow.parquet as parquet  # a dependency of `datasets`; only this layout needs it

    records = []
    for path in files:
        table = parquet.read_table(path)
        missing = [name for name in _FIELDS if name not in table.column_names]
        if missing:
            raise ValueError(f"ScienceQA: {path} lacks the column(s) {missing}; columns: {table.column_names}.")
        for index, row in enumerate(table.to_pylist()):
            pid = f"{split}-{len(records)}"
            where = f"{path}: row {index}"
            image = row.get("image")
            if isinstance(image, Mapping) and not image.get("bytes") and not image.get("path"):
                image = None
            elif isinstance(image, Mapping) and not image.get("bytes"):  # a path without the image's bytes
                image = {"bytes": None, "path": resolve_image_path(
                    image["path"], os.path.dirname(os.path.abspath(path)), allow_outside, where)}
                if not os.path.isfile(image["path"]):
                    raise ValueError(f"{where}: its image file {image['path']} is missing.")
            records.append(_record(pid, row, image, None, where))
    return records


def _record(pid: str, problem: Mapping[str, Any], image: Any, caption: Optional[str], where: str) -> dict[str, Any]:
    """One checked multiple-choice record with the fields scoring needs."""
    question, choices, answer = problem.get("question"), problem.get("choices"), problem.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty str, got {question!r}.")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of 2 or more str, got {choices!r}.")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be the index of one of its {len(choices)} choices, got {answer!r}.")
    hint = problem.get("hint") or ""
    if not isinstance(hint, str):
        raise ValueError(f"{where}: 'hint' must be a str or empty, got {type(hint).__name__}.")
    record: dict[str, Any] = {
        "id": pid,
        "question": question,
        "choices": list(choices),
        "answer": answer,
        "hint": hint,
        "subject": str(problem.get("subject") or ""),
        "grade": str(problem.get("grade") or ""),
        "has_image": image is not None,
        "has_hint": bool(hint),
        ORIGIN_FIELD: where,
    }
    if caption is not None:
        record["caption"] = caption
    if image is not None:
        record["image"] = image
    return record


def load_scienceqa_training(folder: PathLike, train_split: str = "train", use_caption: bool = False, *,
                            allow_outside_image_folder: bool = False
                            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """(training records, held-out records, held-out split) for `memvp-train --dataset scienceqa:DIR`.

    ScienceQA has its own validation split, so nothing is cut off the training split (the authors train on all of
    `train`): the held-out answers come from `HELD_OUT_SPLITS[train_split]`. A training split without one is refused,
    and so is a folder whose two splits share a problem (an edited `pid_splits.json`): its "held-out" accuracy would
    be partly a training accuracy.
    """
    if train_split not in HELD_OUT_SPLITS:
        raise ValueError(f"ScienceQA: train_split must be one of {sorted(HELD_OUT_SPLITS)} (each has a split held "
                         f"out from it: {HELD_OUT_SPLITS}), got {train_split!r}.")
    held_out_split = HELD_OUT_SPLITS[train_split]
    train = load_scienceqa(folder, train_split, use_caption, allow_outside_image_folder=allow_outside_image_folder)
    held_out = load_scienceqa(folder, held_out_split, use_caption,
                              allow_outside_image_folder=allow_outside_image_folder)
    shared = sorted({r["id"] for r in train} & {r["id"] for r in held_out})
    if shared:
        raise ValueError(f"ScienceQA: splits {train_split!r} and {held_out_split!r} of {os.fspath(folder)!r} share "
                         f"{len(shared)} problems (e.g. {shared[:3]}); the held-out split must hold none of the "
                         "training problems.")
    return train, held_out, held_out_split


#: The table's columns, in the paper's order.
SCIENCEQA_COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")

_LETTERS = string.ascii_uppercase
_CAPITAL = re.compile(r"[A-Z]")


def _grade(record: Mapping[str, Any]) -> Optional[int]:
    match = re.fullmatch(r"grade(\d+)", str(record.get("grade", "")))
    return int(match.group(1)) if match else None


_CATEGORIES: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "NAT": lambda r: r.get("subject") == "natural science",
    "SOC": lambda r: r.get("subject") == "social science",
    "LAN": lambda r: r.get("subject") == "language science",
    "TXT": lambda r: bool(r.get("has_hint")),
    "IMG": lambda r: bool(r.get("has_image")),
    "NO": lambda r: not r.get("has_hint") and not r.get("has_image"),
    "G1-6": lambda r: (_grade(r) or 0) in range(1, 7),
    "G7-12": lambda r: (_grade(r) or 0) in range(7, 13),
    "Avg": lambda r: True,
}


def answer_letter(record: Mapping[str, Any]) -> str:
    """The reference letter of a multiple-choice record (integer ``answer`` 0 -> ``A``)."""
    return _LETTERS[int(record["answer"])]


def predicted_letter(generated: str, num_choices: int) -> str:
    """The first capital letter of the generated text if it names one of the choices, else ``""`` (wrong)."""
    match = _CAPITAL.search(generated or "")
    if match is None or _LETTERS.index(match.group(0)) >= num_choices:
        return ""
    return match.group(0)


def scienceqa_scores(records: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> dict[str, Optional[float]]:
    """Accuracy in percent (2 decimals) per column; ``None`` for a column with no problem (e.g. a split without
    grades 7-12), never a division by zero dressed up as 0."""
    if len(records) != len(predictions):
        raise ValueError(f"ScienceQA scoring: {len(records)} problems but {len(predictions)} predictions.")
    scores: dict[str, Optional[float]] = {}
    for column, belongs in _CATEGORIES.items():
        chosen = [prediction == answer_letter(record) for record, prediction in zip(records, predictions)
                  if belongs(record)]
        scores[column] = round(100.0 * sum(chosen) / len(chosen), 2) if chosen else None
    return scores


def format_scores_table(scores: Mapping[str, Optional[float]]) -> str:
    """The scores as a two-line markdown table in the paper's column order."""
    cells = ["-" if scores.get(c) is None else f"{scores[c]:.2f}" for c in SCIENCEQA_COLUMNS]
    header = "| " + " | ".join(SCIENCEQA_COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in SCIENCEQA_COLUMNS) + "|"
    return "\n".join([header, rule, "| " + " | ".join(cells) + " |"])
