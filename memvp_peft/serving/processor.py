"""vLLM's multimodal processor for the MemVP model classes: a request's images become one item of visual features.

MemVP puts no image token into the sequence: the prompt stays exactly as the client sent it. vLLM, though, only
carries image data to the model through placeholders in the prompt. So the processor declares **one placeholder
over the whole prompt with zero embeddings** (`is_embed` all False):

* zero embeddings: no encoder step is scheduled and nothing is scattered into the token embeddings -- the data only
  rides along in the request's `mm_features`, where the runner hook finds it for the memory bank;
* whole prompt: prefix caching keys every block that overlaps a placeholder with the item's hash (and chains each
  block hash on its parent), so every block of the prompt is keyed by the image -- required, since the memory
  changes the KV of every token; text-only requests carry no item and share KV only with text-only requests;
* ending on the last prompt token: the scheduler drops the data of placeholders lying wholly inside a prefix-cache
  hit, and the last prompt token is never served from the cache, so the data always survives;
* several images: one item whose features are the images' features in order (as memvp-peft lays out a row's
  images, image after image) and whose hash combines the images' hashes -- overlapping per-image placeholders would
  leave later images out of the block keys.

Everything a client can get wrong is refused here, in the front end, with a ValueError that vLLM answers as a
400: an error in the engine's worker would take the whole engine down. Checked: the features' width and token
count against the adapter, the image count against `limit_mm_per_prompt` and the slots, and every pixel image's
decoding and encoding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Optional

import torch

from .adapter import ServingAdapter, read_adapter
from .pixels import PixelEncoder

#: the key under which a request's features ride in its multimodal item
FEATURES_KEY = "memvp_features"
#: the hf-overrides key naming the adapter folder
ADAPTER_KEY = "memvp_adapter"


def adapter_folder_of(hf_config: Any) -> str:
    """The adapter folder the model config names (`--hf-overrides '{"memvp_adapter": ...}'`)."""
    folder = getattr(hf_config, ADAPTER_KEY, None)
    if not folder:
        raise ValueError(f"MemVP serving: the model config names no adapter: pass --hf-overrides "
                         f"'{{\"architectures\": [...], \"{ADAPTER_KEY}\": \"<adapter folder>\"}}' (memvp-serve does).")
    return str(folder)


_ADAPTERS: dict[str, ServingAdapter] = {}
_ENCODERS: dict[str, PixelEncoder] = {}


def served_adapter(folder: str) -> ServingAdapter:
    """The adapter in `folder`, read once per process."""
    if folder not in _ADAPTERS:
        _ADAPTERS[folder] = read_adapter(folder)
    return _ADAPTERS[folder]


def pixel_encoder(adapter: ServingAdapter) -> PixelEncoder:
    """The adapter's pixel encoder, one per process (it loads the vision tower on first use)."""
    if adapter.folder not in _ENCODERS:
        _ENCODERS[adapter.folder] = PixelEncoder(adapter)
    return _ENCODERS[adapter.folder]


def combined_hash(hashes: list[str], tokens: list[int]) -> str:
    """One hash for a request's images: their own hashes in order, with each image's token count."""
    joined = "|".join(f"{h}:{n}" for h, n in zip(hashes, tokens))
    return "memvp-" + hashlib.sha256(joined.encode()).hexdigest()


