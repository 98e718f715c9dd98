"""An independent re-implementation of the MemVP forward (MEMVP_SPEC "Exact computation"), for tests only.

Nothing here imports the memvp_peft layer / memory code. Given the *unadapted* base model, the adapter's tensors and
its config, `reference_logits` deep-copies the model and registers plain torch forward hooks on the FFN of every
(selected) decoder layer that add

    s * act(x K_b^T) V_b,   K_b = lambda * pad_n(f(z_b) * ind_b) + p_k,   V_b = lambda * pad_n(f(z_b) * ind_b) + p_v

with f = Linear -> SiLU -> Linear. Text-only batches (no features) use K = p_k, V = p_v for every row.

`own_slots=True` is the memory of a row in the variable form (rows of different lengths): exactly its N tokens' slots,
`K = lambda * f(z) + p_k[:N]`, `V = lambda * f(z) + p_v[:N]` -- no slot after them (nothing padded, no learned slot).
The tests compute it one row at a time and compare each row of a padded batch with it.

* GLU FFNs (Llama & co.): a forward hook on the whole `mlp` module; x is the mlp input, the read-out is added to its
  output; act = the mlp's own activation (`act_fn`, Phi3's `activation_fn`) unless `config.activation` overrides it,
  or no activation at all (`s * (x K^T) V`) when `config.memory_activation` is "identity".
* Plain FFNs (GPT-2 `mlp.c_fc/c_proj`, OPT `fc1/fc2`): deliberately *not* via concatenation -- a hook captures the
  input x of W1 and another adds `s * act(x K^T) V` to the output of W2, act being the model's activation module
  (GPT-2 `mlp.act`, OPT `layer.activation_fn`). OPT flattens the tokens to (B*T, d) before fc1; the hook reshapes
  back to (B, T, d) so each token reads its own sample's memory.

Memory dropout is not modelled: the tests run in eval mode with `memory_dropout=0`.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# model_type -> (path of the layer stack, FFN kind)
_LAYOUTS = {
    "llama": ("model.layers", "glu"),
    "mistral": ("model.layers", "glu"),
    "qwen2": ("model.layers", "glu"),
    "qwen3": ("model.layers", "glu"),
    "gemma": ("model.layers", "glu"),
    "gemma2": ("model.layers", "glu"),
    "gemma3_text": ("model.layers", "glu"),
    "phi3": ("model.layers", "glu"),
    "gpt2": ("transformer.h", "gpt2"),
    "opt": ("model.decoder.layers", "opt"),
}

# Independent of transformers' ACT2FN on purpose.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

_STATE_SUFFIXES = (
    "projector.0.weight",
    "projector.0.bias",
    "projector.2.weight",
    "projector.2.bias",
    "key_pos",
    "value_pos",
)


def adapter_state(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors (projector, key_pos, value_pos), detached copies keyed by their short suffix."""
    marker = f"memvp_memory.{adapter_name}."
    state = {}
    for name, param in peft_model.named_parameters():
        if marker in name:
            state[name.split(marker, 1)[1]] = param.detach().clone()
    missing = [s for s in _STATE_SUFFIXES if s not in state]
    if missing:
        raise KeyError(f"adapter {adapter_name!r} tensors not found: {missing} (have {sorted(state)})")
    return state


def _get(state: dict[str, torch.Tensor], suffix: str) -> torch.Tensor:
    hits = [v for k, v in state.items() if k == suffix or k.endswith("." + suffix)]
    if len(hits) != 1:
        raise KeyError(f"expected exactly one adapter tensor ending in {suffix!r}, found {len(hits)}")
    return hits[0]


