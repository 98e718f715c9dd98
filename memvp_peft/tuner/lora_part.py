"""The LoRA part of a MemVP adapter (`MemVPConfig.lora_config`), injected and merged with peft's own LoRA machinery.

LoRA is injected first, so that it can target linears inside an FFN (`mlp.gate_proj`); MemVP then wraps the FFN
whole and the LoRA keys become `mlp.base_layer.gate_proj.lora_A...`. Both are one adapter: saved in one file,
switched, deleted and rolled back together (`rollback.py` undoes a LoRA part injected for a refused adapter).

The LoRA part goes on the language model only, as in LLaVA's LoRA recipe. On a VLM base the target names of a
language model (`q_proj`, `v_proj`, `fc1`, ...) also name linears of the vision tower and the multi-modal projector,
but neither can train there: MemVP runs the tower frozen and without gradients to compute features, and never runs
the VLM's projector. LoRA placed there would be counted as trainable and saved, yet never change. The vision tower is
adapted by MemVP's own vision adapters (`vision_adapter_dim`), which run with gradients.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import _get_submodules
from torch import nn

from ..vision import vlm_modules_outside_language_model


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
