"""The per-call visual memory: one `CallMemory` per forward / `generate()` call, visible only inside that call.

The memory is a side input of the forward pass (it depends on the image), but HF decoder layers only hand the hidden
states to their MLP. Instead of threading a new argument through every architecture, the entry point of a call
(`entry.py`) computes the keys/values of every active adapter once and *activates* them for the duration of the call;
the FFN layers read the active call from here.

Three rules make that safe:

* **Per thread.** The active call lives in a `threading.local`, so two threads (or the replicas `nn.DataParallel`
  runs in threads) calling one model with different images each see their own memory. A call is one synchronous
  Python call, so asyncio tasks cannot interleave inside it. (`contextvars` would say the same, but TorchDynamo cannot
  trace `ContextVar.set`, and the hot path must compile as one graph.)
* **Strictly nested.** `activate` returns the previous value and `restore` puts it back in a `finally`: after a call
  returns, raises or is interrupted, nothing of it is left behind. A later text-only call never reads a finished
  call's image.
* **Never inferred.** `generate()` does not leave its memory active between decode steps; it hands its `CallMemory`
  to each of its own decode steps explicitly (`entry.CALL_KWARG`), so a text-only forward a `LogitsProcessor` makes
  in between is text-only.

Gradient checkpointing recomputes layers inside backward, after the call returned (possibly on an autograd thread):
`checkpointing.py` captures the active call at forward time and re-activates it around the recomputation.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from ..vision import unread_tower_message
from .input_checks import validate_pixel_values, validate_visual_inputs
from .input_tokens import ClsInput, cls_input_for
from .memory import MemoryState
from .visual_layout import arrange_visual_tokens, tile_for_adapter


def feature_selection(config: Any) -> dict[str, Any]:
    """Which features of the encoder an adapter reads, as `VisionEncoder.features` takes them. Passed on every
    call: adapters sharing one encoder may each read another hidden state, while the `VisionEncoder` keeps only the
    selection it was built with (that of the adapter it was attached for)."""
    return {
        "feature_layer": config.vision_feature_layer,
        "select_strategy": config.vision_feature_select_strategy,
        "layernorm": config.vision_feature_layernorm,
    }


class CallMemory:
    """The keys/values of every active adapter for one forward or `generate()` call (immutable once built)."""

    __slots__ = ("states", "cls_input")

    def __init__(self, states: dict[str, MemoryState], cls_input: Optional[ClsInput] = None) -> None:
        self.states = states
        self.cls_input = cls_input  # what the call inserts into its input (an adapter with cls_token): input_tokens.py

    def tensors(self) -> list[torch.Tensor]:
        return [t for state in self.states.values() for t in state.tensors()]

    def __deepcopy__(self, memo: dict) -> "CallMemory":
        # generate() may copy its model kwargs; the memory of the call is the same object for every decode step.
        return self

    def __copy__(self) -> "CallMemory":
        return self


class ActiveCall(NamedTuple):
    """What a layer reads during a call: the call's memory and the batch size of the running forward (OPT flattens
    tokens to `(B*T, d)` before its FFN; beam search makes decode batches larger than the call's)."""

    memory: CallMemory
    batch_size: Optional[int]


