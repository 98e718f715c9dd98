"""The MemVP tuner layers: where the visual memory is read inside each FFN block.

Two shapes of FFN exist in the wild, and the paper's formula maps onto both exactly:

* `FFNMemoryLayer` wraps a whole FFN module (GLU FFNs such as LLaMA's SwiGLU, or any FFN given by name):
  `out = FFN(x) + s * Dropout(act(x K^T)) V` -- the visual branch has no gate.
* `KeyMemoryLayer` + `ValueMemoryLayer` wrap the two linears of a plain FFN (GPT-2's `c_fc/c_proj`, OPT's
  `fc1/fc2`): the key layer appends `x K^T` to the output of W1, the FFN's own activation runs over both, and the
  value layer splits the memory activations off and reads `s * Dropout(.) V`. This is literally "K appended to W1,
  V appended to W2".

`MemVPConfig(memory_read="adem", drop_ratio=...)` swaps the read for ADEM-VL's `silu(x) silu(K)^T` and zeroes each
token's lowest scores before `V` (`read_forms.py`); the first needs the whole FFN (`FFNMemoryLayer`), the drop works
in both shapes. The default is exactly the paper's read.

The layers own no parameters: keys and values come from the active call of the shared `MemoryRuntime` (one memory
per forward or generate() call, shared by all layers; see scope.py). The memory depends on the image, so nothing can be merged into the base weights.

The read is on every layer's hot path, each decode step included, so it is two GEMMs and nothing around them that
can be folded in: `bmm` straight on the batched (B, n, d) memory (no `matmul` broadcasting logic), the scale `s` and
the residual add riding on the second product (`baddbmm(result, h, V, alpha=s)`: one kernel instead of a product,
a multiply and an add), and the dropout module skipped in eval, where it is the identity. Nothing here reads a value
on the host: the hot path never synchronises with an accelerator (tests/tuner/test_host_syncs.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .read_forms import adem_scores, drop_lowest_scores
from .runtime import MemoryRuntime

MERGE_ERROR = (
    "MemVP cannot be merged into the base weights: its keys and values are computed from each input's image, so "
    "there is no static weight delta. Keep the PeftModel for inference, or call `unload()` to get the untouched base "
    "model back."
)


#: up to this many tokens per sample (a decode step has 1), a CPU read computes `x K^T` as `(K x^T)^T`
FEW_TOKENS = 4


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


class MemVPLayer(nn.Module, BaseTunerLayer):
    """Common bookkeeping of the three MemVP layer kinds (adapter registry, dropout, scale, merge refusal)."""

    adapter_layer_names = ("memvp_dropout",)
    other_param_names = ("memvp_scale", "memvp_num_slots", "memvp_read")
    #: whether the layer sees the FFN input x and adds the whole read itself (ADEM-VL's read needs that)
    reads_whole_ffn = False

    def __init__(self, base_layer: nn.Module, runtime: MemoryRuntime) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.memvp_dropout = nn.ModuleDict({})
        self.memvp_scale: dict[str, float] = {}
        self.memvp_num_slots: dict[str, int] = {}
        self.memvp_read: dict[str, tuple[str, float]] = {}  # adapter -> (memory_read, drop_ratio): read_forms.py
        self._memvp_runtime = runtime
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: Any, activation: Optional[Callable] = None) -> None:
        read = getattr(config, "memory_read", "memvp")
        if read == "adem" and not self.reads_whole_ffn:
            raise ValueError(
                "MemVP: memory_read='adem' reads silu(x) silu(K)^T next to the FFN, which needs the whole FFN wrapped "
                f"(GLU FFNs: Llama, Mistral, Qwen, Gemma, Phi-3, gated T5); {type(self.base_layer).__name__} is one "
                "linear of a plain FFN, whose own activation would run over the memory scores. Use "
                "memory_read='memvp', or name the whole FFN modules in target_modules (with activation=...)."
            )
        self.memvp_read[adapter_name] = (read, float(getattr(config, "drop_ratio", 0.0)))
        self.memvp_dropout[adapter_name] = (
            nn.Dropout(p=config.memory_dropout) if config.memory_dropout > 0 else nn.Identity()
        )
        self.memvp_scale[adapter_name] = float(config.memory_scale)
        self.memvp_num_slots[adapter_name] = int(config.num_memory_slots)
        self.set_adapter(self.active_adapters)

    def _memories(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(adapter, keys, values) for every active adapter of this layer, cast to `x`'s dtype and batch.

        `x` must be batched as `(B, T, ...)`; see `_batched` for FFNs that flatten the tokens. Callers check
        `disable_adapters` first (a disabled layer must not require the running batch size).
        """
        found = []
        for name in self.active_adapters:
            if name not in self.memvp_scale:
                continue
            keys, values = self._memvp_runtime.state_for(name).for_input(x.shape[0], x.dtype, x.device)
            found.append((name, keys, values))
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
    """A whole FFN module plus the visual memory branch `s * Dropout(act(x K^T)) V` (no gate)."""

    other_param_names = MemVPLayer.other_param_names + ("memvp_activation",)
    reads_whole_ffn = True

    def __init__(self, base_layer: nn.Module, runtime: MemoryRuntime) -> None:
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
        for name, keys, values in self._memories(xb):
            read, drop_ratio = self.memvp_read[name]
            if read == "adem":  # silu(x) silu(K)^T, silu(K) cached per call (read_forms.py)
                state = self._memvp_runtime.state_for(name)
                scores = adem_scores(xb, state.activated_keys_for_input(xb.shape[0], xb.dtype, xb.device))
            else:
                scores = self.memvp_activation[name](memory_scores(xb, keys))
            if drop_ratio:
                scores = drop_lowest_scores(scores, drop_ratio)
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
            for _, keys, _ in self._memories(xb)
        ]
        if not scores:
            return result
        return torch.cat([result, *scores], dim=-1)


class ValueMemoryLayer(MemVPLayer):
    """W2 of a plain FFN with the memory values appended: splits off the memory activations and reads them."""

    def __init__(self, base_layer: nn.Module, runtime: MemoryRuntime) -> None:
        super().__init__(base_layer, runtime)
        in_features = getattr(base_layer, "in_features", None) or getattr(base_layer, "nx", None)
        if in_features is None:
            raise ValueError(f"Cannot read the input width of {type(base_layer).__name__} for MemVP.")
        self.in_features = int(in_features)

    def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        memories = self._memories(self._batched(h)) if not self.disable_adapters else []
        expected = self.in_features + sum(self.memvp_num_slots[name] for name, _, _ in memories)
        if h.shape[-1] != expected:
            raise RuntimeError(
                f"MemVP value layer expected {expected} input features (FFN width {self.in_features} + memory slots), "
                f"got {h.shape[-1]}: the matching key layer (W1 of the same FFN) must be wrapped and active too."
            )
        result = self.base_layer(h[..., : self.in_features], *args, **kwargs)
        offset = self.in_features
        for name, _, values in memories:
            scores = self._batched(h[..., offset : offset + self.memvp_num_slots[name]])
            offset += self.memvp_num_slots[name]
            drop_ratio = self.memvp_read[name][1]
            if drop_ratio:
                scores = drop_lowest_scores(scores, drop_ratio)
            scores = self._dropout(name, scores).to(values.dtype)
            result = add_memory_read(result, scores, values, self.memvp_scale[name])
        return result
