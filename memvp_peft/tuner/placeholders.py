"""A batch from a VLM's own processor, read by MemVP: the images out of the sequence, into the memory.

The processor of a supported VLM family (`vision.families`) writes each image into the text as placeholder tokens
and hands its pixels beside it in the family's layout. MemVP's language model must see the text alone -- the very
token sequence `MemVPProcessor` builds for that text -- and its memory the images. At the entry of a call (and once
at the entry of `generate()`, for the prompt) `images_out_of_the_sequence`:

* assigns the call's images to their rows by the rows' placeholders (`VLMFamily.images_of_rows`: every row's
  placeholders must be exactly its images' tokens, and no image may be left over) and turns them into MemVP's visual
  inputs, one entry per row (`VLMFamily.memvp_visual_inputs`: padded, with an `image_mask`; a row without an image
  reads only p_k/p_v);
* removes the placeholder positions (and the family's begin/end-of-image tokens) from `input_ids` and from every
  per-token input beside it -- `attention_mask`, `labels`, `token_type_ids`, `mm_token_type_ids` -- and re-pads each
  row to the batch's new longest, on the side the batch was padded (read from `attention_mask`: left for a
  generation prompt, right for training). Rows lose different numbers of tokens, so a batch without padding may come
  out padded (an `attention_mask` is then added);
* drops `position_ids`, `cache_position` (and M-RoPE's `rope_deltas`): they count the placeholders. The model
  computes them again for the text-only sequence, as it does for a text-only prompt (for M-RoPE models, too: from
  `input_ids` alone).

`generate()` strips the prompt once; its decode steps are text. The ids it returns start with the prompt *as the
language model saw it*: without placeholders (decode `out[:, prompt.shape[1]:]` of the stripped prompt, or skip
special tokens).

What cannot be matched is refused, never guessed: placeholders without the VLM's `pixel_values` (or with
`image_features` / an `image_mask`, which say nothing of rows), a row whose placeholders are not whole images,
images without placeholders, a padding side that cannot be read, a batch whose rows would be left without text; and,
under `torch.compile`, a family base's `pixel_values` without an `image_mask` (the new length depends on values no
compiled graph can follow: `entry.py` refuses them by their metadata).

Why the count is exact: removing positions keeps every other token in order; a right-padded row then holds its text
at the same positions a placeholder-free batch would (same logits); a left-padded row ends at the same position.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..vision.families import VLMFamily

#: Per-token inputs that follow `input_ids` (padding value for the positions the re-padding adds).
PER_TOKEN_INPUTS = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}
#: Inputs that count the placeholders' positions: dropped, so the model computes them for the text alone (M-RoPE
#: models' `rope_deltas` included).
POSITION_INPUTS = ("position_ids", "cache_position", "rope_deltas")


def input_ids_of(args: tuple, kwargs: dict[str, Any]) -> Optional[torch.Tensor]:
    """The call's `input_ids` (keyword or first positional), or None."""
    value = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    return value if isinstance(value, torch.Tensor) else None


def has_placeholders(family: VLMFamily, input_ids: torch.Tensor) -> bool:
    """Whether `input_ids` hold the family's image placeholder token (a value read: one host-device sync)."""
    return bool((input_ids == family.image_token_id).any())


