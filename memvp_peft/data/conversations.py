"""A record -> its :class:`Dialogue`: the one place that knows the text layouts of datasets.

Every layout comes out of :func:`record_dialogue` as the same object -- an optional system text and the record's
(user, assistant) exchanges -- checked the same way, so tokenisation (with a prompt template or a chat template) never
has to care which layout a record came in:

* simple: ``question`` (or ``prompt``) + ``answer`` (a str; an int is written in decimal);
* multiple choice: ``question`` + ``choices`` + an int ``answer`` (+ ``hint``, ``caption``): the authors' ScienceQA
  prompt (:mod:`.multiple_choice`), the answer following the prompt directly;
* LLaVA ``conversations``: ``[{"from": "human"|"gpt", "value": ...}, ...]``;
* ``messages`` (TRL, llava-instruct-mix), TRL's conversational ``prompt``/``completion`` and the_cauldron's
  ``texts``: see :mod:`.chat_layouts`.

Whatever the layout, the images a record's text marks -- ``<image>`` placeholders, ``{"type": "image"}`` entries --
are counted (:attr:`Dialogue.image_marks`) and :func:`check_image_marks` holds them against the images the record
gives: text that speaks of an image the record does not have means the image never reaches the model.

Errors name the record (``where``) and the turn, because a bad record is usually one line among thousands of a
dataset file.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .chat_layouts import cauldron_exchanges, messages_exchanges, prompt_completion_exchanges
from .multiple_choice import multiple_choice_prompt, multiple_choice_target
from .prompts import GPT_ROLES, HUMAN_ROLES, IMAGE_PLACEHOLDER, strip_image_placeholder

__all__ = ["ORIGIN_FIELD", "TEXT_LAYOUTS", "Dialogue", "check_image_marks", "first_answer", "record_dialogue",
           "record_label"]

# The field in which the dataset loaders (`load_llava_json`, `load_jsonl`) record where a record came from, e.g.
# "data.jsonl: line 7" or "llava.json: entry 12 (id='0001')"; a field of the record, so it travels wherever the
# record goes (a shuffled split, a Trainer's batches, a `datasets.Dataset`).
ORIGIN_FIELD = "memvp_origin"

#: The fields that hold a whole conversation; a record has at most one of them (or a simple question instead, or
#: TRL's conversational `prompt` -- a list of messages -- with its `completion`).
TEXT_LAYOUTS = ("conversations", "messages", "texts")


@dataclass(frozen=True)
class Dialogue:
    """A record's text, whatever its layout.

    Attributes:
        exchanges: the (user, assistant) pairs in order, ``<image>`` placeholders removed; when a generation prompt
            is built from a record without answers, the last assistant text is ``""``.
        system: the text of a leading ``system`` message (``messages`` layout), else None.
        preformatted: the user text is already the whole prompt (a multiple-choice record): no prompt template is
            applied and the answer follows it directly (``separator`` is ``""``, otherwise one space).
        image_marks: how many images the text marks -- ``<image>`` placeholders in any layout, plus
            ``{"type": "image"}`` entries of typed content -- checked against the images the record gives
            (:func:`check_image_marks`); None when the text marks none and has no typed content (it then says
            nothing about the images).
        context_exchanges: how many leading exchanges are context, shown but never supervised: those a TRL
            conversational ``prompt`` answers itself (the loss is on the ``completion``).
    """

    exchanges: tuple[tuple[str, str], ...]
    system: Optional[str] = None
    preformatted: bool = False
    image_marks: Optional[int] = None
    context_exchanges: int = 0

    @property
    def separator(self) -> str:
        """What joins a prompt and its answer without a chat template: one space, none for a preformatted prompt."""
        return "" if self.preformatted else " "


def record_label(index: int, record: Any) -> str:
    """How errors name a record of a batch: its place in its dataset file when a loader recorded it (the position
    in a shuffled batch says nothing about which line to fix), else its position in the batch and its ``id``."""
    if isinstance(record, Mapping) and isinstance(record.get(ORIGIN_FIELD), str):
        return record[ORIGIN_FIELD]
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def record_dialogue(
    record: Mapping[str, Any], where: str, placeholder: str = IMAGE_PLACEHOLDER, need_answer: bool = True
) -> Dialogue:
    """The checked :class:`Dialogue` of a record, in any layout of the module docstring.

    With ``need_answer=False`` (building prompts for generation) a missing final answer is allowed (returned as
    ``""``).  A record with two layouts at once (say ``messages`` and ``question``) is refused: which one is meant
    cannot be known, and training on the wrong one would be silent.
    """
    conversational = _is_message_list(record.get("prompt"))
    layouts = [key for key in TEXT_LAYOUTS if record.get(key) is not None] + (["prompt"] if conversational else [])
    simple = [key for key in ("question", "prompt") if record.get(key) is not None and not (
        key == "prompt" and conversational)]
    if len(layouts) + bool(simple) > 1:
        raise ValueError(
            f"{where}: the record has several text layouts ({layouts + simple[:1]}); give exactly one of "
            "'question'/'prompt' (+ 'answer'), 'conversations', 'messages', 'texts' or a conversational 'prompt' "
            "(+ 'completion')."
        )
    if record.get("completion") is not None and not conversational:
        raise ValueError(
            f"{where}: 'completion' is read with a conversational 'prompt' (TRL's prompt/completion layout: both lists "
            "of {'role', 'content'} messages); for plain text give 'question' and 'answer'."
        )
    if layouts == ["conversations"]:
        exchanges, marks = _llava_exchanges(record["conversations"], where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), image_marks=marks)
    if layouts == ["messages"]:
        system, exchanges, marks = messages_exchanges(record["messages"], where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), system=system, image_marks=marks)
    if layouts == ["prompt"]:
        system, exchanges, marks, context = prompt_completion_exchanges(
            record["prompt"], record.get("completion"), where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), system=system, image_marks=marks, context_exchanges=context)
    if layouts == ["texts"]:
        exchanges, marks = cauldron_exchanges(record["texts"], where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), image_marks=marks)
    if not simple:
        raise ValueError(
            f"{where}: the record has none of the text layouts 'question'/'prompt' (+ 'answer'), 'conversations', "
            f"'messages', 'texts', a conversational 'prompt' + 'completion' (keys: {sorted(record)})."
        )
    return _simple_dialogue(record, simple[0], where, placeholder, need_answer)


def check_image_marks(dialogue: Dialogue, given: int, where: str, placeholder: str = IMAGE_PLACEHOLDER,
                      fields: Iterable[str] = ()) -> None:
    """Refuse a record whose text marks another number of images than it gives (``given``), in any layout.

    The one check of marks against images, at load time (the dataset loaders) and per batch (the collator).  Marks
    are optional (``dialogue.image_marks`` None: images are taken unchecked), but text that marks an image the record
    does not give -- a LLaVA ``<image>`` whose ``image`` field is missing or spelt otherwise, a question written for
    an image that never came -- would train text-only while the text speaks of a picture; and a number of marks
    other than the images means text and images do not belong together.  ``fields`` (the record's keys) are named
    when no image was given, to point at one under another name.
    """
    marks = dialogue.image_marks
    if marks is None or marks == given:
        return
    hint = ""
    if given == 0:
        hint = (f" The record gives no image in 'image' or 'images' (its fields: {sorted(fields)}): if its images are "
                "under another name, put them under 'image' (memvp-train: --image_column NAME); a text-only record "
                f"must not mark images (remove the {placeholder!r}).")
    raise ValueError(
        f"{where}: its text marks {marks} images ({placeholder!r} placeholders and {{'type': 'image'}} entries of "
        f"typed content) but the record gives {given}; each mark stands for one image, in order.{hint}"
    )


def first_answer(record: Mapping[str, Any], placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """The answer to a record's first question, as training renders it: what generation from
    ``MemVPDataCollator.prompts`` (the first question) is scored against.  A multiple-choice record gives
    ``"The answer is B."``."""
    return record_dialogue(record, record_label(0, record), placeholder).exchanges[0][1]


def _is_message_list(value: Any) -> bool:
    """Whether a ``prompt`` is TRL's conversational one (a list of messages) rather than a question's text."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _marks(texts: Iterable[str], placeholder: str) -> Optional[int]:
    """The placeholders in a layout's texts, None when there are none (the text then says nothing of images)."""
    return sum(text.count(placeholder) for text in texts) or None


def _llava_exchanges(conversations: Any, where: str, placeholder: str, need_answer: bool
                     ) -> tuple[list[tuple[str, str]], Optional[int]]:
    if not isinstance(conversations, Sequence) or isinstance(conversations, str) or not conversations:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns.")
    turns: list[tuple[str, str]] = []
    question: Optional[str] = None
    for t, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: conversation turn {t} must be a dict with 'from' and 'value'.")
        role = str(turn["from"]).lower()
        value = turn["value"]
        if not isinstance(value, str):
            raise ValueError(f"{where}: conversation turn {t} 'value' must be a str, got {type(value).__name__}.")
        expected_human = t % 2 == 0
        if (expected_human and role not in HUMAN_ROLES) or (not expected_human and role not in GPT_ROLES):
            raise ValueError(
                f"{where}: conversation must alternate human/gpt starting with human; turn {t} is from "
                f"{turn['from']!r} but {'human' if expected_human else 'gpt'} was expected."
            )
        text = strip_image_placeholder(value, placeholder)
        if expected_human:
            question = text
        else:
            if not text.strip():
                raise ValueError(f"{where}: empty answer (gpt turn {t}).")
            turns.append((question or "", text.strip()))
            question = None
    if question is not None and not need_answer:
        turns.append((question, ""))
    elif question is not None:
        raise ValueError(
            f"{where}: conversation must alternate human/gpt and end with a gpt turn; the last human turn "
            f"(turn {len(conversations) - 1}) has no answer."
        )
    return turns, _marks((turn["value"] for turn in conversations), placeholder)


def _simple_dialogue(record: Mapping[str, Any], key: str, where: str, placeholder: str, need_answer: bool) -> Dialogue:
    question = record[key]
    if not isinstance(question, str):
        raise ValueError(f"{where}: {key!r} must be a str, got {type(question).__name__}.")
    marks = _marks([question], placeholder)
    question = strip_image_placeholder(question, placeholder)
    answer = record.get("answer")
    if record.get("choices") is not None:
        dialogue = _multiple_choice_dialogue(record, question, answer, where, need_answer)
        return Dialogue(dialogue.exchanges, preformatted=True, image_marks=marks)
    if not need_answer:
        return Dialogue(((question, ""),), image_marks=marks)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError(f"{where}: empty answer (the 'answer' field is missing or blank).")
    return Dialogue(((question, _answer_text(answer, where)),), image_marks=marks)


def _answer_text(answer: Any, where: str) -> str:
    """A simple record's answer as text: a str stripped, an int in decimal; bool and float refused."""
    if isinstance(answer, str):
        return answer.strip()
    if isinstance(answer, (bool, np.bool_)):
        raise ValueError(
            f"{where}: 'answer' is a bool ({answer!r}): give the answer as text (str), e.g. 'yes'/'no', or as the index "
            "(int) of the right option together with 'choices'."
        )
    if isinstance(answer, numbers.Integral):
        return str(int(answer))
    if isinstance(answer, numbers.Real):
        raise ValueError(
            f"{where}: 'answer' is a float ({answer!r}): refused rather than guessing how to write it (2.0 or 2?); "
            "give the answer as text (str). Integer answers are written in decimal; with 'choices' an int answer "
            "is the index of the right option."
        )
    raise ValueError(f"{where}: 'answer' must be a str (or an int), got {type(answer).__name__}.")


def _multiple_choice_dialogue(
    record: Mapping[str, Any], question: str, answer: Any, where: str, need_answer: bool
) -> Dialogue:
    """``choices`` + an int ``answer``: the authors' QCM prompt and ``The answer is X.`` right after it."""
    choices = record["choices"]
    try:
        prompt = multiple_choice_prompt(question, choices, record.get("hint"), record.get("caption"))
        if not need_answer:  # a generation prompt: the answer, if any, is not read
            return Dialogue(((prompt, ""),), preformatted=True)
        if answer is None:
            raise ValueError("empty answer (the 'answer' field is missing): a multiple-choice record needs the "
                             "index (int) of the right option.")
        if isinstance(answer, str):
            raise ValueError(
                f"has 'choices' but its 'answer' is a str ({answer!r}); a multiple-choice answer is the index (int) "
                "of the right option in 'choices'."
            )
        if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, numbers.Integral):
            raise ValueError(
                f"has 'choices' but its 'answer' is {answer!r} ({type(answer).__name__}); a multiple-choice answer is "
                "the index (int) of the right option in 'choices'."
            )
        target = multiple_choice_target(int(answer), choices)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return Dialogue(((prompt, target),), preformatted=True)
