"""From pixels to visual memory: a frozen vision encoder (CLIP / SigLIP, or a VLM's own tower) and its optional
bottleneck adapters.

Conventions follow the MemVP authors (MEMVP_SPEC.md): patch features of the encoder's penultimate block
(`feature_layer=-2`), the CLS token dropped (`select_strategy="default"`; "full" keeps it; encoders without CLS such
as SigLIP keep every patch), then the encoder's post-layernorm. The encoder is frozen and is *not* part of the adapter
file: it is held outside the module tree (so it is neither saved nor handed to the optimiser) and the adapter config
records which encoder, layer and width it expects.

The authors also train small bottleneck adapters inside every encoder block (dim 12, GELU, scale 0.1, zero-initialised
up-projection). `VisionBottleneck` is that adapter; they live in the MemVP adapter's `VisualMemory` (and so are saved
with it) and are added in parallel to each encoder MLP by forward hooks while that adapter computes its features.

Every adapter may select other features of the same encoder (`feature_selection`). `pixel_features` is the one place
where pixels become the features an adapter reads: the tuner's runtime and the feature cache both call it, so the two
can never compute them differently.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

# The VLM helpers live with the VLM families; importable from here as before.
from .families import (has_own_vision_model, is_vlm, unread_tower_message,  # noqa: F401
                       vlm_modules_outside_language_model, vlm_vision_tower)


class VisionBottleneck(nn.Module):
    """`fc2(Dropout(GELU(fc1(x))))`, no biases, `fc2` zero-initialised so training starts from the frozen encoder."""

    def __init__(self, width: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, dim, bias=False)
        self.fc2 = nn.Linear(dim, width, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(nn.functional.gelu(self.fc1(x))))


class SharedModuleRef:
    """Holds a module on a config without copying it: peft deep-copies configs on every save."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> "SharedModuleRef":
        return self


def _vision_root(model: nn.Module) -> nn.Module:
    """The module that owns `embeddings`/`encoder` (transformers 5 flattens CLIPVisionModel; older nests vision_model)."""
    inner = getattr(model, "vision_model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(inner, "encoder") else model


def _encoder_layers(model: nn.Module) -> nn.ModuleList:
    encoder = getattr(_vision_root(model), "encoder", None)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"MemVP: {type(model).__name__} is not a supported vision encoder (expected a CLIP/SigLIP-style model with "
            "`encoder.layers`)."
        )
    return layers


def load_vision_encoder(name_or_path: str, *, revision: Optional[str] = None,
                        trust_remote_code: bool = False) -> nn.Module:
    """Load a CLIP/SigLIP vision tower (a full CLIP/SigLIP checkpoint works too) from what `from_pretrained` takes: a
    local folder, or a Hub id -- downloaded when online, read from the Hugging Face cache offline. `revision` and
    `trust_remote_code` (off by default) go to transformers as they are.

    The model records `name_or_path` as given (transformers keeps a Hub id as the id, not its cache folder), and that
    is what `MemVPConfig` saves: another machine resolves the same name the same way. A name that is neither a
    folder nor a Hub id that can be had here is a ValueError saying which (`hub.check_model_source`).
    """
    from transformers import AutoConfig, AutoModel, CLIPVisionModel, SiglipVisionModel

    from ..hub import check_model_source, hub_errors

    what = "MemVP: vision encoder"
    check_model_source(name_or_path, what, revision)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    commit = _hub_commit(name_or_path, revision)
    with hub_errors(name_or_path, what, revision):
        model_type = AutoConfig.from_pretrained(name_or_path, **kwargs).model_type
        if model_type == "clip":
            model = CLIPVisionModel.from_pretrained(name_or_path, **kwargs)
        elif model_type == "siglip":
            model = SiglipVisionModel.from_pretrained(name_or_path, **kwargs)
        else:
            model = AutoModel.from_pretrained(name_or_path, **kwargs)
    if commit is not None:
        _LOADED_COMMITS[model] = commit
    return model


