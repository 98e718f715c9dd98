"""What keeps an adapter's injection and load all or nothing: refusals before anything changes, the check of what
an adapter file may put into the model, and the undo of whatever fails in between.

**Before injection.** Injection changes the caller's model in place (wrappers, hooks, frozen parameters). Whatever
can be refused without changing it is refused first (`check_before_injection`), with a ValueError that names the
setting and what the model has: the base depth an adapter was made for, `layers_pattern` / `layers_to_transform`
against the model's layer stacks, a `vision_encoder` folder that is not there, an adapter folder without readable
weights, and targets that are no FFN block (`targets.check_ffn_targets`), `modules_to_save` that a VLM base never
runs with gradients.

**At load.** peft loads an adapter with `model.load_state_dict(..., strict=False)` after mapping its keys: a key that
names a base-model tensor (`base_model.model.model.embed_tokens.weight`) is loaded *into the frozen base*, a missing
one leaves random weights, and an integer or bool tensor is silently cast into a float parameter.
`check_adapter_tensors` runs inside `MemVPModel._remap_adapter_state_dict_for_load` -- the hook peft calls on every
load, before anything is written -- and refuses each of these by name (the key as it is stored in the file). It also
refuses values no trained adapter holds (`check_finite_values`): NaN or inf, and finite values beyond
`LARGEST_ADAPTER_VALUE` or beyond what the model's tensor dtype can hold. Such an adapter loads without complaint
otherwise, and every answer of the model is then computed from NaN (greedy decoding of NaN logits prints an empty
string).

**Undo.** A refused `get_peft_model`, `add_adapter`, `load_adapter` or `from_pretrained` leaves the model exactly as
it was. peft changes the caller's model in place while it injects: modules are replaced (MemVP wrappers, LoRA
layers), parameters are frozen, instance attributes are set (our entry wrappers' `forward`/`generate`,
`peft_config`), hooks are registered. A failure half-way -- or a load whose weights are refused after the adapter was
injected for them -- would leave all that behind, and the caller's own model then misbehaves. `InjectionUndo`
records, before injection, what injection can change and puts it back:

* on every module of the base model: its child modules, parameters, buffers and hooks (the dicts, restored in place
  so that hook handles stay valid), its other instance attributes, and which parameters train;
* on the tuner: the adapters' memories, the runtime's vision encoder (a newly attached one is detached, the previous
  one re-attached), active adapters and layer pre-hooks, peft's target bookkeeping, and the adapter's config.

It only uses what `nn.Module` stores on instances; no peft class is patched.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
from peft.tuners.tuners_utils import (BaseTunerLayer, _filter_state_dict_by_key_prefixes,
                                      _get_tuner_state_dict_key_prefixes)
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..hub import is_hub_id
from ..vision import (FAMILIES, IN_MEMORY_PREFIX, has_own_vision_model, unsupported_vlm_message,
                      vlm_modules_outside_language_model)
from .config import MemVPConfig
from .save_load import CONFIG_NAME, check_adapter_weights
from .targets import check_ffn_targets, find_layer_stacks


# ---------------------------------------------------------------------------------------------------- before injection


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
    check_adapter_weights(folder)


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


def check_supported_vlm(tuner: Any, model: nn.Module, config: MemVPConfig) -> None:
    """Refuse a VLM base of no supported family (`vision.families.FAMILIES`) unless a separate encoder reads the
    adapter's pixels: `config.vision_encoder`, or the encoder already attached for an earlier adapter.

    Without a family MemVP can read neither that VLM's processor's batches nor its tower, so an adapter on it would
    be accepted and fail (or silently see no image) only when images arrive; refused here, before anything changes,
    naming the class and the supported families. With a separate encoder the VLM's own image path never runs (its
    placeholders are refused at the call): the adapter is a language-model adapter fed by that encoder."""
    if not has_own_vision_model(model) or any(family.covers(model) for family in FAMILIES):
        return
    runtime = getattr(tuner, "_memvp_runtime", None)
    if config.vision_encoder is not None or getattr(runtime, "vision", None) is not None:
        return
    raise ValueError(f"MemVP: {unsupported_vlm_message(type(model).__name__)}")


def check_before_injection(tuner: Any, model: nn.Module, config: MemVPConfig) -> None:
    """Every check that needs no change to the model, in the order a user would fix them."""
    check_supported_vlm(tuner, model, config)
    check_vision_encoder_folder(config)
    check_depth(model, config)
    check_layer_selection(model, config)
    check_source_folder(config)
    check_modules_to_save(model, config)
    tuner._prepare_adapter_config(config, {})
    check_ffn_targets(model, matched_targets(tuner, model, config), config.activation)


# --------------------------------------------------------------------------------------- the adapter's tensors at load


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


# ---------------------------------------------------------------------------------------------------------------- undo


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
        self.family = runtime.family
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
        runtime.family = self.family
        runtime.active_adapters = self.active_adapters
        tuner._memvp_hook_handles = self.hook_handles
        tuner.targeted_module_names[:] = self.targeted[0]
        tuner.targeted_parameter_names[:] = self.targeted[1]
        if self.config is not None:
            self.config.__dict__.clear()
            self.config.__dict__.update(self.config_state)
        tuner.peft_config.pop(self.adapter_name, None)
