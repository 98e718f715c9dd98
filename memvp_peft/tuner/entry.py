"""Entry points: where a call's visual inputs become its `CallMemory`, for every way users reach the model.

* `PeftModel.forward` -> `MemVPModel.forward` -> `call_with_memory` (the Trainer, TRL and plain calls go this way).
  The tuner then calls the base model's underlying forward -- or a forward a trainer installed over ours (TRL's fused
  LM head replaces `get_base_model().forward` and calls the backbone directly): the call is already active, so the
  layers read the images either way.
* `PeftModel.generate` -> `MemVPModel.generate` -> `generate_with_memory`: the memory is built once and handed to the
  model's own decode steps as the keyword `memvp_call`; HF's `generate` forwards unknown model kwargs to every step
  (and, for encoder-decoder models, to the encoder call), where the entry wrapper picks it up.
* The base model (and the encoder of an encoder-decoder model) carries an instance `forward` wrapper whose
  signature names `image_features`/`image_mask`/`pixel_values` -- so the HF `Trainer` keeps those dataset columns --
  and `memvp_call`, so `generate` validates it. The wrapper reads its runtime from the module it is bound to, so a
  deep copy of the model gets its own.

A nested entry without visual inputs inside an active call belongs to that call (a trainer's replaced forward
calling ours as its original); outside any call it is text-only. Visual inputs that arrive at a decoder layer never
went through an entry point: `make_layer_pre_hook` raises instead of letting the model train text-only.

**A batch from a VLM's own processor** (the last section of this module). The processor of a supported VLM family (`vision.families`) writes each image into the text as placeholder tokens
and hands its pixels beside it in the family's layout. MemVP's language model must see the text alone -- the very
token sequence `MemVPProcessor` builds for that text -- and its memory the images. At the entry of a call (and once
at the entry of `generate()`, for the prompt) `images_out_of_the_sequence`:

* assigns the call's images to their rows by the rows' placeholders (`VLMFamily.images_of_rows`: every row's
  placeholders must be exactly its images' tokens, and no image may be left over) and turns them into MemVP's visual
  inputs, one entry per row (`VLMFamily.memvp_visual_inputs`: padded, with an `image_mask`; a row without an image
  reads only p_k/p_v);
* removes the placeholder positions (and the family's begin/end-of-image tokens) from `input_ids` and from every
  per-token input beside it -- `attention_mask`, `labels`, `token_type_ids`, `mm_token_type_ids` -- and re-pads each
  row to the batch's new longest, on the side the batch was padded (read from `attention_mask`: left for a
  generation prompt, right for training). Rows lose different numbers of tokens, so a batch without padding may come
  out padded (an `attention_mask` is then added);
* drops `position_ids`, `cache_position` (and M-RoPE's `rope_deltas`): they count the placeholders. The model
  computes them again for the text-only sequence, as it does for a text-only prompt (for M-RoPE models, too: from
  `input_ids` alone).

`generate()` strips the prompt once; its decode steps are text. The ids it returns start with the prompt *as the
language model saw it*: without placeholders (decode `out[:, prompt.shape[1]:]` of the stripped prompt, or skip
special tokens).

What cannot be matched is refused, never guessed: placeholders without the VLM's `pixel_values` (or with
`image_features` / an `image_mask`, which say nothing of rows), a row whose placeholders are not whole images,
images without placeholders, a padding side that cannot be read, a batch whose rows would be left without text; and,
under `torch.compile`, a family base's `pixel_values` without an `image_mask` (the new length depends on values no
compiled graph can follow: refused by their metadata).

Why the count is exact: removing positions keeps every other token in order; a right-padded row then holds its text
at the same positions a placeholder-free batch would (same logits); a left-padded row ends at the same position.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..vision.families import VLMFamily, supported_families
from .input_tokens import generate_grown, grown_call
from .runtime import ActiveCall, CallMemory, MemoryRuntime, wrap_checkpoint_function
from .visual_inputs import VISUAL_INPUT_NAMES, infer_batch_size, reject_vlm_image_path_inputs, values_checkable

CALL_KWARG = "memvp_call"
#: What transformers' Trainer reads to count the label tokens itself (`install_entry`); and our mark that we set it.
LOSS_KWARGS_ATTR = "accepts_loss_kwargs"
_LOSS_KWARGS_MARK = "_memvp_set_accepts_loss_kwargs"
_ENTRY_MARK = "_memvp_entry"
RUNTIME_ATTR = "_memvp_runtime"


def _pop_visual_inputs(kwargs: dict) -> tuple[Any, Any, Any]:
    return tuple(kwargs.pop(name, None) for name in VISUAL_INPUT_NAMES)  # type: ignore[return-value]


def _reject_image_placeholders(runtime: MemoryRuntime, args: tuple, kwargs: dict, given: str) -> None:
    """Placeholder tokens MemVP cannot match to images: any VLM's without a family (its processor's batch is not
    read: e.g. TRL's collator with such a VLM's processor), a family's without its processor's `pixel_values`
    (`given` says what came instead). On accelerator tensors the check costs a host-device sync, so it runs on the
    first call there (a wrong processor shows on the first batch) and afterwards only with MEMVP_CHECK_VALUES=1; on
    CPU, always."""
    token = runtime.image_token_id
    input_ids = input_ids_of(args, kwargs)
    if token is None or input_ids is None or torch.compiler.is_compiling():
        return
    if not values_checkable(input_ids):
        if runtime.placeholders_checked:
            return
        runtime.placeholders_checked = True
    if not bool((input_ids == token).any()):
        return
    family = runtime.family
    if family is not None:
        raise ValueError(
            f"MemVP: `input_ids` contain the {family.name} image placeholder token (id {token}), but {given}. MemVP "
            "takes the images out of the sequence into its memory and matches each row's placeholders to its images: "
            "pass the `pixel_values` (and image keywords) the VLM's processor made with this text, in the same call; "
            "or build the text without placeholders (memvp_peft.MemVPProcessor / MemVPDataCollator)."
        )
    raise ValueError(
        f"MemVP: `input_ids` contain the VLM's image placeholder token (id {token}). MemVP puts the image into the "
        "FFN memory, not the sequence, and reads the placeholders of a VLM's own processor only for the supported "
        f"families ({supported_families()}): build the text without `<image>` placeholders "
        "(memvp_peft.data.MemVPDataCollator does this; with TRL's trainers, pass "
        "processing_class=memvp_peft.MemVPProcessor.from_pretrained(<the VLM's folder>) instead of the VLM's own "
        "processor) and pass the image as `pixel_values`."
    )


def _pad_token_id(owner: nn.Module) -> Optional[int]:
    """The base's pad token (its config, its text config, its generation config), for rows the removal re-pads."""
    config = getattr(owner, "config", None)
    for source in (config, getattr(config, "text_config", None), getattr(owner, "generation_config", None)):
        value = getattr(source, "pad_token_id", None)
        if isinstance(value, int):
            return value
    return None


