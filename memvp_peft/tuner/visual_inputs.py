"""The visual inputs of one forward / `generate()` call, from what the caller passed to what each adapter's memory
reads.

A call brings `image_features` (computed elsewhere) or `pixel_values` (encoded here), and an optional `image_mask`.
For every active adapter they go one way, in `VisualInputs.for_adapter`, which the runtime (`runtime.py`) calls once
per adapter and whose result the memory (`memory.py`) reads as it is:

    pixel_values -> tiled for the adapter's image_grid (vision.tiling) -> checked -> encoded with the adapter's
    feature selection and vision adapters (vision.encoder) -> laid out (tiles, frames, compression) -> checked as the
    tokens the memory reads, (B, T, visual_dim) and a (B, T) mask

(`image_features` join at the layout); the memory's forward then casts the tokens to its projector's dtype with
`cast_checked` -- there, because ZeRO-3 gathers the projector only inside that forward. Everything a user can get
wrong about the visual inputs is caught on that way, before any state changes, with a `ValueError` that says what
was expected and what arrived.

**What a check may cost.** Shapes, dtypes and types are metadata: checking them is free. Checking *values* (NaN/inf
features, a 0/1 integer mask, placeholder tokens in the text) needs a reduction whose result the host reads -- on an
accelerator that is a host-device synchronisation, which on every training step stalls the GPU pipeline, and under
`torch.compile` a graph break. So value checks (`values_checkable`) run in eager mode on CPU tensors, where they cost
one cheap reduction and no sync (data pipelines and tests live there), and on accelerator tensors only when
`MEMVP_CHECK_VALUES=1` is set (a debugging switch: one sync per check). Under `torch.compile` they are skipped: the
traced graph stays whole.

**Long visual context.** MemVP's memory costs `4 * n * d` FLOPs per text token and layer: linear in the number of
slots n, and the sequence never grows. So long visual contexts -- a high-resolution image as tiles, a video as frames
-- are cheap, and shrinking n is the one lever left. Two compressions, both *before* the projector f, on each image's
own grid:

* **average pooling** (`pool_kernel=k`: k x k patches -> one slot, N -> N/k^2; or `pool_tokens=t`: adaptive pooling to
  a sqrt(t) x sqrt(t) grid), the usual token compression of LLaVA-style models;
* **multiscale slots** (`multiscale_tokens=[256, 64]`, ADEM-VL, arXiv 2410.17779): the grid at several scales,
  concatenated -- the 16x16 CLIP grid plus its 8x8 average pool (256 + 64 = 320 slots); an entry equal to the grid's
  own count keeps it as it is (the authors' `Avg2dSampler`).

Every image (tile, frame) is compressed on its own, so image boundaries and the slot blocks stay intact. The memory
then holds, per sample: images x blocks per image (`image_grid`: 1 + rows*cols) x compressed tokens per image
(`memory_tokens`).

**Rows of different lengths.** A VLM with dynamic resolution (Qwen2-VL, LLaVA-NeXT's anyres) gives every image its
own number of tokens, and a row its own number of images. That is the *variable form* of `image_features`, next to
the fixed `(B, N, D)` / `(B, I, N, D)` tensors:

* **rows of per-image tensors**: a list with one entry per row -- a list of `(tokens_i, visual_dim)` tensors (its
  images in order; `[]` or None for a row without image), or one such tensor for a row of one image
  (`group_images_by_row` makes it from a flat list of images and the count of each row's). Every image is laid out
  like the fixed form's (compressed on its own grid, counted against `image_grid` and `num_frames`);
* **`VisualTokens`**, the form the memory reads: a padded `(B, T, visual_dim)` tensor with each row's length, made
  from a padded tensor and a per-token mask (`VisualTokens.from_padded`, the mask may have holes: each row's tokens
  are moved to its front in order). It is read as it is (no compression: it has no image boundaries).

Both become one `VisualTokens`, which `memory.VisualMemory` turns into a memory whose row b holds its own tokens in
its first slots and empty slots after them (read as exactly nothing): a row reads the same alone as in any padded
batch. A row holding more tokens than `num_memory_slots` is refused naming the row, its images' tokens and the
option; `required_memory_slots` / `check_memory_slots` make the same check over a whole dataset's token counts
before training. `image_mask` does not go with the variable form: a row's entries say whether it has images.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..vision.encoder import feature_selection, pixel_features, unread_tower_message
from ..vision.tiling import blocks_per_image, tile_for_adapter

CHECK_VALUES_ENV = "MEMVP_CHECK_VALUES"

VISUAL_INPUT_NAMES = ("image_features", "image_mask", "pixel_values")

#: Inputs of a VLM's own image path that MemVP never reads: what Qwen2-VL-style processors give besides
#: `pixel_values` (the patch grid of each image or video, the video pixels).
VLM_IMAGE_PATH_INPUT_NAMES = ("image_grid_thw", "pixel_values_videos", "video_grid_thw")


def reject_vlm_image_path_inputs(kwargs: dict[str, Any], read_by_family: Sequence[str] = ()) -> None:
    """Refuse a call that brings inputs of a VLM's own image path: MemVP would hand them to the language model,
    which drops them (and with them the images they describe) -- a batch built by a VLM's own processor. Those in
    `read_by_family` are left to the base's VLM family (`vision.families`), which reads or refuses them."""
    given = [name for name in VLM_IMAGE_PATH_INPUT_NAMES
             if kwargs.get(name) is not None and name not in read_by_family]
    if given:
        raise ValueError(
            f"MemVP: {given} came with the call: inputs of a VLM's own image path (a Qwen2-VL-style processor lays "
            "pixel_values out as flattened patches, with a grid per image), which MemVP does not run, so the images "
            "would be dropped. MemVP reads pixel_values as whole images, (batch, channels, height, width), through a "
            "CLIP/SigLIP encoder or a Llava-layout VLM's tower: build the batch with memvp_peft.MemVPDataCollator / "
            "MemVPProcessor and that encoder's image processor, or pass image_features."
        )