# encoder -> the Hub commit `load_vision_encoder` loaded it from (transformers 5 keeps no `_commit_hash`)
_LOADED_COMMITS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _hub_commit(name: str, revision: Optional[str]) -> Optional[str]:
    """The commit `revision` of the Hub id `name` points to (the cache's refs offline), or None for a local folder or
    when it cannot be resolved (the load then fails or falls back the way transformers does)."""
    from huggingface_hub import resolve_revision

    from ..hub import is_hub_id, is_offline

    if not is_hub_id(name):
        return None
    try:
        return resolve_revision(name, revision=revision, local_files_only=is_offline()).resolved
    except Exception:  # unknown repo, no connection, not cached: the load below says which, with its own message
        return None


def loaded_commit(model: nn.Module) -> Optional[str]:
    """The Hub commit `load_vision_encoder` loaded `model` from; None for a folder or a model loaded elsewhere."""
    return _LOADED_COMMITS.get(model)


def clip_style_image_processor(image_size: int) -> Any:
    """A `CLIPImageProcessor` for `image_size`-pixel inputs: shortest edge resized to `image_size`, centre-cropped to
    a square, CLIP mean/std normalisation.

    Why: an encoder or VLM folder saved without `preprocessor_config.json` (a bare `save_pretrained`) has no processor
    of its own; `memvp-train` / `memvp-infer` then use this one, sized to the encoder's `image_size`.
    """
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


#: timm's IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD, which the MemVP authors normalise ScienceQA images with
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_image_processor(image_size: int) -> Any:
    """The MemVP authors' ScienceQA transform as an image processor: the RGB image resized to `image_size` x
    `image_size` (bicubic, aspect ratio not kept, no crop), scaled to [0, 1], normalised with ImageNet mean/std
    (their `Resize((224, 224), BICUBIC), ToTensor(), Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)`).

    Why not the encoder's own processor: CLIP's resizes the short side and centre-crops (a wide diagram loses its
    sides) and normalises with CLIP's mean/std, so an adapter trained the authors' way -- theirs, converted by
    `memvp_peft.convert` -- would be fed other pixels than it learnt from. The PIL backend is asked for by name: it
    resizes the PIL image with PIL's bicubic filter exactly as torchvision's `Resize` does on a PIL image, while the
    torchvision backend (transformers' default where torchvision is installed) resizes a tensor, which differs.
    """
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers without the split backends: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as processor_class
    from PIL import Image

    return processor_class(
        size={"height": image_size, "width": image_size}, do_center_crop=False, resample=Image.BICUBIC,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )


class RunningAdapters(NamedTuple):
    """The vision adapters one `VisionEncoder.features()` call adds to the encoder's block MLPs, and their scale."""

    bottlenecks: nn.ModuleList
    scale: float


