"""Which vision encoder an adapter uses, and swapping it on the runtime without a half-done state.

`attach_vision_encoder` (and the injection of an adapter that names an encoder) runs in two steps: `checked_vision`
builds the `VisionEncoder` -- which reads the encoder and changes nothing -- and checks it against every adapter
(width = `visual_dim`, depth = the saved vision adapters, `vision_feature_layer` in range); only then does
`switch_vision` hook the new encoder, unhook the old one and record the encoder in the configs. A refused encoder
therefore leaves the previous one attached with its adapter hooks. During an injection the old encoder stays hooked
until the injection has succeeded (`MemVPModel.inject_adapter` detaches it), so a rollback needs no re-hooking.

What a config records of its encoder is what a later load needs to find the same one: a local folder by its absolute
path (`hub.resolvable_name`), a Hub id with the commit its files came from (`vision_encoder_revision`, loaded again at
that commit), and a digest of the weights (`vision_encoder_sha256`). Attaching an encoder whose weights differ from
the recorded digest warns, naming both: an adapter trained with the recorded one never saw their features.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

from peft.utils.integrations import _skip_init_on_device
from torch import nn

from ..hub import is_hub_id, resolvable_name
from ..vision import (VisionEncoder, describe_encoder, family_of, has_own_vision_model, is_vlm, load_vision_encoder,
                      loaded_commit, vlm_vision_tower, weights_digest)
from ..vision.families import config_token_id
from .config import MemVPConfig, record_built_field
from .entry import unwrap_checkpoint_function
from .guards import is_recorded
from .runtime import MemoryRuntime


def image_token_id(model: nn.Module) -> Optional[int]:
    """The image placeholder token a VLM base's processor writes (from its config), None for other models."""
    return config_token_id(getattr(model, "config", None), "image_token_id", "image_token_index")


def configured_encoder(model: nn.Module, runtime: MemoryRuntime, config: MemVPConfig) -> Optional[nn.Module]:
    """The encoder `config` names: a built module, a local folder (loaded once), the VLM base's own tower, or the one
    already attached. None when there is none (features come as `image_features`).

    A VLM base, whichever encoder reads the pixels, gets its image placeholder token recorded, and its family
    (`vision.families.family_of`, picked here once) when it has one: a batch of that family's own processor is then
    read with the images taken out of the sequence (`entry.py`); any other VLM's placeholders are refused at
    the entry. A VLM of no family reaches here only with a separate encoder (`guards.check_supported_vlm` refused it
    otherwise); one whose tower MemVP cannot read is recorded by class, for the `pixel_values` refusal should that
    encoder be missing (a recorded Hub id that cannot be had here)."""
    if has_own_vision_model(model):
        runtime.family = family_of(model)
        runtime.image_token_id = image_token_id(model)
        if runtime.family is None and not is_vlm(model):
            runtime.unread_vlm_class = type(model).__name__
    reference = getattr(config, "_vision_encoder_module", None)
    if reference is not None:
        return reference.module
    name = config.vision_encoder
    if name is not None and (os.path.exists(name) or is_hub_id(name)):
        current = runtime.vision
        if current is not None and resolvable_name(describe_encoder(current.model)) == resolvable_name(name):
            return current.model
        revision = config.vision_encoder_revision if is_hub_id(name) else None  # the commit it was trained with
        try:
            with _skip_init_on_device():  # a frozen encoder, not adapter weights: real even under low_cpu_mem_usage
                return load_vision_encoder(name, revision=revision)
        except ValueError as error:
            if os.path.exists(name) or not is_recorded(config):
                raise
            # a Hub id an adapter recorded that cannot be had here (offline, not cached) does not block loading the
            # adapter, as a recorded folder that is gone does not: attach_vision_encoder gives it the encoder
            warnings.warn(f"{error} The adapter loads without it: attach it with "
                          "memvp_peft.attach_vision_encoder(model, encoder).", stacklevel=2)
    tower = runtime.family.encoder_tower(model) if runtime.family is not None else None
    if tower is None and is_vlm(model) and runtime.family is None:
        tower = vlm_vision_tower(model)
    if tower is not None:
        return tower
    if runtime.vision is not None:
        return runtime.vision.model
    return None


