"""Turning (image, question, answer) records into MemVP training and generation batches.

MemVP puts the image into the FFN *memory* of the language model, not into the token sequence.  So unlike a LLaVA
collator, this one never inserts image placeholder tokens: the text is tokenized as plain text and the images travel
separately as ``pixel_values`` (plus an ``image_mask`` saying which rows/slots really hold an image).  That is the
whole point of the method (the sequence stays short), and it is why any ``<image>`` placeholder found in
LLaVA-format conversations is *removed* from the text rather than expanded.

Two record formats are accepted by :class:`MemVPDataCollator`:

* a *simple* record::

      {"image": PIL.Image | np.ndarray | "path.png" | bytes | None | [several of those],
       "question": "What digit is this?",       # or "prompt"
       "answer": "seven"}

* a LLaVA *conversation* record (``image`` relative to ``image_folder``)::

      {"image": "coco/0001.jpg",                 # or a list, or absent for text-only
       "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                         {"from": "gpt",   "value": "A cat."},
                         ...]}                     # multi-turn: loss on every gpt turn

Rows without an image are fine (ScienceQA has text-only questions): their ``pixel_values`` are zeros and their
``image_mask`` is False, so the memory is switched off for them.

The collator only orchestrates; each concern lives in its own module: reading a record's turns
(:mod:`.conversations`), tokens, labels and padding (:mod:`.tokenization`, which also shows the layout of a row),
images (:mod:`.images`, :mod:`.image_batching`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch

from .conversations import record_label, record_turns
from .image_batching import batch_images, blank_image_shape, record_images
from .images import PathLike
from .prompts import DEFAULT_PROMPT_TEMPLATE, IMAGE_PLACEHOLDER, build_prompt
from .tokenization import (
    count_leading_special_tokens,
    encode_answer,
    encode_prompt,
    encode_turns,
    left_pad,
    pad_labels,
    right_pad,
)

__all__ = ["MemVPDataCollator"]


class MemVPDataCollator:
    """Collate MemVP records into ``input_ids``, ``attention_mask``, ``labels``, ``pixel_values``, ``image_mask``.

    Usable directly as ``Trainer(data_collator=MemVPDataCollator(...))`` -- set
    ``TrainingArguments(remove_unused_columns=False)``, otherwise the Trainer drops the ``image``/``conversations``
    columns before they reach the collator.

    Args:
        tokenizer: a HF tokenizer with ``eos_token_id`` and ``pad_token_id`` (for Llama-style tokenizers without a pad
            token, set ``tokenizer.pad_token = tokenizer.eos_token`` first; padding is excluded from the loss by the
            attention mask, not by its id, so this is safe).
        image_processor: a HF image processor (e.g. ``CLIPImageProcessor``) called as
            ``image_processor(images=[...], return_tensors="pt")["pixel_values"]``; it must produce one fixed size.
            ``None`` is allowed for purely textual data: then no ``pixel_values``/``image_mask`` are returned and a
            record with an image raises.
        max_length: longest row in tokens (``None``: no limit).  An over-long row first loses tokens from the *start of
            its first question* (BOS kept), so the answer -- the only supervised part -- survives; if the answers alone
            are still too long, the row is cut on the right.
        prompt_template: template of every human turn, with a ``{question}`` field (see :func:`build_prompt`).
        answer_only_loss: ``True`` (default): labels are -100 except on answer tokens and the EOS after each answer.
            ``False``: every non-padding token is supervised.
        num_images: ``None``: a batch where no record has a *list* of images gives ``pixel_values`` ``(B, C, H, W)``
            and ``image_mask`` ``(B,)``; a batch with at least one list gives ``(B, I, C, H, W)`` / ``(B, I)`` with
            ``I`` the longest list in that batch.  An int ``I`` always gives the 5-D layout with exactly ``I`` slots
            (stable shapes across batches; a record with more images raises).  Empty slots are zeros / False.
        image_folder: folder that relative image paths are resolved against.
        image_placeholder: placeholder removed from conversation text (see :func:`strip_image_placeholder`).
        array_value_range: value range of numpy images, e.g. ``(0, 16)`` for scikit-learn digits (see
            :func:`to_rgb_image`); ``None`` infers it per image.
        pad_to_multiple_of: pad the sequence length up to a multiple of this (tensor-core friendly shapes).
        image_input_name: the model input the images become: ``"pixel_values"`` (images for a vision encoder, the
            processor returns ``(N, C, H, W)``) or ``"image_features"`` (a featurizer such as
            ``DigitPatchFeaturizer`` returns visual tokens ``(N, tokens, dim)``).
        seq2seq: encoder-decoder layout: a training batch is the prompt as encoder input and the answer (+EOS) as
            ``labels`` (see :meth:`seq2seq_batch`); :meth:`prompts` gives the same right-padded encoder input.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        max_length: Optional[int] = 2048,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        answer_only_loss: bool = True,
        num_images: Optional[int] = None,
        image_folder: Optional[PathLike] = None,
        image_placeholder: str = IMAGE_PLACEHOLDER,
        array_value_range: Optional[tuple[float, float]] = None,
        pad_to_multiple_of: Optional[int] = None,
        image_input_name: str = "pixel_values",
        seq2seq: bool = False,
    ) -> None:
        if image_input_name not in ("pixel_values", "image_features"):
            raise ValueError(
                f"MemVPDataCollator: image_input_name must be 'pixel_values' or 'image_features', got {image_input_name!r}"
            )
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise ValueError("MemVPDataCollator: the tokenizer has no eos_token_id; answers end with EOS.")
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                "MemVPDataCollator: the tokenizer has no pad_token_id; set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out of the loss either way)."
            )
        if max_length is not None and max_length < 2:
            raise ValueError(f"MemVPDataCollator: max_length must be >= 2 or None, got {max_length}")
        if num_images is not None and num_images < 1:
            raise ValueError(f"MemVPDataCollator: num_images must be >= 1 or None, got {num_images}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"MemVPDataCollator: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        build_prompt("x", template=prompt_template)  # validates the template early
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.prompt_template = prompt_template
        self.answer_only_loss = answer_only_loss
        self.num_images = num_images
        self.image_folder = image_folder
        self.image_placeholder = image_placeholder
        self.array_value_range = array_value_range
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_input_name = image_input_name
        self.seq2seq = seq2seq
        self._bos_len: Optional[int] = None
        self._empty_image: Optional[tuple[torch.Size, torch.dtype]] = None

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch: prompt + answer tokens, answer-only labels, right padding, images."""
        if self.seq2seq:
            return self.seq2seq_batch(records)
        texts, per_record_images, any_list = self._read(records, with_answers=True)
        batch = self._right_pad([ids for ids, _ in texts], [labels for _, labels in texts])
        return self._add_images(batch, per_record_images, any_list)

    def prompts(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A generation batch: each record's first question as a prompt, with its images. Answers, if present, are
        ignored. Decoder-only: LEFT-padded (`generate` continues from the last position). Seq2seq: the encoder input,
        right-padded like `seq2seq_batch` (models with absolute positions, e.g. BART, must see the same positions)."""
        if self.seq2seq:
            return self._encoder_inputs(records)
        texts, per_record_images, any_list = self._read(records, with_answers=False)
        batch = left_pad([ids for ids, _ in texts], self.tokenizer.pad_token_id)
        return self._add_images(batch, per_record_images, any_list)

    def seq2seq_batch(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Encoder-decoder layout: the prompt feeds the encoder, the answer (+EOS) is the decoder's `labels`."""
        batch = self._encoder_inputs(records)
        answers = []
        for index, record in enumerate(records):
            turns = record_turns(record, record_label(index, record), self.image_placeholder)
            answers.append(encode_answer(self.tokenizer, turns[0][1]))
        batch["labels"] = pad_labels(answers)
        return batch

    def _encoder_inputs(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Each record's first question, right-padded, with its images: the encoder side of a seq2seq batch."""
        texts, per_record_images, any_list = self._read(records, with_answers=False)
        batch = self._right_pad([ids for ids, _ in texts], [ids for ids, _ in texts])
        batch.pop("labels")
        return self._add_images(batch, per_record_images, any_list)

    def _read(self, records: Sequence[Mapping[str, Any]], with_answers: bool):
        """Each record's (ids, labels) and RGB images, and whether any record gave a list of images."""
        if not isinstance(records, Sequence) or len(records) == 0:
            raise ValueError("MemVPDataCollator: expected a non-empty list of records.")
        texts: list[tuple[list[int], list[int]]] = []
        per_record_images: list[list[Any]] = []
        any_list = False
        for index, record in enumerate(records):
            where = record_label(index, record)
            if not isinstance(record, Mapping):
                raise ValueError(f"{where}: a record must be a dict, got {type(record).__name__}.")
            if with_answers:
                texts.append(self._encode_record(record, where))
            else:
                question = record_turns(record, where, self.image_placeholder, need_answer=False)[0][0]
                ids = encode_prompt(self.tokenizer, question, self.prompt_template)
                texts.append((ids, ids))
            images, is_list = record_images(
                record,
                where,
                image_processor=self.image_processor,
                image_folder=self.image_folder,
                array_value_range=self.array_value_range,
            )
            if self.num_images is not None and len(images) > self.num_images:
                raise ValueError(f"{where}: has {len(images)} images but num_images={self.num_images}.")
            any_list = any_list or is_list
            per_record_images.append(images)
        return texts, per_record_images, any_list

    def _encode_record(self, record: Mapping[str, Any], where: str) -> tuple[list[int], list[int]]:
        return encode_turns(
            self.tokenizer,
            record_turns(record, where, self.image_placeholder),
            where,
            template=self.prompt_template,
            max_length=self.max_length,
            answer_only_loss=self.answer_only_loss,
            leading_special=self._leading_special,
        )

    def _leading_special(self) -> int:
        """How many special tokens (e.g. BOS) the tokenizer puts in front of a text; found once, when first needed."""
        if self._bos_len is None:
            self._bos_len = count_leading_special_tokens(self.tokenizer)
        return self._bos_len

    def _right_pad(self, all_ids: list[list[int]], all_labels: list[list[int]]) -> dict[str, torch.Tensor]:
        return right_pad(all_ids, all_labels, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def _add_images(
        self, batch: dict[str, torch.Tensor], per_record_images: list[list[Any]], any_list: bool
    ) -> dict[str, torch.Tensor]:
        if self.image_processor is None:
            return batch
        pixel_values, image_mask = batch_images(
            per_record_images,
            any_list,
            image_processor=self.image_processor,
            image_input_name=self.image_input_name,
            num_images=self.num_images,
            blank_shape=self._empty_image_shape,
        )
        batch[self.image_input_name] = pixel_values
        batch["image_mask"] = image_mask
        return batch

    def _empty_image_shape(self) -> tuple[torch.Size, torch.dtype]:
        """Shape of one processed image, found once by processing a black image (for all-text-only batches)."""
        if self._empty_image is None:
            self._empty_image = blank_image_shape(self.image_processor, self.image_input_name)
        return self._empty_image
