"""Turns -> token ids and labels, and rows -> padded tensors.

Layout of a training row (the prompt template is applied to every human turn)::

    [BOS] Question: {q1}\\nAnswer: {a1}<eos>Question: {q2}\\nAnswer: {a2}<eos> <pad> ...
          ^^^^^^^^^^^ -100 ^^^^^^^^ ^^^^^^^^ supervised ^^^ ...            ^^^^ -100

Only the answer tokens and the EOS after each answer are supervised (``answer_only_loss=True``): the model is
trained to answer, not to reproduce the question, and the EOS teaches it where to stop at generation time.  There is
no image token anywhere: MemVP's images go into the FFN memory, so the text is tokenized as plain text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from .prompts import build_prompt

__all__ = [
    "IGNORE_INDEX",
    "count_leading_special_tokens",
    "encode_answer",
    "encode_prompt",
    "encode_turn",
    "encode_turns",
    "left_pad",
    "pad_labels",
    "right_pad",
]

#: Label value ignored by ``torch.nn.CrossEntropyLoss`` (and therefore by every HF causal LM).
IGNORE_INDEX = -100


def encode_turn(tokenizer: Any, prompt: str, answer: str, template: str, first: bool) -> tuple[list[int], list[bool]]:
    """Token ids of ``prompt + " " + answer`` + EOS, and which of them belong to the answer.

    The turn is tokenized as *one* text so the tokens match what the model sees when it generates after the
    prompt (tokenizing the answer on its own can give different tokens, e.g. an extra "▁" with SentencePiece).
    With a fast tokenizer, a token is an answer token when its character span reaches past the end of the prompt;
    without offsets, the prompt is tokenized alone and its length is used as the boundary.  Special tokens (BOS)
    are added to the ``first`` turn of a row only.
    """
    text = build_prompt(prompt, answer, template)
    boundary = len(build_prompt(prompt, None, template))
    ids: list[int]
    supervised: list[bool]
    try:
        enc = tokenizer(text, add_special_tokens=first, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        supervised = [end > boundary for (_start, end) in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        ids = list(tokenizer(text, add_special_tokens=first)["input_ids"])
        n_prompt = len(tokenizer(text[:boundary], add_special_tokens=first)["input_ids"])
        supervised = [i >= n_prompt for i in range(len(ids))]
    ids.append(int(tokenizer.eos_token_id))
    supervised.append(True)
    return ids, supervised


def count_leading_special_tokens(tokenizer: Any) -> int:
    """How many special tokens (e.g. BOS) the tokenizer puts in front of a text; kept when truncating."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = 0
    if without and len(with_special) >= len(without):
        for k in range(len(with_special) - len(without) + 1):
            if list(with_special[k : k + len(without)]) == list(without):
                n = k
                break
    return n


def encode_turns(
    tokenizer: Any,
    turns: Sequence[tuple[str, str]],
    where: str,
    *,
    template: str,
    max_length: Optional[int],
    answer_only_loss: bool,
    leading_special: Callable[[], int],
) -> tuple[list[int], list[int]]:
    """The ids and labels of one training row holding every (question, answer) turn of a record.

    An over-long row first loses tokens from the *start of its first question* -- after the ``leading_special()``
    tokens (BOS), which are kept -- so the answers, the only supervised part, survive; if the answers alone are still
    too long, the row is cut on the right.  ``leading_special`` is only called when a row needs truncating.
    """
    ids: list[int] = []
    supervised: list[bool] = []
    first_prompt_len = 0
    for t, (question, answer) in enumerate(turns):
        turn_ids, turn_sup = encode_turn(tokenizer, question, answer, template, first=(t == 0))
        if t == 0:
            first_prompt_len = next((i for i, s in enumerate(turn_sup) if s), len(turn_sup))
        ids += turn_ids
        supervised += turn_sup
    if max_length is not None and len(ids) > max_length:
        excess = len(ids) - max_length
        keep_front = min(leading_special(), first_prompt_len)
        removable = max(first_prompt_len - keep_front, 0)
        cut = min(excess, removable)
        if cut:
            ids = ids[:keep_front] + ids[keep_front + cut :]
            supervised = supervised[:keep_front] + supervised[keep_front + cut :]
        ids, supervised = ids[:max_length], supervised[:max_length]
    if not any(supervised):
        raise ValueError(f"{where}: no answer token fits in max_length={max_length}.")
    if answer_only_loss:
        labels = [i if s else IGNORE_INDEX for i, s in zip(ids, supervised)]
    else:
        labels = list(ids)
    return ids, labels


def encode_prompt(tokenizer: Any, question: str, template: str) -> list[int]:
    """The ids of a generation prompt (special tokens included): exactly the start of the matching training row."""
    return list(tokenizer(build_prompt(question, None, template))["input_ids"])


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """A seq2seq decoder target: the answer as it follows the prompt (one leading space), then EOS."""
    ids = list(tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    return ids + [int(tokenizer.eos_token_id)]


def right_pad(
    all_ids: list[list[int]], all_labels: list[list[int]], pad_token_id: int, pad_to_multiple_of: Optional[int]
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up to ``pad_to_multiple_of``); padding is -100 in the labels."""
    length = max(len(ids) for ids in all_ids)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch_size = len(all_ids)
    input_ids = torch.full((batch_size, length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labs) in enumerate(zip(all_ids, all_labels)):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(labs, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(all_ids: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad generation prompts to the longest one: ``generate`` continues every row from its last position."""
    length = max(len(ids) for ids in all_ids)
    input_ids = torch.full((len(all_ids), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(all_ids), length), dtype=torch.long)
    for row, ids in enumerate(all_ids):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_labels(all_labels: list[list[int]]) -> torch.Tensor:
    """Seq2seq ``labels``: each row's targets, right-padded with -100 to the longest (no pad id, no mask needed)."""
    width = max(len(ids) for ids in all_labels)
    labels = torch.full((len(all_labels), width), IGNORE_INDEX, dtype=torch.long)
    for row, ids in enumerate(all_labels):
        labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return labels