def checked_vision(runtime: MemoryRuntime, encoder: nn.Module, configs: list[MemVPConfig]) -> VisionEncoder:
    """The `VisionEncoder` for `encoder` (the attached one if it is the same model), checked against `configs`."""
    current = runtime.vision
    vision = current if current is not None and current.model is encoder else None
    for config in configs:
        vision = vision or VisionEncoder(
            encoder, config.vision_feature_layer, config.vision_feature_select_strategy, config.vision_feature_layernorm
        )
        vision.check_feature_layer(config.vision_feature_layer)
        if vision.hidden_size != config.visual_dim:
            raise ValueError(
                f"MemVP: the vision encoder {describe_encoder(encoder)!r} outputs features of width "
                f"{vision.hidden_size} but MemVPConfig.visual_dim={config.visual_dim}; set visual_dim to the "
                "encoder's hidden size."
            )
        if config.vision_num_layers is not None and config.vision_num_layers != vision.num_layers:
            raise ValueError(
                f"MemVP: the adapter was trained with a {config.vision_num_layers}-block vision encoder but "
                f"{describe_encoder(encoder)!r} has {vision.num_layers} blocks."
            )
    return vision


def switch_vision(
    runtime: MemoryRuntime, vision: VisionEncoder, configs: list[MemVPConfig], detach_replaced: bool = True
) -> Optional[VisionEncoder]:
    """Make the checked `vision` the runtime's encoder and record it in `configs`; returns the one it replaced."""
    replaced = runtime.vision
    digest = weights_digest(vision.model)
    for config in configs:
        record_built_field(config, "vision_num_layers", vision.num_layers)
        record_encoder(config, vision.model, digest)
    if vision is not replaced:
        vision.attach()
        if replaced is not None and detach_replaced:
            release_encoder(replaced)
    runtime.vision = vision
    return None if replaced is vision else replaced


def release_encoder(vision: VisionEncoder) -> None:
    """Take MemVP off an encoder it no longer uses (replaced, or the model unloaded): the adapter hooks of its
    blocks, and the checkpoint wrappers a training call put on them (`entry.wrap_layer_checkpointing`)."""
    vision.detach()
    for layer in vision.layers:
        unwrap_checkpoint_function(layer)


def record_encoder(config: MemVPConfig, encoder: nn.Module, digest: Optional[str]) -> None:
    """Record the attached `encoder` in `config`: its name and a Hub id's commit where none is recorded yet, and its
    weights digest -- after a warning when that differs from the digest `config` recorded, whose features an adapter
    trained with the recorded encoder never saw. The digest then follows the encoder the adapter runs with, so a
    later save says which weights it was last used (and trained) with."""
    name = resolvable_name(describe_encoder(encoder))
    if config.vision_encoder is None:
        record_built_field(config, "vision_encoder", name)
    commit = loaded_commit(encoder)
    if config.vision_encoder_revision is None and commit and config.vision_encoder == name:
        record_built_field(config, "vision_encoder_revision", commit)
    if digest is None or config.vision_encoder_sha256 == digest:
        return
    if config.vision_encoder_sha256 is not None:
        revision = f" at revision {config.vision_encoder_revision}" if config.vision_encoder_revision else ""
        warnings.warn(
            f"MemVP: the vision encoder {name!r} now attached has weights sha256 {digest}, but the adapter recorded "
            f"{config.vision_encoder!r}{revision} with weights sha256 {config.vision_encoder_sha256}: other weights "
            "(another model saved under that folder, another revision, another encoder), whose features an adapter "
            "trained with the recorded one never saw. Unless that is meant, attach the recorded encoder "
            "(memvp_peft.attach_vision_encoder). The adapter now records the attached one.",
            stacklevel=3,
        )
    record_built_field(config, "vision_encoder_sha256", digest)
