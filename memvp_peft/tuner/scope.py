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

from .input_checks import validate_pixel_values, validate_visual_inputs
from .memory import MemoryState


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
        self.vision = None  # VisionEncoder turning pixel_values into features, when one is attached
        self.image_token_id: Optional[int] = None  # VLM bases: placeholder tokens that must not be in the text

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
        pixel_values: Optional[torch.Tensor] = None,
    ) -> dict[str, MemoryState]:
        """Validate the visual inputs and compute K/V once for every active adapter."""
        if pixel_values is not None and image_features is not None:
            raise ValueError("MemVP: pass either `pixel_values` or `image_features`, not both.")
        shared_features = None
        states = {}
        for name in adapter_names:
            if name not in self.memories:
                continue
            config, memory = self.configs[name], self.memories[name]
            features = image_features
            if pixel_values is not None:
                if memory.vision_adapters is not None:
                    features = self._encode(pixel_values, batch_size, memory.vision_adapters, config.vision_adapter_scale)
                else:
                    if shared_features is None:
                        shared_features = self._encode(pixel_values, batch_size, None, 0.0)
                    features = shared_features
            features, mask = validate_visual_inputs(
                features, image_mask, batch_size, config.visual_dim, config.num_memory_slots
            )
            states[name] = memory(features, mask)
        return states

    def _encode(
        self, pixel_values: torch.Tensor, batch_size: Optional[int], adapters: Optional[nn.ModuleList], scale: float
    ) -> torch.Tensor:
        if self.vision is None:
            raise ValueError(
                "MemVP: `pixel_values` were given but no vision encoder is attached. Set "
                "`MemVPConfig(vision_encoder=<CLIP/SigLIP model or local path>)`, call "
                "`memvp_peft.attach_vision_encoder(peft_model, encoder)`, or pass `image_features`."
            )
        pixels, images = validate_pixel_values(pixel_values, batch_size)
        features = self.vision.features(pixels, adapters, scale)
        if pixel_values.dim() == 5:
            features = features.reshape(pixel_values.shape[0], images, *features.shape[1:])
        return features

    @contextmanager
    def use(self, states: Optional[dict[str, MemoryState]], batch_size: Optional[int] = None) -> Iterator[None]:
        previous = self.states, self.batch_size
        self.states = states
        self.batch_size = batch_size
        try:
            yield
        finally:
            self.states, self.batch_size = previous
