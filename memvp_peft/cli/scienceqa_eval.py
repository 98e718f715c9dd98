"""Answering ScienceQA the way the MemVP authors scored it, and writing what `memvp-infer` leaves behind.

Their `eval.py`: the QCM-A prompt plus `The answer is`, one greedy token (`max_gen_len=1`), the first capital letter
of the generated text as the prediction, a letter beyond the problem's choices counted wrong. `memvp-train` (its
held-out answers) and `memvp-infer --dataset scienceqa:DIR` both answer through `answer_scienceqa`, so a run's
reported accuracy is the one the scoring command gives.

What `memvp-infer` writes: `--output_file` with one line per problem, `{"id", "prompt", "prediction", "answer"}` --
the prompt exactly as the tokenizer was given it (its BOS is the tokenizer's own) -- and `scores.json` next to it
with the paper's columns (`tasks.scienceqa`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..data.conversations import record_dialogue, record_label
from ..data.multiple_choice import ANSWER_PHRASE
from ..data.tokenization import plain_turns
from ..tasks.scienceqa import answer_letter, predicted_letter, scienceqa_scores
from .answering import generate_answers

__all__ = ["SCORES_FILE", "answer_scienceqa", "check_scienceqa_collator", "prediction_rows", "scienceqa_prompt",
           "scores_path", "write_scienceqa_results"]

#: The file next to `--output_file` that holds the paper's columns.
SCORES_FILE = "scores.json"


def check_scienceqa_collator(collator: Any, kind: str) -> None:
    """Refuse what cannot be scored the authors' way: a seq2seq base (the answer starts in the decoder, there is no
    prompt to continue after `The answer is`) or rows rendered with a chat template (the authors' prompt is the
    whole text; an adapter trained on ScienceQA by `memvp-train` never uses one)."""
    if kind == "seq2seq":
        raise ValueError("ScienceQA is scored the authors' way, by continuing the prompt after 'The answer is' in a "
                         "decoder-only model; this adapter's base is encoder-decoder (seq2seq).")
    if collator.uses_chat_template:
        raise ValueError("ScienceQA is scored with the authors' plain QCM-A prompt, but this adapter was trained with "
                         "the base's chat template (memvp_cli.json: chat_template true); score an adapter trained on "
                         "--dataset scienceqa:DIR.")


def scienceqa_prompt(record: Mapping[str, Any], collator: Any, answer_prefix: str = ANSWER_PHRASE) -> str:
    """The text the tokenizer is given for `record`'s scoring prompt (special tokens, BOS, are the tokenizer's):
    the authors' QCM-A prompt followed directly by `The answer is`, built as `collator.prompts` builds it."""
    dialogue = record_dialogue(record, record_label(0, record), collator.image_placeholder, need_answer=False)
    return plain_turns(dialogue, collator.prompt_template)[0][0] + dialogue.separator + answer_prefix


def answer_scienceqa(model: Any, collator: Any, records: Sequence[Mapping[str, Any]], kind: str, tokenizer: Any, *,
                     batch_size: int = 64, max_new_tokens: int = 1, progress: bool = True) -> list[str]:
    """The predicted letter of each problem ("" when the generated text names none of its choices)."""
    check_scienceqa_collator(collator, kind)
    generated = generate_answers(model, collator, list(records), kind, tokenizer, max_new_tokens,
                                 batch_size=batch_size, progress=progress, answer_prefix=ANSWER_PHRASE)
    return [predicted_letter(text, len(record["choices"])) for text, record in zip(generated, records)]


def prediction_rows(records: Sequence[Mapping[str, Any]], predictions: Sequence[str], collator: Any
                    ) -> list[dict[str, Any]]:
    """One `{"id", "prompt", "prediction", "answer"}` row per problem."""
    return [{"id": record["id"], "prompt": scienceqa_prompt(record, collator), "prediction": prediction,
             "answer": answer_letter(record)} for record, prediction in zip(records, predictions)]


def scores_path(output_file: str) -> str:
    """`scores.json` in the folder of `output_file`; an `output_file` named so itself is refused (one would
    overwrite the other)."""
    if os.path.basename(output_file) == SCORES_FILE:
        raise ValueError(f"--output_file {output_file}: {SCORES_FILE} is where the scores go, next to the predictions; "
                         "name the predictions file otherwise, e.g. preds.jsonl.")
    return os.path.join(os.path.dirname(os.path.abspath(output_file)), SCORES_FILE)


def _write_staged(path: str, text: str) -> None:
    """Write through a staged file moved into place: an interrupted write keeps the previous file whole."""
    staged = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staged, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)


def write_scienceqa_results(output_file: str, records: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]
                            ) -> dict[str, Any]:
    """Write the prediction lines and `scores.json` (computed from the rows' predictions); returns the scores."""
    scores = scienceqa_scores(records, [row["prediction"] for row in rows])
    _write_staged(output_file, "".join(json.dumps(row) + "\n" for row in rows))
    _write_staged(scores_path(output_file), json.dumps(scores, indent=2) + "\n")
    return scores
