"""The MemVP model classes for vLLM: the base's own vLLM model (Llama, Mistral, Qwen2, Qwen3), weight names
unchanged, with every decoder layer's FFN output plus the memory read of the token's request,
`out = MLP(x) + s * act(x K[slot]^T) V[slot]` (MEMVP_SPEC step 6; the SwiGLU FFN's branch has no gate).

How a layer knows a token's request: the runner hook (`runner_hook.py`) passes `memvp_token_slots`, one bank slot
per scheduled token (the tokens of one request are contiguous in vLLM's flattened batch). The model turns it once per
forward into a `ReadPlan` -- runs of tokens reading the same slot -- and every layer reads by it:

* every run reads its slot's keys and values in place, never a copy: a run of one token (a decode step) with two
  matrix-vector products, a longer run (a prefill chunk, or adjacent requests sharing a slot) with two GEMMs.

Why not gather the decode tokens' memories into one `(B, n, d)` batch for `bmm`: a decode step's read is bound by
memory bandwidth (each token reads its own n x d keys and values, as input-space decoding reads its N tokens' KV),
and the gather writes and re-reads a copy of all of them; measured on CPU (B = 8, n = 640, d = 512, one thread) the
gather plus one layer's `bmm` pair cost ~4.5x what one layer's matrix-vector products on the bank's own rows cost.

Why the model runs its own loop over the decoder layers instead of calling the base's compiled `model.forward`:
the read needs the plan, which is Python state of this forward; vLLM's `support_torch_compile` (and CUDA graphs)
would freeze it into the traced graph and replay one batch's slots for every later batch -- silently wrong. The loop
calls the layers' own submodules in the order their `forward` does (`LAYER_STEPS`, checked by a guard test), so the
model runs eagerly and stays exact.

Tensor parallelism: the read is an FFN whose neurons are the memory slots (K its first matrix, V its second, the
activation elementwise per slot), so it is sharded as vLLM shards the FFN's intermediate neurons. Each rank holds its
`ceil(n / tp)` slots of the bank (`bank.SlotShard`), adds its partial read `s * act(x K_r^T) V_r` to `down_proj`'s
partial sum, and the layer all-reduces once: `down_proj` is told not to reduce (`reduce_results=False`, a
RowParallelLinear option it reads at every forward) and the model reduces the sum of both. Exact, no extra
communication, the bank's memory divided by tp. Pipeline parallelism is refused.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch
from torch import nn

from .adapter import check_base
from .bank import PREFIX, MemoryBank, SlotShard
from .processor import FEATURES_KEY, adapter_folder_of, build_processor_classes, served_adapter
from .runner_hook import check_runner, install_runner_hook

#: the submodules every supported decoder layer's `forward` calls, in this order (guard test: tests/serving)
LAYER_STEPS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
#: base architecture -> (vLLM module, class) the MemVP class extends
BASES = {
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}


def memvp_architecture(base: str) -> str:
    """The registered name of the MemVP class over the base architecture `base` (`MemVPLlamaForCausalLM`)."""
    return f"MemVP{base}"


class ReadPlan(NamedTuple):
    """Which slot each token reads, as runs of consecutive tokens reading one slot."""

    runs: list[tuple[int, int, int]]  # (start, end, slot)


def read_plan(bank: MemoryBank, token_slots: Optional[torch.Tensor], num_tokens: int) -> ReadPlan:
    """The plan of one forward of `num_tokens` tokens (vLLM may pad the batch: padded tokens read slot 0, their
    outputs are discarded). Without slots (profiling and warm-up runs) every token reads slot 0."""
    slots = [] if token_slots is None else token_slots.tolist()
    slots = slots[:num_tokens] + [0] * (num_tokens - len(slots))
    runs = []
    start = 0
    for index in range(1, num_tokens + 1):
        if index == num_tokens or slots[index] != slots[start]:
            runs.append((start, index, slots[start]))
            start = index
    return ReadPlan(runs)


def add_memory_read(x: torch.Tensor, out: torch.Tensor, plan: ReadPlan, bank: MemoryBank, activation: Any,
                    scale: float) -> torch.Tensor:
    """`out + s * act(x K^T) V` for every token of `x` (T, d), each with its own slot's K and V (`plan`)."""
    for start, end, slot in plan.runs:
        keys, values = bank.keys[slot], bank.values[slot]
        if end - start == 1:
            scores = activation(torch.mv(keys, x[start]))
            out[start].add_(torch.mv(values.T, scores), alpha=scale)
        else:
            scores = activation(x[start:end] @ keys.T)
            out[start:end] = torch.addmm(out[start:end], scores, values, alpha=scale)
    return out


def _slot_shard() -> SlotShard:
    """This worker's share of the memory slots (its tensor-parallel rank); pipeline parallelism is refused."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    pp = get_pp_group().world_size
    if pp > 1:
        raise ValueError(f"MemVP serving does not implement pipeline parallelism (pipeline_parallel_size={pp} asked): "
                         "use tensor_parallel_size instead, or one device.")
    return SlotShard(get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())


def _unreduced(partial_sum: torch.Tensor) -> torch.Tensor:
    """One device: the FFN's output plus the read is already whole."""
    return partial_sum