def infer_batch_size(args: tuple, kwargs: dict[str, Any]) -> Optional[int]:
    """Batch size of a HF forward call, from `input_ids`/`inputs_embeds` (keyword or first positional)."""
    for name in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor):
        return args[0].shape[0]
    return None


# ------------------------------------------------------------------------------------------ from a call to the memory


class AdapterInputs(NamedTuple):
    """What one adapter's memory reads from a call, checked (its forward casts them to its projectors' dtype, with
    `cast_checked`): the visual tokens
    `(B, T, visual_dim)` and their `(B, T)` bool mask (None and None without visual input), and the encoder's CLS
    features `(B, visual_dim)` for an adapter with `cls_token` (None otherwise, or without `pixel_values`). In the
    variable form `lengths` `(B,)` holds each row's token count (`VisualTokens`) and `mask` is None."""

    features: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    cls_features: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor] = None


class VisualInputs:
    """One call's visual inputs on their way to each active adapter's memory (module docstring).

    `vision` is the attached `VisionEncoder` (None without one; `unread_vlm_class` names a VLM base whose tower
    MemVP cannot read). Adapters tiling alike and selecting the same features, without vision adapters of their own,
    share one encoding of the call's `pixel_values`.
    """

    def __init__(self, image_features: Any, image_mask: Any, pixel_values: Any, batch_size: Optional[int],
                 vision: Any, unread_vlm_class: Optional[str]) -> None:
        if pixel_values is not None and image_features is not None:
            raise ValueError("MemVP: pass either `pixel_values` or `image_features`, not both.")
        self.image_features = image_features
        self.image_mask = image_mask
        self.pixel_values = pixel_values
        self.batch_size = batch_size
        self.vision = vision
        self.unread_vlm_class = unread_vlm_class
        self._shared: dict[tuple, torch.Tensor] = {}  # one encoding per tiling and feature selection

    def for_adapter(self, name: str, active: list[str], config: Any, memory: nn.Module) -> AdapterInputs:
        """The visual input of adapter `name` (one of the call's `active` adapters) with `config`, for its `memory`
        (a `VisualMemory`: its vision adapters run in the encoder, its projectors' dtype is what the tokens are
        cast to)."""
        features, mask, cls = self.image_features, self.image_mask, None
        if getattr(config, "cls_token", False):
            features, cls = self._with_cls_token(name, active, config, memory)
        elif self.pixel_values is not None:
            pixels, mask = tile_for_adapter(self.pixel_values, self.image_mask, config, self.vision)
            if memory.vision_adapters is not None:
                features = self._encode(pixels, config, memory.vision_adapters)
            else:
                key = (tuple(config.image_grid or ()), *feature_selection(config).values())
                if key not in self._shared:
                    self._shared[key] = self._encode(pixels, config, None)
                features = self._shared[key]
        if is_variable_form(features):
            tokens = variable_tokens(features, mask, config, self.batch_size)
            return AdapterInputs(None, None, cls) if tokens is None else AdapterInputs(
                tokens.features, None, cls, tokens.lengths)
        features, mask = arrange_visual_tokens(features, mask, config)  # frames, tiles, compression
        features, mask = validate_visual_inputs(
            features, mask, self.batch_size, config.visual_dim, config.num_memory_slots
        )
        return AdapterInputs(features, mask, cls)

    def _with_cls_token(self, name: str, active: list[str], config: Any,
                        memory: nn.Module) -> tuple[Any, Optional[torch.Tensor]]:
        """The patch features of an adapter with `cls_token` and its CLS features from the same encoding
        (`input_tokens.py`); (None, None) without visual inputs (every row then gets the text-only prefix)."""
        if len(active) > 1:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which changes the input sequence, and {len(active)} "
                f"adapters are active ({active}); their calls cannot share one input layout. Activate one adapter."
            )
        if self.image_features is not None:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which reads the encoder's CLS token; `image_features` "
                "carry patch features only. Pass `pixel_values` (with the vision encoder attached)."
            )
        pixel_values = self.pixel_values
        if pixel_values is None:
            return None, None
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 5 and pixel_values.shape[1] != 1:
            raise ValueError(
                f"MemVP: adapter {name!r} has cls_token=True, which places one image's CLS token per row; "
                f"pixel_values hold {pixel_values.shape[1]} images per row."
            )
        features, cls = self._encode(pixel_values, config, memory.vision_adapters, with_cls=True)
        return features, cls

    def _encode(self, pixel_values: Any, config: Any, adapters: Optional[nn.ModuleList],
                with_cls: bool = False) -> Any:
        """`config`'s features of `pixel_values`, checked first (`vision.encoder.pixel_features`: the hidden state,
        CLS selection and layernorm it names, with `adapters` -- its vision adapters -- at its scale)."""
        if self.vision is None and self.unread_vlm_class is not None:
            raise ValueError(f"MemVP: `pixel_values` were given, but no vision encoder reads them: "
                             f"{unread_tower_message(self.unread_vlm_class)}")
        if self.vision is None:
            raise ValueError(
                "MemVP: `pixel_values` were given but no vision encoder is attached. Set "
                "`MemVPConfig(vision_encoder=<CLIP/SigLIP model or local path>)`, call "
                "`memvp_peft.attach_vision_encoder(peft_model, encoder)`, or pass `image_features`."
            )
        check_pixel_values(pixel_values, self.batch_size)
        return pixel_features(self.vision, pixel_values, config, adapters, with_cls=with_cls)


