"""The MemVP tuner layers: where the visual memory is read inside each FFN block, and how (the reads).

Two shapes of FFN exist in the wild, and the paper's formula maps onto both exactly:

* `FFNMemoryLayer` wraps a whole FFN module (GLU FFNs such as LLaMA's SwiGLU, or any FFN given by name):
  `out = FFN(x) + s * Dropout(act(x K^T)) V` -- the visual branch has no gate.
* `KeyMemoryLayer` + `ValueMemoryLayer` wrap the two linears of a plain FFN (GPT-2's `c_fc/c_proj`, OPT's
  `fc1/fc2`): the key layer appends `x K^T` to the output of W1, the FFN's own activation runs over both, and the
  value layer splits the memory activations off and reads `s * Dropout(.) V`. This is literally "K appended to W1,
  V appended to W2".

How an adapter reads the memory is an object, `MemoryRead`, picked once per adapter and layer when `update_layer`
builds it (`resolve_read`, like peft's LoRA variants) and called by the forward without asking which it is:

* `MemVPRead` (the default, MEMVP_SPEC step 6): the scores are `act(x K^T)`, `act` being the FFN's own activation.
* `IdentityRead` (`MemVPConfig(memory_activation="identity")`): MemVP's read with no activation, `x K^T` as the
  scores -- the read becomes linear in x (the ablation of the activation). Only `FFNMemoryLayer` can read it: in a
  plain FFN the FFN's own activation runs over the keys' scores between W1 and W2.
* `AdemRead` (`MemVPConfig(memory_read="adem")`): ADEM-VL (Hao et al. 2024, arXiv 2410.17779, "adaptive and
  embedded fusion") puts the same projected image into the same place -- a memory read in parallel to every FFN --
  but reads it as a linear-attention-like product of two SiLU feature maps, `silu(x) silu(K)^T`. It needs the FFN's
  input, so only `FFNMemoryLayer` can read it; `silu(K)` is computed once per call and cached with the keys.
* ADEM-VL's drop (`drop_ratio`, both reads, both FFN shapes): each token's lowest `floor(drop_ratio * n)` scores are
  set to zero before the product with `V`, so each text token keeps only the visual slots it responds to most. The
  authors' code uses `drop_ratio = 0.1` and applies no dropout to the scores.

**Observing the reads.** A reading layer hands the scores it keeps (after the read and the drop, before the
dropout) to its `memvp_observer` when one is set -- `memvp_peft.explain.record_reads` records them, `exclude_slots`
zeroes chosen slots -- and otherwise pays one None check: a class-level None, set on instances only inside those
context managers.

**Rows of different lengths.** A memory built from rows of different numbers of visual tokens
(`visual_inputs.VisualTokens`) has empty slots: keys and values exactly zero (`memory.VisualMemory`), so whatever a
read scores there, `score * 0` adds exactly nothing -- no read needs to mask anything for that. Only the drop looks
at the scores themselves: it ranks each row's own slots (`n` = the row's slot count, from the state's slot mask), so a
row reads in a padded batch exactly as it reads alone.

Both reads share the keys and values of `VisualMemory` (`K = lambda * f(z) + p_k`, `V = lambda * f(z) + p_v`).

The layers own no parameters: keys and values come from the active call of the shared `MemoryRuntime` (one memory
per forward or generate() call, shared by all layers). The memory depends on the image, so nothing can
be merged into the base weights.

The read is on every layer's hot path, each decode step included, so it is two GEMMs and nothing around them that
can be folded in: `bmm` straight on the batched (B, n, d) memory (no `matmul` broadcasting logic), the scale `s` and
the residual add riding on the second product (`baddbmm(result, h, V, alpha=s)`: one kernel instead of a product,
a multiply and an add), and the dropout module skipped in eval, where it is the identity. Nothing here reads a value
on the host (the drop's threshold is a `kthvalue` on the device): the hot path never synchronises with an
accelerator (tests/tuner/test_host_syncs.py).
"""

from __future__ import annotations

import abc
import functools
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .memory import MemoryState

MERGE_ERROR = (
    "MemVP cannot be merged into the base weights: its keys and values are computed from each input's image, so "
    "there is no static weight delta. Keep the PeftModel for inference, or call `unload()` to get the untouched base "
    "model back."
)


#: up to this many tokens per sample (a decode step has 1), a CPU read computes `x K^T` as `(K x^T)^T`
FEW_TOKENS = 4


