"""Gradient checkpointing that keeps each layer's visual memory alive until its recomputation.

transformers (>= 5) checkpoints a decoder layer by calling `layer._gradient_checkpointing_func(partial(forward,
**kwargs), *args)`; the recomputation runs inside backward, after the call returned (its memory is no longer active),
possibly on an autograd thread, and possibly after another call ran. `wrap_checkpoint_function` wraps that function
per layer so that

* the active call of *this* forward is captured and re-activated around the recomputation (two forwards before one
  backward stay correct, and a thread that never saw the call still reads its memory), and
* the memory tensors are passed to the checkpoint as explicit inputs, so reentrant checkpointing returns their
  gradients to the shared projector graph instead of back-propagating through it once per layer ("backward through
  the graph a second time").

The wrapper is installed lazily by the layer's forward pre-hook (`entry.make_layer_pre_hook`).
"""

from __future__ import annotations

from typing import Any, Callable

from .memory import MemoryState
from .scope import ActiveCall, CallMemory, MemoryRuntime


def wrap_checkpoint_function(original: Callable, runtime: MemoryRuntime) -> Callable:
    def checkpoint_with_memory(function: Callable, *args: Any) -> Any:
        active = runtime.active()
        if active is None or not active.memory.states:
            return original(function, *args)
        names = list(active.memory.states)
        tensors = active.memory.tensors()
        batch_size = active.batch_size

        def run(*all_args: Any) -> Any:
            layer_args = all_args[: len(all_args) - len(tensors)]
            memory = all_args[len(all_args) - len(tensors) :]
            replay = CallMemory({name: MemoryState(memory[2 * i], memory[2 * i + 1]) for i, name in enumerate(names)})
            previous = runtime.activate(ActiveCall(replay, batch_size))
            try:
                return function(*layer_args)
            finally:
                runtime.restore(previous)

        return original(run, *args, *tensors)

    checkpoint_with_memory.__wrapped__ = original
    return checkpoint_with_memory
