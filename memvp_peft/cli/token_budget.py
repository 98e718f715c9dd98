"""Tokens per training step on a ScienceQA split: the MemVP authors' padding against ours.

    python -m memvp_peft.cli.token_budget --dataset scienceqa:DIR --tokenizer MODEL [--batch_size 32]

The authors' data loader pads every sample to `max_words=512` tokens, and their model's forward then cuts the batch at
its last labelled position (`seqlen = (labels > 0).nonzero()[:, 1].max() + 1`): the transformer runs on the batch's
longest row, not on 512. `MemVPDataCollator` pads each batch to its longest row directly. This counts, over one
shuffled epoch of `--batch_size` rows per step, the tokens of each way -- what the loader ships (padded to 512),
what their forward computes on (after the cut), what ours computes on -- and the real (non-padding) tokens, from the
same rows (BOS + the QCM-A prompt + `The answer is X.` + EOS, images left out: they are not tokens here). Both cut a
row longer than `--max_length` at the right end, where the two could differ only for rows that long.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["format_budget", "main", "token_budget"]

#: The authors' `max_words` / `--max_seq_len`.
AUTHORS_MAX_WORDS = 512


def token_budget(records: Sequence[Mapping[str, Any]], tokenizer: Any, batch_size: int = 32,
                 max_length: int = AUTHORS_MAX_WORDS, seed: int = 0) -> dict[str, Any]:
    """Mean (and largest) tokens per step of one epoch in `batch_size` steps, shuffled with `seed`, for each way."""
    import torch

    from ..data import IGNORE_INDEX, MemVPDataCollator

    if batch_size < 1 or max_length < 2:
        raise ValueError(f"token_budget: batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}.")
    collator = MemVPDataCollator(tokenizer, None, max_length=max_length, chat_template=False)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    steps: dict[str, list[int]] = {"authors_loader": [], "authors_forward": [], "ours": [], "real": []}
    for start in range(0, len(order), batch_size):
        rows = [{k: v for k, v in records[i].items() if k != "image"} for i in order[start : start + batch_size]]
        batch = collator(rows)
        labelled = batch["labels"] != IGNORE_INDEX
        positions = torch.arange(labelled.shape[1]).expand_as(labelled)
        last = int(positions[labelled].max()) + 1  # the authors' cut: the batch's last labelled position
        steps["authors_loader"].append(len(rows) * max_length)
        steps["authors_forward"].append(len(rows) * last)
        steps["ours"].append(batch["input_ids"].numel())
        steps["real"].append(int(batch["attention_mask"].sum()))
    return {"steps": len(steps["ours"]), "batch_size": batch_size, "max_length": max_length, "rows": len(records),
            **{name: {"mean": sum(v) / len(v), "max": max(v)} for name, v in steps.items()}}


def format_budget(budget: Mapping[str, Any]) -> str:
    """The budget as a markdown table."""
    names = {"authors_loader": f"authors' loader (every row padded to {budget['max_length']})",
             "authors_forward": "authors' forward (cut at the batch's last labelled token)",
             "ours": "MemVPDataCollator (padded to the batch's longest row)",
             "real": "real tokens (no padding)"}
    lines = ["| layout | tokens per step, mean | largest step |", "|---|---:|---:|"]
    lines += [f"| {label} | {budget[name]['mean']:,.1f} | {budget[name]['max']:,} |" for name, label in names.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memvp_peft.cli.token_budget", allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="scienceqa:DIR (repository layout or Hub parquet export)")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder or Hub id (e.g. the base model's)")
    parser.add_argument("--split", default="train", help="the split to count (default: train)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per step (authors: 32 = 4 x 8 GPUs)")
    parser.add_argument("--max_length", type=int, default=AUTHORS_MAX_WORDS, help="authors' max_words (512)")
    parser.add_argument("--use_caption", action="store_true", help="captions in the context")
    parser.add_argument("--seed", type=int, default=0, help="the epoch's shuffle")
    args = parser.parse_args(argv)
    try:
        from transformers import AutoTokenizer

        from ..tasks.scienceqa import load_scienceqa

        records = load_scienceqa(args.dataset, args.split, args.use_caption)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        budget = token_budget(records, tokenizer, args.batch_size, args.max_length, args.seed)
    except ValueError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{budget['rows']} rows of {args.split}, {budget['steps']} steps of {budget['batch_size']}:")
    print(format_budget(budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
