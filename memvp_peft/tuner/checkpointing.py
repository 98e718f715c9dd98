"""Gradient checkpointing that keeps each layer's visual memory alive until its recomputation.

transformers (>= 5) checkpoints a decoder layer by calling `layer._gradient_checkpointing_func(partial(forward,
**kwargs), *args)`; the recomputation runs inside backward, long after the forward returned and possibly after
another forward replaced the memory. We wrap that function per layer so that

* the memory tensors of *this* forward are captured in the closure and re-installed around the recomputation
  (two forwards before one backward stay correct), and
* they are passed to the checkpoint as explicit inputs, so reentrant checkpointing returns their gradients to the
  shared projector graph instead of back-propagating through it once per layer ("backward through the graph a second
  time").

The wrapper is installed lazily from a forward pre-hook, because users enable checkpointing after `get_peft_model`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .scope import MemoryContext
from .memory import MemoryState

_WRAPPED_MARK = "_memvp_checkpoint_wrapper"


def _wrap_checkpoint_function(original: Callable, context: MemoryContext) -> Callable:
    def checkpoint_with_memory(function: Callable, *args: Any) -> Any:
        states, batch_size = context.states, context.batch_size
        if not states:
            return original(function, *args)
        names = list(states)
        tensors = [t for name in names for t in states[name].tensors()]

        def run(*all_args: Any) -> Any:
            layer_args = all_args[: len(all_args) - len(tensors)]
            memory = all_args[len(all_args) - len(tensors) :]
            replay = {name: MemoryState(memory[2 * i], memory[2 * i + 1]) for i, name in enumerate(names)}
            with context.use(replay, batch_size):
                return function(*layer_args)

        return original(run, *args, *tensors)

    setattr(checkpoint_with_memory, _WRAPPED_MARK, True)
    checkpoint_with_memory.__wrapped__ = original
    return checkpoint_with_memory


def make_checkpoint_pre_hook(context: MemoryContext) -> Callable:
    def pre_hook(module: nn.Module, args: tuple) -> None:
        if not (getattr(module, "gradient_checkpointing", False) and module.training):
            return
        current = getattr(module, "_gradient_checkpointing_func", None)
        if current is None or getattr(current, _WRAPPED_MARK, False):
            return
        module._gradient_checkpointing_func = _wrap_checkpoint_function(current, context)

    return pre_hook


def unwrap_checkpoint_function(module: nn.Module) -> None:
    current = getattr(module, "_gradient_checkpointing_func", None)
    if current is not None and getattr(current, _WRAPPED_MARK, False):
        module._gradient_checkpointing_func = current.__wrapped__
