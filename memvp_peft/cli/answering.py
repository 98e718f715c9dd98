"""Answering held-out questions by generation, and scoring the answers.

`memvp-train` (the held-out accuracy and the reload check) and `memvp-infer` (answers for users) share this, so the
accuracy a run reports is measured exactly the way a deployed adapter answers.
"""

from __future__ import annotations

import torch


def generate_answers(model, collator, records: list[dict], kind: str, tokenizer, max_new_tokens: int,
                     batch_size: int = 64, progress: bool = True, answer_prefix: str = "") -> list[str]:
    """Greedy answers for `records`, batched, on the model's own device. The prompts come from the collator that
    trained the adapter (`collator.prompts`), so the answer is conditioned exactly like a training example; a causal
    model's output repeats the prompt, which is cut off, a seq2seq model's does not. `answer_prefix` is the start of
    the answer given with the prompt (`"The answer is"`: what is generated is the rest)."""
    from tqdm.auto import tqdm

    answers: list[str] = []
    model.eval()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(records), batch_size), desc="answering", disable=not progress, leave=False):
        chunk = records[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator.prompts(chunk, answer_prefix=answer_prefix).items()}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = out if kind == "seq2seq" else out[:, batch["input_ids"].shape[1] :]
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


def accuracy(answers: list[str], records: list[dict]) -> float:
    """Exact-match accuracy after `tasks.normalise_answer` (case, spacing and full stops do not count)."""
    from ..data.tasks import normalise_answer, reference_answer

    hits = sum(normalise_answer(a) == normalise_answer(reference_answer(r)) for a, r in zip(answers, records))
    return hits / max(1, len(records))