# ------------------------------------------------------------------------------------------------------- the checks


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether a value check of `tensor` may run here (see the module docstring: never a hidden host-device sync)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type in ("cpu", "meta") or os.environ.get(CHECK_VALUES_ENV, "") == "1"


def _all_finite(tensor: torch.Tensor) -> bool:
    """One cheap reduction first; the exact elementwise check only runs when the sum is not finite."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def cast_checked(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`tensor` cast to the projector's compute `dtype`, where values that were finite in their own dtype may not be
    (1e39 in float64 is inf in float32). The checks before the cast cannot see that, so this one runs on what the
    projector really reads -- only when the cast changed the dtype, and only where value checks may run
    (`values_checkable`)."""
    cast = tensor.to(dtype)
    if cast.dtype == tensor.dtype or not values_checkable(cast) or _all_finite(cast):
        return cast
    raise ValueError(
        f"MemVP: `{name}` ({str(tensor.dtype).replace('torch.', '')}) holds values that are not finite in the "
        f"projector's dtype {str(cast.dtype).replace('torch.', '')} (magnitudes above "
        f"{torch.finfo(cast.dtype).max:.3g} overflow to inf); rescale the features."
    )


def _check_mask(image_mask: Any, batch: int, images: int) -> Optional[torch.Tensor]:
    """`image_mask` as a (B, images) bool tensor; accepts (B,) (one flag per sample) and, for several images, (B, I)."""
    if image_mask is None:
        return None
    allowed = f"({batch},)" if images == 1 else f"({batch},) or ({batch}, {images})"
    if not isinstance(image_mask, torch.Tensor):
        raise ValueError(f"MemVP: `image_mask` must be a torch.Tensor of shape {allowed}, got {type(image_mask).__name__}.")
    shape = tuple(image_mask.shape)
    if shape not in {(batch,), (batch, images)}:
        raise ValueError(
            f"MemVP: `image_mask` must have shape {allowed} (one flag per sample{'' if images == 1 else ' or image'}), "
            f"got {shape}."
        )
    if image_mask.dtype != torch.bool:
        if image_mask.is_floating_point() or image_mask.is_complex():
            raise ValueError(f"MemVP: `image_mask` must be a bool (or 0/1 integer) tensor, got dtype {image_mask.dtype}.")
        if values_checkable(image_mask) and bool(((image_mask != 0) & (image_mask != 1)).any()):
            raise ValueError("MemVP: an integer `image_mask` may only contain 0 and 1.")
        image_mask = image_mask != 0
    if image_mask.dim() == 1:
        image_mask = image_mask[:, None].expand(batch, images)
    return image_mask


