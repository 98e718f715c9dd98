"""Gradient checkpointing that keeps each layer's per-call state alive until its recomputation.

transformers (>= 5) checkpoints a layer by calling `layer._gradient_checkpointing_func(partial(forward, **kwargs),
*args)`; the recomputation runs inside backward, after the call returned, possibly on an autograd thread, and
possibly after another call ran. Two kinds of layers read state of the running call that is gone by then:

* the decoder/encoder layers holding MemVP layers read the call's visual memory (`MemoryRuntime.active`);
* the blocks of the vision encoder (a VLM's own tower, which `gradient_checkpointing_enable` on the VLM checkpoints
  too, or an encoder the user checkpoints) have their vision adapters added by forward hooks that read the adapters
  of the running `VisionEncoder.features()` call (`VisionEncoder.running_adapters`).

`wrap_checkpoint_function` wraps a layer's checkpoint function so that

* that state of *this* forward is captured and re-activated around the recomputation (two forwards before one
  backward stay correct, and a thread that never saw the call still reads its memory and adds its adapters), and
* the tensors the layer's gradients must reach are explicit inputs of the checkpoint: the memory tensors, so
  reentrant checkpointing returns their gradients to the shared projector graph instead of back-propagating through
  it once per layer ("backward through the graph a second time"); and the trainable vision-adapter weights, so that
  reentrant checkpointing of a frozen encoder's block -- whose hidden states need no gradient -- still runs its
  backward (a reentrant checkpoint without an input that requires a gradient returns an output that has none, and
  the adapters would get no gradient, silently). The weights are read as they are (they are leaves: the
  recomputation's backward accumulates into their `.grad`); as inputs they only put the block on the gradient path.

The wrapper is installed lazily at a call's entry (`entry.wrap_layer_checkpointing`).
"""

from __future__ import annotations

from typing import Any, Callable

from .memory import MemoryState
from .scope import ActiveCall, CallMemory, MemoryRuntime


def wrap_checkpoint_function(original: Callable, runtime: MemoryRuntime) -> Callable:
    def checkpoint_with_memory(function: Callable, *args: Any) -> Any:
        active = runtime.active()
        active = active if active is not None and active.memory.states else None
        vision = runtime.vision
        adapters = vision.running_adapters() if vision is not None else None
        if active is None and adapters is None:
            return original(function, *args)
        names = list(active.memory.states) if active is not None else []
        tensors = active.memory.tensors() if active is not None else []
        adapter_weights = [p for p in adapters.bottlenecks.parameters() if p.requires_grad] if adapters else []
        extra = len(tensors) + len(adapter_weights)

        def run(*all_args: Any) -> Any:
            layer_args = all_args[: len(all_args) - extra]
            memory = all_args[len(layer_args) : len(layer_args) + len(tensors)]
            previous = None
            if active is not None:
                states = {name: MemoryState(memory[2 * i], memory[2 * i + 1]) for i, name in enumerate(names)}
                replay = CallMemory(states)
                previous = runtime.activate(ActiveCall(replay, active.batch_size))
            previous_adapters = vision.run_adapters(adapters) if adapters is not None else None
            try:
                return function(*layer_args)
            finally:
                if adapters is not None:
                    vision.run_adapters(previous_adapters)
                if active is not None:
                    runtime.restore(previous)

        return original(run, *args, *tensors, *adapter_weights)

    checkpoint_with_memory.__wrapped__ = original
    return checkpoint_with_memory
