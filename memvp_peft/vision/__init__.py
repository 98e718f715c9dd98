"""The vision side of MemVP: from pixels to the patch features its memory is built from.

* `encoder` -- the frozen vision encoder (CLIP / SigLIP, or a VLM's own tower), its feature selection, the authors'
  bottleneck adapters inside it, and `pixel_features`: the one place pixels become features;
* `families` -- the VLM bases whose own processor's batches MemVP reads (Llava, LLaVA-NeXT, LLaVA-OneVision,
  Gemma 3, Idefics3 / SmolVLM, Qwen2-VL / 2.5 / 3, Mistral 3): one object per family (`family_of`), which knows
  its placeholder tokens, its image keywords and the tower MemVP reads;
  and the helpers that tell a VLM base apart (`is_vlm`, `vlm_vision_tower`, `has_own_vision_model`);
* `tiling` -- AnyRes-style tiling of high-resolution images (the overview plus a grid of encoder-sized tiles) and the
  one parser of a grid (`image_grid`), for the model and the collator alike;
* `feature_cache` -- a disk cache of a frozen encoder's features (`memvp-train --cache_image_features`).

Why a package of its own, below the tuner and the data pipeline: both read images through it (the tuner's runtime
encodes a call's `pixel_values`, the collator tiles a record's image, the cache encodes ahead of the model), so it
imports neither of them. The encoder's names are re-exported here (`from memvp_peft.vision import VisionEncoder`).
"""

from .encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IN_MEMORY_PREFIX,
    RunningAdapters,
    SharedModuleRef,
    VisionBottleneck,
    VisionEncoder,
    blocks_before_feature_layer,
    clip_style_image_processor,
    describe_encoder,
    feature_selection,
    imagenet_image_processor,
    load_vision_encoder,
    loaded_commit,
    pixel_features,
    tensor_digest,
    weights_digest,
)
from .families import (
    FAMILIES,
    VLMFamily,
    family_of,
    has_own_vision_model,
    is_vlm,
    supported_families,
    unread_tower_message,
    unsupported_vlm_message,
    vlm_modules_outside_language_model,
    vlm_vision_tower,
)

__all__ = [
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IN_MEMORY_PREFIX",
    "RunningAdapters",
    "SharedModuleRef",
    "VisionBottleneck",
    "VLMFamily",
    "VisionEncoder",
    "blocks_before_feature_layer",
    "clip_style_image_processor",
    "describe_encoder",
    "family_of",
    "feature_selection",
    "has_own_vision_model",
    "imagenet_image_processor",
    "is_vlm",
    "load_vision_encoder",
    "loaded_commit",
    "pixel_features",
    "supported_families",
    "tensor_digest",
    "unread_tower_message",
    "unsupported_vlm_message",
    "vlm_modules_outside_language_model",
    "vlm_vision_tower",
    "weights_digest",
]