class MemoryRuntime:
    """Shared, per-tuner runtime state: the adapters' memories, the vision encoder, and the active call per thread.

    Referenced by every MemVP layer and by the base model's entry wrappers; a plain object, never a submodule, so
    its tensors are neither saved nor moved twice.
    """

    def __init__(self, memories: nn.ModuleDict, configs: dict) -> None:
        self.memories = memories
        self.configs = configs
        self.active_adapters: list[str] = []
        self.enabled = True
        self.vision = None  # VisionEncoder turning pixel_values into features, when one is attached
        self.image_token_id: Optional[int] = None  # VLM bases: placeholder tokens that must not be in the text
        self.unread_vlm_class: Optional[str] = None  # a VLM base whose tower MemVP cannot read (vision_attach.py)
        self.placeholders_checked = False  # whether that check ran once on accelerator tensors (entry.py)
        self.seen_visual_inputs = False  # a call brought visual inputs; until then a training call warns once
        self.checkpointed_layers: list = []  # the decoder/encoder layers holding MemVP layers (entry.py wraps them)
        self.text_only_warned = False
        self._local = threading.local()

    # ------------------------------------------------------------------------------------------------ the active call

    def active(self) -> Optional[ActiveCall]:
        return getattr(self._local, "call", None)

    def activate(self, call: Optional[ActiveCall]) -> Optional[ActiveCall]:
        """Make `call` the active one in this thread; returns the previous one, for `restore`."""
        previous = getattr(self._local, "call", None)
        self._local.call = call
        return previous

    def restore(self, previous: Optional[ActiveCall]) -> None:
        self._local.call = previous

    def state_for(self, adapter_name: str) -> MemoryState:
        """The memory a layer reads now: the active call's, else (a layer run outside any call) the learned,
        image-independent memory p_k/p_v."""
        call = self.active()
        if call is not None:
            state = call.memory.states.get(adapter_name)
            if state is not None:
                return state
        return self.memories[adapter_name]()

    def batch_size(self) -> Optional[int]:
        call = self.active()
        return None if call is None else call.batch_size

    def layers_reading_the_call(self) -> list:
        """Every layer whose gradient-checkpointing recomputation must see the state of the call that ran it
        (`checkpointing.py`): the layers holding MemVP layers (the call's memory) and the blocks of the attached
        vision encoder (the call's vision adapters, added by hooks)."""
        return [*self.checkpointed_layers, *(self.vision.layers if self.vision is not None else ())]

    # ------------------------------------------------------------------------------------------ building the memory

    def build(
        self,
        memories: nn.ModuleDict,
        image_features: Optional[torch.Tensor],
        image_mask: Optional[torch.Tensor],
        pixel_values: Optional[torch.Tensor],
        batch_size: Optional[int],
    ) -> CallMemory:
        """Validate the visual inputs of a call and compute K/V once for every active adapter.

        `memories` is passed by the caller (the tuner's own ModuleDict): an `nn.DataParallel` replica of the tuner
        computes with its replica's parameters, on its device.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("MemVP: pass either `pixel_values` or `image_features`, not both.")
        shared_features = {}  # adapters tiling alike and selecting the same features share one encoding
        states = {}
        cls_input = None
        active = [name for name in self.active_adapters if name in memories]
        for name in active:
            config, memory = self.configs[name], memories[name]
            features, mask = image_features, image_mask
            cls_embeddings = None
            if getattr(config, "cls_token", False):
                features, cls_embeddings = self._with_cls_token(name, active, memory, features, pixel_values,
                                                                batch_size)
            elif pixel_values is not None:
                pixels, mask = tile_for_adapter(pixel_values, image_mask, config, self.vision)  # visual_layout.py
                if memory.vision_adapters is not None:
                    features = self._encode(pixels, batch_size, config, memory.vision_adapters)
                else:
                    key = (tuple(config.image_grid or ()), *feature_selection(config).values())
                    if key not in shared_features:
                        shared_features[key] = self._encode(pixels, batch_size, config, None)
                    features = shared_features[key]
            features, mask = arrange_visual_tokens(features, mask, config)  # frames, tiles, compression
            features, mask = validate_visual_inputs(
                features, mask, batch_size, config.visual_dim, config.num_memory_slots
            )
            states[name] = memory(features, mask)
            if getattr(config, "cls_token", False):  # the rows with an image: the checked per-token mask's first
                unused = None if cls_embeddings is not None else memory.project_cls(
                    memory.cls_projector[0].weight.new_zeros(1, config.visual_dim)).sum() * 0.0
                cls_input = cls_input_for(config, cls_embeddings, None if mask is None else mask[:, 0], unused)
        return CallMemory(states, cls_input)

    def _with_cls_token(self, name: str, active: list[str], memory: nn.Module, image_features: Any,
                        pixel_values: Any, batch_size: Optional[int]) -> tuple[Any, Optional[torch.Tensor]]:
        """The patch features of an adapter with `cls_token` and its projected CLS features (B, 1, d) from the same
        encoding (`input_tokens.py`); (None, None) without visual inputs (every row then gets the text-only prefix)."""
        config = self.configs[name]
        if len(active) > 1:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which changes the input sequence, and {len(active)} "
                f"adapters are active ({active}); their calls cannot share one input layout. Activate one adapter."
            )
        if image_features is not None:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which reads the encoder's CLS token; `image_features` "
                "carry patch features only. Pass `pixel_values` (with the vision encoder attached)."
            )
        if pixel_values is None:
            return None, None
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5 and pixel_values.shape[1] != 1:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which places one image's CLS token per row; "
                f"pixel_values hold {pixel_values.shape[1]} images per row."
            )
        features, cls = self._encode(pixel_values, batch_size, config, memory.vision_adapters, with_cls=True)
        return features, memory.project_cls(cls)

    def _encode(
        self, pixel_values: torch.Tensor, batch_size: Optional[int], config: Any, adapters: Optional[nn.ModuleList],
        with_cls: bool = False,
    ) -> Any:
        """`config`'s features of `pixel_values` (the hidden state, CLS selection and layernorm it names), with
        `adapters` (its vision adapters, at its scale) added to the encoder's blocks."""
        if self.vision is None and self.unread_vlm_class is not None:
            raise ValueError(f"MemVP: `pixel_values` were given, but no vision encoder reads them: "
                             f"{unread_tower_message(self.unread_vlm_class)}")
        if self.vision is None:
            raise ValueError(
                "MemVP: `pixel_values` were given but no vision encoder is attached. Set "
                "`MemVPConfig(vision_encoder=<CLIP/SigLIP model or local path>)`, call "
                "`memvp_peft.attach_vision_encoder(peft_model, encoder)`, or pass `image_features`."
            )
        pixels, images = validate_pixel_values(pixel_values, batch_size)
        scale = config.vision_adapter_scale if adapters is not None else 0.0
        features = self.vision.features(pixels, adapters, scale, with_cls=with_cls, **feature_selection(config))
        features, cls = features if with_cls else (features, None)
        if pixel_values.dim() == 5:
            features = features.reshape(pixel_values.shape[0], images, *features.shape[1:])
        return (features, cls) if with_cls else features

    # ------------------------------------------------------------------------------------------------ copy / pickle

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_local")  # an active call belongs to a running call in one thread, never to a copy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