def _read_vlm_processor_batch(
    runtime: MemoryRuntime, args: tuple, kwargs: dict, visual: tuple, owner: nn.Module, default_side: str
) -> tuple[tuple, dict, tuple]:
    """The call as MemVP reads it (the last section of this module): a batch of the family's own processor -- its
    `pixel_values` without an `image_mask`, and its placeholders in `input_ids` -- with the images out of the sequence
    and in `visual` (`(image_features, image_mask, pixel_values)`); any other call as it is, once its placeholders
    and image keywords are checked. Finding placeholders reads `input_ids`' values: on an accelerator, one sync per call of a
    family base with `pixel_values` and no `image_mask` (the sequence's new length depends on them anyway)."""
    features, mask, pixels = visual
    family = runtime.family
    input_ids = input_ids_of(args, kwargs)
    processor_batch = (family is not None and pixels is not None and mask is None and features is None
                       and input_ids is not None)
    if processor_batch and torch.compiler.is_compiling():
        raise ValueError(
            f"MemVP: under torch.compile a {family.name} base's `pixel_values` need an `image_mask`: without one they "
            "may be the VLM processor's batch, whose placeholders MemVP takes out of `input_ids` -- a sequence length "
            "that depends on their values, which a compiled graph cannot follow. Run such batches eagerly, or build "
            "them with memvp_peft.MemVPProcessor / MemVPDataCollator (text without placeholders, an image_mask)."
        )
    if processor_batch and has_placeholders(family, input_ids):
        configs = [runtime.configs[name] for name in runtime.active_adapters if name in runtime.configs]
        args, kwargs, built = images_out_of_the_sequence(
            family, pixels, args, kwargs, _pad_token_id(owner), default_side, configs)
        return args, kwargs, (built.get("image_features"), built.get("image_mask"), built.get("pixel_values"))
    given = ("no `pixel_values` came with them" if pixels is None and features is None else
             "they came with `image_features` / an `image_mask`, which the placeholders cannot be matched against")
    _reject_image_placeholders(runtime, args, kwargs, given)
    keywords = [name for name in getattr(family, "image_keywords", ()) if kwargs.get(name) is not None]
    if keywords:
        raise ValueError(
            f"MemVP: {keywords} came without the {family.name} processor's image placeholders in `input_ids` (and "
            "its `pixel_values` without an `image_mask`): they describe images placed in the sequence, which this "
            "call has none of. Pass the processor's whole batch, or none of its image keywords."
        )
    return args, kwargs, visual


