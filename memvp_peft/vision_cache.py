"""A disk cache of a frozen vision encoder's features, so that every image is encoded once, not once per epoch.

Why: with no vision adapters (`vision_adapter_dim=0`) the encoder is frozen and its features of an image never
change, yet every epoch runs the full encoder forward on every image -- for a CLIP-L tower most of a MemVP step.
`memvp-train --cache_image_features [DIR]` wraps the run's collator in `CachedFeatureCollator`: it turns the
batch's `pixel_values` into `image_features` (what the model reads when features are precomputed), encoding only
the images the cache has not seen.

What makes reuse safe:

* an image is keyed by the sha256 of its *processed* pixel tensor (dtype, shape and bytes), so a different image
  processor, normalisation, crop or tile gives other keys;
* the cache folder is keyed by everything else that decides the features (`encoder_settings`): the encoder's
  name/path and revision, its class and config, a digest of its weights, the feature layer, CLS selection and
  post-layernorm, and the image processor / normalisation settings -- a different encoder never finds the folder;
* a shard is a safetensors file whose metadata holds the sha256 of every tensor it stores: a truncated shard
  (unreadable header) or one whose bytes changed is detected, warned about, deleted and its images re-encoded.

Features are computed exactly as `MemoryRuntime.build` computes them (the adapter's `image_grid` tiling first, then
`VisionEncoder.features` without adapters), so a cached run trains on the same numbers as an uncached one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from typing import Any, Callable, Optional

import torch

from .tuner.visual_layout import tile_for_adapter
from .vision import VisionEncoder, describe_encoder, tensor_digest, weights_digest

__all__ = ["CachedFeatureCollator", "FeatureCache", "default_cache_dir", "encoder_settings", "tensor_digest"]

SHARD_PREFIX = "features-"
SETTINGS_FILE = "encoder.json"


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/memvp_peft/image_features` (`~/.cache/...` without it): where a bare flag caches."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "memvp_peft", "image_features")


def encoder_settings(vision: VisionEncoder, *, revision: Optional[str] = None, image_processor: Any = None,
                     image_normalization: Optional[str] = None) -> dict[str, Any]:
    """Everything besides the pixels that decides an image's features; the cache folder is named by its hash."""
    model = vision.model
    config = getattr(model, "config", None)
    processor = image_processor.to_dict() if hasattr(image_processor, "to_dict") else repr(image_processor)
    return {
        "encoder": describe_encoder(model),
        "revision": revision,
        "encoder_class": type(model).__name__,
        "encoder_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "weights_sha256": weights_digest(model),
        "feature_layer": vision.feature_layer,
        "select_strategy": vision.select_strategy,
        "layernorm": vision.layernorm,
        "image_processor": processor,
        "image_normalization": image_normalization,
    }


