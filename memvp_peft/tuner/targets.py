"""Where the FFN blocks live in each supported architecture, found structurally.

`target_modules=None` must "just work" on the language models our users fine-tune. Rather than a brittle table of
module paths per `model_type`, we walk the decoder layer stack and recognise the FFN by the names transformers uses:

* GLU FFN module `mlp` with `gate_proj/up_proj/down_proj` (Llama, Mistral, Qwen2/3, Gemma 1/2/3) or a fused
  `gate_up_proj` (Phi3): wrapped whole (`FFNMemoryLayer`), activation `act_fn`/`activation_fn`.
* Plain FFN as `mlp.c_fc/c_proj` (GPT-2) or `fc1/fc2` on the layer itself (OPT): the two linears are wrapped
  (`KeyMemoryLayer` on W1, `ValueMemoryLayer` on W2) so that K is appended to W1 and V to W2.

Vision towers (`vision_tower`, `visual`, `vision_model`) are never searched: MemVP adapts the language model only.
"""

from __future__ import annotations

from typing import Callable, Optional

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "opt",
    "t5",
    "mt5",
    "bart",
)

#: (W1 name, W2 name) pairs of plain FFNs whose linears are wrapped as key/value memory.
PLAIN_FFN_PAIRS = (("c_fc", "c_proj"), ("fc1", "fc2"), ("wi", "wo"))
KEY_NAMES = {key for key, _ in PLAIN_FFN_PAIRS}
VALUE_NAMES = {value for _, value in PLAIN_FFN_PAIRS}
ACTIVATION_ATTRIBUTES = ("act_fn", "activation_fn", "act", "activation")
_VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder")
_LAYER_STACK_NAMES = ("layers", "h", "block")
MEMORY_SIDES = ("encoder", "decoder", "both")


def unsupported_message(model: nn.Module, detail: str) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    return (
        f"MemVP could not find the FFN blocks of this model (model_type={model_type!r}): {detail}. Automatic "
        f"targeting supports {', '.join(SUPPORTED_ARCHITECTURES)} and other models with the same layer layout. For "
        "another architecture pass `MemVPConfig(target_modules=[...])` with the names of the FFN modules to wrap "
        "whole (e.g. ['mlp']) and, if the module has no `act_fn`/`activation_fn`/`act` attribute, "
        "`activation='silu'` (or the FFN's activation)."
    )


def _is_vision_path(name: str) -> bool:
    return any(part in _VISION_NAMES for part in name.split("."))


def find_decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every block in the language model's layer stack(s)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or _is_vision_path(name):
            continue
        if name.rsplit(".", 1)[-1] not in _LAYER_STACK_NAMES:
            continue
        found.extend((f"{name}.{i}", layer) for i, layer in enumerate(module))
    return found


def _t5_ffn_targets(layer_name: str, layer: nn.Module) -> Optional[list[str]]:
    """T5/mT5 blocks keep the FFN in `layer[-1].DenseReluDense`: gated (`wi_0/wi_1/wo`) or plain (`wi/wo`)."""
    sublayers = layer.layer
    ffn = getattr(sublayers[-1], "DenseReluDense", None)
    if ffn is None:
        return None
    name = f"{layer_name}.layer.{len(sublayers) - 1}.DenseReluDense"
    if isinstance(ffn, BaseTunerLayer):
        ffn = ffn.get_base_layer()
    if hasattr(ffn, "wi_0"):
        return [name]  # GLU: wrapped whole, the memory branch has no gate
    if hasattr(ffn, "wi") and hasattr(ffn, "wo"):
        return [f"{name}.wi", f"{name}.wo"]  # plain: K appended to W1 (wi), V to W2 (wo)
    return None


