"""`MemVPModel`: injection and plumbing of MemVP as a peft tuner (the math lives in `layer.py`/`memory.py`).

What this class adds on top of peft's `BaseTuner`:

* one `VisualMemory` per adapter in the `memvp_memory` ModuleDict (projector + p_k + p_v, shared by all layers),
  with its own trainability handling (peft's generic code only walks the wrapped model);
* `forward` / `generate` entry points that turn a call's visual inputs into that call's memory (`entry.py`,
  `runtime.py`), and entry wrappers on the base model for the paths that reach it directly;
* gradient checkpointing support (`runtime.py`), save/load rules (`save_load.py`, `guards.py`), merge
  refusal, and `unload()` that restores the base model;
* all-or-nothing injection and loading: what can be checked first is, what fails later is rolled back (both
  `guards.py`), so a refused call leaves the caller's model exactly as it was;
* the LoRA part of an adapter (`MemVPConfig.lora_config`), injected and merged with peft's own LoRA machinery.

LoRA is injected first, so that it can target linears inside an FFN (`mlp.gate_proj`); MemVP then wraps the FFN
whole and the LoRA keys become `mlp.base_layer.gate_proj.lora_A...`. Both are one adapter: saved in one file,
switched, deleted and rolled back together (the injection's undo removes a LoRA part injected for a refused adapter).

The LoRA part goes on the language model only, as in LLaVA's LoRA recipe. On a VLM base the target names of a
language model (`q_proj`, `v_proj`, `fc1`, ...) also name linears of the vision tower and the multi-modal projector,
but neither can train there: MemVP runs the tower frozen and without gradients to compute features, and never runs
the VLM's projector. LoRA placed there would be counted as trainable and saved, yet never change. The vision tower is
adapted by MemVP's own vision adapters (`vision_adapter_dim`), which run with gradients.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from peft.tuners.lora import LoraLayer, LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import _get_submodules
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .targets import find_ffn_targets, model_hidden_size, resolve_activation, role_of_target
from .entry import (
    call_with_memory,
    generate_with_memory,
    install_entry,
    make_layer_pre_hook,
    remove_entry,
    underlying_forward,
    unwrap_checkpoint_function,
)
from .config import MemVPConfig, mark_injected, record_built_field
from .layer import MERGE_ERROR, FFNMemoryLayer, KeyMemoryLayer, MemVPLayer, ValueMemoryLayer
from .runtime import MemoryRuntime
from ..vision import VisionEncoder, blocks_before_feature_layer, vlm_modules_outside_language_model
from .memory import VisualMemory
from .save_load import begin_in_place_save, refuse_partitioned_tensors
from .guards import InjectionUndo, check_adapter_tensors, check_before_injection
from .input_tokens import check_cls_token_base
from .vision_attach import checked_vision, configured_encoder, release_encoder, switch_vision

_LAYER_CLASSES = {"ffn": FFNMemoryLayer, "key": KeyMemoryLayer, "value": ValueMemoryLayer}


class MemVPModel(BaseTuner):
    """Memory-Space Visual Prompting as a peft tuner. Use through `get_peft_model(model, MemVPConfig(...))`."""

    prefix: str = "memvp_"
    # Every peft tuner layer in the model belongs to this adapter: MemVP layers, and the LoRA layers of
    # `MemVPConfig.lora_config`. peft's generic set/delete/trainability code then switches both together.
    tuner_layer_cls = BaseTunerLayer
    target_module_mapping: dict = {}
    uses_shared_state = True

    # ------------------------------------------------------------------------------------------- set-up and injection

    def _ensure_memvp_state(self) -> None:
        if "memvp_memory" in self._modules:
            return
        self.memvp_memory = nn.ModuleDict({})
        self._memvp_runtime = MemoryRuntime(self.memvp_memory, self.peft_config)
        self._memvp_hook_handles: list = []
        # adapter -> the undo of its injection, while the weights of an adapter read from a folder are not loaded yet
        self._memvp_pending_loads: dict[str, InjectionUndo] = {}

    # ------------------------------------------------------------------------------------------------- entry points

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward with this call's visual memory (`image_features`/`image_mask`/`pixel_values`).

        `pixel_values` never reach the base model: on a VLM base the language model runs on the text alone.
        """
        return call_with_memory(self._memvp_runtime, self.memvp_memory, underlying_forward(self.model), args, kwargs,
                                self.model)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's `generate()`; the memory is computed once per call and read by every decode step."""
        install_entry(self.model, self._memvp_runtime, with_generate=False)  # see install_entry: decode steps enter here
        return generate_with_memory(self._memvp_runtime, self.memvp_memory, self.model.generate, args, kwargs,
                                    self.model)

    @property
    def vision_encoder(self) -> Optional[Any]:
        """The attached `memvp_peft.vision.VisionEncoder` (frozen, not saved), or None."""
        return self._memvp_runtime.vision

    def _pre_injection_hook(self, model: nn.Module, config: MemVPConfig, adapter_name: str) -> None:
        self._ensure_memvp_state()

    def _prepare_adapter_config(self, peft_config: MemVPConfig, model_config: dict) -> MemVPConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = find_ffn_targets(
                self.model, peft_config.layers_to_transform, peft_config.memory_side
            )
        return peft_config

    def _create_memory(self, adapter_name: str, config: MemVPConfig) -> None:
        memory = VisualMemory.from_config(config, model_hidden_size(self.model))
        self.memvp_memory[adapter_name] = memory
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """The memory goes where the base model is. Under `low_cpu_mem_usage=True` it is created on the meta device
        and stays there until the load materialises it (peft calls this method on every module after such a load)."""
        memory = self.memvp_memory[adapter_name] if adapter_name in self.memvp_memory else None
        if memory is None or any(p.device.type == "meta" for p in memory.parameters()):
            return
        device = device or next((p.device for p in self.model.parameters() if p.device.type != "meta"), None)
        if device is not None:
            memory.to(device)

    def _create_and_replace(
        self,
        peft_config: MemVPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        self._ensure_memvp_state()
        if adapter_name not in self.memvp_memory:
            self._create_memory(adapter_name, peft_config)
        if isinstance(target, MemVPLayer):
            layer = target
        else:
            role = role_of_target(target_name)
            # `target` may be a LoRA layer of this adapter's `lora_config` (injected first): wrap it as it is, so the
            # LoRA update stays in the FFN's W1/W2 and the memory is appended after it.
            layer = _LAYER_CLASSES[role](target, self._memvp_runtime)
            layer.set_adapter([adapter_name])
        activation = None  # plain FFN linears use the FFN's own (an override was refused before injection)
        if isinstance(layer, FFNMemoryLayer):
            activation = resolve_activation(layer.get_base_layer(), peft_config.activation)
        layer.update_layer(adapter_name, peft_config, activation)
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # MemVP wraps whole modules; there is no single `.weight` to rebind as LoRA does.
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """All or nothing: checked before anything changes, rolled back if it fails later (see the module docstring).

        A config read from a folder is the first half of a load: its undo is kept until the weights are accepted
        (`_remap_adapter_state_dict_for_load`), so refused weights undo the injection too.
        """
        self._ensure_memvp_state()
        config = self.peft_config[adapter_name]
        undo = InjectionUndo(self, adapter_name)
        try:
            check_before_injection(self, model, config)
            check_cls_token_base(model, config)
            replaced = self._attach_configured_encoder(config)
            lora_config = config.lora_peft_config()
            if lora_config is not None:
                inject_lora(model, adapter_name, lora_config, kwargs.get("low_cpu_mem_usage", False))
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._install_runtime_hooks()
            self._sync_memory_trainability()
        except BaseException:
            undo.restore(self)
            raise
        if replaced is not None and replaced is not self._memvp_runtime.vision:
            release_encoder(replaced)
        mark_injected(config)  # the model is built from it: its built fields are fixed from now on
        if getattr(config, "_memvp_source_folder", None) is not None:
            self._memvp_pending_loads[adapter_name] = undo

    def _abort_pending_load(self, adapter_name: str) -> None:
        """The weights read for `adapter_name` were refused: undo its injection (if it was injected for them)."""
        undo = self._memvp_pending_loads.pop(adapter_name, None)
        if undo is not None:
            undo.restore(self)

    # ------------------------------------------------------------------------------------------------- vision encoder

    def _attach_configured_encoder(self, config: MemVPConfig) -> Optional[VisionEncoder]:
        """Attach the encoder this adapter names (see `vision_attach.configured_encoder`). Returns the encoder this
        replaced, still hooked: the injection detaches it once it has succeeded."""
        encoder = configured_encoder(self.model, self._memvp_runtime, config)
        replaced = None
        if encoder is not None:
            vision = checked_vision(self._memvp_runtime, encoder, [config])
            replaced = switch_vision(self._memvp_runtime, vision, [config], detach_replaced=False)
        family = self._memvp_runtime.family
        if family is not None and encoder is None:  # the family's tower reads the pixels: it checks the config
            family.check_config(config)
        if (config.vision_adapter_dim and not config.vision_num_layers and family is not None
                and family.encoder_tower(self.model) is None):
            raise ValueError(
                f"MemVP: vision_adapter_dim > 0 places MemVP's bottleneck adapters in a vision encoder's blocks, but "
                f"the {family.name} base's own tower is run by its family (with each image's own grid or size), not "
                "as a VisionEncoder: they cannot go into it. Use vision_adapter_dim=0 with this VLM's processor, or "
                "pass `vision_encoder=` a CLIP/SigLIP model to read pixels with instead."
            )
        if config.vision_adapter_dim and not config.vision_num_layers:
            raise ValueError(
                "MemVP: vision_adapter_dim > 0 needs a vision encoder at injection time (to size one adapter per "
                "encoder block): pass `vision_encoder=` a built CLIP/SigLIP model or a local folder."
            )
        return replaced

    def attach_vision_encoder(self, encoder: nn.Module, configs: Optional[list[MemVPConfig]] = None) -> None:
        """Use `encoder` (CLIP/SigLIP vision model, frozen, not saved) to turn `pixel_values` into features.

        Checks that its width matches `visual_dim` (and its depth the saved vision adapters, its hidden states
        `vision_feature_layer`) of every adapter before anything changes: a refused encoder leaves the previous one
        attached, hooks included, and is itself neither hooked nor frozen.
        """
        configs = list(self.peft_config.values()) if configs is None else configs
        switch_vision(self._memvp_runtime, checked_vision(self._memvp_runtime, encoder, configs), configs)

    def _install_runtime_hooks(self) -> None:
        """Entry wrappers, runtime bookkeeping and layer pre-hooks (idempotent; re-run for every new adapter)."""
        model = self.model
        runtime = self._memvp_runtime
        runtime.active_adapters = self.active_adapters
        install_entry(model, runtime, with_generate=True)
        for inner in _inner_entry_modules(model):
            install_entry(inner, runtime, with_generate=False)
        for handle in self._memvp_hook_handles:
            handle.remove()
        self._memvp_hook_handles = []
        pre_hook = make_layer_pre_hook(runtime)
        runtime.checkpointed_layers = [
            module for module in model.modules()
            if isinstance(module, GradientCheckpointingLayer) and any(isinstance(m, MemVPLayer) for m in module.modules())
        ]
        for module in runtime.checkpointed_layers:
            self._memvp_hook_handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def _remove_runtime_hooks(self) -> None:
        for handle in getattr(self, "_memvp_hook_handles", []):
            handle.remove()
        self._memvp_hook_handles = []
        self._memvp_runtime.checkpointed_layers = []
        for module in self.model.modules():
            unwrap_checkpoint_function(module)
            remove_entry(module)
        if self._memvp_runtime.vision is not None:
            release_encoder(self._memvp_runtime.vision)

    # ---------------------------------------------------------------------------------------------------- trainability

    def _sync_memory_trainability(self, inference_mode: bool = False) -> None:
        """The active adapters' memories train; within them, the vision adapters of encoder blocks past the feature
        layer stay frozen (with the paper's penultimate block, the last block's): no gradient ever reaches them."""
        for name, memory in self.memvp_memory.items():
            config = self.peft_config[name]
            trainable = name in self.active_adapters and not inference_mode and not config.inference_mode
            memory.requires_grad_(trainable)
            if trainable and memory.vision_adapters is not None:
                reached = blocks_before_feature_layer(config.vision_feature_layer, len(memory.vision_adapters))
                memory.vision_adapters[reached:].requires_grad_(False)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        if "memvp_memory" in self._modules:
            self._sync_memory_trainability()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._memvp_runtime.active_adapters = self.active_adapters
        self._sync_memory_trainability(inference_mode=inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._memvp_runtime.enabled = enabled

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._memvp_pending_loads.pop(adapter_name, None)
        if adapter_name in self.memvp_memory:
            del self.memvp_memory[adapter_name]
        self._memvp_runtime.active_adapters = self.active_adapters

    # -------------------------------------------------------------------------------------------------- state dict keys

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # `memvp_memory.<adapter>.projector.0.weight` keeps the adapter name in the middle; peft's generic rule only
        # strips it at the end, so an adapter saved as "default" could not be loaded under another name.
        marker = f"memvp_memory.{adapter_name}."
        if marker in key:
            return key.replace(marker, "memvp_memory.")
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict,
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """peft's selection of this adapter's tensors, refused before any file is written if one is a 0-element
        ZeRO-3 partition (see `save_load.py`). When `PeftModel.save_pretrained` asks (it writes the weights next), the
        folder's current adapter is set aside first, so a save killed before it finishes is undone
        (`begin_in_place_save`)."""
        selected = super()._get_adapter_state_dict(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        refuse_partitioned_tensors(selected, f"adapter {adapter_name!r}")
        begin_in_place_save(model, adapter_name)
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Map checkpoint keys to this model and accept exactly the adapter's own tensors (`guards.py`): every
        one present, of the right shape and kind, and nothing else -- peft would load a stray key into the base.

        A refusal of the weights an adapter was injected for (`from_pretrained`, `load_adapter`) also undoes that
        injection, so the refused load leaves the model as it was before the call.
        """
        tuner = getattr(model, "base_model", None)
        tuner = tuner if isinstance(tuner, MemVPModel) else None
        try:
            remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
            check_adapter_tensors(model, adapter_name, remapped, lambda k: cls._remove_adapter_name_from_key(k, adapter_name))
        except BaseException:
            if tuner is not None:
                tuner._abort_pending_load(adapter_name)
            raise
        if tuner is not None:
            tuner._memvp_pending_loads.pop(adapter_name, None)
        return remapped

    # ----------------------------------------------------------------------------------------------- merge and unload

    def _check_merge_allowed(self) -> None:
        if any(config.lora_config is not None for config in self.peft_config.values()):
            raise ValueError(
                MERGE_ERROR + " The LoRA part of this adapter can be merged: `peft_model.merge_lora()` folds it into "
                "the base weights and keeps the visual memory working."
            )
        raise ValueError(MERGE_ERROR)

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_merge_allowed()

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, *args: Any,
                             **kwargs: Any) -> None:
        """Refused by name (peft's LoRA-only method would otherwise fail with an unrelated AttributeError): a MemVP
        adapter is no weight delta that sums -- its projector is non-linear (Linear -> SiLU -> Linear) and its keys
        pass through the FFN's activation, so a weighted mix of two adapters' tensors reads neither image the way
        either adapter learned."""
        raise ValueError(
            f"MemVP adapters cannot be combined with add_weighted_adapter (asked to mix {list(adapters)} into "
            f"{adapter_name!r}): the visual memory is not a linear weight delta, so a weighted sum of two adapters' "
            "projectors and position embeddings is not a mix of what they learned. Keep the adapters separate and "
            "switch with set_adapter(), or train one adapter on both datasets."
        )

    def merge_lora(self, safe_merge: bool = False) -> None:
        """Fold the LoRA part of the active adapter into the base weights; the visual memory keeps working.

        This is how MemVP+LoRA is deployed: afterwards the model has plain linears where LoRA was, and the adapter
        saved from it holds the visual memory only (its `lora_config` is cleared), to be loaded onto the *merged*
        base.
        """
        inactive = [n for n, c in self.peft_config.items() if c.lora_config and n not in self.active_adapters]
        if inactive:
            raise ValueError(
                f"MemVP: merge_lora() merges the active adapter's LoRA, but the inactive adapters {inactive} also hold "
                "LoRA weights that would be lost; delete them (delete_adapter) or activate them first."
            )
        merge_lora_layers(self.model, safe_merge)
        for config in self.peft_config.values():
            record_built_field(config, "lora_config", None)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        self._remove_runtime_hooks()
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            # LoRA layers nested inside a wrapped FFN are only reachable once the MemVP wrapper is gone
            model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        return model


def _inner_entry_modules(model: nn.Module) -> list[nn.Module]:
    """Modules below the top model that callers reach directly and that hold MemVP layers: the backbone
    (`model.base_model`, which TRL's fused LM head calls with the forward's kwargs) and the encoder of an
    encoder-decoder model (which `generate()` runs itself, with the model kwargs)."""
    found = []
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    encoder = model.get_encoder() if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else None
    for module in (backbone, encoder):
        if (
            isinstance(module, nn.Module)
            and module is not model
            and all(module is not m for m in found)
            and any(isinstance(m, MemVPLayer) for m in module.modules())
        ):
            found.append(module)
    return found


def attach_vision_encoder(peft_model: nn.Module, encoder: nn.Module) -> None:
    """Attach a frozen CLIP/SigLIP vision model to a MemVP PeftModel so that it accepts `pixel_values`.

    Use it after `PeftModel.from_pretrained` when the adapter recorded an in-memory encoder, or to swap encoders.
    """
    tuner = getattr(peft_model, "base_model", peft_model)
    if not isinstance(tuner, MemVPModel):
        raise ValueError(f"attach_vision_encoder expects a MemVP PeftModel, got {type(peft_model).__name__}.")
    tuner.attach_vision_encoder(encoder)


def memvp_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable MemVP parameters of a (Peft) model by name -- handy for optimiser groups and tests."""
    return {n: p for n, p in model.named_parameters() if "memvp" in n}


# ------------------------------------------------------------------------------------------------------ the LoRA part


class _LanguageModelLora(LoraModel):
    """peft's `LoraModel`, matching no module under `outside` (the names a VLM base holds beside its language model).

    peft asks the tuner whether each module is a target (`_check_target_module_exists`), after resolving
    `"all-linear"`; answering "no" there keeps every other matching rule (suffixes, regex, `layers_to_transform`,
    `exclude_modules`) peft's own. What would have matched is recorded in `matched_outside` for the error message.
    """

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, low_cpu_mem_usage: bool,
                 outside: tuple[str, ...], matched_outside: list[str]) -> None:
        # set before LoraModel.__init__, which injects right away
        self._outside = tuple(prefix + "." for prefix in outside)
        self._matched_outside = matched_outside
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)

    def _check_target_module_exists(self, peft_config: Any, key: str) -> Any:
        match = super()._check_target_module_exists(peft_config, key)
        if match and (key + ".").startswith(self._outside):
            self._matched_outside.append(key)
            return False
        return match


def inject_lora(model: nn.Module, adapter_name: str, lora_config: Any, low_cpu_mem_usage: bool) -> None:
    """Inject `lora_config` as adapter `adapter_name`, on the language model only (see the module docstring).

    A config whose targets lie only outside the language model is refused. The temporary LoraModel overwrites
    `model.peft_config`; ours is put back."""
    outside = tuple(vlm_modules_outside_language_model(model))
    matched_outside: list[str] = []
    previous = model.__dict__.pop("peft_config", None)  # else LoraModel would add its config to ours
    try:
        _LanguageModelLora(model, lora_config, adapter_name, low_cpu_mem_usage, outside, matched_outside)
    except ValueError as error:
        if matched_outside:
            raise ValueError(_outside_only_message(lora_config, outside, matched_outside)) from error
        raise
    finally:
        model.__dict__.pop("peft_config", None)
        if previous is not None:
            model.peft_config = previous
    if not any(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in model.modules()):
        if matched_outside:
            raise ValueError(_outside_only_message(lora_config, outside, matched_outside))
        raise ValueError(
            f"MemVP: lora_config.target_modules={lora_config.target_modules} matched no module for adapter "
            f"{adapter_name!r} (modules inside an FFN that another adapter already wraps cannot take a new LoRA)."
        )


def _outside_only_message(lora_config: Any, outside: tuple[str, ...], matched_outside: list[str]) -> str:
    shown = ", ".join(matched_outside[:3]) + (", ..." if len(matched_outside) > 3 else "")
    targets = lora_config.target_modules
    targets = sorted(targets) if isinstance(targets, set) else targets
    return (
        f"MemVP: lora_config.target_modules={targets!r} match only modules outside the language "
        f"model of this VLM ({shown}, under {', '.join(outside)}). The LoRA part of a MemVP adapter goes on the "
        "language model only: MemVP runs the vision tower frozen and without gradients and never runs the VLM's "
        "projector, so LoRA there would never train. Target the language model's linears (e.g. q_proj, v_proj); to "
        "adapt the vision tower, set MemVPConfig(vision_adapter_dim=...)."
    )


def merge_lora_layers(model: nn.Module, safe_merge: bool) -> None:
    """Fold every LoRA layer of `model` into its base linear and put the plain linear back in its place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=safe_merge)
            parent, _, child_name = _get_submodules(model, name)
            setattr(parent, child_name, module.get_base_layer())
