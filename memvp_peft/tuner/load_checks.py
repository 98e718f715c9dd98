"""What an adapter file may put into a model: exactly the adapter's own tensors, each of the right shape and kind.

peft loads an adapter with `model.load_state_dict(..., strict=False)` after mapping its keys: a key that names a
base-model tensor (`base_model.model.model.embed_tokens.weight`) is loaded *into the frozen base*, a missing one
leaves random weights, and an integer or bool tensor is silently cast into a float parameter. `check_adapter_tensors`
runs inside `MemVPModel._remap_adapter_state_dict_for_load` -- the hook peft calls on every load, before anything is
written -- and refuses each of these by name (the key as it is stored in the file).
"""

from __future__ import annotations

from typing import Callable

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

_PEFT_PREFIX = "base_model.model."


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of `model` that belongs to `adapter_name`: its tuner tensors (memory, MemVP and LoRA layers) and
    the copies of its `modules_to_save` / trainable tokens (peft's auxiliary wrappers)."""
    state = model.state_dict()
    own = _filter_state_dict_by_key_prefixes(state, _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name))
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for key in module.adapter_state_dict_load_map(adapter_name).values():
                full = f"{name}.{key}"
                if full in state:
                    own[full] = state[full]
    return own


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def check_adapter_tensors(
    model: nn.Module,
    adapter_name: str,
    remapped: dict[str, torch.Tensor],
    file_key: Callable[[str], str],
) -> None:
    """Raise a ValueError naming the first tensor of `remapped` (checkpoint keys mapped onto `model`) that is not one
    of the adapter's, is missing, or has another shape or kind (bool / integer / float) than the model's tensor."""
    own = adapter_tensors(model, adapter_name)

    def lookup(key: str):
        if key in own:
            return key
        stripped = key.removeprefix(_PEFT_PREFIX)  # adapters injected without a PeftModel carry no prefix
        return stripped if stripped in own else None

    strangers = sorted(key for key in remapped if lookup(key) is None)
    if strangers:
        raise ValueError(
            f"MemVP refused to load the adapter: tensor {file_key(strangers[0])} in the adapter file is not one of this "
            f"adapter's tensors (it would overwrite the base model){f' (and {len(strangers) - 1} more)' if len(strangers) > 1 else ''}. "
            "An adapter file holds only the adapter's own tensors (base_model.memvp_memory.*, LoRA and "
            "modules_to_save weights); remove the others from it."
        )
    present = {lookup(key) for key in remapped}
    missing = sorted(key for key in own if key not in present and "dropout" not in key)
    if missing:
        raise ValueError(
            f"the adapter checkpoint lacks {len(missing)} tensor(s) this model needs, e.g. "
            f"{[file_key(k) for k in missing[:3]]}"
        )
    for key, tensor in remapped.items():
        want = own[lookup(key)]
        if tuple(want.shape) != tuple(tensor.shape) and want.numel() != 0:
            raise ValueError(
                f"tensor {file_key(key)} has shape {tuple(tensor.shape)} in the checkpoint but the model expects "
                f"{tuple(want.shape)} (adapter trained for another base model or config?)"
            )
        if _kind(tensor.dtype) != _kind(want.dtype):
            raise ValueError(
                f"tensor {file_key(key)} is stored as {str(tensor.dtype).replace('torch.', '')} in the adapter file, "
                f"but the model's tensor is {str(want.dtype).replace('torch.', '')}: {_kind(tensor.dtype)} values "
                f"cannot stand for {_kind(want.dtype)} weights (a damaged or hand-edited file?)."
            )
