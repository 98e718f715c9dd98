"""`MemVPConfig`: the documented dataclass that describes one MemVP adapter, and the `MEMVP` peft type it declares.

Every field carries a `metadata={"help": ...}` like peft's own tuner configs. The defaults are the values of the
authors' released LLaMA-7B recipe except `num_memory_slots` (256 here; the authors use 320 for 256 CLIP patches) and
the vision-encoder adapters (off here; 12 in their code) -- `docs/index.md` lists the paper value of every field.

All of the config's validation happens here, at construction (and at every assignment), so a typo fails before any
model is touched: each field's own range, and how the fields go together (`check_long_context`: tiles, frames,
compression and the read form; `check_cls_token`: ADEM-VL's CLS input token). What needs the model is checked at
injection.

**The peft type.** peft's in-tree tuners own a member of `PeftType` declared in peft's source. An out-of-tree tuner
cannot edit that enum, and `peft.utils.register_peft_method` only accepts names that are already members. So this
module adds the one member to the live enum (the same bookkeeping `EnumType.__new__` does for members declared in the
class body) before the config that declares it is defined. The registration itself happens in
`memvp_peft/tuner/__init__.py`, the way `peft/tuners/lora/__init__.py` registers LoRA.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from peft import LoraConfig
from peft.config import PeftConfig
from peft.utils.peft_types import PeftType
from torch import nn

from .targets import MEMORY_SIDES
from .input_tokens import ADEM_VL_IMAGE_PREFIX, ADEM_VL_TEXT_ONLY_PREFIX, adem_vl_prefix_ids
from .layer import MEMORY_ACTIVATIONS, MEMORY_READS
from .visual_inputs import memory_tokens, square_side
from .save_load import (CONFIG_NAME, finish_in_place_save, recover_adapter_folder, replace_file,
                        staging_folder_inside, write_model_card)
from ..hub import resolvable_name
from ..vision import SharedModuleRef, describe_encoder
from ..vision.tiling import is_grid, parse_grid

# ------------------------------------------------------------------------------------------------------ the peft type

MEMVP_NAME = "MEMVP"

#: The peft type as `adapter_config.json` stores it. peft looks a folder's `peft_type` up in a plain dict, so a
#: process that loads a MemVP adapter without `import memvp_peft` fails with `KeyError(<the stored name>)` -- the only
#: message peft lets a tuner word. Stored as the bare "MEMVP", that error says nothing; stored as this, it says what
#: to install and import. Both names are registered, so adapters saved either way load.
MEMVP_STORED_NAME = "MEMVP (pip install memvp-peft, then import memvp_peft before loading this adapter)"


def _add_peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding it to the live enum first when this peft release does not know it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


MEMVP_PEFT_TYPE = _add_peft_type_member(MEMVP_NAME)


def is_memvp_peft_type(stored: object) -> bool:
    """Whether an `adapter_config.json`'s `peft_type` names MemVP (either name it may be stored under)."""
    return stored in (MEMVP_NAME, MEMVP_STORED_NAME)


# ------------------------------------------------------------------------------------------------------ the config

_FLOAT32_MAX = 3.4028234663852886e38
# the fields that hold a real number (the others of a number type hold a count or an index)
_FLOAT_FIELDS = ("visual_scale", "memory_scale", "memory_dropout", "key_init_std", "vision_adapter_scale",
                 "vision_adapter_dropout", "drop_ratio")


def _plain_number(name: str, value: Any) -> Any:
    """A number of another number type (numpy's `np.float32(0.5)`, `np.int64(8)`) as the Python float or int it is:
    accepted like any real number, and stored so that `adapter_config.json` can be written (json cannot write a numpy
    scalar). Anything else is returned as it is, for `_validate` to judge (a bool is no number here)."""
    if isinstance(value, bool) or type(value) in (int, float) or not isinstance(value, numbers.Real):
        return value
    if name in _FLOAT_FIELDS:
        return float(value)
    return int(value) if isinstance(value, numbers.Integral) else value

#: Activation names accepted by `MemVPConfig.activation` (besides `None`, which means "the FFN's own activation").
SUPPORTED_ACTIVATIONS = (
    "silu",
    "swish",
    "gelu",
    "gelu_new",
    "gelu_fast",
    "gelu_pytorch_tanh",
    "quick_gelu",
    "relu",
    "relu2",
    "tanh",
    "sigmoid",
)


