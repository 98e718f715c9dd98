"""The visual memory of one MemVP adapter: projector, position embeddings and the per-forward keys/values.

Why a separate module: the memory is computed *once per forward* (and once per `generate()` call) and then read by
every wrapped FFN block. Keeping the parameters here, on the tuner, makes them one set per adapter (not one per
layer), and `MemoryState` is the small immutable value that the layers read.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..vision import VisionBottleneck
from .visual_inputs import cast_checked


def init_projector(projector: nn.Sequential) -> None:
    """MemVP's projector init: xavier-uniform weights, zero biases."""
    for layer in (projector[0], projector[2]):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)


def build_projector(visual_dim: int, hidden_dim: int, model_dim: int) -> nn.Sequential:
    """The projector f: `Linear(visual_dim, hidden) -> SiLU -> Linear(hidden, model_dim)`, initialised. The
    benchmark's input-space baseline builds its projector here too, so both methods use the very same f."""
    projector = nn.Sequential(nn.Linear(visual_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, model_dim))
    init_projector(projector)
    return projector


class VisualMemory(nn.Module):
    """Projector f and position embeddings (p_k, p_v) of one adapter.

    `forward(z, ind)` returns `K = lambda * pad_n(f(z) * ind) + p_k` and `V = lambda * pad_n(f(z) * ind) + p_v`
    (MEMVP_SPEC steps 1-5). Without features it returns the image-independent memory `K = p_k, V = p_v` (step 7),
    without a batch dimension so that it broadcasts over any batch.

    Rows of different lengths (`forward(z, lengths=...)`, the variable form of `visual_inputs.VisualTokens`): row b's
    first `lengths[b]` slots hold its tokens, `K = lambda * f(z_b) + p_k` there as above; its other slots are *empty*
    (`K = V = 0`, marked False in the state's slot mask), so they read nothing -- a row's memory is its own tokens,
    whatever the batch's longest row, and the p_k/p_v of slots past its tokens never reach it. A row of length 0 has
    no image and reads `K = p_k, V = p_v` in every slot, as a text-only row does in the fixed form. (The fixed form's
    slots past the N tokens are learned memory read by every row, step 3; in the variable form each row's length is
    its own, so no slot is past every row's tokens.)
    """

    def __init__(
        self,
        visual_dim: int,
        hidden_dim: int,
        model_dim: int,
        num_slots: int,
        visual_scale: float,
        key_init_std: float,
        vision_layers: int = 0,
        vision_adapter_dim: int = 0,
        vision_adapter_dropout: float = 0.0,
        cls_token: bool = False,
    ) -> None:
        super().__init__()
        self.visual_dim = visual_dim
        self.num_slots = num_slots
        self.visual_scale = visual_scale
        self.projector = build_projector(visual_dim, hidden_dim, model_dim)
        # ADEM-VL's projector of the encoder's CLS feature into one input embedding (`input_tokens.py`)
        self.cls_projector = build_projector(visual_dim, hidden_dim, model_dim) if cls_token else None
        self.key_pos = nn.Parameter(torch.empty(num_slots, model_dim))
        self.value_pos = nn.Parameter(torch.empty(num_slots, model_dim))
        self.key_init_std = key_init_std
        self._reset_position_embeddings()
        # The authors' bottleneck adapters inside the vision encoder blocks (optional; see vision/encoder.py).
        self.vision_adapters = (
            nn.ModuleList(
                VisionBottleneck(visual_dim, vision_adapter_dim, vision_adapter_dropout) for _ in range(vision_layers)
            )
            if vision_adapter_dim > 0 and vision_layers > 0
            else None
        )

    @classmethod
    def from_config(cls, config: Any, model_dim: int) -> "VisualMemory":
        """The memory of a `MemVPConfig` on a model of width `model_dim`: what an injection creates and what a load
        (or a checkpoint conversion) must fit, tensor by tensor."""
        return cls(
            visual_dim=config.visual_dim,
            hidden_dim=config.projector_hidden_dim,
            model_dim=model_dim,
            num_slots=config.num_memory_slots,
            visual_scale=config.visual_scale,
            key_init_std=config.key_init_std,
            vision_layers=config.vision_num_layers or 0,
            vision_adapter_dim=config.vision_adapter_dim,
            vision_adapter_dropout=config.vision_adapter_dropout,
            cls_token=config.cls_token,
        )

    def reset_parameters(self) -> None:
        init_projector(self.projector)
        if self.cls_projector is not None:
            init_projector(self.cls_projector)
        self._reset_position_embeddings()

    def _reset_position_embeddings(self) -> None:
        nn.init.normal_(self.key_pos, mean=0.0, std=self.key_init_std)
        nn.init.zeros_(self.value_pos)

    def forward(
        self,
        image_features: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
    ) -> "MemoryState":
        weight = self.projector[0].weight
        if lengths is not None:
            return self._rows_of_lengths(image_features, lengths)
        if image_features is None:
            # Built like the image branch: `parameter + computed tensor` is a fresh tensor, which ZeRO-3 cannot empty
            # when it re-partitions this module's parameters (to shape (0,)) after the forward returns, and the
            # projector always runs (times 0), so data-parallel ranks with and without images use the same
            # parameters in the same order (their gradient all-reduces then match).
            unused = self.projector(weight.new_zeros(1, 1, self.visual_dim)).sum() * 0.0
            return MemoryState(self.key_pos + unused, self.value_pos + unused)
        # The cast to the projector's dtype and its check happen here, in the forward, where ZeRO-3 has gathered the
        # projector: reading its weight's dtype outside the forward (on ranks with images only) puts the ranks'
        # parameter collectives out of step.
        features = cast_checked(image_features, weight.dtype, "image_features")
        projected = self.projector(features) * self.visual_scale
        if image_mask is not None:  # (B,) per sample or (B, N) per visual token
            mask = image_mask.to(device=projected.device, dtype=projected.dtype)
            projected = projected * (mask[:, None, None] if mask.dim() == 1 else mask[..., None])
        padded = F.pad(projected, (0, 0, 0, self.num_slots - projected.shape[1]))
        return MemoryState(padded + self.key_pos, padded + self.value_pos)

    def _rows_of_lengths(self, image_features: torch.Tensor, lengths: torch.Tensor) -> "MemoryState":
        """The memory of `(B, T, visual_dim)` features whose row b holds `lengths[b]` tokens (class docstring).

        What lies past a row's tokens is replaced by zeros before the projector, so no value there (huge, inf, NaN)
        can reach the memory or its gradient; the empty slots are set with `where`, exact zeros and no gradient."""
        weight = self.projector[0].weight
        image_features = cast_checked(image_features.to(weight.device), weight.dtype, "image_features")
        lengths = lengths.to(weight.device)
        positions = torch.arange(image_features.shape[1], device=lengths.device)
        tokens = (positions < lengths[:, None])[..., None]  # (B, T, 1)
        features = torch.where(tokens, image_features, 0.0)
        projected = self.projector(features) * self.visual_scale
        projected = projected * tokens.to(projected.dtype)  # a row's own tokens only, as image_mask does per token
        padded = F.pad(projected, (0, 0, 0, self.num_slots - projected.shape[1]))
        slots = torch.arange(self.num_slots, device=lengths.device) < lengths[:, None]
        slots = slots | (lengths == 0)[:, None]  # a row without image reads the learned memory in every slot
        filled = slots[..., None]
        return MemoryState(torch.where(filled, padded + self.key_pos, 0.0),
                           torch.where(filled, padded + self.value_pos, 0.0), slots=slots)


    def project_cls(self, cls_features: torch.Tensor) -> torch.Tensor:
        """(B, D_v) CLS features -> (B, 1, d) input embeddings: ADEM-VL's `adapter_proj_cls`, neither scaled by
        lambda nor masked (rows without an image get no CLS token at all)."""
        weight = self.cls_projector[0].weight
        features = cast_checked(cls_features, weight.dtype, "the encoder's CLS feature")
        return self.cls_projector(features)[:, None, :]


