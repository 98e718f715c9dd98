"""A record -> its (question, answer) turns: the one place that knows the two record formats.

Both formats -- the simple ``question``/``prompt`` + ``answer`` record and the LLaVA ``conversations`` list -- come
out of :func:`record_turns` as the same list of turns, checked the same way, so tokenisation never has to care which
format a record came in.  Errors name the record (``where``) and the turn, because a bad record is usually one line
among thousands of a dataset file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .prompts import GPT_ROLES, HUMAN_ROLES, IMAGE_PLACEHOLDER, strip_image_placeholder

__all__ = ["ORIGIN_FIELD", "record_label", "record_turns"]

# The field in which the dataset loaders (`load_llava_json`, `load_jsonl`) record where a record came from, e.g.
# "data.jsonl: line 7" or "llava.json: entry 12 (id='0001')"; a field of the record, so it travels wherever the
# record goes (a shuffled split, a Trainer's batches, a `datasets.Dataset`).
ORIGIN_FIELD = "memvp_origin"


def record_label(index: int, record: Any) -> str:
    """How errors name a record of a batch: its place in its dataset file when a loader recorded it (the position
    in a shuffled batch says nothing about which line to fix), else its position in the batch and its ``id``."""
    if isinstance(record, Mapping) and isinstance(record.get(ORIGIN_FIELD), str):
        return record[ORIGIN_FIELD]
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def record_turns(
    record: Mapping[str, Any], where: str, placeholder: str = IMAGE_PLACEHOLDER, need_answer: bool = True
) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a record, ``placeholder`` stripped, validated.

    With `need_answer=False` (building prompts for generation) a missing final answer is allowed and returned
    as "".
    """
    if "conversations" in record:
        conversations = record["conversations"]
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
        return turns
    key = "question" if "question" in record else "prompt" if "prompt" in record else None
    if key is None:
        raise ValueError(
            f"{where}: record has neither 'question'/'prompt' nor 'conversations' (keys: {sorted(record)})."
        )
    question = record[key]
    if not isinstance(question, str):
        raise ValueError(f"{where}: {key!r} must be a str, got {type(question).__name__}.")
    answer = record.get("answer")
    if not need_answer:
        return [(strip_image_placeholder(question, placeholder), str(answer or "").strip())]
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError(f"{where}: empty answer (the 'answer' field is missing or blank).")
    if not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer' must be a str, got {type(answer).__name__}.")
    return [(strip_image_placeholder(question, placeholder), answer.strip())]