def reference_memory(
    state: dict[str, torch.Tensor],
    config,
    image_features: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    own_slots: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V of the spec: (B, n, d) with features, (n, d) without; (B, N, d) with `own_slots` (module docstring)."""
    key_pos = _get(state, "key_pos").float()
    value_pos = _get(state, "value_pos").float()
    if image_features is None:
        return key_pos, value_pos
    z = image_features.float()
    hidden = F.silu(F.linear(z, _get(state, "projector.0.weight").float(), _get(state, "projector.0.bias").float()))
    projected = F.linear(hidden, _get(state, "projector.2.weight").float(), _get(state, "projector.2.bias").float())
    batch, tokens, width = projected.shape
    if image_mask is None:
        indicator = torch.ones(batch)
    else:
        indicator = image_mask.to(torch.float32)
    u = config.visual_scale * projected * indicator[:, None, None]
    if own_slots:
        return u + key_pos[:tokens], u + value_pos[:tokens]
    n = config.num_memory_slots
    u = torch.cat([u, torch.zeros(batch, n - tokens, width)], dim=1)
    return u + key_pos, u + value_pos


def _no_activation(scores: torch.Tensor) -> torch.Tensor:
    """`memory_activation="identity"`: the scores x K^T are read as they are."""
    return scores


def _memory_read(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, act: Callable, scale: float) -> torch.Tensor:
    return scale * torch.matmul(act(torch.matmul(x, keys.transpose(-1, -2))), values)


def reference_logits(
    base_model: nn.Module,
    adapter_state: dict[str, torch.Tensor],
    config,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    image_features: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    layers: Optional[Sequence[int]] = None,
    own_slots: bool = False,
) -> torch.Tensor:
    """Logits of `base_model` (unadapted; it is deep-copied, never modified) with MemVP added by forward hooks.

    `layers` restricts the memory to these decoder layer indices (default: `config.layers_to_transform`, else all);
    `own_slots` reads a memory of exactly the features' tokens (`reference_memory`).
    """
    model = copy.deepcopy(base_model).eval()
    model_type = model.config.model_type
    if model_type not in _LAYOUTS:
        raise NotImplementedError(f"reference has no layout for model_type={model_type!r}")
    stack_path, kind = _LAYOUTS[model_type]
    stack = model.get_submodule(stack_path)
    if layers is None:
        layers = config.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]
    selected = range(len(stack)) if layers is None else list(layers)

    keys, values = reference_memory(adapter_state, config, image_features, image_mask, own_slots)
    scale = float(config.memory_scale)
    batch = input_ids.shape[0]
    override = None if config.activation is None else _ACTIVATIONS[config.activation]
    if getattr(config, "memory_activation", "ffn") == "identity":
        override = _no_activation

    for index in selected:
        layer = stack[index]
        if kind == "glu":
            mlp = layer.mlp
            act = override or getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn")

            def glu_hook(module, args, output, act=act):
                return output + _memory_read(args[0], keys, values, act, scale)

            mlp.register_forward_hook(glu_hook)
        else:
            if kind == "gpt2":
                w1, w2, act = layer.mlp.c_fc, layer.mlp.c_proj, layer.mlp.act
            else:
                w1, w2, act = layer.fc1, layer.fc2, layer.activation_fn
            assert override is None, "activation override is not defined for plain FFNs"
            captured: dict[str, torch.Tensor] = {}

            def capture(module, args, captured=captured):
                captured["x"] = args[0]

            def add_read(module, args, output, captured=captured, act=act):
                x = captured.pop("x")
                shape = x.shape
                x = x.reshape(batch, -1, shape[-1])  # OPT hands fc1 the tokens flattened to (B*T, d)
                read = _memory_read(x, keys, values, act, scale)
                return output + read.reshape(*shape[:-1], read.shape[-1])

            w1.register_forward_pre_hook(capture)
            w2.register_forward_hook(add_read)

    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def reference_seq2seq_logits(
    base_model: nn.Module,
    adapter_state: dict[str, torch.Tensor],
    config,
    input_ids: torch.Tensor,
    decoder_input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    image_features: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
    sides: Sequence[str] = ("encoder", "decoder"),
) -> torch.Tensor:
    """Encoder-decoder version (T5 plain/gated, BART): the same memory added to the FFNs of the chosen stacks.

    T5 plain (`wi/wo`) and BART (`fc1/fc2`): x captured at W1, `s * act(x K^T) V` added at W2's output. T5 gated:
    hook on the whole `DenseReluDense`, act = its `act`, no gate on the memory branch.
    """
    model = copy.deepcopy(base_model).eval()
    keys, values = reference_memory(adapter_state, config, image_features, image_mask)
    scale = float(config.memory_scale)
    for side in sides:
        if model.config.model_type in ("t5", "mt5"):
            for block in getattr(model, side).block:
                ffn = block.layer[-1].DenseReluDense
                if hasattr(ffn, "wi_0"):

                    def gated_hook(module, args, output, act=ffn.act):
                        return output + _memory_read(args[0], keys, values, act, scale)

                    ffn.register_forward_hook(gated_hook)
                else:
                    _hook_plain_pair(ffn.wi, ffn.wo, ffn.act, keys, values, scale)
        elif model.config.model_type == "bart":
            for layer in getattr(model.model, side).layers:
                _hook_plain_pair(layer.fc1, layer.fc2, layer.activation_fn, keys, values, scale)
        else:
            raise NotImplementedError(model.config.model_type)
    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids
        ).logits


def _hook_plain_pair(w1: nn.Module, w2: nn.Module, act: Callable, keys, values, scale: float) -> None:
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args):
        captured["x"] = args[0]

    def add_read(module, args, output):
        return output + _memory_read(captured.pop("x"), keys, values, act, scale)

    w1.register_forward_pre_hook(capture)
    w2.register_forward_hook(add_read)
