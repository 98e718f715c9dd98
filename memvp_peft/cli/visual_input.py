"""How a run's images become the adapter's visual input, decided once and shared by `memvp-train` and `memvp-infer`:
the layout, the collator, and (`memvp-train --cache_image_features`) the encoder-feature cache.

An adapter only answers well when it is prompted and fed pixels exactly as it was trained, so every choice about the
visual input is made here, and what training chose is written to the run manifest `memvp_cli.json` and read back by
`memvp-infer`:

* the layout -- tiles (`--image_grid`), frames (`--num_frames`), memory compression (`--pool_kernel`, `--pool_tokens`,
  `--multiscale_tokens`), ADEM-VL's read (`--memory_read adem`, `--drop_ratio`) and its whole model (`--preset
  adem-vl`), and the built-in digit-layout tasks that need them (`digits-grid`, `digits-grid-3x3`,
  `digits-sequence`) -- so the collator (which tiles / samples the images), the `MemVPConfig` (which records the layout
  and sizes the memory) and the manifest never disagree;
* the collator: both programs build their `MemVPDataCollator` here, and the `--image_normalization`, the
  `--prompt_template` and whether the base's chat template rendered the rows go into the manifest
  (`collation_manifest`) and come back out of it (`collator_from_manifest`). A manifest written before these keys
  existed reads as what training did then: the encoder's processor, the default template, the collator's own
  chat-template rule;
* the feature cache (`memvp_peft.vision.feature_cache`), which is only right when the features of an image cannot change
  during training: vision adapters train inside the encoder, so with `--vision_adapter_dim > 0` the flag is refused; a
  run without a vision encoder (the built-in digits' 2x2-pixel patches) has nothing to cache and is refused too,
  rather than the flag doing nothing without a word. The cache is written as training reaches images it does not hold
  yet, so a folder this user cannot write (a shared cache, filled in part by someone else) is refused before the run
  starts, not at the first such batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

from ..tasks.digits import layout_of, layout_prompts
from ..tasks.scienceqa import is_scienceqa_dataset
from ..vision import imagenet_image_processor
from ..vision.tiling import check_grid
from .model_loading import RUN_MANIFEST, image_processor_for
from .options import TrainOptions


# ---------------------------------------------------------------------------------------------------------- the layout

#: datasets the embedded model reads as 2x2-pixel digit patches (`data.digits.DigitPatchFeaturizer`)
DIGIT_PATCH_DATASETS = ("digits", "digits-grid", "digits-grid-3x3", "digits-sequence")


def reads_digit_patches(dataset: str) -> bool:
    return dataset in DIGIT_PATCH_DATASETS


def embedded_corpus(dataset: str) -> list[str]:
    """Prompts whose words the embedded base's word-level tokenizer must know besides `digits`' own prompt (the
    questions of a digit-layout task); none for the other datasets, whose tokenizer stays exactly as before."""
    if layout_of(dataset) is None:
        return []
    return [f"Question: {question}\nAnswer:" for question in layout_prompts(dataset)]


def visual_layout(options: Any) -> dict[str, Any]:
    """`{"image_grid": (rows, cols) or None, "num_frames": int or None}` of the run: the task's own layout for the
    digit-layout tasks (a flag that contradicts it is refused), else `--image_grid` / `--num_frames`."""
    grid = check_grid(options.image_grid, "--image_grid") if options.image_grid is not None else None
    frames = options.num_frames
    if grid is not None and frames is not None:
        raise ValueError("--image_grid and --num_frames were both given: a sample holds tiled images or video "
                         "frames, give one of them.")
    task = layout_of(options.dataset)
    if task is None:
        return {"image_grid": grid, "num_frames": frames}
    for flag, given, own in (("--image_grid", grid, task["image_grid"]), ("--num_frames", frames, task["num_frames"])):
        if given is not None and given != own:
            raise ValueError(f"dataset {options.dataset!r} is laid out with {flag[2:]}={own}; {flag} {given} would "
                             "read it wrongly: drop the flag (or pick the task of that layout).")
    return dict(task)


def parse_token_counts(text: Optional[str]) -> Optional[list[int]]:
    """`--multiscale_tokens 256,64` -> [256, 64] (MemVPConfig checks the values)."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"--multiscale_tokens must be comma-separated token counts, e.g. 256,64; got {text!r}.") from error


def memory_fields(options: Any, layout: dict[str, Any]) -> dict[str, Any]:
    """The `MemVPConfig` fields of the run's layout, compression and read."""
    grid = layout["image_grid"]
    return {
        "image_grid": list(grid) if grid is not None else None,
        "num_frames": layout["num_frames"],
        "pool_kernel": options.pool_kernel,
        "pool_tokens": options.pool_tokens,
        "multiscale_tokens": parse_token_counts(options.multiscale_tokens),
        "memory_read": options.memory_read,
        "drop_ratio": options.drop_ratio,
    }


