"""What an adapter file may put into a model: exactly the adapter's own tensors, each of the right shape and kind.

peft loads an adapter with `model.load_state_dict(..., strict=False)` after mapping its keys: a key that names a
base-model tensor (`base_model.model.model.embed_tokens.weight`) is loaded *into the frozen base*, a missing one
leaves random weights, and an integer or bool tensor is silently cast into a float parameter. `check_adapter_tensors`
runs inside `MemVPModel._remap_adapter_state_dict_for_load` -- the hook peft calls on every load, before anything is
written -- and refuses each of these by name (the key as it is stored in the file).

It also refuses values no trained adapter holds (`check_finite_values`): NaN or inf, and finite values beyond
`LARGEST_ADAPTER_VALUE` or beyond what the model's tensor dtype can hold. Such an adapter loads without complaint
otherwise, and every answer of the model is then computed from NaN (greedy decoding of NaN logits prints an empty
string).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

_PEFT_PREFIX = "base_model.model."

#: The largest magnitude an adapter value may have: the square root of float32's largest number (2**64, ~1.8e19).
#: Every adapter tensor enters a product with a weight or an activation (the projector's two layers, `x K^T`, the read
#: of V, LoRA's `B A`), so a value whose square overflows float32 turns the forward into inf/NaN in every compute
#: dtype; a trained adapter's values are around 1 (training stops when its parameters stop being finite: the
#: `memvp-train` callback `StopOnNonFinite`), some 19 orders of magnitude below it.
LARGEST_ADAPTER_VALUE = math.sqrt(torch.finfo(torch.float32).max)


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
    compute_dtype = _narrowest_float_dtype(model)

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
        if tensor.dtype.is_floating_point:
            check_finite_values(tensor, _narrowest(want.dtype, compute_dtype), file_key(key))


def _narrowest_float_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype of the model's parameters with the smallest range: what the adapter's tensors are cast to in
    the forward (the memory is read in the FFN input's dtype, LoRA in its layer's), e.g. float16 for a float16 base
    whose adapter is float32."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    return min(dtypes, key=lambda dtype: torch.finfo(dtype).max, default=torch.float32)


def _narrowest(first: torch.dtype, second: torch.dtype) -> torch.dtype:
    if not first.is_floating_point:
        return second
    return first if torch.finfo(first).max <= torch.finfo(second).max else second


def check_finite_values(tensor: torch.Tensor, model_dtype: torch.dtype, name: str) -> None:
    """Refuse a float tensor holding NaN or inf, or a finite value larger in magnitude than `LARGEST_ADAPTER_VALUE`
    or than `model_dtype` holds (the dtype the model computes it in: 1e5 is inf in float16).

    Why at load and not at the first forward: the forward path must not read values on the host (it would synchronise
    with the accelerator at every layer), and a load is where the file is still there to be named. NaN in a file
    comes from a run that diverged or a damaged file; a value like 1e30 from a hand edit or a broken conversion."""
    values = tensor.detach()
    non_finite = int((~torch.isfinite(values)).sum())
    if non_finite:
        nan = int(torch.isnan(values).sum())
        what = " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{non_finite - nan} inf"
                                              if non_finite > nan else "") if part)
        raise ValueError(
            f"MemVP refused to load the adapter: tensor {name} holds {what} value(s) (of {values.numel()}). A trained "
            "adapter holds finite numbers only; this file comes from a run whose loss or weights diverged, or it is "
            "damaged: retrain (a smaller learning rate or visual/memory scale) or use another checkpoint."
        )
    if not values.numel():
        return
    largest = float(values.abs().max())
    limit = min(LARGEST_ADAPTER_VALUE, torch.finfo(model_dtype).max if model_dtype.is_floating_point else math.inf)
    if largest > limit:
        why = (f"the model computes it in {str(model_dtype).replace('torch.', '')}, which holds at most {limit:.4g}"
               if limit < LARGEST_ADAPTER_VALUE else
               f"an adapter value is at most {limit:.3g} (2**64: its square still fits float32; trained adapters "
               "hold values around 1)")
        raise ValueError(
            f"MemVP refused to load the adapter: tensor {name} holds a value of magnitude {largest:.4g}, but {why}. "
            "The model would compute inf/NaN from it and answer nothing; the file is damaged or was edited."
        )