def check_features(features: Any, index: int, adapter: ServingAdapter) -> torch.Tensor:
    """One image's features as sent by a client: a `(tokens, visual_dim)` float tensor of finite values."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"MemVP: image {index}'s features must be a (tokens, {adapter.visual_dim}) tensor, got "
                         f"{shape}.")
    if features.shape[-1] != adapter.visual_dim:
        raise ValueError(f"MemVP: image {index}'s features have width {features.shape[-1]}, but the adapter reads "
                         f"features of width {adapter.visual_dim} (its visual_dim).")
    if features.shape[0] == 0:
        raise ValueError(f"MemVP: image {index}'s features hold no token.")
    if not features.is_floating_point() or not bool(torch.isfinite(features).all()):
        raise ValueError(f"MemVP: image {index}'s features must be finite floating-point values.")
    return features.to(torch.float32)


def request_features(images: list[Any], adapter: ServingAdapter, encoder: PixelEncoder,
                     limit: Optional[int]) -> tuple[torch.Tensor, list[int]]:
    """A request's images (features or pixel images) -> their `(tokens, visual_dim)` features, image after image, and
    each image's token count; refused with a ValueError when they cannot be the request's memory."""
    if limit is not None and len(images) > limit:
        raise ValueError(f"MemVP: the request holds {len(images)} images, at most {limit} are allowed per request "
                         "(limit_mm_per_prompt).")
    parts = []
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            parts.append(check_features(image, index, adapter))
        else:
            try:
                parts.append(encoder.features(image))
            except ValueError:
                raise
            except Exception as error:  # a corrupt or unreadable image: the client's, not the engine's, fault
                raise ValueError(f"MemVP: image {index} could not be read as an image: {error}") from error
    tokens = [int(part.shape[0]) for part in parts]
    if sum(tokens) > adapter.num_slots:
        raise ValueError(f"MemVP: the request's images hold {sum(tokens)} visual tokens ({' + '.join(map(str, tokens))})"
                         f", but the adapter's memory has {adapter.num_slots} slots (num_memory_slots): send fewer "
                         "or smaller images.")
    return torch.cat(parts), tokens


def build_processor_classes() -> tuple[type, type, type]:
    """(ProcessingInfo, DummyInputsBuilder, MultiModalProcessor) for the MemVP models; built in a function so that
    importing this module does not import vLLM (the layout and docs tests import the package without it)."""
    from vllm.inputs import mm_input
    from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItem, MultiModalKwargsItems, \
        PlaceholderRange
    from vllm.multimodal.parse import MultiModalDataParser
    from vllm.multimodal.processing import BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo

    class MemVPProcessingInfo(BaseProcessingInfo):
        """The adapter, its pixel encoder and the item limits."""

        @cached_property
        def adapter(self) -> ServingAdapter:
            return served_adapter(adapter_folder_of(self.get_hf_config()))

        @cached_property
        def pixels(self) -> PixelEncoder:
            return pixel_encoder(self.adapter)

        def get_supported_mm_limits(self) -> Mapping[str, Optional[int]]:
            return {"image": None}

        def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
            return {"image": 0}  # no image embeds a token: the features only fill the memory

        def _get_expected_hidden_size(self) -> Optional[int]:
            return None  # features are checked against the adapter's visual_dim (`check_features`), not d

        def get_data_parser(self) -> MultiModalDataParser:
            return MultiModalDataParser(expected_hidden_size=None)

    class MemVPDummyInputsBuilder(BaseDummyInputsBuilder[MemVPProcessingInfo]):
        """Profiling inputs: one image's features filling every slot."""

        def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
            return ""

        def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: Any = None) -> dict:
            count = mm_counts.get("image", 0)
            adapter = self.info.adapter
            mm_config = self.info.ctx.get_mm_config()
            if not mm_config.enable_mm_embeds and self.info.pixels.available:
                return {"image": self._get_dummy_images(width=32, height=32, num_images=count)}
            return {"image": [torch.zeros(max(1, adapter.num_slots // max(count, 1)), adapter.visual_dim)
                              for _ in range(count)]}

    class MemVPMultiModalProcessor(BaseMultiModalProcessor[MemVPProcessingInfo]):
        """See the module docstring: one whole-prompt item with zero embeddings."""

        def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping:
            return {FEATURES_KEY: MultiModalFieldConfig.batched("image")}

        def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> list:
            return []

        def apply(self, inputs: Any, timing_ctx: Any) -> Any:
            prompt = list(inputs.prompt) if not isinstance(inputs.prompt, str) else \
                self.info.get_tokenizer().encode(inputs.prompt)
            items = inputs.mm_data_items
            images = []
            if "image" in items:
                data = items["image"]
                images = [data.get(i) for i in range(data.get_count())]
            other = [m for m in items if m != "image"]
            if other:
                raise ValueError(f"MemVP: only images are supported, the request holds {other}.")
            if not images:
                return mm_input(prompt_token_ids=prompt, mm_kwargs=MultiModalKwargsItems({}), mm_hashes={},
                                mm_placeholders={})
            if not prompt:
                raise ValueError("MemVP: a request with images needs a non-empty prompt.")
            limit = self.info.ctx.get_mm_config().get_limit_per_prompt("image")
            with timing_ctx.record("apply_hf_processor"):
                features, tokens = request_features(images, self.info.adapter, self.info.pixels, limit)
            elems = MultiModalFieldConfig.batched("image").build_elems(FEATURES_KEY, [features])
            kwargs = MultiModalKwargsItems({"image": [MultiModalKwargsItem({FEATURES_KEY: elems[0]})]})
            with timing_ctx.record("get_mm_hashes"):
                hashes = inputs.get_mm_hashes(self.info.model_id,
                                              self.info.ctx.get_mm_config().mm_hasher_algorithm)["image"]
            placeholder = PlaceholderRange(offset=0, length=len(prompt),
                                           is_embed=torch.zeros(len(prompt), dtype=torch.bool))
            return mm_input(prompt_token_ids=prompt, mm_kwargs=kwargs,
                            mm_hashes={"image": [combined_hash(hashes, tokens)]},
                            mm_placeholders={"image": [placeholder]})

    return MemVPProcessingInfo, MemVPDummyInputsBuilder, MemVPMultiModalProcessor