def memory_slots(config_class: Any, fields: dict[str, Any], tokens_per_image: int, given: Optional[int],
                 most_images: tuple[int, Optional[str]] = (0, None)) -> int:
    """`--num_memory_slots` of a run: `given`, or when unset the visual tokens the fullest sample fills (tiles or
    frames, compressed: `MemVPConfig.memory_tokens`) + 25%, at least + 16 (the authors' 256 -> 320).

    `most_images` is (the most image slots one record of the run fills, that record's name), from
    `MemVPDataCollator.check_records`: a sample is sized for a video's `num_frames` (a batch always has that many
    frame slots), else for the record with the most images (each image's tiles counted in those slots), at least
    one image -- a batch carries image tensors even when its rows are text-only. A given value too small for that is
    refused here, naming the record, instead of by the model at the first batch that holds it."""
    probe = config_class(**fields)
    slots, named = most_images
    grid = fields["image_grid"]
    blocks = 1 + grid[0] * grid[1] if grid else 1
    images = fields["num_frames"] or max(1, math.ceil(slots / blocks))
    tokens = probe.memory_tokens(tokens_per_image, images)
    if given is None:
        return max(tokens + 16, math.ceil(tokens * 1.25))
    if given < tokens:
        if fields["num_frames"]:
            sample = f"a sample holds {images} frames (--num_frames)"
        else:
            sample = f"{named if images > 1 else 'a sample'} gives {images} image(s)"
        raise ValueError(f"--num_memory_slots {given} is too small: {sample}, which fill {tokens} memory slots "
                         f"({tokens // images} per image, tiles and compression counted). Pass --num_memory_slots "
                         f"{tokens} or more, or leave it unset: memvp-train then sizes the memory for the fullest "
                         "sample.")
    return given


#: `--preset adem-vl`: the options ADEM-VL's released model sets (the authors' README commands) that are not the
#: options' own defaults; the multiscale slots and the CLS token follow from the encoder and the tokenizer
ADEM_VL_OPTIONS = {"memory_read": "adem", "drop_ratio": 0.1, "memory_dropout": 0.0, "memory_scale": 0.1,
                   "visual_scale": 0.01, "vision_adapter_dim": 12}
#: options a preset fixes as a whole: the layout and compression it brings
_PRESET_LAYOUT = ("multiscale_tokens", "pool_tokens", "image_grid", "num_frames", "cache_image_features")


def check_preset(options: Any) -> None:
    """`--preset adem-vl` refused with what it cannot be combined with, before anything loads: an option it sets
    given another value (the preset is ADEM-VL's model as released: for a variation, give the options one by one),
    a layout or compression of its own, the feature cache (the CLIP adapters change the features), a dataset read as
    digit patches (the CLS token needs an encoder's pixels)."""
    if options.preset is None:
        return
    defaults = {item.name: item.default for item in dataclasses.fields(options)}
    changed = [name for name in ADEM_VL_OPTIONS if getattr(options, name) not in (defaults[name], ADEM_VL_OPTIONS[name])]
    changed += [name for name in _PRESET_LAYOUT if getattr(options, name) not in (None, defaults[name])]
    changed += ["pool_kernel"] if options.pool_kernel != 1 else []
    if changed:
        raise ValueError(
            f"--preset {options.preset} sets ADEM-VL's model as released ({ADEM_VL_OPTIONS}, multiscale slots of the "
            f"encoder's grid, the CLS input token); {', '.join('--' + name for name in changed)} would change it: "
            "drop them, or give ADEM-VL's options one by one instead of the preset."
        )
    if reads_digit_patches(options.dataset) and not options.vision_model_name_or_path:
        raise ValueError(f"--preset {options.preset} puts the encoder's CLS token into the input; dataset "
                         f"{options.dataset!r} is read as digit patches without an encoder: pass "
                         "--vision_model_name_or_path (a CLIP-style encoder).")


