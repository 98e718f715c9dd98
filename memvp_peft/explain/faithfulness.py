"""Do the read maps point at what the answer depends on? Deletion and insertion curves, and Integrated Gradients.

A map ranks the image slots of a row (its mean over the answer's tokens of each slot's contribution). Then:

* **deletion**: exclude the k highest-ranked image slots from every read (`recording.exclude_slots`: their activation
  is zero, so they add nothing) and measure the probability of the answer the model gave, for k = 0 .. all image
  slots. A faithful ranking makes it fall fast: a *low* area under the curve (AUC, over the fraction of slots
  removed).
* **insertion**: start with every image slot excluded (the learned slots past the visual tokens stay) and put the
  k highest-ranked back: a faithful ranking makes the probability rise fast, a *high* AUC.

The same curves for other rankings tell what the numbers are worth: random orders (the mean of a few draws), the
map's own order reversed (least-read first), and Integrated Gradients (Sundararajan et al. 2017, Captum's
`IntegratedGradients`) of the answer's log-probability with respect to the visual features, summed over the feature
axis per token, from an all-zero baseline -- a gradient method that sees the whole network, where the read map sees
only the reads.

All curves of a record are one batched forward (one row per curve and point). Integrated Gradients is computed on the features the
memory reads slot for slot: adapters whose layout compresses the grid (pooling, multiscale) are refused there.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .answers import answer_log_probs


def repeat_row(batch: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """A one-row batch repeated `rows` times along the batch axis."""
    return {key: value.repeat(rows, *[1] * (value.dim() - 1)) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


def curve_points(count: int, steps: int) -> list[int]:
    """`steps` numbers of slots from 0 to `count`, evenly spaced (each once)."""
    return sorted({int(round(value)) for value in np.linspace(0, count, max(2, steps))})


def area_under(points: Sequence[int], values: Sequence[float]) -> float:
    """The trapezoid area under `values` over the fraction of slots `points / points[-1]`."""
    x = np.asarray(points, dtype=np.float64)
    x = x / x[-1] if x[-1] > 0 else x
    y = np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def _keep_masks(order: np.ndarray, image_slots: np.ndarray, points: Sequence[int], num_slots: int,
                insertion: bool) -> torch.Tensor:
    """(len(points), n) keep masks: deletion keeps all but the first k of `order`; insertion keeps the learned slots
    and the first k of `order`."""
    masks = torch.ones(len(points), num_slots, dtype=torch.bool)
    for row, k in enumerate(points):
        if insertion:
            masks[row, torch.as_tensor(image_slots, dtype=torch.long)] = False
            masks[row, torch.as_tensor(order[:k], dtype=torch.long)] = True
        else:
            masks[row, torch.as_tensor(order[:k], dtype=torch.long)] = False
    return masks


def probability_curves(model: nn.Module, row: Mapping[str, Any], curves: Sequence[tuple[np.ndarray, bool]],
                       image_slots: np.ndarray, points: Sequence[int], num_slots: int) -> list[np.ndarray]:
    """The answer's probability at every point of each (order, insertion) curve (module docstring), all of them in
    one batched forward."""
    masks = torch.cat([_keep_masks(order, image_slots, points, num_slots, insertion) for order, insertion in curves])
    device = row["input_ids"].device
    probabilities = answer_log_probs(model, repeat_row(row, masks.shape[0]), masks.to(device)).exp().numpy()
    return list(probabilities.reshape(len(curves), len(points)))


def integrated_gradients(model: nn.Module, row: Mapping[str, Any], steps: int = 32) -> np.ndarray:
    """(tokens,) Integrated Gradients of the row's answer log-probability with respect to its `image_features`
    (from a zero baseline, `steps` steps), summed over the feature axis: one number per visual token, in the order
    the memory lays them out (the features' images, then their tokens)."""
    from captum.attr import IntegratedGradients

    features = row.get("image_features")
    if not isinstance(features, torch.Tensor):
        raise ValueError("integrated_gradients reads image_features (the features the memory reads); this batch has "
                         "none.")
    others = {key: value for key, value in row.items() if key != "image_features"}

    def log_prob(inputs: torch.Tensor) -> torch.Tensor:
        batch = {**repeat_row(others, inputs.shape[0]), "image_features": inputs}
        return _answer_log_prob_with_grad(model, batch)

    attribution = IntegratedGradients(log_prob).attribute(features.float(), baselines=torch.zeros_like(features),
                                                          n_steps=steps, internal_batch_size=steps)
    return attribution.sum(dim=-1).reshape(-1).detach().cpu().numpy()


def _answer_log_prob_with_grad(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """(B,) summed answer log-probabilities, differentiable (`answers.answer_log_probs` runs without gradients)."""
    labels = batch["labels"]
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits.float()
    offset = logits.shape[1] - labels.shape[1]
    log_probs = logits[:, offset:-1].log_softmax(dim=-1)
    targets = labels[:, 1:]
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != -100)).sum(dim=1)


def record_curves(model: nn.Module, row: Mapping[str, Any], rankings: Mapping[str, Optional[np.ndarray]],
                  image_slots: np.ndarray, num_slots: int, steps: int, rng: np.random.Generator,
                  random_draws: int = 3) -> dict[str, dict[str, Any]]:
    """Deletion and insertion curves of one row for every ranking in `rankings` (slot scores over the image slots,
    highest first; None skips it) plus `random_draws` random orders averaged and the read map's reverse."""
    points = curve_points(len(image_slots), steps)
    orders = {name: image_slots[np.argsort(-scores[image_slots], kind="stable")]
              for name, scores in rankings.items() if scores is not None}
    if "read map" in orders:
        orders["least read"] = orders["read map"][::-1].copy()
    draws = [rng.permutation(image_slots) for _ in range(random_draws)]
    wanted = [(name, order, kind) for name, order in [*orders.items(), *(("random", d) for d in draws)]
              for kind in ("deletion", "insertion")]
    values = probability_curves(model, row, [(order, kind == "insertion") for _, order, kind in wanted], image_slots,
                                points, num_slots)
    result: dict[str, dict[str, Any]] = {}
    for (name, _, kind), curve in zip(wanted, values):
        result.setdefault(name, {}).setdefault(kind, []).append(curve)
    result = {name: {kind: np.mean(curves, axis=0) for kind, curves in kinds.items()} for name, kinds in result.items()}
    for curves in result.values():
        curves["points"] = points
    return result
