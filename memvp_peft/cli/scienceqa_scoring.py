"""ScienceQA answers -> the paper's table: `NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg`.

The columns are the ones ScienceQA papers report (MemVP's Table 1 among them) and the authors' ``eval.py`` computes:
accuracy on the natural / social / language science subjects, on problems with a text context (a hint), with an
image, with neither, on grades 1-6 and 7-12, and on all. A prediction is the first capital letter of the generated
text; a letter beyond the problem's choices (or none at all) is wrong, as in the authors' scoring.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

__all__ = ["SCIENCEQA_COLUMNS", "answer_letter", "format_scores_table", "predicted_letter", "scienceqa_scores"]

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