def preset_fields(options: Any, tokens_per_image: int, tokenizer: Any, kind: str,
                  pixels: bool) -> dict[str, Any]:
    """The `MemVPConfig` fields `--preset adem-vl` sets ({} without a preset): ADEM-VL's read, drop, scales and CLIP
    adapters, multiscale slots of the encoder's grid and its half-side pool (CLIP-L's 16x16: their [256, 64]), and
    the CLS token after the tokenizer's 'Image: ' ('Image: N/A' without an image); `num_memory_slots` then defaults
    to exactly the visual slots, as ADEM-VL sizes its memory (no +25%)."""
    from ..tuner.input_tokens import adem_vl_prefix_ids
    from ..tuner.visual_inputs import square_side

    if options.preset is None:
        return {}
    if kind == "seq2seq" or not pixels:
        what = "a seq2seq base" if kind == "seq2seq" else "visual input without an encoder"
        raise ValueError(f"--preset {options.preset} places the encoder's CLS token after the BOS token of a "
                         f"decoder-only model; this run has {what}.")
    side = square_side(tokens_per_image)
    if side is None:
        raise ValueError(f"--preset {options.preset} pools the encoder's square patch grid; an image has "
                         f"{tokens_per_image} patch tokens.")
    scales = [tokens_per_image, (side // 2) ** 2] if side > 1 else [tokens_per_image]
    return {**ADEM_VL_OPTIONS, "multiscale_tokens": scales, "cls_token": True, **adem_vl_prefix_ids(tokenizer)}


# -------------------------------------------------------------------------------------------------------- the collator


def fixed_prompt_dataset(dataset: Optional[str]) -> bool:
    """Whether `dataset` has a prompt of its own that no chat template may replace: the built-in `digits` task
    (today's `Question: ... Answer:` rows, the prompt its demo numbers were measured with) and ScienceQA (the
    authors' QCM-A prompt, which the paper's numbers come from)."""
    return dataset == "digits" or is_scienceqa_dataset(dataset or "")


def chat_template_choice(dataset: Optional[str]) -> Optional[bool]:
    """The collator's `chat_template` argument for a run on `dataset`: False for a dataset with a fixed prompt,
    None (the collator's rule: the base's chat template when it has one) for the others."""
    return False if fixed_prompt_dataset(dataset) else None


def encoder_image_processor(name: Optional[str], vision_config: Any, normalization: str, *,
                            revision: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """The image processor for an encoder (or a VLM's tower) of `vision_config`: with `normalization` 'imagenet'
    the authors' transform sized to the encoder (`vision.imagenet_image_processor`), with 'encoder' the processor
    `name` saved (else CLIP defaults: `model_loading.image_processor_for`)."""
    if normalization == "imagenet":
        return imagenet_image_processor(int(vision_config.image_size))
    return image_processor_for(name, vision_config, revision=revision, trust_remote_code=trust_remote_code)


def build_collator(tokenizer: Any, processor: Any, *, input_name: str, kind: str, max_length: Optional[int] = None,
                   array_value_range: Optional[tuple[float, float]] = None, prompt_template: Optional[str] = None,
                   chat_template: Optional[bool] = None, image_grid: Optional[Any] = None,
                   num_frames: Optional[int] = None) -> Any:
    """The `MemVPDataCollator` of a run (image paths are resolved by the loaders before records get here); tiles
    and frames as the adapter's `image_grid` / `num_frames` lay them out (`visual_layout`)."""
    from ..data import MemVPDataCollator

    kwargs: dict[str, Any] = {} if max_length is None else {"max_length": max_length}
    return MemVPDataCollator(
        tokenizer, processor, prompt_template=prompt_template, chat_template=chat_template,
        array_value_range=array_value_range, image_input_name=input_name, seq2seq=(kind == "seq2seq"),
        image_grid=image_grid, num_frames=num_frames, **kwargs,
    )


def collation_manifest(collator: Any, prompt_template: Optional[str], image_normalization: str) -> dict[str, Any]:
    """What the run manifest keeps of how the rows were built: the template given (None: the default one), whether
    the chat template rendered them, and the image normalisation."""
    return {"prompt_template": prompt_template, "chat_template": bool(collator.uses_chat_template),
            "image_normalization": image_normalization,
            "image_grid": list(collator.image_grid) if collator.image_grid else None, "num_frames": collator.num_frames}


def collator_from_manifest(tokenizer: Any, processor: Any, manifest: dict[str, Any], *, input_name: str, kind: str,
                           prompt_template: Optional[str] = None) -> Any:
    """The collator `memvp-infer` prompts with: the template and chat-template choice training recorded, or
    `prompt_template` (`--prompt_template`) when given, which then renders the questions without a chat template."""
    chat = manifest.get("chat_template")
    template = manifest.get("prompt_template")
    if prompt_template is not None:
        template, chat = prompt_template, False
    array_range = tuple(manifest["array_value_range"]) if manifest.get("array_value_range") else None
    try:
        return build_collator(tokenizer, processor, input_name=input_name, kind=kind, prompt_template=template,
                              chat_template=chat, array_value_range=array_range, image_grid=manifest.get("image_grid"),
                              num_frames=manifest.get("num_frames"))
    except ValueError as error:
        raise ValueError(f"the adapter's {RUN_MANIFEST} says its rows were built with prompt_template={template!r}, "
                         f"chat_template={chat!r}, which this base cannot rebuild: {error}") from error


# --------------------------------------------------------------------------------------------------- the feature cache


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
    from .run_folder import writable_folder_problem  # here: memvp-infer, which imports this module, trains nothing

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
    from .run_folder import writable_folder_problem

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
