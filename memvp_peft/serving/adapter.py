"""A MemVP adapter folder as the server reads it: the math of `adapter_config.json`, the tensors of
`adapter_model.safetensors` and how the run fed images (the run manifest `memvp_cli.json`).

Why read the files directly rather than through peft's `PeftModel`: the server never builds the HF model. vLLM builds
its own layers, and the adapter reduces to a projector, two position embeddings and a handful of numbers (lambda, s,
the activation) that every process of the engine reads -- the front end (validation, pixels), each worker (the bank).

Silently wrong is the worst outcome of a server: an adapter option the plugin does not implement (ADEM-VL's read,
the drop, a LoRA part, tiling, compression, vision adapters, a CLS token, only some layers wrapped) would be served as
plain MemVP and answer differently from `memvp-infer`. Each is refused here, by name, before any engine starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "memvp_cli.json"
#: the peft types a MemVP adapter's config may hold (`tuner.config.MEMVP_NAME` and its self-explaining stored form)
MEMVP_PEFT_TYPES = ("MEMVP", "MEMVP (pip install memvp-peft, then import memvp_peft before loading this adapter)")
#: the memory's tensors, by their name after the last `memvp_memory.` of the stored key
TENSOR_NAMES = ("projector.0.weight", "projector.0.bias", "projector.2.weight", "projector.2.bias", "key_pos",
                "value_pos")

#: option -> (the value the plugin implements, what the option is): anything else is refused
_IMPLEMENTED = {
    "memory_read": ("memvp", "ADEM-VL's read silu(x) silu(K)^T"),
    "drop_ratio": (0.0, "ADEM-VL's drop of the lowest memory scores"),
    "cls_token": (False, "ADEM-VL's CLS input token"),
    "lora_config": (None, "a LoRA part trained with the memory"),
    "image_grid": (None, "AnyRes tiling"),
    "num_frames": (None, "video frames"),
    "pool_kernel": (1, "average pooling of the patch grid"),
    "pool_tokens": (None, "adaptive pooling of the patch grid"),
    "multiscale_tokens": (None, "multiscale slots"),
    "vision_adapter_dim": (0, "bottleneck adapters inside the vision encoder"),
    "layers_to_transform": (None, "a memory in only some layers"),
    "exclude_modules": (None, "layers left without memory"),
    "modules_to_save": (None, "trained copies of base modules"),
    "memory_activation": ("ffn", "the identity read of the ablations (memvp-bench --ablations)"),
}
#: what `activation` may name (None: the FFN's own); the names of `tuner.config.SUPPORTED_ACTIVATIONS`
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "relu2",
               "tanh", "sigmoid")


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"MemVP serving: cannot read {path} ({what}): {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"MemVP serving: {path} must hold a JSON object ({what}), got {type(data).__name__}.")
    return data


@dataclass
class ServingAdapter:
    """What the server needs of one MemVP adapter (see the module docstring)."""

    folder: str = field(metadata={"help": "The adapter folder (absolute)."})
    visual_dim: int = field(metadata={"help": "Width D_v of the visual features the projector takes."})
    num_slots: int = field(metadata={"help": "Memory slots n: at most this many visual tokens per request."})
    visual_scale: float = field(metadata={"help": "lambda, applied to the projected features."})
    memory_scale: float = field(metadata={"help": "s, applied to the memory read-out."})
    activation: Optional[str] = field(metadata={"help": "The read's activation; None: the FFN's own."})
    base_num_layers: Optional[int] = field(metadata={"help": "The depth of the base the adapter was trained on."})
    model_dim: int = field(metadata={"help": "Width d of the language model (from the position embeddings)."})
    tensors: dict[str, torch.Tensor] = field(repr=False, metadata={"help": "The memory's tensors by `TENSOR_NAMES`."})
    vision_encoder: Optional[str] = field(default=None, metadata={"help": "The encoder the adapter was trained with."})
    vision_encoder_revision: Optional[str] = field(default=None, metadata={"help": "Its recorded Hub revision."})
    feature_selection: dict[str, Any] = field(default_factory=dict,
                                              metadata={"help": "Layer, CLS strategy, layernorm of the features."})
    manifest: dict[str, Any] = field(default_factory=dict, metadata={"help": "The run manifest (or {})."})


def refused_options(config: dict[str, Any]) -> list[str]:
    """The options of `config` (an `adapter_config.json`) that the plugin does not implement, each with what it is."""
    found = []
    for name, (implemented, what) in _IMPLEMENTED.items():
        value = config.get(name, implemented)
        if value in (None, [], {}) and implemented is None:
            continue
        if value != implemented:
            found.append(f"{name}={value!r} ({what})")
    activation = config.get("activation")
    if activation is not None and activation not in ACTIVATIONS:
        found.append(f"activation={activation!r} (not one of {list(ACTIVATIONS)})")
    return found


def _number(config: dict[str, Any], name: str, path: str, positive_int: bool = False) -> Any:
    value = config.get(name)
    if positive_int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"MemVP serving: {path}: {name} must be a positive integer, got {value!r}.")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"MemVP serving: {path}: {name} must be a finite number, got {value!r}.")
    return float(value)


def _memory_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"MemVP serving: {folder} holds no {WEIGHTS_FILE} (an adapter saved by memvp-peft has one; "
                         "a `.bin` adapter must be saved again with safetensors).")
    stored = load_file(path)
    tensors: dict[str, torch.Tensor] = {}
    other = []
    for key, tensor in stored.items():
        head, marker, name = key.rpartition("memvp_memory.")
        if marker and name in TENSOR_NAMES:
            tensors[name] = tensor
        else:
            other.append(key)
    if other:
        raise ValueError(f"MemVP serving: {path} holds tensors the plugin does not serve: {sorted(other)[:5]} -- only "
                         f"the memory ({', '.join(TENSOR_NAMES)}) is implemented.")
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise ValueError(f"MemVP serving: {path} lacks the memory tensors {missing}: not a whole MemVP adapter.")
    return tensors


def read_adapter(folder: str) -> ServingAdapter:
    """The adapter in `folder`, checked: a MemVP adapter, only options the plugin implements, tensors of the shapes
    its config names. A ValueError says what is wrong; nothing is loaded into any model here."""
    folder = os.path.abspath(os.path.expanduser(str(folder)))
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder) or not os.path.isfile(path):
        raise ValueError(f"MemVP serving: the adapter {folder!r} is not a folder holding {CONFIG_FILE}.")
    config = _read_json(path, "a peft adapter config")
    if config.get("peft_type") not in MEMVP_PEFT_TYPES:
        raise ValueError(f"MemVP serving: {path} is not a MemVP adapter (peft_type {config.get('peft_type')!r}).")
    refused = refused_options(config)
    if refused:
        raise ValueError(f"MemVP serving: the adapter {folder} uses options the vLLM plugin does not implement: "
                         f"{'; '.join(refused)}. Serve it with memvp-infer (transformers) instead.")
    tensors = _memory_tensors(folder)
    visual_dim = _number(config, "visual_dim", path, positive_int=True)
    num_slots = _number(config, "num_memory_slots", path, positive_int=True)
    hidden = _number(config, "projector_hidden_dim", path, positive_int=True)
    model_dim = int(tensors["key_pos"].shape[-1])
    expected = {"projector.0.weight": (hidden, visual_dim), "projector.0.bias": (hidden,),
                "projector.2.weight": (model_dim, hidden), "projector.2.bias": (model_dim,),
                "key_pos": (num_slots, model_dim), "value_pos": (num_slots, model_dim)}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"MemVP serving: {folder}: memvp_memory.{name} has shape {tuple(tensors[name].shape)}, "
                             f"the config implies {shape}.")
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    manifest = _read_json(manifest_path, "the run manifest") if os.path.isfile(manifest_path) else {}
    return ServingAdapter(
        folder=folder, visual_dim=visual_dim, num_slots=num_slots,
        visual_scale=_number(config, "visual_scale", path), memory_scale=_number(config, "memory_scale", path),
        activation=config.get("activation"), base_num_layers=config.get("base_num_layers"), model_dim=model_dim,
        tensors=tensors, vision_encoder=manifest.get("vision_model_name_or_path") or config.get("vision_encoder"),
        vision_encoder_revision=config.get("vision_encoder_revision"),
        feature_selection={"feature_layer": config.get("vision_feature_layer", -2),
                           "select_strategy": config.get("vision_feature_select_strategy", "default"),
                           "layernorm": config.get("vision_feature_layernorm", True)},
        manifest=manifest,
    )


def check_base(adapter: ServingAdapter, hidden_size: int, num_layers: int) -> None:
    """Refuse a base the adapter was not trained on: another width, or another depth than the adapter recorded."""
    if hidden_size != adapter.model_dim:
        raise ValueError(f"MemVP serving: the adapter {adapter.folder} was trained on a base of width "
                         f"{adapter.model_dim}, this base has hidden_size {hidden_size}.")
    if adapter.base_num_layers is not None and adapter.base_num_layers != num_layers:
        raise ValueError(f"MemVP serving: the adapter {adapter.folder} was trained on a base of "
                         f"{adapter.base_num_layers} layers, this base has {num_layers}.")
