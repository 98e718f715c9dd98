"""`memvp-train --cache_image_features [DIR]`: the checks and the collator of a run whose encoder features are cached.

The cache (`memvp_peft.vision.feature_cache`) is only right when the features of an image cannot change during training:
vision adapters train inside the encoder, so with `--vision_adapter_dim > 0` the flag is refused; a run without a
vision encoder (the built-in digits' 2x2-pixel patches) has nothing to cache and is refused too, rather than the
flag doing nothing without a word. The cache is written as training reaches images it does not hold yet, so a folder
this user cannot write (a shared cache, filled in part by someone else) is refused before the run starts, not at the
first such batch.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .options import TrainOptions
from .run_folder import writable_folder_problem


def cache_folder(options: TrainOptions) -> Optional[str]:
    """The cache folder the options ask for ('auto' is the user cache), or None without the flag."""
    from ..vision.feature_cache import default_cache_dir

    value = options.cache_image_features
    if value is None:
        return None
    if not value.strip():
        raise ValueError("--cache_image_features was given an empty folder name: pass a folder, or the flag alone.")
    return default_cache_dir() if value == "auto" else os.path.abspath(value)


def check_cache_request(options: TrainOptions) -> None:
    """The refusals that need no model: vision adapters change the encoder's features while they train; a folder
    that cannot be written."""
    folder = cache_folder(options)
    if folder is None:
        return
    if options.vision_adapter_dim > 0:
        raise ValueError(f"--cache_image_features reuses the features a frozen encoder computed once, but "
                         f"--vision_adapter_dim {options.vision_adapter_dim} trains adapters inside the encoder, so "
                         "its features change every step: drop --cache_image_features, or set --vision_adapter_dim 0.")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--cache_image_features {folder!r} is a file; pass a folder (it is created if missing).")
    problem = writable_folder_problem(folder)
    if problem is not None:
        raise ValueError(_unwritable(folder, problem))


def _unwritable(folder: str, problem: str) -> str:
    """The refusal of a cache folder the run could not write: the features of every image not cached yet are written
    as training reaches it, so a read-only cache would fail at the first such batch."""
    return (f"--cache_image_features {folder!r} cannot be written: {problem}. The cache is written as training "
            "encodes images it does not hold yet: pass a folder this user may write, or drop --cache_image_features.")


def cached_collator(options: TrainOptions, peft_model: Any, collator: Any, processor: Any, input_name: str) -> Any:
    """`collator`, or with the flag the `CachedFeatureCollator` around it reading the attached encoder's cache."""
    from ..vision.feature_cache import CachedFeatureCollator, FeatureCache, encoder_settings

    folder = cache_folder(options)
    if folder is None:
        return collator
    vision = getattr(peft_model.base_model, "vision_encoder", None)
    if input_name != "pixel_values" or vision is None:
        raise ValueError("--cache_image_features caches a vision encoder's features, and this run has none (the "
                         "built-in digits task reads 2x2-pixel patches): pass --vision_model_name_or_path or a VLM "
                         "base, or drop --cache_image_features.")
    revision = None if options.vision_model_name_or_path else options.revision  # a VLM's tower comes with its base
    settings = encoder_settings(vision, revision=revision, image_processor=processor,
                                image_normalization=options.image_normalization)
    cache = FeatureCache(folder, vision, settings)
    problem = writable_folder_problem(cache.folder)  # this encoder's own folder, made by another user perhaps
    if problem is not None:
        raise ValueError(_unwritable(cache.folder, problem))
    config = peft_model.peft_config[peft_model.active_adapter]
    print(f"memvp-train: caching the encoder's image features in {cache.folder} ({len(cache)} images cached)")
    return CachedFeatureCollator(collator, cache, config, device=lambda: next(peft_model.parameters()).device)


def encode_in_training_precision(train_collator: Any, trainer: Any) -> None:
    """Make a cached run encode under the autocast the model's forward runs under: accelerate wraps that forward in
    `trainer.accelerator.autocast()` (bf16 under `--bf16`, fp16 under `--fp16`), so the uncached run's encoder runs
    in it; features computed outside it would be other numbers, and the run's losses with them. Nothing for a run
    without the cache."""
    from ..vision.feature_cache import CachedFeatureCollator

    if isinstance(train_collator, CachedFeatureCollator):
        train_collator.precision = trainer.accelerator.autocast
