"""Undo for an injection: a refused `get_peft_model`, `add_adapter`, `load_adapter` or `from_pretrained` leaves the
model exactly as it was.

peft changes the caller's model in place while it injects: modules are replaced (MemVP wrappers, LoRA layers),
parameters are frozen, instance attributes are set (our entry wrappers' `forward`/`generate`, `peft_config`), hooks
are registered. A failure half-way -- or a load whose weights are refused after the adapter was injected for them --
would leave all that behind, and the caller's own model then misbehaves. `InjectionUndo` records, before injection,
what injection can change and puts it back:

* on every module of the base model: its child modules, parameters, buffers and hooks (the dicts, restored in place
  so that hook handles stay valid), its other instance attributes, and which parameters train;
* on the tuner: the adapters' memories, the runtime's vision encoder (a newly attached one is detached, the previous
  one re-attached), active adapters and layer pre-hooks, peft's target bookkeeping, and the adapter's config.

It only uses what `nn.Module` stores on instances; no peft class is patched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

_TORCH_CONTAINERS = (
    "_parameters",
    "_buffers",
    "_modules",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class ModuleTreeState:
    """The Python-level state of every module under `root` (not tensor values: injection never writes those)."""

    def __init__(self, root: nn.Module) -> None:
        self._entries = []
        for module in root.modules():
            state = module.__dict__
            containers = {key: dict(state[key]) for key in _TORCH_CONTAINERS if isinstance(state.get(key), dict)}
            plain = {
                key: set(value) if isinstance(value, set) else value
                for key, value in state.items()
                if key not in containers
            }
            self._entries.append((module, containers, plain))
        self._trainable = [(parameter, parameter.requires_grad) for parameter in root.parameters()]

    def restore(self) -> None:
        for module, containers, plain in self._entries:
            state = module.__dict__
            for key in [key for key in state if key not in containers and key not in plain]:
                del state[key]
            state.update(plain)
            for key, saved in containers.items():
                current = state[key]
                current.clear()
                current.update(saved)
        for parameter, trainable in self._trainable:
            parameter.requires_grad_(trainable)


class InjectionUndo:
    """What injecting `adapter_name` into `tuner` can change, captured before it starts (see the module docstring)."""

    def __init__(self, tuner: Any, adapter_name: str) -> None:
        runtime = tuner._memvp_runtime
        self.adapter_name = adapter_name
        self.model_state = ModuleTreeState(tuner.model)
        self.memories = dict(tuner.memvp_memory._modules)
        self.memory_trainable = [(p, p.requires_grad) for p in tuner.memvp_memory.parameters()]
        self.vision = runtime.vision
        self.image_token_id = runtime.image_token_id
        self.active_adapters = list(runtime.active_adapters)
        self.hook_handles = list(tuner._memvp_hook_handles)
        self.targeted = (list(tuner.targeted_module_names), list(tuner.targeted_parameter_names))
        self.config = tuner.peft_config.get(adapter_name)
        self.config_state = dict(self.config.__dict__) if self.config is not None else None

    def restore(self, tuner: Any) -> None:
        """Put everything back and forget the adapter (peft's own bookkeeping of it included)."""
        self.model_state.restore()
        tuner.memvp_memory._modules.clear()
        tuner.memvp_memory._modules.update(self.memories)
        for parameter, trainable in self.memory_trainable:
            parameter.requires_grad_(trainable)
        runtime = tuner._memvp_runtime
        if runtime.vision is not None and runtime.vision is not self.vision:
            runtime.vision.detach()
            if self.vision is not None:
                self.vision.attach()  # replaced during the injection: its hooks come back (never twice, see attach)
        runtime.vision = self.vision
        runtime.image_token_id = self.image_token_id
        runtime.active_adapters = self.active_adapters
        tuner._memvp_hook_handles = self.hook_handles
        tuner.targeted_module_names[:] = self.targeted[0]
        tuner.targeted_parameter_names[:] = self.targeted[1]
        if self.config is not None:
            self.config.__dict__.clear()
            self.config.__dict__.update(self.config_state)
        tuner.peft_config.pop(self.adapter_name, None)