def ffn_reduce(layers: Iterable[nn.Module], world_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a layer completes `MLP(x) + read` across ranks: with tp > 1 every layer's `down_proj` stops reducing its
    partial sum (the read is added to it first) and the returned all-reduce does it once, after the addition."""
    if world_size == 1:
        return _unreduced
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.model_executor.layers.linear import RowParallelLinear

    downs = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in layers]
    for index, down in enumerate(downs):
        if not isinstance(down, RowParallelLinear) or not down.reduce_results:
            raise ValueError(f"MemVP serving with tensor parallelism needs every layer's FFN to end in a reducing "
                             f"RowParallelLinear `mlp.down_proj`; layer {index} has {type(down).__name__}.")
    for down in downs:  # its bias (if any) is added on rank 0 only: the one all-reduce after the read adds it once
        down.reduce_results = False
    return tensor_model_parallel_all_reduce


def _refuse_cudagraphs(vllm_config: Any) -> None:
    compilation = vllm_config.compilation_config
    mode = getattr(compilation, "cudagraph_mode", None)
    if mode is not None and getattr(mode, "name", str(mode)) != "NONE" and torch.cuda.is_available():
        raise ValueError("MemVP serving reads each request's memory by a per-step plan that CUDA graphs would freeze: "
                         "run vLLM with enforce_eager=True (--enforce-eager).")


class MemVPMixin:
    """Everything the MemVP classes add to a vLLM causal LM (see the module docstring); mixed in before the base."""

    supports_multimodal = True
    supports_multimodal_raw_input_only = False
    merge_by_field_config = True

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        from transformers.activations import ACT2FN

        check_runner()
        install_runner_hook()  # normally done by the plugin; raises on an untested vLLM
        shard = _slot_shard()
        _refuse_cudagraphs(vllm_config)
        config = vllm_config.model_config.hf_config
        self.memvp_adapter = served_adapter(adapter_folder_of(config))
        check_base(self.memvp_adapter, int(config.hidden_size), int(config.num_hidden_layers))
        for layer in self.model.layers:
            if getattr(layer, "ada_rms_norm_t_cond", None) is not None:
                raise ValueError("MemVP serving: this Mistral variant conditions its layers on a time embedding "
                                 "(ada_rms_norm_t_cond), which the plugin does not implement.")
        self.memvp_activation = ACT2FN[self.memvp_adapter.activation or config.hidden_act]
        self.memvp_scale = self.memvp_adapter.memory_scale
        self.memvp_bank = MemoryBank(self.memvp_adapter, vllm_config.scheduler_config.max_num_seqs,
                                     vllm_config.model_config.dtype, shard=shard)
        self.memvp_reduce = ffn_reduce(self.model.layers, shard.world_size)

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> Optional[str]:
        if modality.startswith("image"):
            return None  # the chat template gets no image marker: MemVP's prompt is the text alone
        raise ValueError("MemVP serving supports images only.")

    def get_language_model(self) -> nn.Module:
        return self.model

    def embed_multimodal(self, **kwargs: Any) -> list[torch.Tensor]:
        """No image embeds a token (the placeholder's `is_embed` is all False): an empty embedding per item."""
        features = kwargs.get(FEATURES_KEY)
        count = len(features) if isinstance(features, (list, tuple)) else (0 if features is None else features.shape[0])
        width = self.config.hidden_size
        return [self.memvp_bank.keys.new_zeros(0, width) for _ in range(count)]

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: Optional[torch.Tensor], positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: Optional[torch.Tensor] = None, memvp_token_slots: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        model = self.model
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        plan = read_plan(self.memvp_bank, memvp_token_slots, hidden.shape[0])
        residual = None
        for layer in model.layers[model.start_layer:model.end_layer]:
            if residual is None:
                residual = hidden
                hidden = layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            hidden = layer.self_attn(positions=positions, hidden_states=hidden)
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = self.memvp_reduce(add_memory_read(hidden, layer.mlp(hidden), plan, self.memvp_bank,
                                                       self.memvp_activation, self.memvp_scale))
        hidden, _ = model.norm(hidden, residual)
        return hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base's weights through the base's loader, then the adapter's memory (not in the base's files)."""
        loaded = set(super().load_weights(weights))
        return loaded | self.memvp_bank.load_adapter(self.memvp_adapter)


def memvp_model_class(base: str) -> type:
    """The MemVP class over vLLM's class of the architecture `base`, registered with the MemVP processor."""
    import importlib

    from vllm.model_executor.models.interfaces import SupportsMultiModal
    from vllm.multimodal import MULTIMODAL_REGISTRY

    module, name = BASES[base]
    base_class = getattr(importlib.import_module(module), name)
    info, dummy, processor = build_processor_classes()
    cls = type(memvp_architecture(base), (MemVPMixin, base_class, SupportsMultiModal),
               {"__doc__": f"{base} with MemVP's memory read in every FFN (module `{__name__}`).",
                "__module__": __name__})
    return MULTIMODAL_REGISTRY.register_processor(processor, info=info, dummy_inputs=dummy)(cls)


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """`MemVPLlamaForCausalLM` & co., built on first use: vLLM's registry imports them by name
    ("memvp_peft.serving.model:MemVPLlamaForCausalLM") only in the processes that build or inspect a model."""
    for base in BASES:
        if name == memvp_architecture(base):
            if name not in _CLASSES:
                _CLASSES[name] = memvp_model_class(base)
            return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BASES", "LAYER_STEPS", "MemVPMixin", "ReadPlan", "memvp_architecture", "memvp_model_class", "read_plan",
           "add_memory_read", "ffn_reduce", "PREFIX"]