#: Keywords of a packed / padding-free batch (TRL's `padding_free`, BFD packing): several samples share one row.
PACKED_SEQUENCE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _reject_packed_rows(kwargs: dict) -> None:
    """MemVP's memory is one per row; a packed row holds several samples, each with its own image."""
    packed = [name for name in PACKED_SEQUENCE_KWARGS if kwargs.get(name) is not None]
    if packed:
        raise ValueError(
            f"MemVP: a packed (padding-free) batch ({packed}) came with visual inputs, but the visual memory is one "
            "per row and a packed row holds several samples, each with its own image. Train without packing and "
            "padding_free (one sample per row)."
        )


def _warn_if_training_without_images(runtime: MemoryRuntime, memories: nn.ModuleDict) -> None:
    """Once per model: a training call (gradients on, the adapter trainable) before any call brought visual inputs.

    The one failure the model cannot refuse: a trainer that drops the image columns before the model sees them
    (TRL's collators read only `image`/`images`; a precomputed `pixel_values`/`image_features` column is removed) trains
    the adapter text-only. Said once, and not at all after a first call with visual inputs, so a mixed dataset's
    text-only rows stay quiet.
    """
    if runtime.text_only_warned or runtime.seen_visual_inputs or not torch.is_grad_enabled():
        return
    if torch.compiler.is_compiling():
        return
    adapters = [memories[name] for name in runtime.active_adapters if name in memories]
    if not any(p.requires_grad for memory in adapters for p in memory.parameters()):
        return
    runtime.text_only_warned = True
    warnings.warn(
        "MemVP: a training forward ran without any visual input (no pixel_values / image_features / image_mask): "
        "the memory reads only its learned p_k/p_v and the projector learns nothing (a zero gradient). If the rows "
        "have images, they do not reach the model -- e.g. TRL's collators read only 'image'/'images' columns and drop "
        "precomputed 'pixel_values'/'image_features' (memvp_peft.MemVPSFTTrainer refuses that at construction). "
        "Text-only rows in a dataset with images are fine; this is said once.",
        UserWarning,
        stacklevel=4,
    )


def _disabled_kwargs(runtime: MemoryRuntime, pixel_values: Any, image_mask: Any, kwargs: dict) -> dict:
    """Base-model kwargs when the adapter is disabled: a VLM base gets its `pixel_values` back and behaves exactly as
    without MemVP (image features are MemVP's own input and are dropped).

    Not when they come with an `image_mask`: that batch was built for MemVP (MemVPDataCollator, MemVPProcessor), its
    text has no image placeholder for the VLM to put the image in, so the base runs on the text alone -- e.g. the
    reference model of TRL's DPOTrainer, which disables the adapter.
    """
    if pixel_values is not None and image_mask is None and runtime.image_token_id is not None:
        kwargs["pixel_values"] = pixel_values
    return kwargs


