"""What is checked before an adapter touches the model: everything that can be known from the config and the model.

Injection changes the caller's model in place (wrappers, hooks, frozen parameters). Whatever can be refused without
changing it is refused here, first, with a ValueError that names the setting and what the model has: the base depth
an adapter was made for, `layers_pattern` / `layers_to_transform` against the model's layer stacks, a
`vision_encoder` folder that is not there, an adapter folder without readable weights, and targets that are no FFN
block (`targets.check_ffn_targets`), `modules_to_save` that a VLM base never runs with gradients. What can only
fail later is rolled back (`rollback.py`).
"""

from __future__ import annotations

import os
from typing import Any

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..hub import is_hub_id
from ..vision import IN_MEMORY_PREFIX, vlm_modules_outside_language_model
from .config import MemVPConfig
from .save_load import BIN_WEIGHTS_NAME, CONFIG_NAME, WEIGHTS_NAME, adapter_weights_file, check_adapter_file_complete
from .targets import check_ffn_targets, find_layer_stacks


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, (int, str)) else list(value)


def check_depth(model: nn.Module, config: MemVPConfig) -> None:
    """Refuse a base of another depth than the adapter was made for; record the depth on a new adapter.

    MemVP's layers own no tensors, so an adapter made for 2 layers would load onto 4 and adapt 2 of them; the depth
    recorded at injection (`base_num_layers`) is what tells the two apart. `layers_to_transform` does not change it.
    """
    depth = sum(len(stack) for _, stack in find_layer_stacks(model))
    if config.base_num_layers is None:
        config.base_num_layers = depth or None
    elif depth and depth != config.base_num_layers:
        raise ValueError(
            f"MemVP: this adapter was made for a base model with {config.base_num_layers} transformer layers, but the "
            f"model it is applied to has {depth}; load it onto the base model it was trained on."
        )


def check_layer_selection(model: nn.Module, config: MemVPConfig) -> None:
    """`layers_pattern` must name a layer stack of the model, `layers_to_transform` indices that exist in it."""
    stacks = find_layer_stacks(model)
    if not stacks:
        stacks = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        return
    stack_names = sorted({name.rsplit(".", 1)[-1] for name, _ in stacks})
    if config.layers_pattern is not None:
        unknown = [p for p in _as_list(config.layers_pattern) if p not in stack_names]
        if unknown:
            raise ValueError(
                f"MemVP: layers_pattern={config.layers_pattern!r} names no layer stack of this model; its layer stacks "
                f"are {stack_names}."
            )
        stacks = [(name, m) for name, m in stacks if name.rsplit(".", 1)[-1] in _as_list(config.layers_pattern)]
    if config.layers_to_transform is not None:
        depth = max(len(stack) for _, stack in stacks)
        beyond = sorted(i for i in _as_list(config.layers_to_transform) if i >= depth)
        if beyond:
            raise ValueError(
                f"MemVP: layers_to_transform={config.layers_to_transform!r} names layer(s) {beyond}, but the model "
                f"has {depth} layers (indices 0-{depth - 1})."
            )


def is_recorded(config: MemVPConfig) -> bool:
    """Whether `config`'s vision encoder was attached before (saved, then read back: `vision_num_layers` is filled in
    when an encoder is attached), or the config was read from a folder: its names are another machine's, not the
    user's request.

    Not `base_num_layers`: `check_depth` fills that in on a new config during its own injection, before the encoder
    it names is loaded, and a new config's encoder that cannot be loaded must be refused, not passed over."""
    return config.vision_num_layers is not None or getattr(config, "_memvp_source_folder", None) is not None


def check_vision_encoder_folder(config: MemVPConfig) -> None:
    """A `vision_encoder` the user named as a folder must exist (else `pixel_values` would fail much later). A name
    of the form of a Hub id (`org/name`) is what `from_pretrained` would take too: it is loaded at injection
    (`vision.load_vision_encoder`, downloaded when online, read from the cache offline), which says why it cannot.

    A config that was injected before (`is_recorded`) records the encoder it was trained with, possibly another
    machine's path or an in-memory model: that one is attached again by hand (`attach_vision_encoder`), so it is
    not refused here.
    """
    name = config.vision_encoder
    if (
        name is None
        or is_recorded(config)
        or getattr(config, "_vision_encoder_module", None) is not None
        or name.startswith(IN_MEMORY_PREFIX)
        or os.path.exists(name)
        or is_hub_id(name)
    ):
        return
    raise ValueError(
        f"MemVP: MemVPConfig.vision_encoder={name!r} is not a local folder, nor a Hub id of the form 'org/name'. "
        "Pass the folder of a CLIP/SigLIP checkpoint, its Hub id, or the built encoder itself "
        "(vision_encoder=CLIPVisionModel.from_pretrained(...))."
    )


def check_source_folder(config: MemVPConfig) -> None:
    """A config read from a folder is the first half of a load: its weights must be there and readable before
    anything is injected for them (peft reads them only after the adapter is registered)."""
    folder = getattr(config, "_memvp_source_folder", None)
    if folder is None or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        return  # not a local folder (a Hub id): peft downloads the weights itself
    weights = adapter_weights_file(folder)
    if weights is None:
        raise ValueError(
            f"MemVP adapter folder {folder} has no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} (was the save interrupted?)."
        )
    check_adapter_file_complete(weights)


def check_modules_to_save(model: nn.Module, config: MemVPConfig) -> None:
    """`modules_to_save` (the adapter's, or its `lora_config`'s) must not name a VLM base's vision tower or projector
    (or a module inside them): MemVP runs the tower frozen and without gradients and never runs the projector, so the
    trainable copy peft makes of such a module would be counted as trainable and saved but never change. Names are
    matched as peft's `_set_trainable` matches them (a module whose qualified name ends with one)."""
    outside = tuple(prefix + "." for prefix in vlm_modules_outside_language_model(model))
    requests = {
        "modules_to_save": config.modules_to_save,
        "lora_config.modules_to_save": (config.lora_config or {}).get("modules_to_save"),
    }
    for field_name, names in requests.items():
        if not outside or not names:
            continue
        dead = [
            key for key, _ in model.named_modules()
            if (key + ".").startswith(outside) and any(key.endswith(name) for name in names)
        ]
        if dead:
            raise ValueError(
                f"MemVP: {field_name}={list(names)} names {dead[0]}, outside the language model of this VLM base: "
                "MemVP runs the vision tower frozen and without gradients and never runs the VLM's projector, so it "
                "would never train. Name language-model modules only (e.g. lm_head); to adapt the vision tower, set "
                "MemVPConfig(vision_adapter_dim=...)."
            )


def matched_targets(tuner: Any, model: nn.Module, config: MemVPConfig) -> list[tuple[str, nn.Module]]:
    """The modules peft's own matching will wrap for `config` (the modules of other adapters' layers excepted)."""
    owned = [key + "." for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    return [
        (key, module)
        for key, module in model.named_modules()
        if key and not any(key.startswith(prefix) for prefix in owned) and tuner._check_target_module_exists(config, key)
    ]


def check_before_injection(tuner: Any, model: nn.Module, config: MemVPConfig) -> None:
    """Every check that needs no change to the model, in the order a user would fix them."""
    check_vision_encoder_folder(config)
    check_depth(model, config)
    check_layer_selection(model, config)
    check_source_folder(config)
    check_modules_to_save(model, config)
    tuner._prepare_adapter_config(config, {})
    check_ffn_targets(model, matched_targets(tuner, model, config), config.activation)
