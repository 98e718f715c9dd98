"""What the model read for each token of an answer: one teacher-forced forward of prompt + answer under
`record_reads`, cut to the answer's tokens.

Which read belongs to an answer token: the one that *produced* it. A causal LM predicts token t at position t - 1,
so answer token t's reads are the reads of every layer at position t - 1 (the prompt's last position for the first
answer token): exactly what `generate()` read when it chose that token (the prompt's forward for the first one, the
decode step of token t - 1 for the others), read here in one forward with the same numbers up to float rounding.

`explain(model, batch)` takes a training-layout batch (`MemVPDataCollator.__call__`: the prompt and the answer,
labels on the answer only, right padding) and returns one `AnswerReads` per row; `answer_log_probs` is the
summed log-probability of each row's answer, optionally with slots excluded from every read (`exclude_slots`), what
the deletion and insertion tests measure. Encoder-decoder models are refused: their answer is read by the decoder
while the encoder also reads the memory for the prompt, which this one-stack view does not separate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .recording import exclude_slots, record_reads

IGNORE_INDEX = -100
MEASURES = ("contribution", "activation")


@dataclass
class AnswerReads:
    """One row's answer and what was read for each of its tokens: `tokens` (A,) ids, `log_probs` (A,) of each given
    its prefix, `activations` (L, A, n) `a_j` and `contributions` (L, A, n) `|s a_j| ||V_j||` per layer (depth
    order, `layer_names`), token and slot."""

    tokens: list[int]
    log_probs: torch.Tensor
    activations: torch.Tensor
    contributions: torch.Tensor
    layer_names: list[str]

    @property
    def answer_log_prob(self) -> float:
        return float(self.log_probs.sum())

    def slot_weights(self, layers: Optional[Sequence[int]] = None, measure: str = "contribution") -> np.ndarray:
        """(A, n): per answer token, each slot's `measure` summed over `layers` (depth indices; None: all) --
        'contribution' (`|s a_j| ||V_j||`, what the slot moved the FFN output by) or 'activation' (`|a_j|`)."""
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}.")
        chosen = list(range(len(self.layer_names))) if layers is None else [int(layer) for layer in layers]
        bad = [layer for layer in chosen if not -len(self.layer_names) <= layer < len(self.layer_names)]
        if bad or not chosen:
            raise ValueError(f"layers must be a non-empty list of depth indices of the {len(self.layer_names)} "
                             f"reading layers, got {list(layers) if layers is not None else layers}.")
        values = self.contributions if measure == "contribution" else self.activations.abs()
        return values[chosen].sum(dim=0).numpy()


def _answer_positions(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the positions t (>= 1) of its answer tokens: where the labels are not ignored."""
    return [torch.nonzero(row[1:] != IGNORE_INDEX).flatten() + 1 for row in labels]


def _check_batch(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("explain reads decoder-only models: an encoder-decoder model's encoder reads the memory for "
                         "the prompt and its decoder for the answer, which one answer map does not separate.")
    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor) or labels.shape != batch.get("input_ids", labels).shape:
        raise ValueError("explain needs a training-layout batch: input_ids and labels of the same shape, the labels "
                         f"{IGNORE_INDEX} except on the answer (MemVPDataCollator(...)(records) with the answers).")
    if not bool((labels[:, 1:] != IGNORE_INDEX).any(dim=1).all()):
        raise ValueError("explain: a row of the batch has no answer token (every label is ignored); give each record "
                         "its answer.")
    return labels


def _forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs).logits.float()


def explain(model: nn.Module, batch: Mapping[str, Any], adapter: Optional[str] = None) -> list[AnswerReads]:
    """One `AnswerReads` per row of `batch` (module docstring); the model runs in eval mode without gradients and is
    put back in the mode it was in."""
    labels = _check_batch(model, batch)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), record_reads(model) as record:
            logits = _forward(model, batch)
    finally:
        model.train(was_training)
    activations = record.stacked(0, adapter, "activations")  # (L, B, T', n)
    contributions = record.stacked(0, adapter, "contributions")
    offset = logits.shape[1] - labels.shape[1]  # ADEM-VL's CLS input token grows every row at its front
    log_probs = logits.log_softmax(dim=-1).cpu()
    ids = batch["input_ids"].cpu()
    explained = []
    for row, positions in enumerate(_answer_positions(labels.cpu())):
        read_at = positions - 1 + offset
        tokens = ids[row, positions]
        explained.append(AnswerReads(
            tokens=tokens.tolist(),
            log_probs=log_probs[row, read_at].gather(-1, tokens[:, None])[:, 0],
            activations=activations[:, row, read_at],
            contributions=contributions[:, row, read_at],
            layer_names=list(record.layer_names),
        ))
    return explained


def answer_log_probs(model: nn.Module, batch: Mapping[str, Any], keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) the summed log-probability of each row's answer given its prompt, with the slots where `keep` (B, n) is
    False excluded from every read (None: all read)."""
    labels = _check_batch(model, batch)
    with torch.no_grad():
        if keep is None:
            logits = _forward(model, batch)
        else:
            with exclude_slots(model, keep):
                logits = _forward(model, batch)
    offset = logits.shape[1] - labels.shape[1]
    log_probs = logits.log_softmax(dim=-1)
    total = torch.zeros(labels.shape[0])
    for row, positions in enumerate(_answer_positions(labels.cpu())):
        tokens = batch["input_ids"][row, positions].to(log_probs.device)
        total[row] = log_probs[row, positions - 1 + offset].gather(-1, tokens[:, None]).sum().cpu()
    return total
