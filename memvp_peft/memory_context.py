"""`MemoryContext`: the per-forward visual memory shared by the tuner and every wrapped FFN.

The memory is a side input of the forward pass (it depends on the image) but HF decoder layers only hand the hidden
states to their MLP. Instead of threading a new argument through every architecture, the tuner opens a *scope*
around each forward / generate call in which `states` holds the keys/values of every active adapter, computed once;
the layers read them from here. The context is a plain object referenced by the layers, never a submodule, so its
tensors are neither saved nor moved twice.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from .visual_inputs import validate_visual_inputs
from .visual_memory import MemoryState


class MemoryContext:
    def __init__(self, memories: nn.ModuleDict, configs: dict) -> None:
        self.memories = memories
        self.configs = configs
        self.states: Optional[dict[str, MemoryState]] = None
        # Batch size of the running forward: some FFNs (OPT) see tokens flattened to (B*T, d) and need it to find
        # which sample a token row belongs to.
        self.batch_size: Optional[int] = None
        self.active_adapters: list[str] = []
        self.enabled = True

    def state_for(self, adapter_name: str) -> MemoryState:
        """The memory a layer must read now: the scoped one, else the image-independent learned memory."""
        if self.states is not None:
            state = self.states.get(adapter_name)
            if state is not None:
                return state
        return self.memories[adapter_name]()

    def compute(
        self,
        adapter_names: list[str],
        image_features: Optional[torch.Tensor],
        image_mask: Optional[torch.Tensor],
        batch_size: Optional[int],
    ) -> dict[str, MemoryState]:
        """Validate the visual inputs and compute K/V once for every active adapter."""
        states = {}
        for name in adapter_names:
            if name not in self.memories:
                continue
            config = self.configs[name]
            mask = validate_visual_inputs(
                image_features, image_mask, batch_size, config.visual_dim, config.num_memory_slots
            )
            states[name] = self.memories[name](image_features, mask)
        return states

    @contextmanager
    def use(self, states: Optional[dict[str, MemoryState]], batch_size: Optional[int] = None) -> Iterator[None]:
        previous = self.states, self.batch_size
        self.states = states
        self.batch_size = batch_size
        try:
            yield
        finally:
            self.states, self.batch_size = previous
