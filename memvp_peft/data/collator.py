"""Turning dataset records into MemVP training and generation batches.

MemVP puts the image into the FFN *memory* of the language model, not into the token sequence.  So unlike a LLaVA
collator, this one never inserts image placeholder tokens: the text is tokenized as plain text and the images travel
separately as ``pixel_values`` (plus an ``image_mask`` saying which rows/slots really hold an image).  That is the
whole point of the method (the sequence stays short), and it is why any ``<image>`` placeholder (or
``{"type": "image"}`` entry) of a record's text is *removed* rather than expanded.

A record's text may come in any layout of :mod:`.conversations` -- a simple ``question``/``answer``, a
multiple-choice ``question``/``choices``/int ``answer`` (the authors' ScienceQA prompt), LLaVA ``conversations``, TRL
``messages``, the_cauldron ``texts`` -- and its images in ``image`` or ``images`` (paths, PIL images, arrays, bytes,
``datasets.Image`` values; one or a list) or as precomputed ``pixel_values`` / ``image_features``.  For example::

    {"images": [<PIL>], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

Rows without an image are fine (ScienceQA has text-only questions): their ``pixel_values`` are zeros and their
``image_mask`` is False, so the memory is switched off for them.  An image the collator would not use is an error,
never silently text-only training: images in a field it does not read, text that marks another number of images than
the record gives (:func:`.conversations.check_image_marks`).  Because every batch carries ``pixel_values`` and an
``image_mask``, the model cannot tell a dataset whose images never arrive from one with text-only rows; so a
collator with an image processor warns once when the first :data:`TEXT_ONLY_WARNING_RECORDS` records of its training
batches carried no image at all.  docs/datasets.md has the table of layouts.

Datasets prepared once carry the model input itself: precomputed ``pixel_values`` (images already resized and
normalised) or ``image_features`` (encoder features already extracted), one image or several per row:

* ``pixel_values``: ``(C, H, W)`` or ``(I, C, H, W)``;
* ``image_features``: ``(tokens, dim)`` or ``(I, tokens, dim)``;

as a ``torch`` tensor, a numpy array or nested lists (what a ``datasets`` row gives without a format; those are
read as float32).  The tensor goes into the batch under the model input name it is, so it must be the kind the
collator was built for (``image_input_name``): ``image_features`` handed to a collator whose model wants
``pixel_values`` would otherwise reach the wrong input, or none.

The collator orchestrates; the other concerns live in their own modules: a record's text
(:mod:`.conversations`, :mod:`.multiple_choice`), tokens, labels and padding (:mod:`.tokenization` with a prompt
template, :mod:`.chat_template` with the base's chat template), raw images (:mod:`.images`).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
import torch

from ..vision.tiling import blocks_per_image, check_grid, tile_image
from .chat_template import ChatTemplateRenderer, chat_template_of
from .conversations import (
    DEFAULT_PROMPT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    ORIGIN_FIELD,
    Dialogue,
    build_prompt,
    check_image_marks,
    record_dialogue,
    record_label,
)
from .images import (
    RAW_IMAGE_FIELDS,
    PathLike,
    assemble_images,
    blank_image_shape,
    image_field,
    process_images,
    record_images,
)
from .video import FRAME_FIELDS, record_frames
from .tokenization import (
    count_leading_special_tokens,
    encode_answer,
    encode_prompt,
    encode_turns,
    labels_of,
    left_pad,
    pad_labels,
    right_pad,
)

__all__ = ["TEXT_ONLY_WARNING_RECORDS", "MemVPDataCollator", "precomputed_images"]

#: How many training records without any image a collator with an image processor batches before it warns (once)
#: that no image reaches the model. A dataset whose images are lost gives none at all; one where a tenth of the rows
#: have an image still shows one among the first 64 rows with 99.9% probability.
TEXT_ONLY_WARNING_RECORDS = 64


class _RecordImages:
    """One record's images on their way into the batch: raw RGB images (to process; ``None`` where a record's list
    leaves a slot empty) or precomputed tensors."""

    __slots__ = ("raw", "tensors", "is_list", "field", "sources", "slots")

    def __init__(self, raw: list[Any], tensors: list[torch.Tensor], is_list: bool, field: Optional[str],
                 sources: Optional[int] = None, slots: Optional[int] = None) -> None:
        self.raw, self.tensors, self.is_list, self.field = raw, tensors, is_list, field
        given = sum(image is not None for image in raw) + len(tensors)
        self.sources = given if sources is None else sources  # images the record gave (before tiling)
        self.slots = self.count if slots is None else slots  # their slots before tiling, empty ones included

    @property
    def count(self) -> int:
        return len(self.raw) + len(self.tensors)


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
            ``None`` is allowed for purely textual data and for precomputed ``pixel_values``/``image_features``: a
            record with a raw image then raises.
        max_length: longest row in tokens (``None``: no limit).  An over-long row first loses tokens from the *start of
            its first question* (BOS and a chat template's header kept), so the answer -- the only supervised part --
            survives; if the answers alone are still too long, the row is cut on the right.
        prompt_template: template of every user turn, with a ``{question}`` field (see :func:`build_prompt`); default
            ``"Question: {question}\\nAnswer:"``.  Giving one means "use it": the chat template is then not used
            (unless ``chat_template=True``, which is a contradiction and refused).
        chat_template: ``None`` (default): render with the base's chat template (the tokenizer's, else the
            processor's) when it has one and no ``prompt_template`` was given; otherwise with the prompt template.
            ``True``: the chat template, required.  ``False``: the prompt template, always.  Seq2seq never uses one.
            ``uses_chat_template`` says what was decided (see :mod:`.chat_template` for how it renders).
        answer_only_loss: ``True`` (default): labels are -100 except on answer tokens and the EOS after each answer
            (with a chat template: the assistant turns, end-of-turn tokens included).  ``False``: every non-padding
            token is supervised.
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
            ``DigitPatchFeaturizer`` returns visual tokens ``(N, tokens, dim)``).  Precomputed tensors must be this
            kind.
        seq2seq: encoder-decoder layout: a training batch is the prompt as encoder input and the answer (+EOS) as
            ``labels`` (see :meth:`seq2seq_batch`); :meth:`prompts` gives the same right-padded encoder input.
        image_grid: ``(rows, cols)`` or ``"RxC"``: AnyRes tiling (:mod:`memvp_peft.vision.tiling`); every raw image becomes the whole
            image plus rows x cols crops, row by row, each processed as an image (``1 + rows*cols`` slots per image,
            always the 5-D layout). The layout of ``MemVPConfig(image_grid=...)``. Precomputed tensors are taken as
            given (already tiles).
        num_frames: read video: a record's ``video`` (a video file, decoded with PyAV, or a list of frames) or
            ``frames`` (a list) is sampled uniformly to this many frames (:mod:`.video`), each frame a slot of the
            5-D layout with exactly ``num_frames`` slots (a shorter video leaves the last ones empty). Without it,
            video fields are refused.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        max_length: Optional[int] = 2048,
        prompt_template: Optional[str] = None,
        answer_only_loss: bool = True,
        num_images: Optional[int] = None,
        image_folder: Optional[PathLike] = None,
        image_placeholder: str = IMAGE_PLACEHOLDER,
        array_value_range: Optional[tuple[float, float]] = None,
        pad_to_multiple_of: Optional[int] = None,
        image_input_name: str = "pixel_values",
        seq2seq: bool = False,
        chat_template: Optional[bool] = None,
        image_grid: Optional[Any] = None,
        num_frames: Optional[int] = None,
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
        if image_grid is not None:
            image_grid = check_grid(image_grid, "MemVPDataCollator")
        if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"MemVPDataCollator: num_frames must be a positive integer or None, got {num_frames!r}")
        if image_grid is not None and num_frames is not None:
            raise ValueError("MemVPDataCollator: image_grid and num_frames were both given; a row holds tiled images "
                             "or video frames: give one.")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"MemVPDataCollator: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        template = DEFAULT_PROMPT_TEMPLATE if prompt_template is None else prompt_template
        build_prompt("x", template=template)  # validates the template early
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_length = max_length
        self.prompt_template = template
        self.answer_only_loss = answer_only_loss
        self.num_images = num_images
        self.image_folder = image_folder
        self.image_placeholder = image_placeholder
        self.array_value_range = array_value_range
        self.pad_to_multiple_of = pad_to_multiple_of
        self.image_input_name = image_input_name
        self.seq2seq = seq2seq
        self.image_grid = image_grid
        self.num_frames = num_frames
        self._chat = self._chat_renderer(chat_template, prompt_template is not None)
        self._bos_len: Optional[int] = None
        self._image_shape: Optional[tuple[torch.Size, torch.dtype]] = None
        self._records_without_image = 0  # training records batched before the first image (None once one came)

    def _chat_renderer(self, chat_template: Optional[bool], explicit_prompt_template: bool):
        """The decision of the ``chat_template`` argument (rule in the class docstring)."""
        if chat_template is not None and not isinstance(chat_template, bool):
            raise ValueError(
                f"MemVPDataCollator: chat_template must be True, False or None, got {chat_template!r} (to use another "
                "template, set `tokenizer.chat_template` to it)."
            )
        available = chat_template_of(self.tokenizer, self.image_processor)
        if chat_template is True:
            if available is None:
                raise ValueError(
                    "MemVPDataCollator: chat_template=True but neither the tokenizer nor the processor has a chat "
                    "template; set `tokenizer.chat_template`, or use chat_template=None/False for the prompt template."
                )
            if explicit_prompt_template:
                raise ValueError(
                    "MemVPDataCollator: chat_template=True and a prompt_template were both given; a row is rendered "
                    "with one of them: drop prompt_template, or pass chat_template=False."
                )
            if self.seq2seq:
                raise ValueError("MemVPDataCollator: chat_template=True with seq2seq=True: encoder-decoder rows use "
                                 "the prompt template.")
        use = chat_template if chat_template is not None else (
            available is not None and not explicit_prompt_template and not self.seq2seq)
        return ChatTemplateRenderer(self.tokenizer, available) if use else None

    @property
    def uses_chat_template(self) -> bool:
        """Whether rows are rendered with the base's chat template (else with ``prompt_template``)."""
        return self._chat is not None

    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch: prompt + answer tokens, answer-only labels, right padding, images."""
        if self.seq2seq:
            batch = self.seq2seq_batch(records)
        else:
            texts, images = self._read(records, with_answers=True, answer_prefix="")
            batch = self._add_images(self._right_pad([ids for ids, _ in texts], [labels for _, labels in texts]),
                                     images)
        self._watch_for_images(batch, len(records))
        return batch

    def _watch_for_images(self, batch: dict[str, torch.Tensor], records: int) -> None:
        """Warn once when the first :data:`TEXT_ONLY_WARNING_RECORDS` training records carried no image (module
        docstring).  Only with an image processor: without one, text-only batches are what was asked for."""
        if self.image_processor is None or self._records_without_image is None:
            return
        mask = batch.get("image_mask")
        if mask is not None and bool(mask.any()):
            self._records_without_image = None
            return
        before = self._records_without_image
        self._records_without_image += records
        if before < TEXT_ONLY_WARNING_RECORDS <= self._records_without_image:
            warnings.warn(
                f"MemVPDataCollator: the first {self._records_without_image} training records carried no image (every "
                "image_mask False), though the collator has an image processor: if the dataset has images, they do "
                "not reach the model. Images are read from 'image' or 'images' (or precomputed 'pixel_values' / "
                "'image_features'); a dataset whose first rows are text-only may ignore this (said once).",
                UserWarning,
                stacklevel=3,
            )

    def prompts(self, records: Sequence[Mapping[str, Any]], answer_prefix: str = "") -> dict[str, torch.Tensor]:
        """A generation batch: each record's first question as a prompt, with its images. Answers, if present, are
        ignored. Decoder-only: LEFT-padded (`generate` continues from the last position). Seq2seq: the encoder input,
        right-padded like `seq2seq_batch` (models with absolute positions, e.g. BART, must see the same positions).

        `answer_prefix` is the start of the answer, put where the answer begins in a training row, e.g.
        `"The answer is"` to score multiple choice by the next token (decoder-only)."""
        if self.seq2seq:
            if answer_prefix:
                raise ValueError("MemVPDataCollator.prompts: answer_prefix is for decoder-only prompts; a seq2seq "
                                 "answer starts in the decoder.")
            return self._encoder_inputs(records)
        texts, images = self._read(records, with_answers=False, answer_prefix=answer_prefix)
        batch = left_pad([ids for ids, _ in texts], self.tokenizer.pad_token_id)
        return self._add_images(batch, images)

    def seq2seq_batch(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Encoder-decoder layout: the prompt feeds the encoder, the answer (+EOS) is the decoder's `labels`."""
        batch = self._encoder_inputs(records)
        batch["labels"] = pad_labels([self._seq2seq_answer(index, record) for index, record in enumerate(records)])
        return batch

    def _seq2seq_answer(self, index: int, record: Mapping[str, Any]) -> list[int]:
        """The decoder's labels of one record: its answer (+EOS)."""
        dialogue = record_dialogue(record, record_label(index, record), self.image_placeholder)
        if dialogue.context_exchanges:
            raise ValueError(
                f"{record_label(index, record)}: its conversational prompt holds assistant answers (context); an "
                "encoder-decoder row is one question and its answer: give the prompt as one user message."
            )
        return encode_answer(self.tokenizer, dialogue.exchanges[0][1], dialogue.separator)

    def _encoder_inputs(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Each record's first question, right-padded, with its images: the encoder side of a seq2seq batch."""
        texts, images = self._read(records, with_answers=False, answer_prefix="")
        batch = self._right_pad([ids for ids, _ in texts], [ids for ids, _ in texts])
        batch.pop("labels")
        return self._add_images(batch, images)

    def _read(self, records: Sequence[Mapping[str, Any]], with_answers: bool, answer_prefix: str,
              first_index: int = 0):
        """Each record's (ids, labels) and images; a batch mixing raw images and precomputed tensors is refused.
        Errors name a record without a recorded origin by `first_index` + its place in `records`."""
        if not isinstance(records, Sequence) or len(records) == 0:
            raise ValueError("MemVPDataCollator: expected a non-empty list of records.")
        texts: list[tuple[list[int], list[int]]] = []
        per_record: list[_RecordImages] = []
        for index, record in enumerate(records, start=first_index):
            where = record_label(index, record)
            if not isinstance(record, Mapping):
                raise ValueError(f"{where}: a record must be a dict, got {type(record).__name__}.")
            dialogue = record_dialogue(record, where, self.image_placeholder, need_answer=with_answers)
            if with_answers:
                texts.append(self._encode_record(dialogue, where))
            else:
                ids = self._encode_prompt(dialogue, where, answer_prefix)
                texts.append((ids, ids))
            images = self._record_images(record, where)
            if images.field not in FRAME_FIELDS:  # a video's frames are not marked one by one
                check_image_marks(dialogue, images.sources, where, self.image_placeholder, record.keys())
            if self.num_images is not None and images.slots > self.num_images:
                raise ValueError(f"{where}: has {images.slots} images but num_images={self.num_images} (a None "
                                 "entry of a list keeps its slot).")
            per_record.append(images)
        labels = [record_label(index, record) for index, record in enumerate(records, start=first_index)]
        self._refuse_mixed_sources(labels, per_record)
        return texts, per_record

    def check_records(self, records: Sequence[Mapping[str, Any]]) -> tuple[int, Optional[str]]:
        """Read every record as a training batch would, before any training starts; return the most image slots one
        record fills and the name of the first record that fills that many (None when no record has an image).

        A batch meets a record only when the `Trainer` reaches it, so a bad record would stop a run hours in. Here
        each record goes through what :meth:`__call__` does with it on its own -- its text in its layout, tokenized;
        each image decoded (tiled, a video sampled), precomputed tensors checked, marks counted against images --
        and a dataset mixing raw images with precomputed tensors, which some batch would mix, is refused. Left out is
        only what a batch does for all its records at once: the image processor (the same resize for every image)
        and the padding. The cost is one more read of the dataset, every image decoded once.

        `records` is a list of dicts or a `datasets.Dataset`, which decodes a row's images as the row is read: a row
        it cannot give is named too. The slots are the ``I`` of the ``(B, I, ...)`` image layout, tiles and frames
        counted (not the empty slots a batch pads with)."""
        most, most_at = 0, None
        first: dict[bool, tuple[str, _RecordImages]] = {}  # raw images (True) / tensors (False) -> the first record
        for index in range(len(records)):
            record = _read_row(records, index)
            if self.seq2seq:
                _, (images,) = self._read([record], with_answers=False, answer_prefix="", first_index=index)
                self._seq2seq_answer(index, record)
            else:
                _, (images,) = self._read([record], with_answers=True, answer_prefix="", first_index=index)
            if images.sources:
                first.setdefault(bool(images.raw), (record_label(index, record), images))
            if images.count > most:
                most, most_at = images.count, record_label(index, record)
        self._refuse_mixed_sources([label for label, _ in first.values()], [images for _, images in first.values()])
        return most, most_at

    def _encode_record(self, dialogue: Dialogue, where: str) -> tuple[list[int], list[int]]:
        if self._chat is not None:
            ids, supervised = self._chat.encode(dialogue, where, self.max_length)
            return ids, labels_of(ids, supervised, self.answer_only_loss)
        return encode_turns(
            self.tokenizer,
            dialogue,
            where,
            template=self.prompt_template,
            max_length=self.max_length,
            answer_only_loss=self.answer_only_loss,
            leading_special=self._leading_special,
        )

    def _encode_prompt(self, dialogue: Dialogue, where: str, answer_prefix: str) -> list[int]:
        if self._chat is not None:
            return self._chat.encode_prompt(dialogue, where, answer_prefix)
        return encode_prompt(self.tokenizer, dialogue, self.prompt_template, answer_prefix)

    def _record_images(self, record: Mapping[str, Any], where: str) -> _RecordImages:
        field = image_field(record, where, read_video=self.num_frames is not None)
        if field is None:
            return _RecordImages([], [], False, None)
        if field in FRAME_FIELDS:
            if self.image_processor is None:
                raise ValueError(f"{where}: the record has a video but the collator has no image_processor.")
            frames = record_frames(record[field], where, self.num_frames, image_folder=self.image_folder,
                                   array_value_range=self.array_value_range)
            return _RecordImages(frames, [], True, field)
        if field in RAW_IMAGE_FIELDS:
            raw, is_list = record_images(
                record[field],
                where,
                image_processor=self.image_processor,
                image_folder=self.image_folder,
                array_value_range=self.array_value_range,
            )
            if self.image_grid is None:
                return _RecordImages(raw, [], is_list, field)
            blocks = blocks_per_image(self.image_grid)
            try:
                tiles = [tile for image in raw
                         for tile in (tile_image(image, self.image_grid) if image is not None else [None] * blocks)]
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from exc
            return _RecordImages(tiles, [], True, field, sources=sum(image is not None for image in raw),
                                 slots=len(raw))
        tensors, is_list = precomputed_images(record[field], field, where, self.image_input_name)
        return _RecordImages([], tensors, is_list, field)

    @staticmethod
    def _refuse_mixed_sources(labels: list[str], per_record: list[_RecordImages]) -> None:
        """Raw images are processed and precomputed tensors are not: one batch holding both would put two different
        things side by side in one tensor. `labels` name the records of `per_record`."""
        raw = next((i for i, images in enumerate(per_record) if images.raw and images.sources), None)
        precomputed = next((i for i, images in enumerate(per_record) if images.tensors), None)
        if raw is not None and precomputed is not None:
            raise ValueError(
                f"MemVPDataCollator: the batch mixes raw images ({labels[raw]}: '{per_record[raw].field}') with "
                f"precomputed tensors ({labels[precomputed]}: '{per_record[precomputed].field}'); a dataset gives one "
                "or the other."
            )

    def _slots(self) -> Optional[int]:
        """Image slots of every row when fixed: ``num_frames``, or ``num_images`` x (1 + rows*cols) with tiles."""
        if self.num_frames is not None:
            return self.num_frames
        if self.num_images is not None and self.image_grid is not None:
            return self.num_images * blocks_per_image(self.image_grid)
        return self.num_images

    def _leading_special(self) -> int:
        """How many special tokens (e.g. BOS) the tokenizer puts in front of a text; found once, when first needed."""
        if self._bos_len is None:
            self._bos_len = count_leading_special_tokens(self.tokenizer)
        return self._bos_len

    def _right_pad(self, all_ids: list[list[int]], all_labels: list[list[int]]) -> dict[str, torch.Tensor]:
        return right_pad(all_ids, all_labels, self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    def _add_images(self, batch: dict[str, torch.Tensor], per_record: list[_RecordImages]) -> dict[str, torch.Tensor]:
        """The image columns: processed raw images or the precomputed tensors, zeros and a False mask where a row
        has none.  A batch without any image gets zeros of the shape seen before (or the processor's); with neither
        (a text-only collator) it gets no image columns."""
        flat = [image for images in per_record for image in images.raw if image is not None]
        processed = iter(process_images(self.image_processor, flat, self.image_input_name) if flat else ())
        tensors: list[list[Optional[torch.Tensor]]] = []
        for images in per_record:  # an empty slot (None) stays None: assemble_images leaves it empty
            if images.raw:
                tensors.append([None if image is None else next(processed) for image in images.raw])
            else:
                tensors.append(images.tensors)
        if any(t is not None for row in tensors for t in row):
            first = next(t for row in tensors for t in row if t is not None)
            self._image_shape = (first.shape, first.dtype)
        elif self._image_shape is None:
            if self.image_processor is None:
                return batch
            self._image_shape = blank_image_shape(self.image_processor, self.image_input_name)
        any_list = any(images.is_list for images in per_record) or self.image_grid is not None
        pixel_values, image_mask = assemble_images(tensors, any_list, num_images=self._slots(), blank=self._image_shape)
        batch[self.image_input_name] = pixel_values
        batch["image_mask"] = image_mask
        return batch


def _read_row(records: Sequence[Mapping[str, Any]], index: int) -> Any:
    """Row `index` of `records`. A `datasets.Dataset` decodes the row's images as it reads it, so a row it cannot
    decode (a damaged image, a decompression bomb) fails here, in `datasets`' own words: named by the place the
    loaders recorded for it (`ORIGIN_FIELD`, read on its own), else by its index."""
    try:
        return records[index]
    except Exception as exc:
        where = f"record {index}"
        columns = getattr(records, "column_names", None)
        if columns is not None and ORIGIN_FIELD in columns:
            try:
                where = records.select_columns([ORIGIN_FIELD])[index][ORIGIN_FIELD]
            except Exception:  # the name is a courtesy: the error below is what matters
                pass
        raise ValueError(f"{where}: the row cannot be read: {type(exc).__name__}: {exc}") from exc


# dimensions of ONE image's tensor, per model input
_IMAGE_DIMS = {"pixel_values": (3, "(C, H, W)"), "image_features": (2, "(tokens, dim)")}


def precomputed_images(value: Any, field: str, where: str, image_input_name: str) -> tuple[list[torch.Tensor], bool]:
    """One record's precomputed ``field`` as a list of per-image tensors, and whether it gave several (the
    multi-image layout, like a list of raw images).  An empty list is a record without images."""
    if field != image_input_name:
        raise ValueError(
            f"{where}: has precomputed '{field}' but this collator builds '{image_input_name}' (its "
            f"image_input_name); the model takes each as a different input. Build the collator with "
            f"image_input_name={field!r}, or give raw images in 'image'/'images'."
        )
    if isinstance(value, (list, tuple)) and not value:
        return [], True
    tensor = _as_tensor(value, field, where)
    dims, layout = _IMAGE_DIMS[field]
    if tensor.dim() == dims:
        return [tensor], False
    if tensor.dim() == dims + 1:
        return list(tensor.unbind(0)), True
    raise ValueError(
        f"{where}: '{field}' has shape {tuple(tensor.shape)}; one row holds {layout} for one image or "
        f"(I, {layout[1:-1]}) for I images."
    )


def _as_tensor(value: Any, field: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if value and all(isinstance(item, torch.Tensor) for item in value):
            try:
                return torch.stack(list(value))
            except RuntimeError as exc:
                raise ValueError(f"{where}: the '{field}' tensors of one record differ in shape: {exc}") from exc
        try:
            tensor = torch.from_numpy(np.asarray(value, dtype=np.float32))
        except (ValueError, TypeError) as exc:  # ragged nesting, or something that is not a number
            raise ValueError(f"{where}: '{field}' is not a rectangular array of numbers: {exc}") from exc
    else:
        raise ValueError(
            f"{where}: '{field}' must be a tensor, a numpy array or nested lists of numbers, got {type(value).__name__}."
        )
    if not tensor.is_floating_point():
        raise ValueError(f"{where}: '{field}' must hold floating point values, got dtype {tensor.dtype}.")
    return tensor