def images_out_of_the_sequence(
    family: VLMFamily, pixel_values: torch.Tensor, args: tuple, kwargs: dict[str, Any], pad_token_id: Optional[int],
    default_side: str, configs: list[Any],
) -> tuple[tuple, dict[str, Any], dict[str, torch.Tensor]]:
    """The call of a VLM processor's batch as MemVP reads it (module docstring): `(args, kwargs, visual)` with the
    placeholders out of `input_ids` and its per-token inputs, and `visual` the keywords of `MemoryRuntime.build`.

    `pad_token_id` fills the positions the re-padding adds (the batch's own pad where it has one); `default_side` is
    the padding side of a batch that had none ("left" for a generation prompt). `configs` are the active adapters'
    configs (an adapter that tiles images itself cannot read a family's pre-tiled images)."""
    input_ids = input_ids_of(args, kwargs)
    tiled = [config for config in configs if getattr(config, "image_grid", None)]
    if family.tiles_images and tiled:
        raise ValueError(
            f"MemVP: the {family.name} processor tiles each image itself, but an active adapter has "
            f"image_grid={list(tiled[0].image_grid)} (MemVP's own tiling): its tiles would be tiled again. Use "
            "image_grid=None with this VLM's processor."
        )
    images = family.take_image_inputs(pixel_values, kwargs)
    family.check_unread_tokens(input_ids)
    mask = kwargs.get("attention_mask")
    real = _real_positions(input_ids, mask)
    rows = family.images_of_rows(input_ids, real, images)
    visual = family.memvp_visual_inputs(images, rows)
    keep = real & ~torch.isin(input_ids, torch.tensor(family.sequence_token_ids, device=input_ids.device))
    side = padding_side(mask, default_side)
    pad = _pad_value(input_ids, mask, pad_token_id)
    lengths = keep.sum(dim=1)
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest == 0:
        raise ValueError("MemVP: without its image placeholder tokens no row of `input_ids` holds any text.")
    index = _target_positions(keep, lengths, longest, side)
    stripped = _moved(input_ids, keep, index, longest, pad)
    if args and isinstance(args[0], torch.Tensor):
        args = (stripped, *args[1:])
    else:
        kwargs["input_ids"] = stripped
    for name, fill in PER_TOKEN_INPUTS.items():
        value = kwargs.get(name)
        if name == "attention_mask":
            kwargs[name] = _moved(torch.ones_like(input_ids) if value is None else value, keep, index, longest, fill)
        elif isinstance(value, torch.Tensor):
            if value.shape != input_ids.shape:
                raise ValueError(
                    f"MemVP: `{name}` has shape {tuple(value.shape)} but `input_ids` {tuple(input_ids.shape)}: a "
                    "per-token input must follow the tokens for the image placeholders to be taken out of it."
                )
            kwargs[name] = _moved(value, keep, index, longest, fill)
    for name in POSITION_INPUTS:
        kwargs.pop(name, None)
    return args, kwargs, visual


def padding_side(attention_mask: Optional[torch.Tensor], default: str) -> str:
    """"left" or "right", as `attention_mask` pads the batch; `default` for a batch without padding. A batch padded
    on both sides cannot be re-padded the way it was: refused."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] == 0:
        return default
    left = bool((attention_mask[:, 0] == 0).any())
    right = bool((attention_mask[:, -1] == 0).any())
    if left and right:
        raise ValueError(
            "MemVP: `attention_mask` pads some rows on the left and others on the right; taking the image placeholders "
            "out re-pads every row, on the side the batch is padded. Pad the whole batch on one side."
        )
    return "left" if left else "right" if right else default


def _real_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"MemVP: `attention_mask` has shape {tuple(attention_mask.shape)} but `input_ids` "
            f"{tuple(input_ids.shape)}; the image placeholders are taken out of both."
        )
    return attention_mask.bool()


def _pad_value(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], pad_token_id: Optional[int]) -> int:
    """The id at the batch's own padded positions, else the model's pad token, else 0 (under a 0 of the mask, no
    position reads it)."""
    if attention_mask is not None:
        padded = input_ids[attention_mask == 0]
        if padded.numel():
            return int(padded[0])
    return 0 if pad_token_id is None else int(pad_token_id)


def _target_positions(keep: torch.Tensor, lengths: torch.Tensor, longest: int, side: str) -> torch.Tensor:
    """Where each kept token goes: its rank among its row's kept tokens, shifted right on a left-padded batch."""
    index = keep.long().cumsum(dim=1) - 1
    if side == "left":
        index = index + (longest - lengths)[:, None]
    return index


def _moved(value: torch.Tensor, keep: torch.Tensor, index: torch.Tensor, longest: int, fill: int) -> torch.Tensor:
    out = value.new_full((value.shape[0], longest), fill)
    rows = torch.arange(value.shape[0], device=value.device)[:, None].expand_as(keep)
    out[rows[keep], index[keep]] = value[keep]
    return out