def check_pixel_values(pixel_values: Any, batch_size: Optional[int]) -> None:
    """Refuse anything but a floating point `(B, C, H, W)` or `(B, I, C, H, W)` tensor of the call's batch, with
    finite values."""
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"MemVP: `pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() not in (4, 5):
        raise ValueError(
            "MemVP: `pixel_values` must be (batch, channels, height, width) or (batch, images, channels, height, "
            f"width), got shape {tuple(pixel_values.shape)}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"MemVP: `pixel_values` must be a floating point tensor, got dtype {pixel_values.dtype}.")
    if batch_size is not None and pixel_values.shape[0] != batch_size:
        raise ValueError(f"MemVP: `pixel_values` batch ({pixel_values.shape[0]}) must equal the input batch ({batch_size}).")
    if values_checkable(pixel_values) and not _all_finite(pixel_values):
        raise ValueError("MemVP: `pixel_values` contains NaN or inf values.")


def validate_visual_inputs(
    image_features: Any,
    image_mask: Any,
    batch_size: Optional[int],
    visual_dim: int,
    num_memory_slots: int,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Check the visual inputs; return features as (B, T, visual_dim) and a (B, T) bool token mask (or None).

    Several images per sample come as (B, I, N, visual_dim): their tokens are concatenated in order (T = I*N), and a
    (B, I) mask switches single images off (a (B,) mask switches whole samples off).
    """
    if image_features is None:
        if image_mask is not None:
            raise ValueError(
                "MemVP: `image_mask` was given without `image_features`/`pixel_values`; pass the images together with "
                "the mask, or drop the mask for a text-only batch."
            )
        return None, None
    if not isinstance(image_features, torch.Tensor):
        raise ValueError(
            f"MemVP: `image_features` must be a torch.Tensor of shape (batch, tokens, {visual_dim}), "
            f"got {type(image_features).__name__}."
        )
    if image_features.dim() not in (3, 4):
        raise ValueError(
            f"MemVP: `image_features` must be 3-D (batch, tokens, {visual_dim}) or 4-D (batch, images, tokens, "
            f"{visual_dim}), got shape {tuple(image_features.shape)}."
        )
    if not image_features.is_floating_point():
        raise ValueError(f"MemVP: `image_features` must be a floating point tensor, got dtype {image_features.dtype}.")
    batch, width = image_features.shape[0], image_features.shape[-1]
    images = image_features.shape[1] if image_features.dim() == 4 else 1
    tokens = image_features.shape[-2]
    if width != visual_dim:
        raise ValueError(
            f"MemVP: `image_features` width must equal MemVPConfig.visual_dim={visual_dim}, got {width} "
            f"(shape {tuple(image_features.shape)})."
        )
    if batch_size is not None and batch != batch_size:
        raise ValueError(f"MemVP: `image_features` batch ({batch}) must equal the input batch ({batch_size}).")
    if images * tokens > num_memory_slots:
        raise ValueError(
            f"MemVP: got {images * tokens} visual tokens per sample ({images} image(s) x {tokens}) but "
            f"MemVPConfig.num_memory_slots={num_memory_slots}; num_memory_slots must be >= the number of visual tokens."
        )
    if tokens == 0:
        raise ValueError("MemVP: `image_features` has 0 visual tokens; pass at least one token or omit the features.")
    if values_checkable(image_features) and not _all_finite(image_features):
        raise ValueError("MemVP: `image_features` contains NaN or inf values.")
    mask = _check_mask(image_mask, batch, images)
    features = image_features.reshape(batch, images * tokens, width)
    if mask is not None:
        mask = mask.repeat_interleave(tokens, dim=1)
    return features, mask


# ------------------------------------------------------------------------------------- the layout in the memory


def square_side(count: int) -> Optional[int]:
    """The side g of a g x g grid of `count` tokens, or None when `count` is not a perfect square."""
    side = math.isqrt(count) if count > 0 else 0
    return side if side > 0 and side * side == count else None


def _grid_side(tokens: int, what: str) -> int:
    side = square_side(tokens)
    if side is None:
        raise ValueError(
            f"MemVP: {what} pools each image's square patch grid, but an image has {tokens} visual tokens, which is "
            "no g x g grid (a CLS token kept with vision_feature_select_strategy='full' adds one: use 'default')."
        )
    return side


def compressed_tokens(config: Any, tokens: int) -> int:
    """Slots one image of `tokens` patch features takes after the config's compression (checks the grid fits)."""
    kernel, target, scales = config.pool_kernel, config.pool_tokens, config.multiscale_tokens
    if kernel == 1 and target is None and not scales:
        return tokens
    side = _grid_side(tokens, _compression_name(config))
    if kernel > 1:
        if side % kernel:
            raise ValueError(
                f"MemVP: pool_kernel={kernel} needs a patch grid whose side is a multiple of {kernel}; an image's "
                f"{tokens} tokens form a {side}x{side} grid."
            )
        return (side // kernel) ** 2
    counts = [target] if target is not None else list(scales)
    too_big = [count for count in counts if square_side(count) > side]
    if too_big:
        raise ValueError(
            f"MemVP: {_compression_name(config)} pools each image's {side}x{side} grid ({tokens} tokens) to fewer "
            f"tokens, not more: {too_big} exceed {tokens}."
        )
    return sum(counts)


def memory_tokens(config: Any, tokens_per_image: int, images: int = 1) -> int:
    """Visual slots a sample fills: `images` x blocks per image (tiles) x compressed tokens per block.

    `num_memory_slots` must be at least this; `memvp-train` defaults to it + 25% (the authors' 256 -> 320)."""
    return images * blocks_per_image(config.image_grid) * compressed_tokens(config, tokens_per_image)


def _compression_name(config: Any) -> str:
    if config.pool_kernel > 1:
        return f"pool_kernel={config.pool_kernel}"
    if config.pool_tokens is not None:
        return f"pool_tokens={config.pool_tokens}"
    return f"multiscale_tokens={list(config.multiscale_tokens)}"


def compress_grid(features: torch.Tensor, config: Any) -> torch.Tensor:
    """`(..., N, D)` patch features -> `(..., N', D)` after the config's pooling / multiscale (row-major grids)."""
    kernel, target, scales = config.pool_kernel, config.pool_tokens, config.multiscale_tokens
    if kernel == 1 and target is None and not scales:
        return features
    *lead, tokens, width = features.shape
    side = _grid_side(tokens, _compression_name(config))
    compressed_tokens(config, tokens)  # the grid fits the compression
    grid = features.reshape(-1, side, side, width).permute(0, 3, 1, 2)  # (M, D, g, g)
    if kernel > 1:
        pooled = [F.avg_pool2d(grid, kernel_size=kernel, stride=kernel)]
    else:
        sides = [square_side(target)] if target is not None else [square_side(count) for count in scales]
        pooled = [grid if s == side else F.adaptive_avg_pool2d(grid, s) for s in sides]
    flat = torch.cat([p.flatten(2).transpose(1, 2) for p in pooled], dim=1)  # (M, N', D)
    return flat.reshape(*lead, flat.shape[1], width)


def arrange_visual_tokens(
    features: Any, image_mask: Any, config: Any
) -> tuple[Any, Any]:
    """A call's `image_features` laid out for the adapter: the image count checked against `image_grid` (whole
    images of 1 + rows*cols blocks) and `num_frames` (at most that many frames), then each image compressed.

    Runs before `validate_visual_inputs`: anything that is not a 3-D/4-D tensor is handed on untouched for it to
    refuse with its own message; the mask is per sample or per image, so compression leaves it as it is.
    """
    if not isinstance(features, torch.Tensor) or features.dim() not in (3, 4):
        return features, image_mask
    images = features.shape[1] if features.dim() == 4 else 1
    check_image_count(images, config, "per sample")
    compressed = compress_grid(features, config)
    needed = images * compressed.shape[-2]
    if compressed is not features and needed > config.num_memory_slots:
        raise ValueError(
            f"MemVP: {images} image(s) x {features.shape[-2]} tokens become {images} x {compressed.shape[-2]} = "
            f"{needed} slots after {_compression_name(config)}, but MemVPConfig.num_memory_slots="
            f"{config.num_memory_slots}; num_memory_slots must be >= the compressed visual tokens."
        )
    return compressed, image_mask


def check_image_count(images: int, config: Any, where: str) -> None:
    """Refuse `images` images (tiles, frames) in one row, `where` saying which, that the adapter's `image_grid` (whole
    images of 1 + rows*cols blocks) or `num_frames` (at most that many) cannot lay out."""
    blocks = blocks_per_image(config.image_grid)
    if blocks > 1 and images % blocks:
        rows, cols = config.image_grid
        raise ValueError(
            f"MemVP: image_grid={[rows, cols]} makes every image {blocks} blocks of slots (the overview, then "
            f"{rows * cols} tiles row by row); the visual input holds {images} image(s) {where}, not a multiple of "
            f"{blocks}. Pass high-resolution pixel_values (tiled here), or tiles from "
            f"MemVPDataCollator(image_grid={(rows, cols)})."
        )
    if config.num_frames is not None and images > config.num_frames:
        raise ValueError(
            f"MemVP: the adapter reads num_frames={config.num_frames} frames per sample but the visual input holds "
            f"{images} {where}; sample them first (MemVPDataCollator(num_frames={config.num_frames}) or "
            "memvp_peft.data.sample_frame_indices)."
        )



# ------------------------------------------------------------------------------------- rows of different lengths


class VisualTokens:
    """The visual tokens of a batch whose rows hold different numbers of them: what the memory reads in the variable
    form (module docstring).

    `features` `(B, T, visual_dim)`: row b's tokens in its first `lengths[b]` positions, in order (its images one
    after the other); what lies after them is padding, never read, whatever its value. `lengths` `(B,)` integer: the
    tokens of each row; 0 is a row without image, which reads the learned memory p_k/p_v as a text-only row does.
    `longest`: the largest length where it is known on the host (built from host data or CPU tensors), else None --
    what lets the runtime refuse a row longer than the memory without reading a device tensor.

    A plain object, neither tuple nor dict, so the `Trainer` hands it to the model untouched; `to` moves it
    (accelerate's data loaders call it) and the runtime moves it to the projector's device anyway.
    """

    __slots__ = ("features", "lengths", "longest")

    def __init__(self, features: torch.Tensor, lengths: torch.Tensor, longest: Optional[int] = None) -> None:
        self.features = features
        self.lengths = lengths
        self.longest = longest

    @classmethod
    def from_padded(cls, features: torch.Tensor, token_mask: torch.Tensor) -> "VisualTokens":
        """From a padded `(B, T, D)` tensor (or `(B, I, N, D)`: I images of at most N tokens) and its per-token mask
        `(B, T)` (`(B, I, N)`), True where a token is: each row's tokens move to its front, in order, so holes in
        the mask (each image padded on its own) are fine; a row with no True is a row without image."""
        if not isinstance(features, torch.Tensor) or features.dim() not in (3, 4):
            raise ValueError(
                "MemVP: VisualTokens.from_padded takes features of shape (batch, tokens, visual_dim) or (batch, "
                f"images, tokens, visual_dim), got {_describe(features)}."
            )
        if not isinstance(token_mask, torch.Tensor) or tuple(token_mask.shape) != tuple(features.shape[:-1]):
            raise ValueError(
                f"MemVP: VisualTokens.from_padded takes a token mask of shape {tuple(features.shape[:-1])} (one flag "
                f"per token of the features {tuple(features.shape)}), got {_describe(token_mask)}."
            )
        if token_mask.is_floating_point() or token_mask.is_complex():
            raise ValueError(f"MemVP: the token mask must be bool (or 0/1 integer), got dtype {token_mask.dtype}.")
        batch, width = features.shape[0], features.shape[-1]
        present = token_mask.reshape(batch, -1) != 0
        flat = features.reshape(batch, -1, width)
        order = torch.argsort((~present).to(torch.int8), dim=1, stable=True)  # the row's tokens first, in order
        flat = flat.gather(1, order[..., None].expand(-1, -1, width))
        lengths = present.sum(dim=1)
        longest = None
        if values_checkable(lengths):
            longest = int(lengths.max()) if batch else 0
            flat = flat[:, :longest]
        return cls(flat, lengths, longest)

    def to(self, *args: Any, **kwargs: Any) -> "VisualTokens":
        """Both tensors moved as `Tensor.to` moves them; the lengths keep their integer dtype."""
        features = self.features.to(*args, **kwargs)
        return VisualTokens(features, self.lengths.to(device=features.device), self.longest)

    def token_mask(self) -> torch.Tensor:
        """`(B, T)` bool: True at each row's own tokens."""
        positions = torch.arange(self.features.shape[1], device=self.lengths.device)
        return positions < self.lengths[:, None]

    def __repr__(self) -> str:
        return f"VisualTokens(features={tuple(self.features.shape)}, longest={self.longest})"


#: One row of the variable form: its images' `(tokens, visual_dim)` tensors, one such tensor, or None (no image).
Row = Union[None, torch.Tensor, Sequence[torch.Tensor]]


def is_variable_form(image_features: Any) -> bool:
    """Whether a call's `image_features` come in the variable form: rows of per-image tensors or `VisualTokens`."""
    return isinstance(image_features, (list, tuple, VisualTokens))


def group_images_by_row(images: Sequence[torch.Tensor], images_per_row: Sequence[int]) -> list[list[torch.Tensor]]:
    """A flat sequence of per-image `(tokens, visual_dim)` tensors (every row's images, row after row, as a VLM's
    tower returns them) -> the rows of the variable form, row b taking the next `images_per_row[b]`."""
    counts = [int(count) for count in images_per_row]
    if any(count < 0 for count in counts) or sum(counts) != len(images):
        raise ValueError(
            f"MemVP: images_per_row={counts} must be non-negative counts adding up to the {len(images)} images given "
            f"(they add up to {sum(counts)})."
        )
    starts = [sum(counts[:row]) for row in range(len(counts))]
    return [list(images[start:start + count]) for start, count in zip(starts, counts)]


def variable_tokens(image_features: Any, image_mask: Any, config: Any,
                    batch_size: Optional[int]) -> Optional[VisualTokens]:
    """A call's variable-form `image_features` as the `VisualTokens` an adapter with `config` reads, checked, each
    row's padding zeroed; None when no row has a token. The memory's forward moves them to its projector's device and
    dtype (`cast_checked`), where ZeRO-3 has the projector gathered."""
    if image_mask is not None:
        raise ValueError(
            "MemVP: `image_mask` came with `image_features` in the variable form (rows of per-image tensors, or "
            "VisualTokens), whose rows say themselves which have images (an empty row has none): drop the mask."
        )
    if isinstance(image_features, VisualTokens):
        return _checked_visual_tokens(image_features, config, batch_size)
    return _laid_out_rows(image_features, config, batch_size)


def _laid_out_rows(rows: Sequence[Row], config: Any, batch_size: Optional[int]) -> Optional[VisualTokens]:
    """Rows of per-image tensors -> `VisualTokens`: every image checked and compressed on its own grid (as the fixed
    form's are), each row's images counted against `image_grid` / `num_frames`, then concatenated in order (in the
    widest of their dtypes, on the first image's device: nothing overflows before the memory's checked cast)."""
    rows = [_row_images(row, index, config.visual_dim) for index, row in enumerate(rows)]
    if batch_size is not None and len(rows) != batch_size:
        raise ValueError(
            f"MemVP: `image_features` as rows of per-image tensors has {len(rows)} rows but the input batch has "
            f"{batch_size}: give one entry per row ([] for a row without image)."
        )
    laid_out = []
    for index, images in enumerate(rows):
        check_image_count(len(images), config, f"in row {index}")
        laid_out.append([compress_grid(image, config) for image in images])
    lengths = [sum(image.shape[0] for image in images) for images in laid_out]
    _refuse_long_row(lengths, [[image.shape[0] for image in images] for images in laid_out], config, "of the call")
    longest = max(lengths, default=0)
    if longest == 0:
        return None
    every_image = [image for images in laid_out for image in images]
    device = every_image[0].device
    dtype = functools.reduce(torch.promote_types, (image.dtype for image in every_image))
    joined = [torch.cat([image.to(device=device, dtype=dtype) for image in images]) if images
              else torch.zeros(0, config.visual_dim, device=device, dtype=dtype) for images in laid_out]
    return VisualTokens(pad_sequence(joined, batch_first=True),
                        torch.tensor(lengths, dtype=torch.long, device=device), longest)


def _row_images(row: Row, index: int, visual_dim: int) -> list[torch.Tensor]:
    """Row `index`'s images as a list of checked `(tokens, visual_dim)` tensors ([] for a row without image)."""
    if row is None:
        return []
    images = [row] if isinstance(row, torch.Tensor) else row
    if not isinstance(images, (list, tuple)):
        raise ValueError(
            f"MemVP: row {index} of `image_features` must be a list of torch.Tensor of shape (tokens, {visual_dim}) "
            f"(one per image, [] for a row without image) or one such tensor, got {type(row).__name__}."
        )
    for position, image in enumerate(images):
        what = f"image {position} of row {index} of `image_features`"
        if not isinstance(image, torch.Tensor) or image.dim() != 2:
            raise ValueError(f"MemVP: {what} must be a torch.Tensor of shape (tokens, {visual_dim}), got "
                             f"{_describe(image)}.")
        if not image.is_floating_point():
            raise ValueError(f"MemVP: {what} must be a floating point tensor, got dtype {image.dtype}.")
        if image.shape[1] != visual_dim:
            raise ValueError(
                f"MemVP: {what} has width {image.shape[1]}, but MemVPConfig.visual_dim={visual_dim} "
                f"(shape {tuple(image.shape)})."
            )
        if image.shape[0] == 0:
            raise ValueError(f"MemVP: {what} has 0 visual tokens; leave a row without image empty ([]) instead.")
        if values_checkable(image) and not _all_finite(image):
            raise ValueError(f"MemVP: {what} contains NaN or inf values.")
    return list(images)


def _checked_visual_tokens(tokens: VisualTokens, config: Any, batch_size: Optional[int]) -> Optional[VisualTokens]:
    """`VisualTokens` a caller built, checked as the memory reads them (they are not laid out again: compression,
    tiles and frames need each image's boundaries, which they no longer have)."""
    layout = _layout_needing_images(config)
    if layout is not None:
        raise ValueError(
            f"MemVP: `image_features` came as VisualTokens, which the memory reads as they are, but the adapter lays "
            f"each image out ({layout}), which needs each image's own tokens: pass `image_features` as rows of "
            "per-image tensors instead."
        )
    features, lengths, visual_dim = tokens.features, tokens.lengths, config.visual_dim
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or not features.is_floating_point():
        raise ValueError(
            f"MemVP: VisualTokens.features must be a floating point (batch, tokens, {visual_dim}) tensor, got "
            f"{_describe(features)}."
        )
    batch, slots, width = features.shape
    if width != visual_dim:
        raise ValueError(f"MemVP: VisualTokens.features width must equal MemVPConfig.visual_dim={visual_dim}, got "
                         f"{width} (shape {tuple(features.shape)}).")
    if batch_size is not None and batch != batch_size:
        raise ValueError(f"MemVP: VisualTokens batch ({batch}) must equal the input batch ({batch_size}).")
    if (not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch,) or lengths.is_floating_point()
            or lengths.is_complex() or lengths.dtype == torch.bool):
        raise ValueError(f"MemVP: VisualTokens.lengths must be an integer tensor of shape ({batch},), one token count "
                         f"per row, got {_describe(lengths)}.")
    longest = tokens.longest
    if values_checkable(lengths):
        if bool(((lengths < 0) | (lengths > slots)).any()):
            raise ValueError(f"MemVP: VisualTokens.lengths must lie in [0, {slots}] (the features' tokens per row), "
                             f"got {lengths.tolist()}.")
        longest = int(lengths.max()) if batch else 0
        _refuse_long_row(lengths.tolist(), None, config, "of the call")
    elif longest is not None:
        _refuse_long_row([longest], None, config, "of the call")
    elif slots > config.num_memory_slots:
        raise ValueError(
            f"MemVP: VisualTokens hold up to {slots} tokens per row but MemVPConfig.num_memory_slots="
            f"{config.num_memory_slots}, and their lengths live on {lengths.device}, where checking them would stall "
            "the device: build them on the CPU (VisualTokens.from_padded in the collator), at most "
            "num_memory_slots wide, or set MEMVP_CHECK_VALUES=1."
        )
    if longest == 0:
        return None
    features = features[:, : min(slots, longest if longest is not None else slots)]
    lengths = lengths.to(device=features.device, dtype=torch.long)
    mask = (torch.arange(features.shape[1], device=features.device) < lengths[:, None])[..., None]
    features = torch.where(mask, features, 0.0)  # the padding is never read, whatever it holds
    if values_checkable(features) and not _all_finite(features):
        raise ValueError("MemVP: VisualTokens.features contain NaN or inf values within the rows' lengths.")
    return VisualTokens(features, lengths, longest)


def _layout_needing_images(config: Any) -> Optional[str]:
    """The first of the adapter's layout options that needs each image's own tokens, as `name=value`, or None."""
    if config.image_grid:
        return f"image_grid={list(config.image_grid)}"
    if config.num_frames is not None:
        return f"num_frames={config.num_frames}"
    if config.pool_kernel > 1 or config.pool_tokens is not None or config.multiscale_tokens:
        return _compression_name(config)
    return None


def _refuse_long_row(lengths: Sequence[int], per_image: Optional[Sequence[Sequence[int]]], config: Any,
                     where: str) -> None:
    """Refuse the longest of the rows' `lengths` when it holds more tokens than the memory has slots."""
    if lengths and max(lengths) > config.num_memory_slots:
        row = max(range(len(lengths)), key=lambda index: lengths[index])
        raise ValueError(_long_row_message(row, lengths[row], None if per_image is None else per_image[row], config,
                                           where))


def _long_row_message(row: int, needed: int, per_image: Optional[Sequence[int]], config: Any, where: str) -> str:
    """What a row too long for the memory is told: the row, the slots it needs (its images' tokens where known) and
    the option to set."""
    detail = "" if per_image is None else (
        f" ({len(per_image)} image(s): {' + '.join(str(count) for count in per_image)} tokens)")
    return (
        f"MemVP: row {row} {where} needs {needed} memory slots{detail}, but MemVPConfig.num_memory_slots="
        f"{config.num_memory_slots}: each of a row's visual tokens takes one slot. Set num_memory_slots >= {needed} "
        "(memvp_peft.tuner.visual_inputs.required_memory_slots finds what a whole dataset needs)."
    )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ------------------------------------------------------------------------------------- what a dataset needs


#: One row of a dataset's token counts: its images' visual token counts, or one count for a row of one image.
RowTokens = Union[int, Sequence[int]]


def required_memory_slots(rows: Iterable[RowTokens], config: Any = None) -> int:
    """The memory slots the longest row of a dataset needs: `rows` holds, per row, the visual tokens of each of its
    images as the encoder gives them (an int for a row of one image, [] for a row without image), one pass over the
    dataset's image sizes; with a `MemVPConfig`, each image's tokens as its compression leaves them
    (`pool_kernel`, `pool_tokens`, `multiscale_tokens`)."""
    return _longest_row(rows, config)[0]


def check_memory_slots(rows: Iterable[RowTokens], config: Any) -> int:
    """`required_memory_slots(rows, config)`, refused before training with a `ValueError` naming
    `num_memory_slots`, the size needed and the row that needs it when the config's memory is smaller."""
    needed, row, per_image = _longest_row(rows, config)
    if needed > config.num_memory_slots:
        raise ValueError(_long_row_message(row, needed, per_image, config, "of the dataset"))
    return needed


def _longest_row(rows: Iterable[RowTokens], config: Any) -> tuple[int, int, list[int]]:
    """(slots, index, its images' slots) of the row needing the most slots: the first of equals, (0, 0, []) for
    none."""
    best = (0, 0, [])
    for index, row in enumerate(rows):
        counts = [row] if isinstance(row, numbers.Integral) else list(row)
        if any(isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1 for count in counts):
            raise ValueError(
                f"MemVP: row {index} of the token counts must be a positive int (one image) or a list of them (one per "
                f"image, [] for a row without image), got {row!r}."
            )
        if config is not None:
            check_image_count(len(counts), config, f"in row {index}")
            counts = [compressed_tokens(config, int(count)) for count in counts]
        counts = [int(count) for count in counts]
        if sum(counts) > best[0]:
            best = (sum(counts), index, counts)
    return best