class _MemoryStateFields(NamedTuple):
    keys: torch.Tensor
    values: torch.Tensor
    cache: dict
    slots: Optional[torch.Tensor]


class MemoryState(_MemoryStateFields):
    """Keys and values of one forward: `(B, n, d)` with images, `(n, d)` for the shared text-only memory.

    Layers ask for `for_input(batch, dtype)`: the memory is cast to the compute dtype and, when generation has
    expanded the batch (beam search, `num_return_sequences`), repeated per sample exactly like HF expands its inputs
    (`repeat_interleave`). Both are cached, so twenty layers pay for them once.

    `slots` is the `(B, n)` bool slot mask of rows of different lengths (`VisualMemory` with `lengths`): False marks
    an empty slot, whose keys and values are zero, so its read `act(x·0)·0` is exactly zero whatever the read. The
    reads that rank a row's scores (ADEM-VL's drop) ask for it (`slots_for_input`, expanded like the keys) to rank
    the row's own slots only. None in the fixed form, where every slot is read.

    Why a tuple: `VisualMemory.forward` returns this value, and DeepSpeed ZeRO-3 only registers backward hooks (which
    re-gather the partitioned projector and p_k/p_v before their gradients arrive) on tensors it can find in a module's
    output, i.e. inside tuples, lists and dicts. A dataclass hides them and the backward then reads 0-element
    parameters.
    """

    __slots__ = ()

    def __new__(cls, keys: torch.Tensor, values: torch.Tensor, cache: Optional[dict] = None,
                slots: Optional[torch.Tensor] = None) -> "MemoryState":
        return super().__new__(cls, keys, values, {} if cache is None else cache, slots)

    @property
    def batch_size(self) -> Optional[int]:
        return self.keys.shape[0] if self.keys.dim() == 3 else None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values

    def for_input(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch_size, dtype, device)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        keys, values = self._expanded(self.keys, batch_size), self._expanded(self.values, batch_size)
        keys = keys.to(device=device, dtype=dtype)
        values = values.to(device=device, dtype=dtype)
        self.cache[key] = (keys, values)
        return keys, values

    def slots_for_input(self, batch_size: int, device: torch.device) -> Optional[torch.Tensor]:
        """The slot mask for a layer's batch (repeated per sample like the keys), or None in the fixed form."""
        if self.slots is None:
            return None
        key = ("slots", batch_size, device)
        cached = self.cache.get(key)
        if cached is None:
            cached = self.cache[key] = self._expanded(self.slots, batch_size).to(device=device)
        return cached

    def _expanded(self, tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
        """`tensor` (this state's batch first) for a layer's batch: HF grows the batch of a `generate()` by a whole
        factor, every sample repeated in place (`repeat_interleave`)."""
        own = self.batch_size
        if own is None or own == batch_size:
            return tensor
        if batch_size % own != 0:
            raise ValueError(
                f"MemVP: the visual memory was computed for a batch of {own} samples but a layer received a batch "
                f"of {batch_size}; the batch can only grow by a whole factor (beam search, num_return_sequences)."
            )
        return tensor.repeat_interleave(batch_size // own, dim=0)
