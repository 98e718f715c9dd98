"""Multiple-choice records rendered the way the MemVP authors trained ScienceQA (their ``QCM-A`` prompt format).

The paper's ScienceQA numbers come from one exact text per problem, so reproducing them needs the very same
characters, not a paraphrase::

    Question: Which digit is shown?
    Context: N/A
    Options: (A) three (B) seven (C) one
    Response:The answer is B.

* context = the hint, then the image caption when one is given, joined by a space and stripped; ``N/A`` when empty;
* options = ``(A) c0 (B) c1 ...`` joined by single spaces;
* the prompt has every double space replaced by one (a single left-to-right pass, as the authors'
  ``str.replace("  ", " ")`` does) and surrounding whitespace stripped;
* the training target ``The answer is {letter}.`` follows ``Response:`` *directly*, with no space; at evaluation
  the model is given the prompt plus :data:`ANSWER_PHRASE` and its first capital letter is the prediction.

The collator renders every record that has ``choices`` and an integer ``answer`` with these functions
(:mod:`.conversations`), and the ScienceQA task uses them too, so training, evaluation and the scores agree on one
text.
"""

from __future__ import annotations

import numbers
import string
from collections.abc import Sequence
from typing import Optional

__all__ = [
    "ANSWER_PHRASE",
    "CHOICE_LETTERS",
    "choice_letter",
    "format_choices",
    "multiple_choice_context",
    "multiple_choice_prompt",
    "multiple_choice_target",
]

#: The letters that name the options, in order: ``(A)``, ``(B)``, ...
CHOICE_LETTERS = string.ascii_uppercase

#: How a target starts; an evaluation prompt ends with it, so the next token generated is the letter.
ANSWER_PHRASE = "The answer is"


def _collapse_double_spaces(text: str) -> str:
    """One pass of ``"  " -> " "`` then strip: the authors' rule exactly (three spaces become two, not one)."""
    return text.replace("  ", " ").strip()


def _checked_choices(choices: Sequence[str]) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise ValueError(f"'choices' must be a list of option texts (str), got {type(choices).__name__}.")
    if not choices:
        raise ValueError("'choices' is empty: a multiple-choice record needs at least one option.")
    if len(choices) > len(CHOICE_LETTERS):
        raise ValueError(f"'choices' has {len(choices)} options; at most {len(CHOICE_LETTERS)} (A-Z) can be named.")
    bad = [i for i, choice in enumerate(choices) if not isinstance(choice, str)]
    if bad:
        raise ValueError(f"'choices' must hold option texts (str); option {bad[0]} is {type(choices[bad[0]]).__name__}.")
    return list(choices)


def choice_letter(index: int, num_choices: int) -> str:
    """The letter of option ``index`` (0 -> ``A``); an index outside the options is a ValueError."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise ValueError(f"a multiple-choice answer is the index of the right option (int), got {index!r}.")
    index = int(index)  # numpy integers too
    if not 0 <= index < num_choices:
        raise ValueError(
            f"answer index {index} is outside the {num_choices} choices (valid: 0..{num_choices - 1})."
        )
    return CHOICE_LETTERS[index]


def format_choices(choices: Sequence[str]) -> str:
    """``(A) c0 (B) c1 ...``: each option after its letter, joined by single spaces."""
    return " ".join(f"({CHOICE_LETTERS[i]}) {choice}" for i, choice in enumerate(_checked_choices(choices)))


def multiple_choice_context(hint: Optional[str] = None, caption: Optional[str] = None) -> str:
    """The ``Context:`` text: hint and caption joined by a space and stripped, ``N/A`` when both are empty."""
    for name, value in (("hint", hint), ("caption", caption)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name!r} must be a str or None, got {type(value).__name__}.")
    context = " ".join([hint or "", caption or ""]).strip()
    return context or "N/A"


def multiple_choice_prompt(
    question: str, choices: Sequence[str], hint: Optional[str] = None, caption: Optional[str] = None
) -> str:
    """The QCM prompt, ending in ``Response:``; the target (:func:`multiple_choice_target`) follows it directly.

    ``multiple_choice_prompt("Which digit?", ["three", "seven"])`` is
    ``"Question: Which digit?\\nContext: N/A\\nOptions: (A) three (B) seven\\nResponse:"``.
    """
    if not isinstance(question, str):
        raise ValueError(f"a multiple-choice 'question' must be a str, got {type(question).__name__}.")
    text = (
        f"Question: {question}\nContext: {multiple_choice_context(hint, caption)}\n"
        f"Options: {format_choices(choices)}\nResponse:"
    )
    return _collapse_double_spaces(text)


def multiple_choice_target(answer: int, choices: Sequence[str]) -> str:
    """``The answer is {letter}.`` for the option at index ``answer``."""
    return f"{ANSWER_PHRASE} {choice_letter(answer, len(_checked_choices(choices)))}."
