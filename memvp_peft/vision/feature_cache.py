"""A disk cache of a frozen vision encoder's features, so that every image is encoded once, not once per epoch.

Why: with no vision adapters (`vision_adapter_dim=0`) the encoder is frozen and its features of an image never
change, yet every epoch runs the full encoder forward on every image -- for a CLIP-L tower most of a MemVP step.
`memvp-train --cache_image_features [DIR]` wraps the run's collator in `CachedFeatureCollator`: it turns the
batch's `pixel_values` into `image_features` (what the model reads when features are precomputed), encoding only
the images the cache has not seen.

What makes reuse safe:

* an image is keyed by the sha256 of its *processed* pixel tensor (dtype, shape and bytes) and of the autocast the
  encoder runs under (`autocast_regime`: bf16 features are other numbers than fp32 ones), so a different image
  processor, normalisation, crop, tile or precision gives other keys;
* the cache folder is keyed by everything else that decides the features (`encoder_settings`): the encoder's
  name/path and revision, its class and config, a digest of its weights, the feature layer, CLS selection and
  post-layernorm, and the image processor / normalisation settings -- a different encoder never finds the folder;
* a shard is a safetensors file whose metadata holds, for every entry, a sha256 that binds together the folder's key
  (the encoder), the entry's image key and the feature tensor (dtype, shape, bytes): a truncated shard (unreadable
  header), one whose bytes changed, one whose features were rewritten with a digest of the new tensor alone, two
  images' features swapped under each other's keys, or a shard copied from another encoder's folder all fail it;
* every feature read back must have the shape and dtype this encoder gives for images of that size under that
  autocast (learned from the images it encodes, or from one image encoded to find out): a tensor of another token
  count or width is not served even with a matching digest;
* only regular files are read: a symlink or folder named like a shard (or a symlinked encoder folder) is refused,
  so the cache never reads features from outside its folder.

A shard failing a digest or the shape check is warned about, deleted and its images encoded again.

What it does *not* protect against: someone who may write the folder and knows this scheme can write features with
digests that match (the digest is a checksum, not a signature -- there is no secret key). Keep the folder as private
as the training data it stands for.

Features are computed by the functions the model computes them with (`tiling.tile_for_adapter` for the adapter's
`image_grid`, then `encoder.pixel_features` without vision adapters, reading the features the encoder was attached
to read) and under the autocast the model's forward runs under (`CachedFeatureCollator.precision`: `memvp-train`
gives it the Trainer's `accelerator.autocast`, which wraps the model's forward under `--bf16`/`--fp16`), so a cached
run trains on the same numbers as an uncached one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import warnings
from typing import Any, Callable, ContextManager, Optional

import torch

from .encoder import VisionEncoder, describe_encoder, pixel_features, tensor_digest, weights_digest
from .tiling import tile_for_adapter

__all__ = ["CachedFeatureCollator", "FeatureCache", "autocast_regime", "default_cache_dir", "encoder_settings",
           "tensor_digest"]

SHARD_PREFIX = "features-"
SETTINGS_FILE = "encoder.json"


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/memvp_peft/image_features` (`~/.cache/...` without it): where a bare flag caches."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "memvp_peft", "image_features")


def autocast_regime(device_type: str) -> str:
    """The autocast in force for `device_type` right now, as text: part of every image key, because an encoder's
    features under bf16/fp16 autocast are other numbers than without."""
    if not torch.is_autocast_enabled(device_type):
        return "no autocast"
    return f"autocast {torch.get_autocast_dtype(device_type)} on {device_type}"


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
        if os.path.islink(self.folder):
            raise ValueError(f"memvp feature cache: {self.folder} is a symlink; the cache reads only its own folder. "
                             "Remove the link (the folder is created again).")
        os.makedirs(self.folder, exist_ok=True)
        shards = [os.path.join(self.folder, name) for name in sorted(os.listdir(self.folder))
                  if name.startswith(SHARD_PREFIX) and name.endswith(".safetensors")]
        for path in shards:
            _refuse_non_file(path)
        settings_path = os.path.join(self.folder, SETTINGS_FILE)
        if not os.path.isfile(settings_path):  # for people: what these features were computed with
            _atomic_write(settings_path, text.encode())
        self._index: dict[str, str] = {}  # image key -> shard path
        self._digests: dict[str, str] = {}  # image key -> its entry digest (`_entry_digest`), from the shard's metadata
        self._outputs: dict[tuple, tuple[torch.Size, torch.dtype]] = {}  # (pixel shape, autocast) -> feature shape
        for path in shards:
            self._read_index(path)

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

    def _entry_digest(self, key: str, tensor: torch.Tensor) -> str:
        """The digest a shard records for an entry: sha256 of this encoder's folder key, the image key and the
        tensor's digest, so features are only valid for the image and the encoder they were computed for."""
        return hashlib.sha256(f"{self.key}|{key}|{tensor_digest(tensor)}".encode()).hexdigest()

    def _drop_shard(self, path: str, why: str) -> None:
        warnings.warn(f"memvp feature cache: shard {path} {why}; it is deleted and its images are encoded again.",
                      stacklevel=3)
        for key in [key for key, where in self._index.items() if where == path]:
            del self._index[key], self._digests[key]
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def _load(self, keys: list[str], expected: tuple[torch.Size, torch.dtype]) -> dict[str, torch.Tensor]:
        """The cached features of `keys` that read back intact, with the `expected` (shape, dtype) of one image's
        features (a shard failing its digests or holding another shape is dropped)."""
        from safetensors import safe_open

        found: dict[str, torch.Tensor] = {}
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            by_shard.setdefault(self._index[key], []).append(key)
        for path, wanted in by_shard.items():
            _refuse_non_file(path)
            try:
                with safe_open(path, framework="pt") as shard:
                    tensors = {key: shard.get_tensor(key) for key in wanted}
            except Exception as error:
                self._drop_shard(path, f"cannot be read ({error})")
                continue
            if any(self._entry_digest(key, tensor) != self._digests[key] for key, tensor in tensors.items()):
                self._drop_shard(path, "holds features whose bytes differ from their recorded sha256 (which binds "
                                       "them to their image and this encoder)")
                continue
            wrong = next(((key, t) for key, t in tensors.items() if (t.shape, t.dtype) != expected), None)
            if wrong is not None:
                self._drop_shard(path, f"holds features of shape {tuple(wrong[1].shape)} and dtype {wrong[1].dtype} "
                                       f"where this encoder gives {tuple(expected[0])} and {expected[1]}")
                continue
            found.update(tensors)
        return found

    def _encode(self, pixels: torch.Tensor, regime: str, device: Optional[torch.device]) -> torch.Tensor:
        """Features of `pixels` on the CPU (encoded on `device`), noting the shape and dtype this encoder gives."""
        if device is not None:
            pixels = pixels.to(device)
        encoded = pixel_features(self.vision, pixels).detach().cpu().contiguous()
        self._outputs[(tuple(pixels.shape[1:]), regime)] = (encoded.shape[1:], encoded.dtype)
        return encoded

    def _encode_and_store(self, keys: list[str], pixels: torch.Tensor, regime: str,
                          device: Optional[torch.device]) -> dict[str, torch.Tensor]:
        """Encode `pixels` (the images of `keys`) and store the features of those the cache does not hold."""
        encoded = self._encode(pixels, regime, device)
        new = {key: encoded[i].clone() for i, key in enumerate(keys)}
        self._store({key: tensor for key, tensor in new.items() if key not in self._index})
        self.encoded += len(keys)
        return new

    @torch.no_grad()
    def features(self, pixel_values: torch.Tensor, device: Optional[torch.device] = None,
                 precision: Optional[Callable[[], ContextManager]] = None) -> torch.Tensor:
        """(M, C, H, W) processed images -> (M, tokens, hidden) features on the CPU, encoding (on `device`, inside
        `precision()`: the autocast the model's forward runs under) only the images not in the cache and storing
        theirs as a new shard.

        What is read back must have the shape and dtype the encoder gives for these images: known once it encoded
        one of this size under this autocast; a batch the cache holds whole before that has its first image encoded
        (not read) to learn it."""
        if pixel_values.dim() != 4:
            raise ValueError(f"FeatureCache.features takes (images, C, H, W) pixel_values, got shape "
                             f"{tuple(pixel_values.shape)}.")
        encoder_device = device if device is not None else next(self.vision.model.parameters()).device
        encoded_before = self.encoded
        with precision() if precision is not None else contextlib.nullcontext():
            regime = autocast_regime(encoder_device.type)
            keys = [hashlib.sha256(f"{tensor_digest(image)}|{regime}".encode()).hexdigest() for image in pixel_values]
            first = {key: index for index, key in reversed(list(enumerate(keys)))}
            missing = [key for key in first if key not in self._index]
            if not missing and (tuple(pixel_values.shape[1:]), regime) not in self._outputs:
                missing = [keys[0]]  # nothing to encode, and the encoder's output not known yet: learn it
            known = self._encode_and_store(missing, pixel_values[[first[k] for k in missing]], regime, device) \
                if missing else {}
            cached = [key for key in first if key not in known]
            if cached:
                expected = self._outputs[(tuple(pixel_values.shape[1:]), regime)]
                known.update(self._load(cached, expected))
                dropped = [key for key in cached if key not in known]  # shards that failed their checks
                if dropped:
                    known.update(self._encode_and_store(dropped, pixel_values[[first[k] for k in dropped]], regime,
                                                        device))
        self.reused += len(keys) - (self.encoded - encoded_before)  # batch places not run through the encoder
        return torch.stack([known[key] for key in keys])

    def _store(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        digests = {key: self._entry_digest(key, tensor) for key, tensor in tensors.items()}
        path = os.path.join(self.folder, f"{SHARD_PREFIX}{uuid.uuid4().hex}.safetensors")
        _atomic_write(path, save(tensors, metadata=digests))  # several ranks may write: unique names, whole files
        for key in tensors:
            self._index[key], self._digests[key] = path, digests[key]


def _refuse_non_file(path: str) -> None:
    """A shard must be a regular file in the cache's folder: a symlink could serve features from anywhere, and a
    folder is nothing the cache wrote."""
    if os.path.islink(path) or not os.path.isfile(path):
        kind = "a symlink" if os.path.islink(path) else "not a regular file"
        raise ValueError(f"memvp feature cache: {path} is {kind}; the cache reads only the shard files it wrote. "
                         "Remove it (its images are encoded again).")


def _atomic_write(path: str, data: bytes) -> None:
    staging = f"{path}.{os.getpid()}.partial"
    with open(staging, "wb") as handle:
        handle.write(data)
    os.replace(staging, path)


class CachedFeatureCollator:
    """`collator`'s batches with `pixel_values` replaced by the cached `image_features` (and the `image_mask` of
    the tiles when the adapter's `config.image_grid` tiles them, as the model would have). `device` gives where
    to run the encoder for the images the cache misses (the model's device); `precision` the context the model's
    forward runs under (its autocast: the Trainer's `accelerator.autocast`), which the encoder then runs under too --
    without it, under `--bf16` the cached features would be fp32 ones and the losses other numbers."""

    def __init__(self, collator: Callable[[list], dict], cache: FeatureCache, config: Any,
                 device: Optional[Callable[[], torch.device]] = None,
                 precision: Optional[Callable[[], ContextManager]] = None) -> None:
        self.collator = collator
        self.cache = cache
        self.config = config
        self.device = device
        self.precision = precision

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
        features = self.cache.features(flat, self.device() if self.device is not None else None, self.precision)
        batch["image_features"] = features.reshape(*pixel_values.shape[:-3], *features.shape[1:])
        if mask is not None:
            batch["image_mask"] = mask
        return batch
