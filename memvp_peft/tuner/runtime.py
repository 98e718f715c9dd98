"""The runtime of a MemVP tuner: the per-call visual memory, and gradient checkpointing that keeps it alive.

**The per-call memory.** One `CallMemory` per forward / `generate()` call, visible only inside that call. The memory
is a side input of the forward pass (it depends on the image), but HF decoder layers only hand the hidden states to
their MLP. Instead of threading a new argument through every architecture, the entry point of a call (`entry.py`)
has `MemoryRuntime.build` compute the keys/values of every active adapter once -- from the call's visual inputs,
checked and laid out on their way (`visual_inputs.py`) -- and *activates* them for the duration of the call; the FFN
layers read the active call from here.

Three rules make that safe:

* **Per thread.** The active call lives in a `threading.local`, so two threads (or the replicas `nn.DataParallel`
  runs in threads) calling one model with different images each see their own memory. A call is one synchronous
  Python call, so asyncio tasks cannot interleave inside it. (`contextvars` would say the same, but TorchDynamo cannot
  trace `ContextVar.set`, and the hot path must compile as one graph.)
* **Strictly nested.** `activate` returns the previous value and `restore` puts it back in a `finally`: after a call
  returns, raises or is interrupted, nothing of it is left behind. A later text-only call never reads a finished
  call's image.
* **Never inferred.** `generate()` does not leave its memory active between decode steps; it hands its `CallMemory`
  to each of its own decode steps explicitly (`entry.CALL_KWARG`), so a text-only forward a `LogitsProcessor` makes
  in between is text-only.

**Gradient checkpointing.** transformers (>= 5) checkpoints a layer by calling
`layer._gradient_checkpointing_func(partial(forward, **kwargs), *args)`; the recomputation runs inside backward,
after the call returned, possibly on an autograd thread, and possibly after another call ran. Two kinds of layers
read state of the running call that is gone by then:

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

import threading
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from .input_tokens import ClsInput, cls_input_for
from .memory import MemoryState
from .visual_inputs import VisualInputs


class CallMemory:
    """The keys/values of every active adapter for one forward or `generate()` call (immutable once built)."""

    __slots__ = ("states", "cls_input")

    def __init__(self, states: dict[str, MemoryState], cls_input: Optional[ClsInput] = None) -> None:
        self.states = states
        self.cls_input = cls_input  # what the call inserts into its input (an adapter with cls_token): input_tokens.py

    def tensors(self) -> list[torch.Tensor]:
        return [t for state in self.states.values() for t in state.tensors()]

    def __deepcopy__(self, memo: dict) -> "CallMemory":
        # generate() may copy its model kwargs; the memory of the call is the same object for every decode step.
        return self

    def __copy__(self) -> "CallMemory":
        return self


class ActiveCall(NamedTuple):
    """What a layer reads during a call: the call's memory and the batch size of the running forward (OPT flattens
    tokens to `(B*T, d)` before its FFN; beam search makes decode batches larger than the call's)."""

    memory: CallMemory
    batch_size: Optional[int]