def _ffn_targets_of_layer(layer_name: str, layer: nn.Module) -> Optional[list[str]]:
    if isinstance(getattr(layer, "layer", None), nn.ModuleList) and len(layer.layer):
        return _t5_ffn_targets(layer_name, layer)
    mlp = getattr(layer, "mlp", None)
    if isinstance(mlp, BaseTunerLayer):  # already wrapped by another adapter: inspect the FFN itself
        mlp = mlp.get_base_layer()
    if isinstance(mlp, nn.Module):
        if hasattr(mlp, "experts"):
            return None  # mixture of experts: not a single key-value memory
        if hasattr(mlp, "down_proj") and (hasattr(mlp, "gate_up_proj") or hasattr(mlp, "up_proj")):
            if find_activation(mlp) is not None:
                return [f"{layer_name}.mlp"]
        for key, value in PLAIN_FFN_PAIRS:
            if hasattr(mlp, key) and hasattr(mlp, value):
                return [f"{layer_name}.mlp.{key}", f"{layer_name}.mlp.{value}"]
    for key, value in PLAIN_FFN_PAIRS:
        if hasattr(layer, key) and hasattr(layer, value):
            return [f"{layer_name}.{key}", f"{layer_name}.{value}"]
    return None


def _stack_side(layer_name: str) -> Optional[str]:
    parts = layer_name.split(".")
    for side in ("encoder", "decoder"):
        if side in parts:
            return side
    return None


def find_ffn_targets(
    model: nn.Module, layers_to_transform: Optional[list[int] | int] = None, memory_side: str = "both"
) -> list[str]:
    """Qualified names of the modules to wrap so that every (selected) transformer layer gets the visual memory.

    For encoder-decoder models `memory_side` picks the encoder stack, the decoder stack or both.
    """
    layers = find_decoder_layers(model)
    if not layers:
        raise ValueError(unsupported_message(model, "no transformer layer stack (`layers`, `h` or `block`) was found"))
    if memory_side != "both":
        if not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            raise ValueError(
                f"MemVP: memory_side={memory_side!r} only applies to encoder-decoder models (T5, BART); this model has "
                "a single stack, use memory_side='both'."
            )
        layers = [(name, layer) for name, layer in layers if _stack_side(name) == memory_side]
    if isinstance(layers_to_transform, int):
        layers_to_transform = [layers_to_transform]
    targets = []
    for layer_name, layer in layers:
        index = int(layer_name.rsplit(".", 1)[-1])
        if layers_to_transform is not None and index not in layers_to_transform:
            continue
        ffn = _ffn_targets_of_layer(layer_name, layer)
        if ffn is None:
            raise ValueError(unsupported_message(model, f"{type(layer).__name__} has no recognisable FFN"))
        targets.extend(ffn)
    if not targets:
        raise ValueError(
            f"MemVP: layers_to_transform={layers_to_transform} selects none of the {len(layers)} decoder layers."
        )
    return targets


def find_activation(module: nn.Module) -> Optional[Callable]:
    for attr in ACTIVATION_ATTRIBUTES:
        act = getattr(module, attr, None)
        if callable(act):
            return act
    return None


def resolve_activation(module: nn.Module, override: Optional[str]) -> Callable:
    if override is not None:
        return ACT2FN[override]
    act = find_activation(module)
    if act is None:
        raise ValueError(
            f"MemVP: the FFN module {type(module).__name__} has none of the attributes {ACTIVATION_ATTRIBUTES}; "
            "set `MemVPConfig(activation=...)` to the FFN's activation."
        )
    return act


def model_hidden_size(model: nn.Module) -> int:
    """Width d of the language model, from its config (never from weights: ZeRO-3 partitions them to shape (0,))."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(
        "MemVP: cannot read the model width from the model config (hidden_size / n_embd / d_model)."
    )


def role_of_target(target_name: str) -> str:
    if target_name in KEY_NAMES:
        return "key"
    if target_name in VALUE_NAMES:
        return "value"
    return "ffn"


def partner_name(target_name: str) -> str:
    for key, value in PLAIN_FFN_PAIRS:
        if target_name == key:
            return value
        if target_name == value:
            return key
    raise KeyError(target_name)