class VisionEncoder:
    """A frozen vision tower plus the feature-selection rules; deliberately not an `nn.Module` (never saved/trained).

    Building one reads the encoder and changes nothing, so a tuner can check it against every adapter first;
    `attach()` then freezes the encoder and hooks its block MLPs, and `detach()` takes the hooks off again. Keeping
    the two apart is what lets a refused `attach_vision_encoder` leave the previous encoder as it was.
    """

    def __init__(
        self,
        model: nn.Module,
        feature_layer: int = -2,
        select_strategy: str = "default",
        layernorm: bool = True,
    ) -> None:
        self.model = model
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.layernorm = layernorm
        root = _vision_root(model)
        self.hidden_size = int(model.config.hidden_size)
        self.has_cls = hasattr(getattr(root, "embeddings", None), "class_embedding")
        self.post_layernorm = getattr(root, "post_layernorm", None)
        self.layers = _encoder_layers(model)
        # The vision adapters of the running `features()` call, per thread: two threads encoding for different
        # adapters (or one with and one without adapters) must never see each other's.
        self._call = threading.local()
        self._hooks: list = []

    def check_feature_layer(self, layer: Optional[int] = None) -> None:
        """Raise a ValueError unless `layer` (default: `feature_layer`) indexes one of the encoder's hidden states
        (the embeddings and one per block) -- else the first `pixel_values` would fail with an IndexError."""
        layer = self.feature_layer if layer is None else layer
        states = self.num_layers + 1
        if not -states <= layer < states:
            raise ValueError(
                f"MemVP: vision_feature_layer={layer} is out of range for {describe_encoder(self.model)!r}, "
                f"which has {states} hidden states (the embeddings and {self.num_layers} blocks): use an index in "
                f"[{-states}, {states - 1}] (-2 = the penultimate block, as in the paper)."
            )

    def attach(self) -> None:
        """Freeze the encoder and hook every block MLP (idempotent: a second call re-registers, never doubles)."""
        self.detach()
        self.model.eval().requires_grad_(False)
        self._hooks = [
            layer.mlp.register_forward_hook(self._make_bottleneck_hook(index)) for index, layer in enumerate(self.layers)
        ]

    def detach(self) -> None:
        """Remove the adapter hooks from the encoder (on `unload()`, or when another encoder replaces this one).

        The handles are kept: removing is idempotent, and a rollback that restores the hook dicts of a model holding
        this encoder (a VLM's own tower) brings their entries back, which the next `attach()` then removes."""
        for handle in self._hooks:
            handle.remove()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def running_adapters(self) -> Optional[RunningAdapters]:
        """The vision adapters the block hooks add in this thread now: those of the running `features()` call, or
        of the call a checkpointed block is being recomputed for (`run_adapters`); None otherwise."""
        return getattr(self._call, "adapters", None)

    def run_adapters(self, adapters: Optional[RunningAdapters]) -> Optional[RunningAdapters]:
        """Make `adapters` the ones the block hooks add in this thread; returns the previous ones, to put back.

        Gradient checkpointing of the encoder's blocks recomputes a block inside backward, after `features()`
        returned (possibly on an autograd thread): the tuner's checkpoint wrapper (`tuner/runtime.py`)
        captures the running adapters at forward time and re-runs the block with them, so the recomputation adds the
        same adapters the forward did."""
        previous = self.running_adapters()
        self._call.adapters = adapters
        return previous

    def _make_bottleneck_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            adapters = self.running_adapters()
            if adapters is None:
                return None
            return output + adapters.scale * adapters.bottlenecks[index](args[0])

        return hook

    def features(
        self, pixel_values: torch.Tensor, bottlenecks: Optional[nn.ModuleList] = None, scale: float = 0.0,
        with_cls: bool = False, *, feature_layer: Optional[int] = None, select_strategy: Optional[str] = None,
        layernorm: Optional[bool] = None,
    ) -> Any:
        """(B, C, H, W) -> (B, N, hidden); gradients flow only into `bottlenecks` (the encoder stays frozen).

        `feature_layer`, `select_strategy` and `layernorm` select the features for this call (default: the
        encoder's own): adapters sharing one encoder may each read another hidden state.

        `with_cls`: ((B, N, hidden), (B, hidden)), the second the CLS token of the same hidden state after the same
        post-layernorm -- ADEM-VL's CLS input token (`tuner/input_tokens.py`); an encoder without one is refused."""
        feature_layer = self.feature_layer if feature_layer is None else feature_layer
        select_strategy = self.select_strategy if select_strategy is None else select_strategy
        layernorm = self.layernorm if layernorm is None else layernorm
        if with_cls and not self.has_cls:
            raise ValueError(
                f"MemVP: cls_token=True reads the encoder's CLS token, but {describe_encoder(self.model)!r} "
                f"({type(self.model).__name__}) has none (SigLIP-style encoders keep only patches). Use a CLIP-style "
                "encoder, or cls_token=False."
            )
        reference = next(self.model.parameters())
        if reference.device != pixel_values.device:
            self.model.to(pixel_values.device)
        pixel_values = pixel_values.to(reference.dtype)
        post_layernorm = self.post_layernorm if layernorm else None
        previous = self.run_adapters(None if bottlenecks is None else RunningAdapters(bottlenecks, scale))
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and bottlenecks is not None):
                outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
                hidden = outputs.hidden_states[feature_layer]
                cls = hidden[:, 0] if with_cls else None
                if self.has_cls and select_strategy == "default":
                    hidden = hidden[:, 1:]
                if post_layernorm is not None:
                    hidden = post_layernorm(hidden)
                    cls = post_layernorm(cls) if with_cls else None
        finally:
            self.run_adapters(previous)
        return (hidden, cls) if with_cls else hidden

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_call")  # thread-local call state is never copied (deepcopy of a model, pickling)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._call = threading.local()