class MemoryRuntime:
    """Shared, per-tuner runtime state: the adapters' memories, the vision encoder, and the active call per thread.

    Referenced by every MemVP layer and by the base model's entry wrappers; a plain object, never a submodule, so
    its tensors are neither saved nor moved twice.
    """

    def __init__(self, memories: nn.ModuleDict, configs: dict) -> None:
        self.memories = memories
        self.configs = configs
        self.active_adapters: list[str] = []
        self.enabled = True
        self.vision = None  # VisionEncoder turning pixel_values into features, when one is attached
        self.image_token_id: Optional[int] = None  # VLM bases: the image placeholder token of their processor
        self.family = None  # a VLM base's family (vision.families): its processor's batches are read (entry.py)
        self.unread_vlm_class: Optional[str] = None  # a VLM base whose tower MemVP cannot read (vision_attach.py)
        self.placeholders_checked = False  # whether that check ran once on accelerator tensors (entry.py)
        self.seen_visual_inputs = False  # a call brought visual inputs; until then a training call warns once
        self.checkpointed_layers: list = []  # the decoder/encoder layers holding MemVP layers (entry.py wraps them)
        self.text_only_warned = False
        self._local = threading.local()

    # ------------------------------------------------------------------------------------------------ the active call

    def active(self) -> Optional[ActiveCall]:
        return getattr(self._local, "call", None)

    def activate(self, call: Optional[ActiveCall]) -> Optional[ActiveCall]:
        """Make `call` the active one in this thread; returns the previous one, for `restore`."""
        previous = getattr(self._local, "call", None)
        self._local.call = call
        return previous

    def restore(self, previous: Optional[ActiveCall]) -> None:
        self._local.call = previous

    def state_for(self, adapter_name: str) -> MemoryState:
        """The memory a layer reads now: the active call's, else (a layer run outside any call) the learned,
        image-independent memory p_k/p_v."""
        call = self.active()
        if call is not None:
            state = call.memory.states.get(adapter_name)
            if state is not None:
                return state
        return self.memories[adapter_name]()

    def batch_size(self) -> Optional[int]:
        call = self.active()
        return None if call is None else call.batch_size

    def layers_reading_the_call(self) -> list:
        """Every layer whose gradient-checkpointing recomputation must see the state of the call that ran it
        (`wrap_checkpoint_function`): the layers holding MemVP layers (the call's memory) and the blocks of the
        attached vision encoder (the call's vision adapters, added by hooks)."""
        return [*self.checkpointed_layers, *(self.vision.layers if self.vision is not None else ())]

    # ------------------------------------------------------------------------------------------ building the memory

    def build(
        self,
        memories: nn.ModuleDict,
        image_features: Optional[torch.Tensor],
        image_mask: Optional[torch.Tensor],
        pixel_values: Optional[torch.Tensor],
        batch_size: Optional[int],
    ) -> CallMemory:
        """Compute K/V once for every active adapter from the call's visual inputs, which reach each memory checked
        and laid out for its adapter (`visual_inputs.VisualInputs`).

        `memories` is passed by the caller (the tuner's own ModuleDict): an `nn.DataParallel` replica of the tuner
        computes with its replica's parameters, on its device.
        """
        inputs = VisualInputs(image_features, image_mask, pixel_values, batch_size, self.vision,
                              self.unread_vlm_class)
        states = {}
        cls_input = None
        active = [name for name in self.active_adapters if name in memories]
        for name in active:
            config, memory = self.configs[name], memories[name]
            visual = inputs.for_adapter(name, active, config, memory)
            cls_embeddings = None if visual.cls_features is None else memory.project_cls(visual.cls_features)
            states[name] = memory(visual.features, visual.mask, visual.lengths)
            if getattr(config, "cls_token", False):  # the rows with an image: the checked per-token mask's first
                unused = None if cls_embeddings is not None else memory.project_cls(
                    memory.cls_projector[0].weight.new_zeros(1, config.visual_dim)).sum() * 0.0
                cls_input = cls_input_for(config, cls_embeddings, None if visual.mask is None else visual.mask[:, 0],
                                          unused)
        return CallMemory(states, cls_input)

    # ------------------------------------------------------------------------------------------------ copy / pickle

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local")  # an active call belongs to a running call in one thread, never to a copy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


# ------------------------------------------------------------------------------------------ gradient checkpointing


def wrap_checkpoint_function(original: Callable, runtime: MemoryRuntime) -> Callable:
    """`original` (a layer's `_gradient_checkpointing_func`) re-activating, around the recomputation, the call
    memory and vision adapters its forward ran with, which it takes as explicit inputs (module docstring)."""
    def checkpoint_with_memory(function: Callable, *args: Any) -> Any:
        active = runtime.active()
        active = active if active is not None and active.memory.states else None
        vision = runtime.vision
        adapters = vision.running_adapters() if vision is not None else None
        if active is None and adapters is None:
            return original(function, *args)
        names = list(active.memory.states) if active is not None else []
        slots = [active.memory.states[name].slots for name in names]  # no gradient: read as they are
        tensors = active.memory.tensors() if active is not None else []
        adapter_weights = [p for p in adapters.bottlenecks.parameters() if p.requires_grad] if adapters else []
        extra = len(tensors) + len(adapter_weights)

        def run(*all_args: Any) -> Any:
            layer_args = all_args[: len(all_args) - extra]
            memory = all_args[len(layer_args) : len(layer_args) + len(tensors)]
            previous = None
            if active is not None:
                states = {name: MemoryState(memory[2 * i], memory[2 * i + 1], slots=slots[i])
                          for i, name in enumerate(names)}
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
