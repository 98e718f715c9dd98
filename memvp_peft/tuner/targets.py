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


def find_layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """(qualified name, ModuleList) of the language model's layer stack(s): one, or encoder and decoder."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and not _is_vision_path(name)
        and name.rsplit(".", 1)[-1] in _LAYER_STACK_NAMES
    ]


def find_decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every block in the language model's layer stack(s)."""
    return [(f"{name}.{i}", layer) for name, stack in find_layer_stacks(model) for i, layer in enumerate(stack)]


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


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _is_single_layer(module: nn.Module) -> bool:
    """A leaf that holds a weight (Linear, GPT-2 Conv1D, Embedding): one matrix, not an FFN block."""
    return not any(True for _ in module.children()) and isinstance(getattr(module, "weight", None), nn.Parameter)


def _not_an_ffn(model: nn.Module, key: str, module: nn.Module, detected: Optional[set[str]]) -> str:
    parent_name = key.rpartition(".")[0]
    parent = _unwrapped(model.get_submodule(parent_name)) if parent_name else None
    if parent is not None and _is_single_layer(module) and (
        (detected is not None and parent_name in detected) or hasattr(parent, "down_proj")
    ):
        return (
            f"MemVP: target_modules matched {key}, but {key} is a linear inside the FFN {parent_name}; MemVP wraps a "
            f"GLU FFN whole (its memory branch has no gate): target {parent_name.rsplit('.', 1)[-1]!r}, or leave "
            "target_modules=None to find every FFN."
        )
    example = f" -- here e.g. {sorted(detected)[0]!r} --" if detected else ""
    return (
        f"MemVP: target_modules matched {key}, but {key} is not an FFN block ({type(module).__name__}). MemVP appends "
        f"the image to the key-value memory of the FFN blocks, so target those{example} or leave target_modules=None."
    )


def check_ffn_targets(model: nn.Module, matched: list[tuple[str, nn.Module]], activation: Optional[str]) -> None:
    """Refuse, before anything is wrapped, targets that are no FFN block (an attention, the LM head, a linear inside a
    GLU FFN, a whole decoder layer), a plain-FFN linear without its partner, or an FFN whose activation is unknown.

    On a model whose FFNs are found automatically, the targets must be among them; on another architecture the checks
    are structural (no single linear, no attention, no decoder layer), since the user names the FFN there.
    """
    layers = {name for name, _ in find_decoder_layers(model)}
    try:
        detected: Optional[set[str]] = set(find_ffn_targets(model))
    except ValueError:
        detected = None
    else:  # a plain FFN's module (GPT-2's `mlp`, T5's `DenseReluDense`) may also be wrapped whole
        detected |= {t.rpartition(".")[0] for t in detected if role_of_target(t.rsplit(".", 1)[-1]) != "ffn"} - layers
    names = {key for key, _ in matched}
    for key, module in matched:
        leaf, base = key.rsplit(".", 1)[-1], _unwrapped(module)
        role = role_of_target(leaf)
        if detected is not None:
            wrong = key not in detected
        else:
            wrong = key in layers or "attn" in leaf or "attention" in leaf or (role == "ffn" and _is_single_layer(base))
        if wrong:
            raise ValueError(_not_an_ffn(model, key, base, detected))
        if role == "ffn":
            resolve_activation(base, activation)
            continue
        parent_name = key.rpartition(".")[0]
        partner = f"{parent_name}.{partner_name(leaf)}" if parent_name else partner_name(leaf)
        if partner not in names:
            raise ValueError(
                f"MemVP: target_modules matches {key} but not its partner {partner}; the two linears of a plain FFN "
                "(W1 holds the keys, W2 the values) must be targeted together."
            )
        if activation is not None:
            raise ValueError(
                f"MemVP: `activation` cannot be overridden for the plain FFN linear {key!r}: its memory activations "
                "pass through the FFN's own activation (K is appended to W1). Leave activation=None."
            )


def partner_name(target_name: str) -> str:
    for key, value in PLAIN_FFN_PAIRS:
        if target_name == key:
            return value
        if target_name == value:
            return key
    raise KeyError(target_name)

