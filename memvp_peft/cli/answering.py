"""Answering held-out questions by generation, and scoring the answers.

`memvp-train` (the held-out accuracy and the reload check) and `memvp-infer` (answers for users) share this, so the
accuracy a run reports is measured exactly the way a deployed adapter answers.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import LogitsProcessor


class NonFiniteScores(LogitsProcessor):
    """Notes which rows of a `generate()` call got NaN or +inf next-token scores, leaving the scores as they are.

    Why: greedy decoding of NaN scores picks token 0 at every step, and the answer decodes to an empty string -- a
    model that computes NaN (a diverged adapter, a scale that overflows the compute dtype) would "answer" with exit 0.
    -inf is left alone: it is how tokens are masked. The flags stay on the device and are read once per batch, after
    the call, not once per step."""

    def __init__(self) -> None:
        self.rows: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1)
        self.rows = bad if self.rows is None else self.rows | bad
        return scores

    def check(self, first_index: int) -> None:
        """Raise a ValueError naming the questions (by index) whose scores were not finite."""
        if self.rows is None or not bool(self.rows.any()):
            return
        indices = [first_index + int(i) for i in torch.nonzero(self.rows).flatten().tolist()]
        shown = ", ".join(str(i) for i in indices[:8]) + (", ..." if len(indices) > 8 else "")
        raise ValueError(
            f"the model computed NaN/inf next-token scores for {len(indices)} question(s) (index {shown}), so it has "
            "no answer for them (greedy decoding of NaN gives an empty string). The adapter or its base computes "
            "non-finite values: an adapter trained with too large a learning rate, visual_scale or memory_scale (see "
            "adapter_config.json), a damaged file, or a base in a dtype too narrow for it."
        )


def generate_answers(model, collator, records: list[dict], kind: str, tokenizer, max_new_tokens: int,
                     batch_size: int = 64, progress: bool = True, answer_prefix: str = "") -> list[str]:
    """Greedy answers for `records`, batched, on the model's own device. The prompts come from the collator that
    trained the adapter (`collator.prompts`), so the answer is conditioned exactly like a training example; a causal
    model's output repeats the prompt, which is cut off, a seq2seq model's does not. `answer_prefix` is the start of
    the answer given with the prompt (`"The answer is"`: what is generated is the rest). A model whose next-token
    scores are NaN/inf has no answer: a ValueError (`NonFiniteScores`), not an empty string."""
    from tqdm.auto import tqdm

    answers: list[str] = []
    model.eval()
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(records), batch_size), desc="answering", disable=not progress, leave=False):
        chunk = records[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator.prompts(chunk, answer_prefix=answer_prefix).items()}
        finite = NonFiniteScores()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 logits_processor=[finite])
        finite.check(start)
        new = out if kind == "seq2seq" else out[:, batch["input_ids"].shape[1] :]
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return answers


def asked_question(record: dict) -> str:
    """The question a record asks, as shown next to its answer (memvp-train's sample answers, memvp-infer's lines and
    answers file): the first user turn of the record's dialogue in any layout -- `question` or `prompt`, LLaVA
    `conversations`, TRL `messages`, ... -- with its `<image>` marks removed; for a multiple-choice record its
    `question`, not the whole prompt the authors' template builds from it."""
    from ..data.conversations import record_dialogue, record_label

    dialogue = record_dialogue(record, record_label(0, record), need_answer=False)
    if dialogue.preformatted and isinstance(record.get("question"), str):
        return record["question"]
    return dialogue.exchanges[0][0]


def accuracy(answers: list[str], records: list[dict]) -> float:
    """Exact-match accuracy after `tasks.normalise_answer` (case, spacing and full stops do not count)."""
    from ..tasks.catalogue import normalise_answer, reference_answer

    hits = sum(normalise_answer(a) == normalise_answer(reference_answer(r)) for a, r in zip(answers, records))
    return hits / max(1, len(records))
