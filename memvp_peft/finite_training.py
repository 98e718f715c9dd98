"""`StopOnNonFinite`: a Trainer callback that ends a run the step its loss or its weights stop being numbers.

Why a callback and not the Trainer's own handling: the HF Trainer keeps going on a NaN loss. By default
(`logging_nan_inf_filter=True`) it leaves NaN steps out of the logged loss -- a run whose every step is NaN logs a
loss of 0.0 -- and the optimiser writes the NaN gradients into the weights, so the run saves an all-NaN adapter and
exits 0. A learning rate like 1e38 does the same with finite gradients: the first step moves the weights to 1e38,
and every later forward computes inf and NaN from them. This callback stops such a run with a
`NonFiniteTrainingError` that says what went wrong and at which step:

* before each optimiser step, the gradients (already unscaled and clipped): a NaN/inf gradient means the loss of
  that step, or its backward, was not finite -- the step is not applied, so the weights stay those of the step
  before (skipped under fp16 mixed precision, whose loss scaler skips such steps itself);
* after each step, the trainable parameters: NaN/inf, or a value beyond `LARGEST_ADAPTER_VALUE` (what loading an
  adapter refuses, `tuner/guards.py`: training never saves an adapter that cannot be loaded);
* every logged loss and gradient norm.

Each check reads one flag on the host per step. Under a launcher the flag is reduced over the ranks first, so every
rank stops at the same step (a rank stopping alone would leave the others waiting in a collective).

`memvp-train` adds it to its Trainer; with the Python API, pass it yourself:
`Trainer(model=peft_model, args=args, ..., callbacks=[StopOnNonFinite()])`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .tuner.guards import LARGEST_ADAPTER_VALUE

__all__ = ["NonFiniteTrainingError", "StopOnNonFinite"]


class NonFiniteTrainingError(ValueError):
    """A training run was stopped because its loss, a gradient or a parameter is no longer a finite number."""


def _first_bad(named: list[tuple[str, torch.Tensor]], limit: float) -> Optional[tuple[str, str]]:
    """(name, what) of the first tensor holding NaN/inf or a magnitude beyond `limit`, or None; one host read when
    all are fine (the check of every step), more only to word the error."""
    named = [(name, tensor) for name, tensor in named if tensor.numel()]
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not named and not launched:
        return None
    device = named[0][1].device if named else _collective_device()
    largest = torch.stack([torch.linalg.vector_norm(t.detach(), ord=math.inf).float().to(device) for _, t in named]
                          ) if named else torch.zeros(0, device=device)
    bad = ~(largest <= limit)  # NaN compares False: caught with inf and too large values
    anywhere = bad.any().to(torch.int32)
    if launched:  # every rank joins, with or without tensors of its own, so none waits alone
        torch.distributed.all_reduce(anywhere, op=torch.distributed.ReduceOp.MAX)
    if not bool(anywhere):
        return None
    for (name, tensor), flagged, value in zip(named, bad.tolist(), largest.tolist()):
        if flagged:
            values = tensor.detach()
            nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
            if nan or inf:
                parts = [f"{nan} NaN" if nan else "", f"{inf} inf" if inf else ""]
                return name, f"holds {' and '.join(p for p in parts if p)} value(s) (of {values.numel()})"
            return name, f"holds a value of magnitude {value:.4g}, beyond {limit:.3g}"
    return "of another rank", "is not finite"


def _collective_device() -> torch.device:
    """Where a rank without tensors of its own puts its flag: NCCL reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: ZeRO-3 keeps a parameter's shard in `ds_tensor` (the parameter itself is empty
    then), FSDP2 a DTensor's in `to_local()`; the flag is reduced over the ranks (`_first_bad`)."""
    tensor = getattr(tensor, "ds_tensor", tensor)
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(name, _local(p)) for name, p in model.named_parameters() if p.requires_grad]


class StopOnNonFinite(TrainerCallback):
    """Raise `NonFiniteTrainingError` the step the loss, a gradient or a trainable parameter stops being finite (see
    the module docstring). The error names the step and the tensor; the weights are never overwritten with NaN."""

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if model is None or args.fp16:  # fp16: the loss scaler skips steps with inf gradients, as it should
            return
        grads = [(name, _local(p.grad)) for name, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None]
        found = _first_bad(grads, math.inf)
        if found is not None:
            name, what = found
            raise NonFiniteTrainingError(
                f"training stopped at step {state.global_step + 1}: the loss of that step, or its gradient, is not "
                f"finite (the gradient of {name} {what}). The step was not applied. Lower the learning rate or "
                "visual_scale / memory_scale, or check the data of that step."
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: Optional[nn.Module] = None, **kwargs: Any) -> None:
        if model is None:
            return
        found = _first_bad(_trainable(model), LARGEST_ADAPTER_VALUE)
        if found is not None:
            name, what = found
            raise NonFiniteTrainingError(
                f"training stopped at step {state.global_step}: after that step the parameter {name} {what}; the "
                f"forward would compute inf/NaN from it. The learning rate ({args.learning_rate:g}) or a scale is "
                "too large for this model: lower it."
            )

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict[str, float]] = None, **kwargs: Any) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise NonFiniteTrainingError(
                    f"training stopped at step {state.global_step}: the logged training {key.replace('_', ' ')} is "
                    f"{value} (averaged over the steps since the last log). Lower the learning rate or "
                    "visual_scale / memory_scale, or check the data."
                )
