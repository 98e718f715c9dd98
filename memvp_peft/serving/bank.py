"""The per-request memory of a served MemVP adapter: a fixed bank of keys and values, one slot per running request.

vLLM flattens the scheduled tokens of all running requests into one batch, and each request reads its own memory
(`K = lambda * pad_n(f(z)) + p_k`, `V = lambda * pad_n(f(z)) + p_v`, MEMVP_SPEC steps 1-5) at every prefill chunk and
decode step. Projecting a request's image once and keeping the result is what makes a decode step cost a gather:
the bank is `(max_num_seqs + 1, n, d)` for K and for V, allocated once (static shapes, no allocation per step).

* Slot 0 holds the text-only memory (`p_k`, `p_v`, step 7): every request without an image reads it.
* A request with an image gets a slot the first time it is scheduled, filled from its own features -- which vLLM's
  runner keeps in the request's `mm_features` for the request's whole life, so a request preempted and recomputed,
  or one whose first step a prefix-cache hit skipped, still finds its image.
* A full bank evicts only requests outside the current batch (preempted or waiting ones); they are filled again from
  their features when they return. A batch never holds more than `max_num_seqs` requests, so a slot is always found.
* The runner's request-removal hook frees a finished request's slot.

Tensor parallelism shards the memory slots the way vLLM shards an FFN's intermediate neurons (`SlotShard`): the read
`s * act(x K^T) V` is an FFN whose first matrix is K and second is V, with an elementwise activation, so each of `tp`
ranks holds `ceil(n / tp)` slots of every K and V (and of `p_k`, `p_v`), projects only the visual tokens that land on
them, and its partial read sums exactly with the others' -- in the all-reduce of `down_proj`'s partial sums
(`model.py`). When `tp` does not divide `n`, the last rank's extra slots are padding with K = V = 0: their read
`act(x 0^T) 0` is exactly zero for any activation.

The keys and values are computed exactly as `tuner.memory.VisualMemory` computes them (the projector in float32,
`* lambda`, zero-padded to n slots, `+ p_k` / `+ p_v`), then cast to the model's dtype, as the HF layers cast them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import ServingAdapter

#: the name under which the bank's parameters are loaded (not a base weight: `load_weights` fills them from the adapter)
PREFIX = "memvp_bank"


class SlotShard(NamedTuple):
    """Which of the memory's `n` slots one tensor-parallel rank holds: `[start, start + size)` of `ceil(n / tp)`."""

    rank: int
    world_size: int

    def size(self, num_slots: int) -> int:
        """Slots per rank (the last rank's beyond `num_slots` are zero padding)."""
        return -(-num_slots // self.world_size)

    def start(self, num_slots: int) -> int:
        """The first slot this rank holds."""
        return self.rank * self.size(num_slots)

    def rows(self, tensor: torch.Tensor, num_slots: int) -> torch.Tensor:
        """This rank's rows of a `(rows <= num_slots, d)` tensor, zero-padded to `size(num_slots)` rows."""
        start, size = self.start(num_slots), self.size(num_slots)
        own = tensor[start:start + size]
        return F.pad(own, (0, 0, 0, size - own.shape[0]))


#: one device, all slots
WHOLE = SlotShard(0, 1)


class MemoryBank(nn.Module):
    """Projector, position embeddings and the `(slots, n, d)` keys/values of the running requests (module docstring).

    `slots_for(req_ids, features_of)` is the one entry of the runner hook: the bank slot of each request of a batch,
    filling the slots of requests seen for the first time (or evicted since)."""

    def __init__(self, adapter: ServingAdapter, max_num_seqs: int, dtype: torch.dtype,
                 device: Optional[torch.device] = None, shard: SlotShard = WHOLE) -> None:
        super().__init__()
        if not 0 <= shard.rank < shard.world_size:
            raise ValueError(f"MemVP: tensor-parallel rank {shard.rank} of {shard.world_size} ranks.")
        self.visual_dim = adapter.visual_dim
        self.num_slots = adapter.num_slots
        self.shard = shard
        self.local_slots = shard.size(adapter.num_slots)
        self.visual_scale = adapter.visual_scale
        hidden = adapter.tensors["projector.0.weight"].shape[0]
        self.projector = nn.Sequential(nn.Linear(adapter.visual_dim, hidden), nn.SiLU(),
                                       nn.Linear(hidden, adapter.model_dim)).to(device=device, dtype=torch.float32)
        self.key_pos = nn.Parameter(torch.zeros(self.local_slots, adapter.model_dim, device=device),
                                    requires_grad=False)
        self.value_pos = nn.Parameter(torch.zeros(self.local_slots, adapter.model_dim, device=device),
                                      requires_grad=False)
        self.projector.requires_grad_(False)
        shape = (max_num_seqs + 1, self.local_slots, adapter.model_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self._slot_of: dict[str, int] = {}
        self._free = list(range(max_num_seqs, 0, -1))  # popped from the end: slot 1 first

    def load_adapter(self, adapter: ServingAdapter) -> set[str]:
        """Copy the adapter's tensors in (of `p_k`, `p_v` this rank's slots) and write the text-only memory into slot
        0; the loaded parameter names."""
        own = {"projector.0.weight": self.projector[0].weight, "projector.0.bias": self.projector[0].bias,
               "projector.2.weight": self.projector[2].weight, "projector.2.bias": self.projector[2].bias,
               "key_pos": self.key_pos, "value_pos": self.value_pos}
        with torch.no_grad():
            for name, parameter in own.items():
                tensor = adapter.tensors[name].to(torch.float32)
                if name in ("key_pos", "value_pos"):
                    tensor = self.shard.rows(tensor, self.num_slots)
                parameter.copy_(tensor)
            self.keys[0].copy_(self.key_pos)
            self.values[0].copy_(self.value_pos)
        return {f"{PREFIX}.{name}" for name in own}

    @property
    def capacity(self) -> int:
        """How many requests with images the bank holds at once (`max_num_seqs`)."""
        return self.keys.shape[0] - 1

    def slot_of(self, req_id: str) -> Optional[int]:
        """The slot the request holds now (None: none, or text-only)."""
        return self._slot_of.get(req_id)

    def slots_for(self, req_ids: Sequence[str],
                  features_of: Callable[[str], Optional[torch.Tensor]]) -> list[int]:
        """The slot of each request of a batch, in order: 0 for a request without image features, else its own slot,
        filled now from `features_of(req_id)` if it holds none (requests outside `req_ids` are evicted if needed)."""
        if len(req_ids) > self.capacity:
            raise RuntimeError(f"MemVP: a batch of {len(req_ids)} requests, but the bank holds {self.capacity} "
                               "(max_num_seqs): the engine's batch exceeded its own limit.")
        batch = set(req_ids)
        slots = []
        for req_id in req_ids:
            slot = self._slot_of.get(req_id)
            if slot is None:
                features = features_of(req_id)
                if features is None:
                    slots.append(0)
                    continue
                slot = self._take_slot(batch)
                self._fill(slot, features)
                self._slot_of[req_id] = slot
            slots.append(slot)
        return slots

    def free(self, req_id: str) -> None:
        """The request finished: its slot goes back to the pool (nothing to do for a request holding none)."""
        slot = self._slot_of.pop(req_id, None)
        if slot is not None:
            self._free.append(slot)

    def _take_slot(self, batch: set) -> int:
        if not self._free:
            outside = next((req for req in self._slot_of if req not in batch), None)
            if outside is None:  # unreachable while batches respect max_num_seqs (checked in slots_for)
                raise RuntimeError("MemVP: every bank slot is held by a request of the running batch.")
            self.free(outside)
        return self._free.pop()

    @torch.no_grad()
    def memory_of(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(K, V)` of one request, of this rank's slots (`(n, d)` on one device) in float32, from its
        `(tokens, visual_dim)` features: token i fills slot i, so a rank projects only the tokens of its slots."""
        weight = self.projector[0].weight
        start = self.shard.start(self.num_slots)
        own = features.to(device=weight.device, dtype=weight.dtype)[start:start + self.local_slots]
        projected = self.projector(own[None]) * self.visual_scale  # (1, tokens on this rank, d); may be 0 tokens
        padded = F.pad(projected, (0, 0, 0, self.local_slots - own.shape[0]))[0]
        return padded + self.key_pos, padded + self.value_pos

    def _fill(self, slot: int, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[-1] != self.visual_dim or not 0 < features.shape[0] <= self.num_slots:
            raise RuntimeError(f"MemVP: a request's features have shape {tuple(features.shape)}; the front end admits "
                               f"(1..{self.num_slots}, {self.visual_dim}) only.")
        keys, values = self.memory_of(features)
        self.keys[slot].copy_(keys)
        self.values[slot].copy_(values)