def call_with_memory(
    runtime: MemoryRuntime, memories: nn.ModuleDict, forward: Callable, args: tuple, kwargs: dict, owner: nn.Module
) -> Any:
    """Run `forward(*args, **kwargs)` with this call's memory active (see the module docstring for which memory).

    A call that builds its memory for an adapter with `cls_token` also grows its input (`input_tokens.grown_call`,
    with `owner`'s input embeddings); the decode steps of a `generate()` and nested entries inherit the grown input."""
    features, mask, pixels = _pop_visual_inputs(kwargs)
    pinned: Optional[CallMemory] = kwargs.pop(CALL_KWARG, None)
    if not runtime.enabled:
        return forward(*args, **_disabled_kwargs(runtime, pixels, mask, kwargs))
    reject_vlm_image_path_inputs(kwargs, family_keywords(runtime.family))
    has_visual = features is not None or mask is not None or pixels is not None
    if has_visual:
        _reject_packed_rows(kwargs)
        runtime.seen_visual_inputs = True
    batch_size = infer_batch_size(args, kwargs)
    if torch.is_grad_enabled():  # before the memory is built: the vision encoder's blocks run in `build`
        for layer in runtime.layers_reading_the_call():
            wrap_layer_checkpointing(layer, runtime)
    active = runtime.active()
    if pinned is not None:
        if has_visual:
            raise ValueError("MemVP: a generate() step received visual inputs besides the memory of its own call.")
        memory = pinned
    elif not has_visual and active is not None:
        memory = active.memory
    else:
        args, kwargs, (features, mask, pixels) = _read_vlm_processor_batch(
            runtime, args, kwargs, (features, mask, pixels), owner, "right")
        if not has_visual:
            _warn_if_training_without_images(runtime, memories)
        memory = runtime.build(memories, features, mask, pixels, batch_size)
        if memory.cls_input is not None:
            args, kwargs = grown_call(memory.cls_input, owner, args, kwargs)
    previous = runtime.activate(ActiveCall(memory, batch_size))
    try:
        return forward(*args, **kwargs)
    finally:
        runtime.restore(previous)


def generate_with_memory(
    runtime: MemoryRuntime, memories: nn.ModuleDict, generate: Callable, args: tuple, kwargs: dict, owner: nn.Module
) -> Any:
    """Build the memory once and hand it to every decode step of this `generate()` call, and only to those.

    Beam search and `num_return_sequences` expand the batch with `repeat_interleave`; the layers expand the memory
    the same way (`MemoryState.for_input`), so it follows every hypothesis.
    """
    features, mask, pixels = _pop_visual_inputs(kwargs)
    pinned: Optional[CallMemory] = kwargs.pop(CALL_KWARG, None)
    if not runtime.enabled:
        return generate(*args, **_disabled_kwargs(runtime, pixels, mask, kwargs))
    reject_vlm_image_path_inputs(kwargs, family_keywords(runtime.family))
    if pinned is None:  # the prompt loses its placeholders here, once; the decode steps are text
        args, kwargs, (features, mask, pixels) = _read_vlm_processor_batch(
            runtime, args, kwargs, (features, mask, pixels), owner, "left")
        pinned = runtime.build(memories, features, mask, pixels, infer_batch_size(args, kwargs))
        if pinned.cls_input is not None:  # the prompt grows once, here; the decode steps read it as it is
            return generate_grown(pinned.cls_input, owner, generate, args, {**kwargs, CALL_KWARG: pinned})
    elif features is not None or mask is not None or pixels is not None:
        raise ValueError("MemVP: generate() received visual inputs besides the memory of its own call.")
    return generate(*args, **kwargs, **{CALL_KWARG: pinned})


# ------------------------------------------------------------------------------------- wrappers on the base model


def _make_entry(method: str, inner_key: Optional[str]) -> Callable:
    """The entry wrapper for `module.<method>`: it calls the forward/generate that was installed before it (kept in the
    module's `__dict__` under `inner_key`), else the class's own. The closure holds only that key, so a deep copy of
    the model gets wrappers that call the copy's own methods and read the copy's runtime."""

    def entry(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        inner = self.__dict__.get(inner_key) if inner_key else None
        inner = inner or functools.partial(getattr(type(self), method), self)
        runtime: Optional[MemoryRuntime] = self.__dict__.get(RUNTIME_ATTR)
        if runtime is None:  # unloaded: a wrapper someone else still calls passes straight through
            return inner(*args, **kwargs)
        if method == "generate":
            install_entry(self, runtime, with_generate=False)  # decode steps must enter through ours (install_entry)
            return generate_with_memory(runtime, runtime.memories, inner, args, kwargs, self)
        return call_with_memory(runtime, runtime.memories, inner, args, kwargs, self)

    return entry


def _signature_with_memvp_inputs(function: Callable) -> inspect.Signature:
    signature = inspect.signature(function)
    names = (*VISUAL_INPUT_NAMES, CALL_KWARG)
    params = [p for p in signature.parameters.values() if p.name not in names]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in names]
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params + extra + var_kw)