def feature_selection(config: Any) -> dict[str, Any]:
    """Which features of the encoder an adapter's config (`MemVPConfig`) reads, as `VisionEncoder.features` takes
    them. Passed on every call: adapters sharing one encoder may each read another hidden state, while the
    `VisionEncoder` keeps only the selection it was built with (that of the adapter it was attached for)."""
    return {
        "feature_layer": config.vision_feature_layer,
        "select_strategy": config.vision_feature_select_strategy,
        "layernorm": config.vision_feature_layernorm,
    }


def pixel_features(vision: VisionEncoder, pixel_values: torch.Tensor, config: Any = None,
                   adapters: Optional[nn.ModuleList] = None, *, with_cls: bool = False) -> Any:
    """`(B, C, H, W)` or `(B, I, C, H, W)` pixel values -> `(B, N, hidden)` or `(B, I, N, hidden)` features: every
    image through the encoder on its own, reading the features `config` selects (`feature_selection`; without a
    config, the encoder's own selection) with `adapters` (`config`'s vision adapters) added at
    `config.vision_adapter_scale`. `with_cls`: also the images' CLS features, `(B*I, hidden)`
    (`VisionEncoder.features`).

    The one place where pixels become features: the tuner's runtime calls it for a call's `pixel_values` (tiled for
    the adapter by `tiling.tile_for_adapter`, then checked), and the feature cache for the images it has not seen
    (tiled the same way), so cached features are the numbers the model itself computes."""
    flat = pixel_values.reshape(-1, *pixel_values.shape[-3:])
    scale = config.vision_adapter_scale if adapters is not None else 0.0
    selection = feature_selection(config) if config is not None else {}
    features = vision.features(flat, adapters, scale, with_cls=with_cls, **selection)
    features, cls = features if with_cls else (features, None)
    features = features.reshape(*pixel_values.shape[:-3], *features.shape[1:])
    return (features, cls) if with_cls else features


def blocks_before_feature_layer(feature_layer: int, num_layers: int) -> int:
    """How many encoder blocks the hidden state `feature_layer` comes out of (an index into the embeddings and one
    state per block: -2 of 24 blocks is the output of block 22, after 23 blocks). A block beyond them never reaches
    the features, so neither does its vision adapter: such adapters cannot train."""
    return feature_layer % (num_layers + 1)


#: How `describe_encoder` records an encoder that was built in memory (no folder or Hub id to load it from again).
IN_MEMORY_PREFIX = "<in-memory "


def describe_encoder(model: nn.Module) -> str:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name if name else f"{IN_MEMORY_PREFIX}{type(model).__name__}>"


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (any dtype, bfloat16 included: hashed as raw bytes)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(model: nn.Module) -> Optional[str]:
    """sha256 of an encoder's weights: every parameter and buffer by name, dtype, shape and bytes. Two encoders with
    the same digest compute the same features; the name an encoder is loaded by says nothing of the kind (another
    model saved into the same folder, a newer upload under the same Hub id). The feature cache keys its folders with
    it and `MemVPConfig.vision_encoder_sha256` records it.

    None when the weights are not all in this process (the meta device, DeepSpeed ZeRO-3 partitions): no digest can
    then stand for them."""
    named = sorted(list(model.named_parameters()) + list(model.named_buffers()), key=lambda item: item[0])
    if any(t.device.type == "meta" or hasattr(t, "ds_id") for _, t in named):
        return None
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}:{tensor_digest(tensor)};".encode())
    return digest.hexdigest()