class MemorySource(Protocol):
    """What a layer asks of the tuner's shared `MemoryRuntime`: an adapter's memory for the running call, and the
    running batch size. Named here rather than imported: the config validates `memory_read` against this module's
    `MEMORY_READS`, so this module stays below everything that builds a call's memory."""

    def state_for(self, adapter_name: str) -> MemoryState: ...

    def batch_size(self) -> Optional[int]: ...


# ------------------------------------------------------------------------------------------------- the products


def memory_scores(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """`x K^T`: one `bmm` when both are batched (B, ., d) -- a call's memory, already expanded to x's batch by
    `MemoryState.for_input` -- else `matmul`, which broadcasts the shared text-only memory (n, d) over the batch.

    A decode step reads the whole (B, n, d) memory for one token per sample: a batched GEMV, bound by the bytes of
    K. On CPU, `bmm(x, K^T)` with a one-row `x` streams K at about half the speed of the same product with K on the
    left, `bmm(K, x^T)`, whose rows are contiguous dot products (measured: 271 vs 126 us for B=4, n=320, d=512, cold
    cache; equal from 16 tokens on). Same values up to float rounding."""
    if x.dim() == 3 and keys.dim() == 3:
        if x.shape[1] <= FEW_TOKENS and x.device.type == "cpu":
            return torch.bmm(keys, x.transpose(1, 2)).transpose(1, 2)
        return torch.bmm(x, keys.transpose(1, 2))
    return torch.matmul(x, keys.transpose(-1, -2))


def add_memory_read(result: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """`result + scale * (scores V)`, reshaped to `result`'s shape: fused into one `baddbmm` (batched memory) or
    `addmm` (shared memory) when the dtypes agree; otherwise (e.g. under autocast, where the base's output dtype
    differs) the plain product, scaled, cast to `result`'s dtype and added."""
    batch, tokens = scores.shape[0], scores.shape[1] if scores.dim() == 3 else 1
    fusable = (scores.dim() == 3 and result.dtype == scores.dtype == values.dtype
               and result.numel() == batch * tokens * values.shape[-1])
    if not fusable:
        read = torch.matmul(scores, values) * scale
        return result + read.reshape(result.shape).to(result.dtype)
    out = result.reshape(batch, tokens, values.shape[-1])
    if values.dim() == 3:
        fused = torch.baddbmm(out, scores, values, alpha=scale)
    else:
        fused = torch.addmm(out.reshape(batch * tokens, -1), scores.reshape(batch * tokens, -1), values, alpha=scale)
    return fused.reshape(result.shape)


def dropped_count(num_slots: int, drop_ratio: float) -> int:
    """How many of a token's `num_slots` scores the drop zeroes: `floor(drop_ratio * num_slots)`, as ADEM-VL takes
    the score at that index of the ascending sort as the threshold (everything strictly below it is dropped)."""
    return int(drop_ratio * num_slots)


def drop_lowest_scores(scores: torch.Tensor, drop_ratio: float, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`scores` (..., n) with each row's `floor(drop_ratio * n)` lowest values set to zero (ADEM-VL's drop).

    Why `kthvalue` and a comparison, not a sort: the threshold is the k-th smallest score of the row (k = the number
    dropped, 0-based), one selection instead of a full sort, and scores equal to the threshold are kept, exactly like
    the authors' `x < threshold` mask. The mask is not differentiated: gradients reach the kept scores only.

    With a `(B, n)` slot mask (`MemoryState.slots`, scores `(B, T, n)`), each sample's `n` is its own slot count and
    only its own slots are ranked (`drop_lowest_scores_of_slots`).
    """
    dropped = dropped_count(scores.shape[-1], drop_ratio)
    if dropped == 0:
        return scores
    if slots is not None:
        return drop_lowest_scores_of_slots(scores, drop_ratio, slots)
    threshold = scores.kthvalue(dropped + 1, dim=-1, keepdim=True).values
    return scores * (scores >= threshold).to(scores.dtype)


def drop_lowest_scores_of_slots(scores: torch.Tensor, drop_ratio: float, slots: torch.Tensor) -> torch.Tensor:
    """ADEM-VL's drop over each sample's own slots: `scores` (B, T, n), `slots` (B, n) bool. A sample with `c` slots
    drops `floor(drop_ratio * c)` of its scores, ranked among its own slots, exactly as `drop_lowest_scores` does for
    a memory of those `c` slots alone; its empty slots are zero (they read nothing either way).

    The number dropped differs per sample, so the threshold is read from a sort (empty slots last, as +inf) at each
    sample's own index rather than from one `kthvalue`; the count is `floor` in float64 (float32 where the device
    has no float64), like `int(drop_ratio * c)` on the host, and nothing is read back to the host."""
    own = slots[:, None, :]
    count = own.sum(dim=-1, keepdim=True)  # (B, 1, 1)
    exact = torch.float32 if scores.device.type == "mps" else torch.float64
    dropped = torch.floor(count.to(exact) * drop_ratio).long()
    ordered = scores.masked_fill(~own, float("inf")).sort(dim=-1).values
    threshold = ordered.gather(-1, dropped.expand(*scores.shape[:-1], 1))
    return scores * ((scores >= threshold) & own).to(scores.dtype)


def keep_all_scores(scores: torch.Tensor, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
    """No drop: every score is read with V (an empty slot's V is zero: `slots` is not needed)."""
    return scores


class ReadObserver(Protocol):
    """What a layer's `memvp_observer` is: called once per active adapter and forward of a reading layer
    (`FFNMemoryLayer`, `ValueMemoryLayer`) with the layer, the adapter, the kept scores `a` (B, T, n) and the values
    V it reads them with ((B, n, d), or the shared (n, d)); returns the scores to read V with -- the same tensor to
    observe, another (same shape) to intervene, e.g. to exclude slots from the read."""

    def __call__(self, layer: "MemVPLayer", adapter_name: str, scores: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------- the reads


class MemoryRead(abc.ABC):
    """How one adapter reads the memory in one layer: the scores of the FFN input against the keys (`scores`, only
    asked of an `FFNMemoryLayer`; a plain FFN's own W1 and activation make them) and the scores kept for the product
    with V (`select(scores, slots=...)`: ADEM-VL's drop when `drop_ratio` > 0, else all of them, decided here once;
    `slots` is the memory's slot mask, None in the fixed form)."""

    def __init__(self, drop_ratio: float = 0.0) -> None:
        self.drop_ratio = drop_ratio
        self.select: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor] = (
            functools.partial(drop_lowest_scores, drop_ratio=drop_ratio) if drop_ratio else keep_all_scores
        )

    def check_layer(self, layer: "MemVPLayer") -> None:
        """Refuse a layer this read cannot run in; by default every layer kind can run it."""

    @abc.abstractmethod
    def scores(self, layer: "FFNMemoryLayer", adapter_name: str, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The scores of `x` (B, T, d), the FFN's input, against `keys` (this adapter's, from `_memories`)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(drop_ratio={self.drop_ratio})"


class MemVPRead(MemoryRead):
    """MemVP's read (MEMVP_SPEC step 6): `act(x K^T)`, `act` being the FFN's own activation."""

    def scores(self, layer: "FFNMemoryLayer", adapter_name: str, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return layer.memvp_activation[adapter_name](memory_scores(x, keys))


def check_whole_ffn(layer: "MemVPLayer", read: str, fix: str) -> None:
    """Refuse a plain FFN's linear for a read that needs the FFN's input next to the whole FFN (`read` names it,
    `fix` says what to do instead)."""
    if not isinstance(layer, FFNMemoryLayer):
        raise ValueError(
            f"MemVP: {read} next to the FFN, which needs the whole FFN wrapped (GLU FFNs: Llama, Mistral, Qwen, Gemma, "
            f"Phi-3, gated T5); {type(layer.base_layer).__name__} is one linear of a plain FFN, whose own activation "
            f"would run over the memory scores. {fix}"
        )


class IdentityRead(MemoryRead):
    """MemVP's read without an activation (`memory_activation="identity"`): the scores are `x K^T` as they are."""

    def check_layer(self, layer: "MemVPLayer") -> None:
        check_whole_ffn(layer, "memory_activation='identity' reads (x K^T) V", "Use memory_activation='ffn', or name "
                        "the whole FFN modules in target_modules (with activation=...).")

    def scores(self, layer: "FFNMemoryLayer", adapter_name: str, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return memory_scores(x, keys)


class AdemRead(MemoryRead):
    """ADEM-VL's read `silu(x) silu(K)^T`, next to the whole FFN (see the module docstring)."""

    def check_layer(self, layer: "MemVPLayer") -> None:
        check_whole_ffn(layer, "memory_read='adem' reads silu(x) silu(K)^T", "Use memory_read='memvp', or name the "
                        "whole FFN modules in target_modules (with activation=...).")

    def scores(self, layer: "FFNMemoryLayer", adapter_name: str, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`silu(x) silu(K)^T` for x (B, T, d) and `silu(K)` (B, n, d) or the shared (n, d)."""
        activated_keys = self.activated_keys(layer._memvp_runtime.state_for(adapter_name), x)
        x = F.silu(x)
        if x.dim() == 3 and activated_keys.dim() == 3:
            return torch.bmm(x, activated_keys.transpose(1, 2))
        return torch.matmul(x, activated_keys.transpose(-1, -2))

    @staticmethod
    def activated_keys(state: MemoryState, x: torch.Tensor) -> torch.Tensor:
        """`silu(K)` of the keys `state.for_input` gives for `x`, cached in the state beside them: computed once per
        call and compute dtype, not once per layer and decode step."""
        batch_size, dtype, device = x.shape[0], x.dtype, x.device
        key = ("silu", batch_size, dtype, device)
        cached = state.cache.get(key)
        if cached is None:
            cached = state.cache[key] = F.silu(state.for_input(batch_size, dtype, device)[0])
        return cached


#: `MemVPConfig.memory_read` -> its read: the paper's, and ADEM-VL's
READS: dict[str, type[MemoryRead]] = {"memvp": MemVPRead, "adem": AdemRead}
#: `MemVPConfig.memory_read` values
MEMORY_READS = tuple(READS)
#: `MemVPConfig.memory_activation` -> MemVP's read with that activation of the scores: the FFN's own (the paper) or
#: none (the config allows 'identity' only with memory_read='memvp')
ACTIVATED_READS: dict[str, type[MemoryRead]] = {"ffn": MemVPRead, "identity": IdentityRead}
#: `MemVPConfig.memory_activation` values
MEMORY_ACTIVATIONS = tuple(ACTIVATED_READS)


def resolve_read(config: Any) -> MemoryRead:
    """The read a `MemVPConfig` asks for (`memory_read`, `memory_activation`, `drop_ratio`)."""
    drop_ratio = float(getattr(config, "drop_ratio", 0.0))
    if getattr(config, "memory_read", "memvp") == "memvp":
        return ACTIVATED_READS[getattr(config, "memory_activation", "ffn")](drop_ratio)
    return READS[config.memory_read](drop_ratio)


# --------------------------------------------------------------------------------------------------- the layers


class MemVPLayer(nn.Module, BaseTunerLayer):
    """Common bookkeeping of the three MemVP layer kinds (adapter registry, read, dropout, scale, merge refusal)."""

    adapter_layer_names = ("memvp_dropout",)
    other_param_names = ("memvp_scale", "memvp_num_slots", "memvp_read")

    #: An optional `ReadObserver` (`memvp_peft.explain`): called with the scores each read keeps, after the read's
    #: activation (and ADEM-VL's drop) and before the dropout, and returning the scores to read V with. A class-level
    #: None, so "off" is one attribute lookup and one None check on the hot path; `explain.record_reads` sets it on
    #: the instances it observes and deletes it again on exit.
    memvp_observer: Optional["ReadObserver"] = None

    def __init__(self, base_layer: nn.Module, runtime: MemorySource) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.memvp_dropout = nn.ModuleDict({})
        self.memvp_scale: dict[str, float] = {}
        self.memvp_num_slots: dict[str, int] = {}
        self.memvp_read: dict[str, MemoryRead] = {}
        self._memvp_runtime = runtime
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: Any, activation: Optional[Callable] = None) -> None:
        read = resolve_read(config)
        read.check_layer(self)
        self.memvp_read[adapter_name] = read
        self.memvp_dropout[adapter_name] = (
            nn.Dropout(p=config.memory_dropout) if config.memory_dropout > 0 else nn.Identity()
        )
        self.memvp_scale[adapter_name] = float(config.memory_scale)
        self.memvp_num_slots[adapter_name] = int(config.num_memory_slots)
        self.set_adapter(self.active_adapters)

    def _memories(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """(adapter, keys, values, slot mask) for every active adapter of this layer, cast to `x`'s dtype and batch
        (the slot mask, `MemoryState.slots`, is None in the fixed form).

        `x` must be batched as `(B, T, ...)`; see `_batched` for FFNs that flatten the tokens. Callers check
        `disable_adapters` first (a disabled layer must not require the running batch size).
        """
        found = []
        for name in self.active_adapters:
            if name not in self.memvp_scale:
                continue
            state = self._memvp_runtime.state_for(name)
            keys, values = state.for_input(x.shape[0], x.dtype, x.device)
            found.append((name, keys, values, state.slots_for_input(x.shape[0], x.device)))
        return found

    def _batched(self, x: torch.Tensor) -> torch.Tensor:
        """View `x` as `(B, T, width)`: OPT flattens the tokens of all samples to `(B*T, width)` before its FFN."""
        if x.dim() >= 3:
            return x
        batch = self._memvp_runtime.batch_size()
        if batch is None or x.shape[0] % batch != 0:
            raise RuntimeError(
                f"MemVP: the FFN received a flattened input of shape {tuple(x.shape)} but the batch size of the running "
                f"forward is unknown ({batch}); call the model through the PeftModel (forward/generate)."
            )
        return x.reshape(batch, -1, x.shape[-1])

    def _dropout(self, adapter_name: str, scores: torch.Tensor) -> torch.Tensor:
        """The memory dropout of `adapter_name`; in eval (the identity) the module call is skipped altogether."""
        dropout = self.memvp_dropout[adapter_name]
        return dropout(scores) if dropout.training else scores

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        return None

    def __repr__(self) -> str:
        return "memvp." + super().__repr__()


class FFNMemoryLayer(MemVPLayer):
    """A whole FFN module plus the visual memory branch `s * Dropout(act(x K^T)) V` (no gate; the scores are the
    adapter's read's: `act(x K^T)` or ADEM-VL's `silu(x) silu(K)^T`)."""

    other_param_names = MemVPLayer.other_param_names + ("memvp_activation",)

    def __init__(self, base_layer: nn.Module, runtime: MemorySource) -> None:
        super().__init__(base_layer, runtime)
        self.memvp_activation: dict[str, Callable] = {}

    def update_layer(self, adapter_name: str, config: Any, activation: Optional[Callable] = None) -> None:
        if activation is None:
            raise ValueError("FFNMemoryLayer needs the FFN's activation function.")
        self.memvp_activation[adapter_name] = activation
        super().update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        xb = self._batched(x)
        for name, keys, values, slots in self._memories(xb):
            read = self.memvp_read[name]
            scores = read.select(read.scores(self, name, xb, keys), slots=slots)
            if self.memvp_observer is not None:
                scores = self.memvp_observer(self, name, scores, values)
            result = add_memory_read(result, self._dropout(name, scores), values, self.memvp_scale[name])
        return result


class KeyMemoryLayer(MemVPLayer):
    """W1 of a plain FFN with the memory keys appended: returns `[x W1^T + b, x K_1^T, x K_2^T, ...]`."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        xb = self._batched(x)
        scores = [
            memory_scores(xb, keys).reshape(*result.shape[:-1], -1).to(result.dtype)
            for _, keys, _, _ in self._memories(xb)
        ]
        if not scores:
            return result
        return torch.cat([result, *scores], dim=-1)


class ValueMemoryLayer(MemVPLayer):
    """W2 of a plain FFN with the memory values appended: splits off the memory activations and reads them."""

    def __init__(self, base_layer: nn.Module, runtime: MemorySource) -> None:
        super().__init__(base_layer, runtime)
        in_features = getattr(base_layer, "in_features", None) or getattr(base_layer, "nx", None)
        if in_features is None:
            raise ValueError(f"Cannot read the input width of {type(base_layer).__name__} for MemVP.")
        self.in_features = int(in_features)

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        memories = self._memories(self._batched(h)) if not self.disable_adapters else []
        expected = self.in_features + sum(self.memvp_num_slots[name] for name, _, _, _ in memories)
        if h.shape[-1] != expected:
            raise RuntimeError(
                f"MemVP value layer expected {expected} input features (FFN width {self.in_features} + memory slots), "
                f"got {h.shape[-1]}: the matching key layer (W1 of the same FFN) must be wrapped and active too."
            )
        result = self.base_layer(h[..., : self.in_features], *args, **kwargs)
        offset = self.in_features
        for name, _, values, slots in memories:
            scores = self._batched(h[..., offset : offset + self.memvp_num_slots[name]])
            offset += self.memvp_num_slots[name]
            scores = self.memvp_read[name].select(scores, slots=slots)
            if self.memvp_observer is not None:
                scores = self.memvp_observer(self, name, scores, values)
            scores = self._dropout(name, scores).to(values.dtype)
            result = add_memory_read(result, scores, values, self.memvp_scale[name])
        return result
