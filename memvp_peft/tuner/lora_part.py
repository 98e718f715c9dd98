"""The LoRA part of a MemVP adapter (`MemVPConfig.lora_config`), injected and merged with peft's own LoRA machinery.

LoRA is injected first, so that it can target linears inside an FFN (`mlp.gate_proj`); MemVP then wraps the FFN
whole and the LoRA keys become `mlp.base_layer.gate_proj.lora_A...`. Both are one adapter: saved in one file,
switched, deleted and rolled back together (`rollback.py` undoes a LoRA part injected for a refused adapter).
"""

from __future__ import annotations

from typing import Any

from peft.tuners.lora import LoraLayer, LoraModel
from peft.utils import _get_submodules
from torch import nn


def inject_lora(model: nn.Module, adapter_name: str, lora_config: Any, low_cpu_mem_usage: bool) -> None:
    """Inject `lora_config` as adapter `adapter_name`. The temporary LoraModel overwrites `model.peft_config`; ours is
    put back."""
    previous = model.__dict__.pop("peft_config", None)  # else LoraModel would add its config to ours
    try:
        LoraModel(model, lora_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    finally:
        model.__dict__.pop("peft_config", None)
        if previous is not None:
            model.peft_config = previous
    if not any(isinstance(m, LoraLayer) and adapter_name in m.lora_A for m in model.modules()):
        raise ValueError(
            f"MemVP: lora_config.target_modules={lora_config.target_modules} matched no module for adapter "
            f"{adapter_name!r} (modules inside an FFN that another adapter already wraps cannot take a new LoRA)."
        )


def merge_lora_layers(model: nn.Module, safe_merge: bool) -> None:
    """Fold every LoRA layer of `model` into its base linear and put the plain linear back in its place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=safe_merge)
            parent, _, child_name = _get_submodules(model, name)
            setattr(parent, child_name, module.get_base_layer())