@dataclass
class MemVPConfig(PeftConfig):
    """Configuration of a MemVP (Memory-Space Visual Prompting, ICML 2024) adapter.

    MemVP projects visual features with a small projector and appends them, plus learned position embeddings, to the
    key-value memory of every FFN block of a frozen language model: `out = FFN(x) + s * Dropout(act(x K^T)) V` with
    `K = lambda * f(z) + p_k` and `V = lambda * f(z) + p_v`. The sequence length never grows.
    """

    visual_dim: int = field(
        default=1024,
        metadata={"help": "Width D_v of the incoming visual features (CLIP ViT-L/14 patch features: 1024)."},
    )
    num_memory_slots: int = field(
        default=256,
        metadata={
            "help": (
                "Number n of memory slots appended to every FFN. Must be >= the number of visual tokens per sample; "
                "the slots beyond them are pure learned memory (only position embeddings). The authors use 320 for "
                "256 CLIP patches on LLaMA-7B and 400 on LLaMA-13B."
            )
        },
    )
    projector_hidden_dim: int = field(
        default=128,
        metadata={"help": "Hidden width h of the projector Linear(D_v, h) -> SiLU -> Linear(h, d) (paper: 128)."},
    )
    visual_scale: float = field(
        default=0.01,
        metadata={"help": "lambda: scale applied to the projected visual features before they enter the memory."},
    )
    memory_scale: float = field(
        default=0.1,
        metadata={"help": "s: scale of the memory read-out added to the FFN output (paper: 0.1)."},
    )
    memory_dropout: float = field(
        default=0.1,
        metadata={"help": "Dropout probability applied to the memory activations act(x K^T) (paper: 0.1)."},
    )
    key_init_std: float = field(
        default=0.02,
        metadata={"help": "Standard deviation of the normal init of the key position embedding p_k (p_v starts at 0)."},
    )
    activation: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Activation of the memory branch. None (default, as in the paper) uses the FFN's own activation; a "
                f"name from {SUPPORTED_ACTIVATIONS} overrides it for whole-FFN wrappers."
            )
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "FFN modules to wrap (names, suffixes or a regex). None finds every FFN block of the language model "
                "automatically for the supported architectures; after injection it holds the resolved module names."
            )
        },
    )
    memory_side: str = field(
        default="both",
        metadata={
            "help": (
                "Encoder-decoder models (T5, BART): put the visual memory into the FFNs of the 'encoder', the "
                "'decoder' or 'both' (default: both -- the encoder then builds image-aware text states and the decoder "
                "reads the image at every generated token; the paper's BART/T5 code was never released)."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or a regex that must not be wrapped, even if they match `target_modules`."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Only wrap the FFNs of these decoder layer indices (default: every layer)."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Name of the layer stack used with `layers_to_transform` when it is ambiguous ('layers', 'h')."},
    )
    vision_encoder: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Vision encoder that turns `pixel_values` into features: a local CLIP/SigLIP folder, a Hub id "
                "('org/name': downloaded when online, read from the Hugging Face cache offline), or an already built "
                "CLIPVisionModel/SiglipVisionModel (recorded here by its name). It is frozen and never saved in the "
                "adapter. None: pass `image_features` yourself, or use a VLM base (its own vision tower is used)."
            )
        },
    )
    vision_encoder_revision: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Filled in when an encoder named by a Hub id is attached: the commit its files came from. A reload "
                "loads the encoder at this revision, so a newer upload under the same id is not used silently."
            )
        },
    )
    vision_encoder_sha256: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Filled in when an encoder is attached: a sha256 of its weights (`vision.weights_digest`). Attaching "
                "an encoder with other weights -- another model saved under the recorded folder, another revision -- "
                "warns, naming both digests. Adapters saved without it load as before."
            )
        },
    )
    vision_feature_layer: int = field(
        default=-2,
        metadata={"help": "Hidden-state index of the encoder whose patch features enter the memory (paper: -2)."},
    )
    vision_feature_select_strategy: str = field(
        default="default",
        metadata={"help": "'default' drops the CLS token (paper), 'full' keeps it. Encoders without CLS keep all."},
    )
    vision_feature_layernorm: bool = field(
        default=True,
        metadata={"help": "Apply the encoder's post-layernorm to the selected features (as the authors do)."},
    )
    vision_adapter_dim: int = field(
        default=0,
        metadata={
            "help": (
                "Bottleneck width of the authors' adapters inside every vision-encoder block (paper code: 12); 0 "
                "disables them. They train and save with the MemVP adapter."
            )
        },
    )
    vision_adapter_scale: float = field(
        default=0.1, metadata={"help": "Scale of the vision-encoder adapters' output (paper code: 0.1)."}
    )
    vision_adapter_dropout: float = field(
        default=0.1, metadata={"help": "Dropout inside the vision-encoder adapters (paper code: 0.1)."}
    )
    vision_num_layers: Optional[int] = field(
        default=None,
        metadata={"help": "Filled in when an encoder is attached: its block count (sizes the vision adapters)."},
    )
    base_num_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Filled in at injection: how many transformer layers the base model has. The layers own no tensors, "
                "so this is what tells an adapter loaded onto a base of another depth (refused) from the right one."
            )
        },
    )
    image_grid: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": (
                "AnyRes-style tiling of high-resolution images, as [rows, cols] (or 'RxC'): each image becomes the "
                "downscaled whole image plus rows x cols encoder-sized tiles, each its own block of memory slots (the "
                "per-slot position embeddings tell them apart), overview first, then the tiles row by row. "
                "`pixel_values` of rows x cols times the encoder's size are tiled by the model; tiles made by "
                "MemVPDataCollator(image_grid=...) are taken as they are. Memory: images x (1 + rows*cols) x tokens "
                "per tile. None (default): no tiling."
            )
        },
    )
    num_frames: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Video: frames per sample, each frame a block of memory slots (frames x tokens per frame). The "
                "model refuses more frames than this; MemVPDataCollator(num_frames=...) samples a video file or a "
                "frame list uniformly to it. None (default): no video."
            )
        },
    )
    pool_kernel: int = field(
        default=1,
        metadata={
            "help": (
                "Memory compression: average-pool each image's square patch grid with a k x k kernel before the "
                "projector (2: N -> N/4 slots, a 16x16 CLIP grid -> 8x8 = 64). 1 (default): no pooling."
            )
        },
    )
    pool_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Memory compression to a target count: adaptive average pooling of each image's patch grid to this "
                "many tokens (a perfect square, e.g. 64 or 144) before the projector. None (default): no pooling."
            )
        },
    )
    multiscale_tokens: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": (
                "ADEM-VL's multiscale slots: each image's patch grid at several scales, concatenated before the "
                "projector; every entry a perfect square token count, the grid's own count keeping it as is (ADEM-VL: "
                "[256, 64] = the 16x16 CLIP grid plus its 8x8 average pool, 320 slots). None (default): one scale."
            )
        },
    )
    memory_read: str = field(
        default="memvp",
        metadata={
            "help": (
                "How every FFN reads the memory: 'memvp' (default, the paper: act(x K^T) V with the FFN's own "
                "activation) or 'adem' (ADEM-VL: silu(x) silu(K)^T V; needs whole-FFN wrappers, i.e. GLU FFNs such "
                "as LLaMA's, and no `activation` override)."
            )
        },
    )
    memory_activation: str = field(
        default="ffn",
        metadata={
            "help": (
                "What MemVP's read applies to the scores x K^T: 'ffn' (default, the paper: the FFN's own activation, "
                "or `activation`'s override) or 'identity' (none: s * (x K^T) V, a linear read -- the ablation of "
                "the activation; needs whole-FFN wrappers, i.e. GLU FFNs such as LLaMA's, since a plain FFN's own "
                "activation runs over the keys' scores inside W1/W2, and memory_read='memvp' with no `activation`)."
            )
        },
    )
    drop_ratio: float = field(
        default=0.0,
        metadata={
            "help": (
                "ADEM-VL's adaptive drop: the lowest floor(drop_ratio * n) of each token's n memory scores are set "
                "to zero before the product with V (ADEM-VL: 0.1). 0 (default, the paper's MemVP): nothing dropped."
            )
        },
    )
    cls_token: bool = field(
        default=False,
        metadata={
            "help": (
                "ADEM-VL's CLS input token: the encoder's CLS feature, through a projector of its own, placed into the "
                "input after each row's BOS token and `cls_token_prefix_ids`; rows without an image get "
                "`cls_token_text_only_prefix_ids` instead (ADEM-VL: 'Image: ' and 'Image: N/A'). The rows grow by "
                "the inserted tokens. Needs `pixel_values` and an encoder with a CLS token, one image per row, a "
                "decoder-only base with a BOS token. False (default, MemVP): the sequence never grows."
            )
        },
    )
    cls_token_prefix_ids: Optional[list[int]] = field(
        default=None,
        metadata={"help": "With cls_token: the base tokenizer's ids of the text between BOS and the CLS token "
                          "(ADEM-VL: 'Image: '; `input_tokens.adem_vl_prefix_ids(tokenizer)`); [] for none."},
    )
    cls_token_text_only_prefix_ids: Optional[list[int]] = field(
        default=None,
        metadata={"help": "With cls_token: the ids placed after BOS in rows without an image, which get no CLS token "
                          "(ADEM-VL: 'Image: N/A'); [] for none."},
    )
    lora_config: Optional[dict] = field(
        default=None,
        metadata={
            "help": (
                "Train LoRA together with the visual memory as ONE adapter: a `peft.LoraConfig` or its dict. LoRA is "
                "injected first (it may target linears inside the FFNs that MemVP wraps), saved in the same "
                "adapter_model.safetensors and restored by `PeftModel.from_pretrained`. It goes on the language "
                "model only: on a VLM base never into the vision tower or projector, which MemVP runs without "
                "gradients (the tower is adapted by `vision_adapter_dim`). Default None: MemVP only, as in the paper."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Extra base-model modules to train and save with the adapter (peft's usual meaning)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MEMVP_PEFT_TYPE
        if isinstance(self.vision_encoder, nn.Module):
            # keep the built encoder for injection (without copying it), record its name in the config
            self._vision_encoder_module = SharedModuleRef(self.vision_encoder)
            self.vision_encoder = describe_encoder(self.vision_encoder)
        if isinstance(self.vision_encoder, str):  # a folder as its absolute path: the same from any working folder
            self.vision_encoder = resolvable_name(self.vision_encoder)
        self.image_grid = parse_grid(self.image_grid)
        self._plain_numbers()
        self._validate()
        if self.lora_config is not None:
            self.lora_config = normalise_lora_config(self.lora_config)
        if isinstance(self.multiscale_tokens, tuple):
            self.multiscale_tokens = list(self.multiscale_tokens)
        for name in ("cls_token_prefix_ids", "cls_token_text_only_prefix_ids"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if isinstance(self.target_modules, list):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, set):
            self.exclude_modules = sorted(self.exclude_modules)
        self._memvp_checked = True  # from here on, assignments are validated (__setattr__)

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field is checked like constructing the config (a NaN `drop_ratio` is refused here, not saved
        and refused at the next load), and a field the adapter was built from cannot change once it is injected.

        Why refuse rather than take the new value: the layers and the memory read these fields when they are built
        (`memory_scale`, `visual_scale`, `memory_read`, `drop_ratio`, the widths, the targets, ...); a later value
        would be ignored by the running model but written by `save_pretrained`, and the reloaded adapter would then
        compute something else than the one that was trained and evaluated. `LIVE_FIELDS` are read at every call
        and may change; peft's own bookkeeping fields (`inference_mode`, `base_model_name_or_path`, ...) too."""
        state = self.__dict__
        if name.startswith("_") or "_memvp_checked" not in state:  # private notes, or the dataclass __init__
            object.__setattr__(self, name, value)
            return
        value = _plain_number(name, value)
        if state.get("_memvp_injected") and name in _built_fields() and not _same(state.get(name), value):
            raise ValueError(
                f"MemVPConfig.{name} cannot change after the adapter was injected: the model was built with "
                f"{name}={state.get(name)!r} and keeps it, so {value!r} would only reach the saved adapter_config.json. "
                f"Build a new adapter instead: get_peft_model(base, dataclasses.replace(config, {name}={value!r})) on "
                "a fresh base, or peft_model.add_adapter(name, that config)."
            )
        missing = object()
        previous = state.get(name, missing)
        object.__setattr__(self, name, value)
        try:
            self._validate()
        except ValueError:
            if previous is missing:
                del state[name]
            else:
                object.__setattr__(self, name, previous)
            raise

    @classmethod
    def adem_vl(cls, tokenizer: Any = None, **overrides: Any) -> "MemVPConfig":
        """ADEM-VL's model (arXiv 2410.17779) with the authors' released defaults: multiscale slots of the 16x16 CLIP
        grid plus its 8x8 pool (256 + 64 = 320 slots, exactly), the `silu(x) silu(K)^T` read, the lowest 10% of each
        token's scores dropped, no dropout on the scores, s = 0.1, lambda = 0.01, bottleneck adapters of width 12 in
        every CLIP block, and the CLS input token after 'Image: ' ('Image: N/A' in rows without an image).

        The CLS token's prefixes are token ids of the base's tokenizer, so `tokenizer` is needed for it; without one,
        pass `cls_token=False` (the memory form alone: ADEM-VL's read on `image_features` needs neither the CLS token
        nor an encoder, so also `vision_adapter_dim=0` there). Any field can be overridden, e.g.
        `multiscale_tokens=[16, 4]` and `num_memory_slots=20` for a 4x4 grid."""
        settings: dict[str, Any] = dict(
            multiscale_tokens=[256, 64], num_memory_slots=320, memory_read="adem", drop_ratio=0.1,
            memory_dropout=0.0, memory_scale=0.1, visual_scale=0.01, vision_adapter_dim=12, cls_token=True,
        )
        settings.update(overrides)
        if settings["cls_token"] and not all(
            settings.get(name) is not None for name in ("cls_token_prefix_ids", "cls_token_text_only_prefix_ids")
        ):
            if tokenizer is None:
                raise ValueError(
                    "MemVPConfig.adem_vl: ADEM-VL's CLS input token follows 'Image: ' ('Image: N/A' without an "
                    "image) in the base's own token ids: pass tokenizer=<the base's tokenizer>, or cls_token=False "
                    "for ADEM-VL's memory alone."
                )
            settings = {**adem_vl_prefix_ids(tokenizer), **settings}
        return cls(**settings)

    def memory_tokens(self, tokens_per_image: int, images: int = 1) -> int:
        """Visual slots one sample fills with this config: images x blocks per image (1, or 1 + rows*cols with
        `image_grid`) x tokens per image after `pool_kernel` / `pool_tokens` / `multiscale_tokens`. For a video,
        `images` is the number of frames. `num_memory_slots` must be at least this."""
        return memory_tokens(self, tokens_per_image, images)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any
    ) -> "MemVPConfig":
        """peft's loading, plus a note of the folder on the config (not saved): injecting a config that came from a
        folder is the first half of a load, and a load refused in its second half (the weights) must undo it."""
        folder = str(pretrained_model_name_or_path)
        source = os.path.join(folder, subfolder) if subfolder else folder
        if os.path.isdir(source):  # a save killed mid-way is settled before peft reads a file (save_load.py)
            recover_adapter_folder(source)
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._memvp_source_folder = source
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """peft's `adapter_config.json`, then what only MemVP knows to write. peft calls this last in every
        `PeftModel.save_pretrained` (after its model card and the weights), so whatever saved the adapter:

        * `peft_type` is stored under its self-explaining name (`MEMVP_STORED_NAME`): a process loading the
          folder without `import memvp_peft` fails in peft's lookup of that name, and the `KeyError` then says what
          to install and import instead of a bare `'MEMVP'`;
        * the model card gets its MemVP section (`save_load.write_model_card`): what the adapter is, how to load it,
          its base and vision encoder;
        * the config is written beside the folder's and moved over it in one rename (peft itself opens the file for
          writing in place: a kill there left an empty `adapter_config.json`), and only then does the new adapter win
          over the old one peft's save set aside (`save_load.finish_in_place_save`)."""
        with staging_folder_inside(save_directory) as staging:  # the config in the folder is only ever replaced
            super().save_pretrained(staging, **kwargs)
            path = os.path.join(staging, CONFIG_NAME)
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            stored["peft_type"] = MEMVP_STORED_NAME
            with open(path, "w", encoding="utf-8") as handle:  # peft's own formatting
                handle.write(json.dumps(stored, indent=2, sort_keys=True))
            replace_file(path, os.path.join(save_directory, CONFIG_NAME))
        finish_in_place_save(save_directory)  # the new adapter is whole: an interrupted save is no longer undone
        write_model_card(save_directory, self)

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict:
        """The keys of an `adapter_config.json` that MemVPConfig knows; the others are named in one warning (with the
        field a typo most likely meant) and dropped, instead of peft's hint to upgrade peft."""
        kwargs = super().check_kwargs(**kwargs)
        known = {f.name for f in fields(cls)}
        unknown = sorted(key for key in kwargs if key not in known)
        if unknown:
            named = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            warnings.warn(
                f"MemVP: adapter_config.json holds keys MemVPConfig does not know, ignored: {', '.join(named)}. "
                "A typo, or a config written by a newer memvp-peft.",
                stacklevel=2,
            )
        return {key: value for key, value in kwargs.items() if key in known}

    def lora_peft_config(self) -> Optional[LoraConfig]:
        """The LoRA part as a `LoraConfig` (None when this adapter is MemVP only)."""
        if self.lora_config is None:
            return None
        return LoraConfig(**{**self.lora_config, "inference_mode": self.inference_mode})

    def _plain_numbers(self) -> None:
        """Every field through `_plain_number` (numpy scalars as Python numbers)."""
        for item in fields(self):
            value = getattr(self, item.name)
            plain = _plain_number(item.name, value)
            if plain is not value:
                setattr(self, item.name, plain)

    def _validate(self) -> None:
        def positive_int(name: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MemVPConfig.{name} must be a positive integer, got {value!r}.")

        def probability(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"MemVPConfig.{name} must be a number in [0, 1), got {value!r}.")

        def names(name: str, value: Any) -> None:
            if value is None or (isinstance(value, str) and value):
                return
            if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
                return
            raise ValueError(f"MemVPConfig.{name} must be a module name, a regex or a list of names, got {value!r}.")

        for name in ("visual_dim", "num_memory_slots", "projector_hidden_dim"):
            positive_int(name)
        for name in ("vision_num_layers", "base_num_layers"):
            positive_int(name, optional=True)
        for name in ("visual_scale", "memory_scale", "key_init_std", "vision_adapter_scale"):
            value = getattr(self, name)
            # an infinite scale (or one beyond float32, inf in every compute dtype) trains an all-NaN adapter
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not 0 <= value <= _FLOAT32_MAX
            ):
                raise ValueError(
                    f"MemVPConfig.{name} must be a finite number >= 0 (at most {_FLOAT32_MAX:.3g}, the float32 "
                    f"range), got {value!r}."
                )
        probability("memory_dropout")
        probability("vision_adapter_dropout")
        names("target_modules", self.target_modules)
        names("exclude_modules", self.exclude_modules)
        if self.activation is not None and self.activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"MemVPConfig.activation must be None (the FFN's own activation) or one of {SUPPORTED_ACTIVATIONS}, "
                f"got {self.activation!r}."
            )
        if self.memory_side not in MEMORY_SIDES:
            raise ValueError(f"MemVPConfig.memory_side must be one of {MEMORY_SIDES}, got {self.memory_side!r}.")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                "MemVPConfig.vision_feature_select_strategy must be 'default' (drop CLS) or 'full', got "
                f"{self.vision_feature_select_strategy!r}."
            )
        if isinstance(self.vision_feature_layer, bool) or not isinstance(self.vision_feature_layer, int):
            raise ValueError(
                f"MemVPConfig.vision_feature_layer must be an integer index of the encoder's hidden states (-2 = the "
                f"penultimate block), got {self.vision_feature_layer!r}."
            )
        if not isinstance(self.vision_feature_layernorm, bool):
            raise ValueError(
                f"MemVPConfig.vision_feature_layernorm must be True or False, got {self.vision_feature_layernorm!r}."
            )
        if isinstance(self.vision_adapter_dim, bool) or not isinstance(self.vision_adapter_dim, int) or self.vision_adapter_dim < 0:
            raise ValueError(f"MemVPConfig.vision_adapter_dim must be an integer >= 0, got {self.vision_adapter_dim!r}.")
        if self.vision_encoder is not None and not isinstance(self.vision_encoder, str):
            raise ValueError(
                "MemVPConfig.vision_encoder must be a local folder, a Hub id ('org/name') or a built vision model, "
                f"got {type(self.vision_encoder).__name__}."
            )
        check_long_context(self)
        check_cls_token(self)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("MemVPConfig.layers_pattern only makes sense together with layers_to_transform.")
        if self.layers_pattern is not None and not (
            (isinstance(self.layers_pattern, str) and self.layers_pattern)
            or (isinstance(self.layers_pattern, list) and all(isinstance(p, str) and p for p in self.layers_pattern))
        ):
            raise ValueError(
                "MemVPConfig.layers_pattern must be the name of the layer stack (e.g. 'layers', 'h') or a list of "
                f"names, got {self.layers_pattern!r}."
            )
        if self.layers_to_transform is not None:
            indices = (
                [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            )
            if not isinstance(indices, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices
            ):
                raise ValueError(
                    f"MemVPConfig.layers_to_transform must hold non-negative layer indices, got {self.layers_to_transform!r}."
                )


# ------------------------------------------------------------------------------------ how the fields go together


def positive_ints(value: Any, length: Optional[int] = None) -> bool:
    """Whether `value` is a list/tuple of positive ints (of `length` items when given)."""
    return (
        isinstance(value, (list, tuple))
        and (length is None or len(value) == length)
        and len(value) > 0
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def check_long_context(config: Any) -> None:
    """`MemVPConfig`'s checks of tiling, frames, compression and the read form."""
    if config.image_grid is not None and not is_grid(config.image_grid):
        raise ValueError(
            "MemVPConfig.image_grid must be None or [rows, cols] (or 'RxC') of positive integers with at least "
            f"2 tiles, e.g. [2, 2]; got {config.image_grid!r}."
        )
    if config.num_frames is not None and not positive_ints([config.num_frames]):
        raise ValueError(f"MemVPConfig.num_frames must be None or a positive integer, got {config.num_frames!r}.")
    if config.image_grid is not None and config.num_frames is not None:
        raise ValueError(
            "MemVPConfig: image_grid and num_frames were both set; a sample is either tiled images or video "
            "frames: set one of them."
        )
    if not positive_ints([config.pool_kernel]):
        raise ValueError(f"MemVPConfig.pool_kernel must be a positive integer (1 = no pooling), got {config.pool_kernel!r}.")
    target = config.pool_tokens
    if target is not None and (not positive_ints([target]) or square_side(target) is None):
        raise ValueError(f"MemVPConfig.pool_tokens must be None or a perfect square token count (e.g. 64), got {target!r}.")
    scales = config.multiscale_tokens
    if scales is not None and (not positive_ints(scales) or any(square_side(count) is None for count in scales)):
        raise ValueError(
            "MemVPConfig.multiscale_tokens must be None or a list of perfect square token counts, e.g. [256, 64] "
            f"(ADEM-VL), got {scales!r}."
        )
    compressions = [name for name, on in (("pool_kernel", config.pool_kernel != 1),
                                           ("pool_tokens", config.pool_tokens is not None),
                                           ("multiscale_tokens", scales is not None)) if on]
    if len(compressions) > 1:
        raise ValueError(
            f"MemVPConfig: {' and '.join(compressions)} were both set; they are alternative compressions of the "
            "patch grid: set one."
        )
    if config.memory_read not in MEMORY_READS:
        raise ValueError(f"MemVPConfig.memory_read must be one of {MEMORY_READS}, got {config.memory_read!r}.")
    if config.memory_activation not in MEMORY_ACTIVATIONS:
        raise ValueError(f"MemVPConfig.memory_activation must be one of {MEMORY_ACTIVATIONS} ('ffn': the FFN's own "
                         f"activation, the paper; 'identity': none), got {config.memory_activation!r}.")
    if config.memory_activation == "identity" and (config.memory_read != "memvp" or config.activation is not None):
        given = (f"memory_read={config.memory_read!r}" if config.memory_read != "memvp"
                 else f"activation={config.activation!r}")
        raise ValueError(
            f"MemVPConfig: memory_activation='identity' reads s * (x K^T) V with no activation at all, so {given} "
            "would not be used: leave memory_read='memvp' and activation None, or memory_activation='ffn'."
        )
    if config.memory_read == "adem" and config.activation is not None:
        raise ValueError(
            f"MemVPConfig: memory_read='adem' reads silu(x) silu(K)^T, so activation={config.activation!r} would "
            "not be used: leave activation None."
        )
    value = config.drop_ratio
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"MemVPConfig.drop_ratio must be a number in [0, 1), got {value!r}.")


def _is_id_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def check_cls_token(config: Any) -> None:
    """`MemVPConfig`'s checks of the CLS input token fields (`input_tokens.py`; what needs the model is checked at
    injection)."""
    if not isinstance(config.cls_token, bool):
        raise ValueError(f"MemVPConfig.cls_token must be True or False, got {config.cls_token!r}.")
    names = ("cls_token_prefix_ids", "cls_token_text_only_prefix_ids")
    if not config.cls_token:
        given = [name for name in names if getattr(config, name) is not None]
        if given:
            raise ValueError(f"MemVPConfig: {given} only apply with cls_token=True; set cls_token=True or drop them.")
        return
    for name in names:
        if not _is_id_list(getattr(config, name)):
            raise ValueError(
                f"MemVPConfig.{name} must be a list of token ids (>= 0) when cls_token=True -- the base tokenizer's "
                f"ids of the text before the CLS token (ADEM-VL: {ADEM_VL_IMAGE_PREFIX!r} for rows with an image, "
                f"{ADEM_VL_TEXT_ONLY_PREFIX!r} for rows without; memvp_peft.tuner.input_tokens.adem_vl_prefix_ids"
                f"(tokenizer) gives both), [] for none; got {getattr(config, name)!r}."
            )
    layouts = [name for name in ("image_grid", "num_frames") if getattr(config, name) is not None]
    if layouts:
        raise ValueError(
            f"MemVPConfig: cls_token=True places one image's CLS feature into the text; {layouts[0]} brings several "
            "images (tiles or frames) per sample. Use one of them."
        )
    if getattr(config, "task_type", None) == "SEQ_2_SEQ_LM":
        raise ValueError("MemVPConfig: cls_token=True places the CLS token after the BOS token of a decoder-only "
                         "model's input; encoder-decoder models (task_type='SEQ_2_SEQ_LM') are not supported.")


#: Fields the model reads at every call (tiling, frames, compression, the vision adapters' scale): changing them after
#: injection changes what the model computes and what is saved alike, so they may change.
LIVE_FIELDS = frozenset({"image_grid", "num_frames", "pool_kernel", "pool_tokens", "multiscale_tokens",
                         "vision_adapter_scale", "modules_to_save"})


def _built_fields() -> frozenset:
    """MemVPConfig's own fields that are read when the adapter is built (everything but `LIVE_FIELDS` and peft's
    `PeftConfig` bookkeeping)."""
    return frozenset(f.name for f in fields(MemVPConfig)) - {f.name for f in fields(PeftConfig)} - LIVE_FIELDS


def _same(current: Any, new: Any) -> bool:
    try:
        return bool(current == new)
    except Exception:  # values that do not compare (tensors) are not the same
        return False


def mark_injected(config: MemVPConfig) -> None:
    """The tuner has built an adapter from `config`: from now on its built fields are fixed (`__setattr__`)."""
    config._memvp_injected = True


def record_built_field(config: MemVPConfig, name: str, value: Any) -> None:
    """The tuner records what it built with (`vision_num_layers`, the encoder it attached, a LoRA part merged away)
    on a config whose built fields are fixed to users."""
    object.__setattr__(config, name, value)


# LoraConfig fields that belong to the surrounding MemVP adapter, not to its LoRA part.
_LORA_FIELDS_OWNED_BY_MEMVP = ("peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision")


def normalise_lora_config(value: object) -> dict:
    """A JSON-serialisable dict of a `LoraConfig` (or of its dict), validated by building the `LoraConfig`."""
    if isinstance(value, LoraConfig):
        value = value.to_dict()
    if not isinstance(value, dict):
        raise ValueError(
            f"MemVPConfig.lora_config must be a peft.LoraConfig or a dict of its fields, got {type(value).__name__}."
        )
    fields = {k: v for k, v in value.items() if k not in _LORA_FIELDS_OWNED_BY_MEMVP}
    try:
        LoraConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"MemVPConfig.lora_config is not a valid LoraConfig: {error}") from error
    return {k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}
