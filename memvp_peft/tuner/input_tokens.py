"""ADEM-VL's CLS input token: the one part of ADEM-VL that is not in the FFN memory but in the input sequence.

ADEM-VL (Hao et al. 2024, arXiv 2410.17779; the authors' `Transformer.insert_image_embeds` and `generate`) projects
the CLIP encoder's CLS feature with a projector of its own (`adapter_proj_cls`, the same Linear -> SiLU -> Linear
shape as the memory's) and places it into the text as one input embedding: every row becomes

    image row:      [BOS] [tokens of "Image: "] [CLS] [the rest of the row]
    text-only row:  [BOS] [tokens of "Image: N/A"]     [the rest of the row]

with no loss on the inserted positions. `MemVPConfig(cls_token=True, cls_token_prefix_ids=...,
cls_token_text_only_prefix_ids=...)` does the same: the prefixes are the base tokenizer's ids of those texts
(`adem_vl_prefix_ids`; the model has no tokenizer, so they are saved in the adapter config), the CLS feature comes
from the encoder's own forward (the token `vision_feature_select_strategy='default'` drops from the memory, after the
same post-layernorm), and its projector (`VisualMemory.cls_projector`) trains and saves with the adapter.

Where: at the entry of a call, once, when the call's memory is built (`entry.py`): `input_ids` become
`inputs_embeds`, and `attention_mask`, `labels` (-100 on the inserted positions) and `position_ids` (counted from
the mask, so every row's tokens keep the positions they have without padding) follow. A `generate()` call grows its
prompt the same way, hands HF's loop the grown prompt (its ids and embeddings), and returns the caller's own
`input_ids` followed by the generated tokens, as without the token; its decode steps (and every step of the KV
cache) read the grown sequence and insert nothing. The outputs of a forward (logits, hidden states, cache) are of the
grown sequence.

Why the sequence grows instead of being cut back: the authors' rows are padded to a fixed 512 tokens and cut back to
that length after the insertion, which drops tokens only from a row within a few tokens of the limit. Rows padded to
the longest row of each batch (the collators here) would lose the end of their longest row -- its answer -- at every
step if cut back to the batch's length, so nothing is cut: a row of n tokens is read as n + (inserted) tokens, as the
authors read every row shorter than their limit. Rows get different numbers of inserted tokens (ADEM-VL on LLaMA:
4 with an image, 5 without), so the shorter rows get padding on the left (masked, and skipped by the positions).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from .visual_inputs import values_checkable

#: the texts ADEM-VL puts before the CLS token (rows with an image) and instead of it (rows without)
ADEM_VL_IMAGE_PREFIX = "Image: "
ADEM_VL_TEXT_ONLY_PREFIX = "Image: N/A"
IGNORE_INDEX = -100


def adem_vl_prefix_ids(tokenizer: Any) -> dict[str, list[int]]:
    """The `MemVPConfig` fields of ADEM-VL's prefixes in `tokenizer`'s ids: each text encoded on its own, without
    special tokens (the authors' `tokenizer.encode(text, bos=False, eos=False)`)."""
    def ids(text: str) -> list[int]:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        return [int(i) for i in encoded]

    return {"cls_token_prefix_ids": ids(ADEM_VL_IMAGE_PREFIX),
            "cls_token_text_only_prefix_ids": ids(ADEM_VL_TEXT_ONLY_PREFIX)}


def check_cls_token_base(model: nn.Module, config: Any) -> None:
    """Refused before injection: a base the CLS token cannot be placed in (no BOS token, an encoder-decoder)."""
    if not config.cls_token:
        return
    model_config = getattr(model, "config", None)
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(
            f"MemVP: cls_token=True places the CLS token into a decoder-only model's input; {type(model).__name__} is "
            "an encoder-decoder model. Set cls_token=False."
        )
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if getattr(text_config, "bos_token_id", None) is None:
        raise ValueError(
            f"MemVP: cls_token=True places the CLS token after each row's BOS token, but {type(model).__name__}'s "
            "config has no bos_token_id. Set cls_token=False, or a base whose tokenizer starts every text with BOS."
        )
    if model.get_input_embeddings() is None:
        raise ValueError(f"MemVP: cls_token=True needs the input embeddings of {type(model).__name__}; it has none.")


class ClsInput(NamedTuple):
    """What one call inserts: the prefixes, the projected CLS features and which rows have an image.

    `embeddings` is None when no row has an image (a text-only call); `image_rows` is None when every row has one.
    """

    prefix_ids: tuple[int, ...]
    text_only_prefix_ids: tuple[int, ...]
    embeddings: Optional[torch.Tensor]  # (B, 1, d), the CLS projector's output
    image_rows: Optional[torch.Tensor]  # (B,) bool
    #: without images, 0 times the CLS projector's output, added to the embeddings: the projector runs in every call,
    #: so data-parallel ranks with and without images use the same parameters (as `VisualMemory.forward` does)
    unused: Optional[torch.Tensor] = None

    @property
    def width(self) -> int:
        """Positions every row grows by: the larger insertion of the kinds of rows the call has (known on the host:
        which kinds there are follows from the inputs given, not from their values)."""
        with_image, without = len(self.prefix_ids) + 1, len(self.text_only_prefix_ids)
        if self.embeddings is None:
            return without
        return with_image if self.image_rows is None else max(with_image, without)


def cls_input_for(config: Any, embeddings: Optional[torch.Tensor], image_rows: Optional[torch.Tensor],
                  unused: Optional[torch.Tensor] = None) -> ClsInput:
    return ClsInput(tuple(config.cls_token_prefix_ids), tuple(config.cls_token_text_only_prefix_ids), embeddings,
                    image_rows, unused)


class GrownInputs(NamedTuple):
    input_ids: torch.Tensor  # (B, L): the inserted prefix ids; the CLS and the added padding hold the row's first id
    inputs_embeds: torch.Tensor  # (B, L, d)
    attention_mask: torch.Tensor  # (B, L)
    position_ids: torch.Tensor  # (B, L)
    labels: Optional[torch.Tensor]  # (B, L), IGNORE_INDEX on the inserted and added positions and at BOS


def grow_inputs(cls_input: ClsInput, embedding: nn.Module, input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                bos_token_ids: tuple[int, ...]) -> GrownInputs:
    """Every row with its insertion after its first attended token (BOS), the shorter insertions padded on the left.

    Built with gathers over index tensors, on the device: no value is read on the host (the BOS check runs where
    value checks may, `visual_inputs.values_checkable`)."""
    batch, length = input_ids.shape
    device = input_ids.device
    width = cls_input.width
    with_image, without = len(cls_input.prefix_ids) + 1, len(cls_input.text_only_prefix_ids)
    if cls_input.embeddings is None:
        has_image = torch.zeros(batch, dtype=torch.bool, device=device)
    elif cls_input.image_rows is None:
        has_image = torch.ones(batch, dtype=torch.bool, device=device)
    else:
        has_image = cls_input.image_rows.to(device)
    inserted = torch.where(has_image, with_image, without)  # (B,)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    first = mask.ne(0).to(torch.int32).argmax(dim=1)  # the first attended token: BOS
    _check_bos(input_ids, first, bos_token_ids)
    # column j of the grown row holds: padding (j' < 0), the row up to BOS, the insertion, then the rest of the row
    column = torch.arange(length + width, device=device)[None, :] - (width - inserted)[:, None]  # j'
    padding = column < 0
    in_insertion = (column > first[:, None]) & (column <= (first + inserted)[:, None])
    source = torch.where(column <= first[:, None], column, column - inserted[:, None]).clamp(0, length - 1)
    slot = (column - first[:, None] - 1).clamp(0, max(width - 1, 0))

    tokens = embedding(input_ids)
    hidden = tokens.shape[-1]
    inserted_embeds = _inserted_embeddings(cls_input, embedding, has_image, batch, width, tokens)
    from_text = tokens.gather(1, source[..., None].expand(-1, -1, hidden))
    from_insertion = inserted_embeds.gather(1, slot[..., None].expand(-1, -1, hidden)) if width else from_text
    embeds = torch.where(in_insertion[..., None], from_insertion, from_text)
    embeds = embeds.masked_fill(padding[..., None], 0.0)
    if cls_input.unused is not None:
        embeds = embeds + cls_input.unused.to(embeds.dtype)

    grown_mask = torch.where(in_insertion, torch.ones_like(source), mask.gather(1, source).to(source.dtype))
    grown_mask = grown_mask.masked_fill(padding, 0).to(mask.dtype)
    position_ids = (grown_mask.long().cumsum(dim=1) - 1).clamp(min=0)

    first_ids = input_ids.gather(1, first[:, None])  # the CLS and the added padding hold BOS: no token of their own
    inserted_ids = _inserted_ids(cls_input, has_image, first_ids, width)
    ids = torch.where(in_insertion, inserted_ids.gather(1, slot) if width else input_ids.gather(1, source),
                      input_ids.gather(1, source))
    ids = torch.where(padding, first_ids.expand_as(ids), ids)
    grown_labels = None
    if labels is not None:
        # BOS's label too: no token of its row precedes it (a position before it is padding, whose logits HF's
        # shifted loss would otherwise score against it)
        grown_labels = labels.gather(1, source).masked_fill(padding | in_insertion | (column == first[:, None]),
                                                            IGNORE_INDEX)
    return GrownInputs(ids, embeds, grown_mask, position_ids, grown_labels)


def _check_bos(input_ids: torch.Tensor, first: torch.Tensor, bos_token_ids: tuple[int, ...]) -> None:
    if not bos_token_ids or not values_checkable(input_ids):
        return
    starts = input_ids.gather(1, first[:, None])[:, 0]
    wrong = ~torch.isin(starts, torch.tensor(bos_token_ids, device=starts.device))
    if bool(wrong.any()):
        row = int(wrong.nonzero()[0, 0])
        raise ValueError(
            f"MemVP: cls_token=True places the CLS token after each row's BOS token (id {list(bos_token_ids)}), but "
            f"row {row} starts with token {int(starts[row])}. Tokenize with the BOS token (add_special_tokens=True; "
            "MemVPDataCollator does)."
        )


def _inserted_embeddings(cls_input: ClsInput, embedding: nn.Module, has_image: torch.Tensor, batch: int, width: int,
                         tokens: torch.Tensor) -> torch.Tensor:
    """(B, width, d): each row's insertion, zero-padded at its end to `width` (only the kinds of rows the call has)."""
    device, hidden, dtype = tokens.device, tokens.shape[-1], tokens.dtype

    def embedded(ids: tuple[int, ...]) -> torch.Tensor:
        part = embedding(torch.tensor(ids, dtype=torch.long, device=device)).to(dtype)
        return part[None].expand(batch, len(ids), hidden)

    def padded(part: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(part, (0, 0, 0, width - part.shape[1]))

    if cls_input.embeddings is None:
        return padded(embedded(cls_input.text_only_prefix_ids))
    cls = cls_input.embeddings.to(device=device, dtype=dtype)
    with_image = padded(torch.cat([embedded(cls_input.prefix_ids), cls], dim=1))
    if cls_input.image_rows is None:
        return with_image
    return torch.where(has_image[:, None, None], with_image, padded(embedded(cls_input.text_only_prefix_ids)))


def _inserted_ids(cls_input: ClsInput, has_image: torch.Tensor, first_ids: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width): the ids of each row's insertion (the CLS position holds the row's BOS id)."""
    batch, device = has_image.shape[0], has_image.device

    def padded(ids: tuple[int, ...]) -> torch.Tensor:
        row = torch.tensor(list(ids) + [0] * (width - len(ids)), dtype=first_ids.dtype, device=device)
        return row[None, :].expand(batch, width)

    if cls_input.embeddings is None:
        return padded(cls_input.text_only_prefix_ids)
    with_image = padded(cls_input.prefix_ids + (0,)).clone()
    with_image[:, len(cls_input.prefix_ids)] = first_ids[:, 0]
    if cls_input.image_rows is None:
        return with_image
    return torch.where(has_image[:, None], with_image, padded(cls_input.text_only_prefix_ids))


# --------------------------------------------------------------------------------------------- at a call's entry


def _bos_token_ids(owner: nn.Module) -> tuple[int, ...]:
    config = getattr(owner, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    bos = getattr(config, "bos_token_id", None)
    if bos is None:
        return ()
    return tuple(int(b) for b in bos) if isinstance(bos, (list, tuple)) else (int(bos),)


def _continues_a_cache(kwargs: dict) -> bool:
    for name in ("cache", "past_key_values"):
        cache = kwargs.get(name)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return True
    return False


def _take_input_ids(args: tuple, kwargs: dict, where: str) -> tuple[torch.Tensor, dict]:
    """`input_ids` out of the call (keyword or first positional), refusing what the insertion cannot grow."""
    kwargs = dict(kwargs)
    if args:
        if len(args) > 1 or not isinstance(args[0], torch.Tensor) or "input_ids" in kwargs:
            raise ValueError(f"MemVP: with cls_token=True, pass the inputs of {where} as keywords (input_ids=..., "
                             "attention_mask=..., ...).")
        kwargs["input_ids"] = args[0]
    for name in ("inputs_embeds", "position_ids"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"MemVP: cls_token=True inserts the CLS token into input_ids and counts the positions of the grown "
                f"rows from their attention mask; {where} received {name}. Pass input_ids (and attention_mask) only."
            )
    input_ids = kwargs.pop("input_ids", None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"MemVP: cls_token=True inserts the CLS token into input_ids; {where} received no 2-D "
                         "input_ids.")
    kwargs.pop("inputs_embeds", None)
    kwargs.pop("position_ids", None)
    return input_ids, kwargs


def grown_call(cls_input: ClsInput, owner: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward's arguments with the CLS token inserted (see the module docstring). A call that continues a KV
    cache is a continuation of the call that filled it, which inserted the token already: it is left as it is."""
    if _continues_a_cache(kwargs):
        return args, kwargs
    input_ids, kwargs = _take_input_ids(args, kwargs, "the forward")
    grown = grow_inputs(cls_input, owner.get_input_embeddings(), input_ids, kwargs.get("attention_mask"),
                        kwargs.get("labels"), _bos_token_ids(owner))
    kwargs.update(inputs_embeds=grown.inputs_embeds, attention_mask=grown.attention_mask,
                  position_ids=grown.position_ids)
    if grown.labels is not None:
        kwargs["labels"] = grown.labels
    return (), kwargs


def generate_grown(cls_input: ClsInput, owner: nn.Module, generate: Callable, args: tuple, kwargs: dict) -> Any:
    """`generate()` on the grown prompt; returns the caller's `input_ids` followed by the generated tokens."""
    input_ids, kwargs = _take_input_ids(args, kwargs, "generate()")
    grown = grow_inputs(cls_input, owner.get_input_embeddings(), input_ids, kwargs.get("attention_mask"), None,
                        _bos_token_ids(owner))
    kwargs.update(input_ids=grown.input_ids, inputs_embeds=grown.inputs_embeds, attention_mask=grown.attention_mask)
    output = generate(**kwargs)
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(sequences, torch.Tensor):
        return output
    repeats = sequences.shape[0] // input_ids.shape[0]
    prompt = input_ids.to(sequences.device).repeat_interleave(repeats, dim=0)
    restored = torch.cat([prompt, sequences[:, grown.input_ids.shape[1]:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output
