"""Dialogues -> token ids and labels without a chat template, and rows -> padded tensors.

Layout of a training row (the prompt template is applied to every user turn)::

    [BOS] Question: {q1}\\nAnswer: {a1}<eos>Question: {q2}\\nAnswer: {a2}<eos> <pad> ...
          ^^^^^^^^^^^ -100 ^^^^^^^^ ^^^^^^^^ supervised ^^^ ...            ^^^^ -100

Only the answer tokens and the EOS after each answer are supervised (``answer_only_loss=True``): the model is
trained to answer, not to reproduce the question, and the EOS teaches it where to stop at generation time.  There is
no image token anywhere: MemVP's images go into the FFN memory, so the text is tokenized as plain text.  A system
text (``messages`` layout) is a line in front of the first prompt; a multiple-choice prompt (``preformatted``) is used
as it is, its answer following it directly.  With a chat template, :mod:`.chat_template` renders the row instead;
both share :func:`truncate_row` and :func:`labels_of`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from .conversations import Dialogue, build_prompt

__all__ = [
    "IGNORE_INDEX",
    "count_leading_special_tokens",
    "encode_answer",
    "encode_prompt",
    "encode_turn",
    "encode_turns",
    "labels_of",
    "left_pad",
    "pad_labels",
    "plain_turns",
    "right_pad",
    "truncate_row",
]

#: Label value ignored by ``torch.nn.CrossEntropyLoss`` (and therefore by every HF causal LM).
IGNORE_INDEX = -100


def plain_turns(dialogue: Dialogue, template: str) -> list[tuple[str, str]]:
    """Each exchange as (prompt text, answer text with its leading separator), without a chat template."""
    turns = []
    for t, (user, assistant) in enumerate(dialogue.exchanges):
        prompt = user if dialogue.preformatted else build_prompt(user, None, template)
        if t == 0 and dialogue.system:
            prompt = dialogue.system + "\n" + prompt
        turns.append((prompt, dialogue.separator + assistant))
    return turns


def encode_turn(tokenizer: Any, prompt: str, answer: str, first: bool) -> tuple[list[int], list[bool]]:
    """Token ids of ``prompt + answer`` + EOS, and which of them belong to the answer.

    The turn is tokenized as *one* text so the tokens match what the model sees when it generates after the
    prompt (tokenizing the answer on its own can give different tokens, e.g. an extra "▁" with SentencePiece).
    With a fast tokenizer, a token is an answer token when its character span reaches past the end of the prompt;
    without offsets, the prompt is tokenized alone and its length is used as the boundary.  Special tokens (BOS)
    are added to the ``first`` turn of a row only.
    """
    text = prompt + answer
    boundary = len(prompt)
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


def truncate_row(
    ids: list[int], supervised: list[bool], max_length: Optional[int], cut: tuple[int, int], where: str
) -> tuple[list[int], list[bool]]:
    """Fit a row into ``max_length`` without losing its answer.

    Tokens are first removed from the front of the ``cut = (start, end)`` range -- the first question, after what
    must stay in front of it (BOS, a chat template's header) -- so the answers, the only supervised part, survive;
    if the row is still too long, it is cut on the right.  A row left without any supervised token is an error.
    """
    if max_length is not None and len(ids) > max_length:
        start, end = cut
        removed = min(len(ids) - max_length, max(end - start, 0))
        if removed:
            ids = ids[:start] + ids[start + removed :]
            supervised = supervised[:start] + supervised[start + removed :]
        ids, supervised = ids[:max_length], supervised[:max_length]
    if not any(supervised):
        raise ValueError(f"{where}: no answer token fits in max_length={max_length}.")
    return ids, supervised


def labels_of(ids: list[int], supervised: list[bool], answer_only_loss: bool) -> list[int]:
    """The labels of a row: the supervised ids (the rest ``IGNORE_INDEX``), or every id without answer-only loss."""
    if not answer_only_loss:
        return list(ids)
    return [i if s else IGNORE_INDEX for i, s in zip(ids, supervised)]


def encode_turns(
    tokenizer: Any,
    dialogue: Dialogue,
    where: str,
    *,
    template: str,
    max_length: Optional[int],
    answer_only_loss: bool,
    leading_special: Callable[[], int],
) -> tuple[list[int], list[int]]:
    """The ids and labels of one training row holding every exchange of a dialogue (no chat template).

    An over-long row first loses tokens from the *start of its first question* -- after the ``leading_special()``
    tokens (BOS), which are kept -- see :func:`truncate_row`.  ``leading_special`` is only called when a row needs
    truncating.
    """
    ids: list[int] = []
    supervised: list[bool] = []
    first_prompt_len = 0
    for t, (prompt, answer) in enumerate(plain_turns(dialogue, template)):
        turn_ids, turn_sup = encode_turn(tokenizer, prompt, answer, first=(t == 0))
        if t < dialogue.context_exchanges:  # answered by a TRL prompt: context, not trained on
            turn_sup = [False] * len(turn_sup)
        if t == 0:
            first_prompt_len = next((i for i, s in enumerate(turn_sup) if s), len(turn_sup))
        ids += turn_ids
        supervised += turn_sup
    cut = (0, 0)
    if max_length is not None and len(ids) > max_length:
        cut = (min(leading_special(), first_prompt_len), first_prompt_len)
    ids, supervised = truncate_row(ids, supervised, max_length, cut, where)
    return ids, labels_of(ids, supervised, answer_only_loss)


def encode_prompt(tokenizer: Any, dialogue: Dialogue, template: str, answer_prefix: str = "") -> list[int]:
    """The ids of a generation prompt (special tokens included): exactly the start of the matching training row.

    ``answer_prefix`` (e.g. ``"The answer is"``) is the start of the answer, placed where the answer would be."""
    prompt = plain_turns(dialogue, template)[0][0]
    if answer_prefix:
        prompt += dialogue.separator + answer_prefix
    return list(tokenizer(prompt)["input_ids"])


def encode_answer(tokenizer: Any, answer: str, separator: str = " ") -> list[int]:
    """A seq2seq decoder target: the answer as it follows the prompt (after ``separator``), then EOS."""
    ids = list(tokenizer(separator + answer, add_special_tokens=False)["input_ids"])
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