def _bind(function: Callable, module: nn.Module, name: str, inner_key: Optional[str],
          signature: Optional[inspect.Signature]) -> Any:
    """`function` as a marked method of `module` (`types.MethodType`, so a deep copy rebinds it to the copy)."""
    function.__name__ = function.__qualname__ = name
    if signature is not None:
        function.__signature__ = signature
    setattr(function, _ENTRY_MARK, True)
    function._memvp_inner_key = inner_key
    return types.MethodType(function, module)


def is_entry(function: Any) -> bool:
    return getattr(function, _ENTRY_MARK, False)


def _wrap(module: nn.Module, method: str) -> None:
    current = module.__dict__.get(method)
    if is_entry(current):
        return
    signature = _signature_with_memvp_inputs(type(module).forward) if method == "forward" else None
    inner_key = None
    if current is not None:  # someone's own forward/generate (e.g. a trainer's): kept, and called inside ours
        inner_key = f"_memvp_inner_{method}_{sum(k.startswith(f'_memvp_inner_{method}_') for k in module.__dict__)}"
        module.__dict__[inner_key] = current
    module.__dict__[method] = _bind(_make_entry(method, inner_key), module, method, inner_key, signature)


def install_entry(module: nn.Module, runtime: MemoryRuntime, with_generate: bool) -> None:
    """Give `module` the entry wrappers (idempotent). A forward/generate someone installed before us is kept and
    called inside ours.

    On a VLM base with a family (whose processor's batches lose their placeholders here), the top model also says
    `accepts_loss_kwargs = False`, the attribute transformers' `Trainer` reads to decide whether to count the batch's
    label tokens itself (`num_items_in_batch`) and divide the loss by that count: counted before the call, it would
    include the placeholder positions this call takes out of the labels, and scale every loss (and gradient) down by
    the share of image tokens. Without it the loss is the mean over the labels the model scored (TRL's SFT loss:
    over its `label_mask`), per micro-batch.

    Re-run at the start of every `generate()`: a trainer may have installed its own forward over ours since (TRL's
    fused LM head does), and the decode steps must enter through ours -- HF's `generate` checks the `memvp_call`
    keyword against the outermost forward's signature, and ours is the one that turns it into the active call.
    """
    module.__dict__[RUNTIME_ATTR] = runtime
    _wrap(module, "forward")
    if with_generate and hasattr(type(module), "generate"):
        _wrap(module, "generate")
    if with_generate and runtime.family is not None and LOSS_KWARGS_ATTR not in module.__dict__:
        module.__dict__[LOSS_KWARGS_ATTR] = False
        module.__dict__[_LOSS_KWARGS_MARK] = True


def remove_entry(module: nn.Module) -> None:
    """Undo `install_entry`: what was installed before ours comes back (ours may sit in several layers when a trainer
    wrapped it in between; each layer gives back its inner one)."""
    for method in ("forward", "generate"):
        current = module.__dict__.get(method)
        while is_entry(current):
            inner_key = current._memvp_inner_key
            del module.__dict__[method]
            if inner_key is not None:
                module.__dict__[method] = module.__dict__.pop(inner_key)
            current = module.__dict__.get(method)
    module.__dict__.pop(RUNTIME_ATTR, None)
    if module.__dict__.pop(_LOSS_KWARGS_MARK, False):
        module.__dict__.pop(LOSS_KWARGS_ATTR, None)


def underlying_forward(module: nn.Module) -> Callable:
    """What the tuner's forward calls: the module's forward *behind* our entry wrapper (the tuner already made the
    call active), or a forward installed over ours (which calls ours as its original, a nested entry)."""
    current = module.__dict__.get("forward")
    if current is None:
        return module.forward
    if is_entry(current):
        inner_key = current._memvp_inner_key
        return (module.__dict__.get(inner_key) if inner_key else None) or functools.partial(type(module).forward, module)
    return current


