"""`assert_untouched(model, pristine)`: a refused call left `model` exactly like a copy taken before the call.

"Exactly" means what a user can observe: the module tree (names and classes), every tensor of the state dict, which
parameters train, the instance attributes of every module (an instance `forward` or `generate` is what an entry
wrapper leaves behind) and the number of hooks on every module.
"""

from __future__ import annotations

import torch
from torch import nn

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_CONTAINERS = {"_parameters", "_buffers", "_modules", *_HOOK_DICTS}


def describe(model: nn.Module) -> dict:
    return {
        "modules": [(name, type(module).__name__) for name, module in model.named_modules()],
        "trainable": {name: p.requires_grad for name, p in model.named_parameters()},
        "attributes": {
            name: sorted(key for key in module.__dict__ if key not in _CONTAINERS)
            for name, module in model.named_modules()
        },
        "hooks": {
            name: [len(getattr(module, attr)) for attr in _HOOK_DICTS] for name, module in model.named_modules()
        },
    }


def assert_untouched(model: nn.Module, pristine: nn.Module) -> None:
    assert describe(model) == describe(pristine)
    state, expected = model.state_dict(), pristine.state_dict()
    assert list(state) == list(expected)
    different = [key for key in state if not torch.equal(state[key], expected[key])]
    assert not different, different
