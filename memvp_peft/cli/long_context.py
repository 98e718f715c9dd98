"""`memvp-train`'s long-context options: tiles (`--image_grid`), frames (`--num_frames`), memory compression
(`--pool_kernel`, `--pool_tokens`, `--multiscale_tokens`), ADEM-VL's read (`--memory_read adem`, `--drop_ratio`) and
its whole model (`--preset adem-vl`), and the built-in digit-layout tasks that need them (`digits-grid`,
`digits-grid-3x3`, `digits-sequence`).

One place decides how a run lays out its visual input, so the collator (which tiles / samples the images), the
`MemVPConfig` (which records the layout and sizes the memory) and `memvp_cli.json` (which `memvp-infer` rebuilds the
collator from) never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from ..data.digit_layouts import layout_of, layout_prompts
from ..vision.tiling import check_grid

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