class FeatureCache:
    """Features of a frozen `VisionEncoder` on disk under `root/<settings hash>/`, one safetensors shard per batch
    of newly encoded images. `encoded` counts the images run through the encoder, `reused` those read back."""

    def __init__(self, root: str, vision: VisionEncoder, settings: dict[str, Any]) -> None:
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"--cache_image_features {root!r} is a file; pass a folder (it is created if missing).")
        text = json.dumps(settings, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()
        self.folder = os.path.join(root, self.key[:32])
        self.vision = vision
        self.encoded = 0
        self.reused = 0
        os.makedirs(self.folder, exist_ok=True)
        settings_path = os.path.join(self.folder, SETTINGS_FILE)
        if not os.path.isfile(settings_path):  # for people: what these features were computed with
            _atomic_write(settings_path, text.encode())
        self._index: dict[str, str] = {}  # image hash -> shard path
        self._digests: dict[str, str] = {}  # image hash -> sha256 of its features, from the shard's metadata
        for name in sorted(os.listdir(self.folder)):
            if name.startswith(SHARD_PREFIX) and name.endswith(".safetensors"):
                self._read_index(os.path.join(self.folder, name))

    def __len__(self) -> int:
        return len(self._index)

    def _read_index(self, path: str) -> None:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as shard:
                metadata = shard.metadata() or {}
                keys = list(shard.keys())
        except Exception as error:  # a truncated or overwritten file: safetensors cannot parse its header
            self._drop_shard(path, f"cannot be read ({error})")
            return
        if sorted(keys) != sorted(metadata):
            self._drop_shard(path, "has tensors without a recorded digest")
            return
        for key in keys:
            self._index[key] = path
            self._digests[key] = metadata[key]

    def _drop_shard(self, path: str, why: str) -> None:
        warnings.warn(f"memvp feature cache: shard {path} {why}; it is deleted and its images are encoded again.",
                      stacklevel=3)
        for key in [key for key, where in self._index.items() if where == path]:
            del self._index[key], self._digests[key]
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def _load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The cached features of `keys` that read back intact (a shard failing its digests is dropped)."""
        from safetensors import safe_open

        found: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self._index[key], []).append(key)
        for path, wanted in by_shard.items():
            try:
                with safe_open(path, framework="pt") as shard:
                    tensors = {key: shard.get_tensor(key) for key in wanted}
            except Exception as error:
                self._drop_shard(path, f"cannot be read ({error})")
                continue
            if any(tensor_digest(tensor) != self._digests[key] for key, tensor in tensors.items()):
                self._drop_shard(path, "holds features whose bytes differ from their recorded sha256")
                continue
            found.update(tensors)
        return found

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
        """(M, C, H, W) processed images -> (M, tokens, hidden) features on the CPU, encoding (on `device`) only
        the images not in the cache and storing theirs as a new shard."""
        if pixel_values.dim() != 4:
            raise ValueError(f"FeatureCache.features takes (images, C, H, W) pixel_values, got shape "
                             f"{tuple(pixel_values.shape)}.")
        keys = [tensor_digest(image) for image in pixel_values]
        known = self._load(sorted({key for key in keys if key in self._index}))
        missing = list(dict.fromkeys(key for key in keys if key not in known))
        if missing:
            first = {key: index for index, key in reversed(list(enumerate(keys)))}
            pixels = pixel_values[[first[key] for key in missing]]
            if device is not None:
                pixels = pixels.to(device)
            encoded = self.vision.features(pixels).detach().cpu().contiguous()
            new = {key: encoded[i].clone() for i, key in enumerate(missing)}
            self._store(new)
            known.update(new)
            self.encoded += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack([known[key] for key in keys])

    def _store(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        digests = {key: tensor_digest(tensor) for key, tensor in tensors.items()}
        path = os.path.join(self.folder, f"{SHARD_PREFIX}{uuid.uuid4().hex}.safetensors")
        _atomic_write(path, save(tensors, metadata=digests))  # several ranks may write: unique names, whole files
        for key in tensors:
            self._index[key], self._digests[key] = path, digests[key]


def _atomic_write(path: str, data: bytes) -> None:
    staging = f"{path}.{os.getpid()}.partial"
    with open(staging, "wb") as handle:
        handle.write(data)
    os.replace(staging, path)


class CachedFeatureCollator:
    """`collator`'s batches with `pixel_values` replaced by the cached `image_features` (and the `image_mask` of
    the tiles when the adapter's `config.image_grid` tiles them, as the model would have). `device` gives where
    to run the encoder for the images the cache misses (the model's device)."""

    def __init__(self, collator: Callable[[list], dict], cache: FeatureCache, config: Any,
                 device: Optional[Callable[[], torch.device]] = None) -> None:
        self.collator = collator
        self.cache = cache
        self.config = config
        self.device = device

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's attributes (image_grid, tokenizer, ...)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)

    def __call__(self, records: list) -> dict:
        batch = self.collator(records)
        pixel_values = batch.pop("pixel_values", None)
        if pixel_values is None:
            return batch
        mask = batch.get("image_mask")
        pixel_values, mask = tile_for_adapter(pixel_values, mask, self.config, self.cache.vision)
        flat = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        features = self.cache.features(flat, self.device() if self.device is not None else None)
        batch["image_features"] = features.reshape(*pixel_values.shape[:-3], *features.shape[1:])
        if mask is not None:
            batch["image_mask"] = mask
        return batch