# --------------------------------------------------------------------------------------- decoder-layer pre-hook


def make_layer_pre_hook(runtime: MemoryRuntime) -> Callable:
    """Forward pre-hook of every decoder/encoder layer holding MemVP layers.

    * Visual inputs (or a decode step's memory) in the layer's kwargs never went through an entry point -- e.g. a
      forward that calls the backbone directly with `**kwargs` -- and would be ignored: refuse loudly.
    * Gradient checkpointing: wrap the layer's checkpoint function so the recomputation in backward sees the memory of
      the call that ran the forward (installed lazily: users enable checkpointing after `get_peft_model`).
    """

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        leaked = [name for name in (*VISUAL_INPUT_NAMES, CALL_KWARG) if kwargs.get(name) is not None]
        if leaked:
            raise ValueError(
                f"MemVP: {leaked} reached the decoder layer {type(module).__name__} without passing through MemVP's "
                "entry point, so the images would be ignored. Call the PeftModel (its forward/generate), or the base "
                "model's own forward; a forward that calls the backbone directly with the visual inputs in its "
                "kwargs bypasses the visual memory."
            )
        wrap_layer_checkpointing(module, runtime)

    return pre_hook


def wrap_layer_checkpointing(module: nn.Module, runtime: MemoryRuntime) -> None:
    """Wrap `module`'s checkpoint function (once) so its recomputation re-activates the memory (or the vision
    adapters) of the call that ran the forward (`runtime.py`). Installed at a call's entry, before any layer
    runs: transformers before 5.20 checkpoints a layer's whole `__call__`, so its pre-hook runs *inside* the
    checkpoint -- too late to wrap the very checkpoint that is running, and the first step's recomputation would read
    the text-only memory. The layer pre-hook wraps too, for checkpointing enabled on a layer after the call began."""
    if not (getattr(module, "gradient_checkpointing", False) and module.training):
        return
    current = getattr(module, "_gradient_checkpointing_func", None)
    if current is not None and not is_entry(current):
        wrapped = wrap_checkpoint_function(current, runtime)
        setattr(wrapped, _ENTRY_MARK, True)
        module._gradient_checkpointing_func = wrapped


def unwrap_checkpoint_function(module: nn.Module) -> None:
    current = getattr(module, "_gradient_checkpointing_func", None)
    if current is not None and is_entry(current):
        module._gradient_checkpointing_func = current.__wrapped__


# ------------------------------------------------- a batch from a VLM's own processor: the images out of the sequence


#: Per-token inputs that follow `input_ids` (padding value for the positions the re-padding adds).
PER_TOKEN_INPUTS = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}
#: Inputs that count the placeholders' positions: dropped, so the model computes them for the text alone (M-RoPE
#: models' `rope_deltas` and `mm_token_type_ids`, which mark the tokens whose positions follow an image grid).
POSITION_INPUTS = ("position_ids", "cache_position", "rope_deltas", "mm_token_type_ids")


def input_ids_of(args: tuple, kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
    """The call's `input_ids` (keyword or first positional), or None."""
    value = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    return value if isinstance(value, torch.Tensor) else None


def family_keywords(family: Optional[VLMFamily]) -> tuple[str, ...]:
    """The image keywords a family base's processor adds that the family itself reads or refuses (with its own
    message), so the general refusal of a VLM's image-path inputs leaves them to it."""
    return () if family is None else (*family.image_keywords, *family.refused_keywords)


def has_placeholders(family: VLMFamily, input_ids: torch.Tensor) -> bool:
    """Whether `input_ids` hold the family's image placeholder token (a value read: one host-device sync)."""
    return bool((input_ids == family.image_token_id).any())


def images_out_of_the_sequence(
    family: VLMFamily, pixel_values: torch.Tensor, args: tuple, kwargs: dict[str, Any], pad_token_id: Optional[int],
    default_side: str, configs: list[Any],
) -> tuple[tuple, dict[str, Any], dict[str, torch.Tensor]]:
    """The call of a VLM processor's batch as MemVP reads it (module docstring): `(args, kwargs, visual)` with the
    placeholders out of `input_ids` and its per-token inputs, and `visual` the keywords of `MemoryRuntime.build`.

    `pad_token_id` fills the positions the re-padding adds (the batch's own pad where it has one); `default_side` is
    the padding side of a batch that had none ("left" for a generation prompt). `configs` are the active adapters'
    configs (an adapter that tiles images itself cannot read a family's pre-tiled images)."""
    input_ids = input_ids_of(args, kwargs)
    tiled = [config for config in configs if getattr(config, "image_grid", None)]
    if family.tiles_images and tiled:
        raise ValueError(
            f"MemVP: the {family.name} processor tiles each image itself, but an active adapter has "
            f"image_grid={list(tiled[0].image_grid)} (MemVP's own tiling): its tiles would be tiled again. Use "
            "image_grid=None with this VLM's processor."
        )
    images = family.take_image_inputs(pixel_values, kwargs)
    family.check_unread_tokens(input_ids)
    mask = kwargs.get("attention_mask")
    real = _real_positions(input_ids, mask)
    rows = family.images_of_rows(input_ids, real, images)
    visual = family.memvp_visual_inputs(images, rows, configs)
    keep = real & ~family.image_marking_tokens(input_ids)
    side = padding_side(mask, default_side)
    pad = _pad_value(input_ids, mask, pad_token_id)
    lengths = keep.sum(dim=1)
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest == 0:
        raise ValueError("MemVP: without its image placeholder tokens no row of `input_ids` holds any text.")
    index = _target_positions(keep, lengths, longest, side)
    stripped = _moved(input_ids, keep, index, longest, pad)
    if args and isinstance(args[0], torch.Tensor):
        args = (stripped, *args[1:])
    else:
        kwargs["input_ids"] = stripped
    for name, fill in PER_TOKEN_INPUTS.items():
        value = kwargs.get(name)
        if name == "attention_mask":
            kwargs[name] = _moved(torch.ones_like(input_ids) if value is None else value, keep, index, longest, fill)
        elif isinstance(value, torch.Tensor):
            if value.shape != input_ids.shape:
                raise ValueError(
                    f"MemVP: `{name}` has shape {tuple(value.shape)} but `input_ids` {tuple(input_ids.shape)}: a "
                    "per-token input must follow the tokens for the image placeholders to be taken out of it."
                )
            kwargs[name] = _moved(value, keep, index, longest, fill)
    for name in POSITION_INPUTS:
        kwargs.pop(name, None)
    return args, kwargs, visual


def padding_side(attention_mask: Optional[torch.Tensor], default: str) -> str:
    """"left" or "right", as `attention_mask` pads the batch; `default` for a batch without padding. A batch padded
    on both sides cannot be re-padded the way it was: refused."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] == 0:
        return default
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    if left and right:
        raise ValueError(
            "MemVP: `attention_mask` pads some rows on the left and others on the right; taking the image placeholders "
            "out re-pads every row, on the side the batch is padded. Pad the whole batch on one side."
        )
    return "left" if left else "right" if right else default


def _real_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"MemVP: `attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` "
            f"{tuple(input_ids.shape)}; the image placeholders are taken out of both."
        )
    return attention_mask.bool()


def _pad_value(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], pad_token_id: Optional[int]) -> int:
    """The id at the batch's own padded positions, else the model's pad token, else 0 (under a 0 of the mask, no
    position reads it)."""
    if attention_mask is not None:
        padded = input_ids[attention_mask == 0]
        if padded.numel():
            return int(padded[0])
    return 0 if pad_token_id is None else int(pad_token_id)


def _target_positions(keep: torch.Tensor, lengths: torch.Tensor, longest: int, side: str) -> torch.Tensor:
    """Where each kept token goes: its rank among its row's kept tokens, shifted right on a left-padded batch."""
    index = keep.long().cumsum(dim=1) - 1
    if side == "left":
        index = index + (longest - lengths)[:, None]
    return index


def _moved(value: torch.Tensor, keep: torch.Tensor, index: torch.Tensor, longest: int, fill: int) -> torch.Tensor:
    out = value.new_full((value.shape[0], longest), fill)
    rows = torch.arange(value.shape[0], device=value.device)[:, None].expand_as(keep)
    out[rows[keep], index[keep]] = value[keep]
    return out
