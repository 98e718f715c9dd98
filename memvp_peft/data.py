"""Turning (image, question, answer) records into MemVP training batches.

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

Layout of a row (the prompt template is applied to every human turn)::

    [BOS] Question: {q1}\\nAnswer: {a1}<eos>Question: {q2}\\nAnswer: {a2}<eos> <pad> ...
          ^^^^^^^^^^^ -100 ^^^^^^^^ ^^^^^^^^ supervised ^^^ ...            ^^^^ -100

Only the answer tokens and the EOS after each answer are supervised (``answer_only_loss=True``): the model is
trained to answer, not to reproduce the question, and the EOS teaches it where to stop at generation time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "MemVPDataCollator",
    "build_prompt",
    "load_jsonl",
    "load_llava_json",
    "strip_image_placeholder",
    "to_rgb_image",
]

#: Label value ignored by ``torch.nn.CrossEntropyLoss`` (and therefore by every HF causal LM).
IGNORE_INDEX = -100

#: Default prompt; ``{question}`` is replaced by the question text.  The answer follows after a single space.
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

#: The image placeholder used by LLaVA data.  MemVP does not put images in the sequence, so it is stripped.
IMAGE_PLACEHOLDER = "<image>"

#: The `from` values LLaVA-style data uses for the two sides of a conversation (case-insensitive).
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant"})

ImageLike = Any  # PIL.Image.Image | np.ndarray | str | os.PathLike | None
PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------------------------
# Prompt helpers
# --------------------------------------------------------------------------------------------------------------------


def build_prompt(question: str, answer: Optional[str] = None, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """Render ``template`` with the question; if ``answer`` is given, append it after one space.

    ``build_prompt("What digit?")`` gives ``"Question: What digit?\\nAnswer:"`` (what you feed to ``generate``),
    ``build_prompt("What digit?", "seven")`` gives ``"Question: What digit?\\nAnswer: seven"`` (a training text).
    The collator uses the very same function, so prompts at training and inference time match exactly.
    """
    if "{question}" not in template:
        raise ValueError(f"prompt template must contain '{{question}}', got {template!r}")
    prompt = template.replace("{question}", question)
    if answer is None:
        return prompt
    return prompt + " " + answer


def strip_image_placeholder(text: str, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """Remove every ``placeholder`` (and the blank/newline right after it) from ``text``.

    LLaVA data writes ``"<image>\\nWhat is ...?"`` (or puts the placeholder at the end).  In LLaVA the placeholder is
    expanded into visual tokens inside the sequence; in MemVP the image goes into the FFN memory instead, so the
    placeholder must disappear -- left in, it would be tokenized as the literal characters ``<``, ``image``, ``>``.
    """
    if placeholder not in text:
        return text
    text = re.sub(r"[ \t]*" + re.escape(placeholder) + r"[ \t]*\n?", " ", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n[ \t]+", "\n", text)
    return text.strip()


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a transformers image dependency
        raise ImportError("memvp_peft.data needs Pillow to load images: `pip install pillow`.") from exc
    return Image


def _array_to_uint8(array: np.ndarray, value_range: Optional[tuple[float, float]]) -> np.ndarray:
    """Map an array of pixel values to uint8 0..255 (see :func:`to_rgb_image` for the rules)."""
    if array.dtype == np.uint8 and value_range is None:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"image array has non-numeric dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image array contains NaN or inf")
    if value_range is not None:
        low, high = float(value_range[0]), float(value_range[1])
        if high <= low:
            raise ValueError(f"array_value_range must be (low, high) with high > low, got {value_range}")
        scaled = (values - low) / (high - low)
    elif np.issubdtype(array.dtype, np.floating) and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values  # the usual 0..1 float convention
    elif values.min() >= 0.0 and values.max() <= 255.0 and np.issubdtype(array.dtype, np.integer):
        return values.astype(np.uint8)
    else:
        # Unknown range (e.g. scikit-learn digits: floats 0..16): stretch this image's min..max to 0..255.
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def to_rgb_image(
    image: ImageLike,
    image_folder: Optional[PathLike] = None,
    array_value_range: Optional[tuple[float, float]] = None,
):
    """Return ``image`` as an RGB ``PIL.Image``.

    * ``PIL.Image``: converted to RGB (grayscale, palette and RGBA images all become 3-channel).
    * ``str`` / ``os.PathLike``: opened with PIL; a relative path is resolved against ``image_folder``.  The file is
      decoded right away so that a corrupt file fails here, with a clear message, and not deep in the processor.
    * ``bytes`` (encoded PNG/JPEG...) or a ``{"bytes": ..., "path": ...}`` dict (an undecoded HF ``datasets.Image``).
    * ``np.ndarray``: ``(H, W)`` grayscale, ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in 1/3/4.  Values are mapped to
      uint8 0..255: uint8 is kept; bool becomes 0/255; with ``array_value_range=(low, high)`` values are scaled
      linearly from that range; otherwise floats within 0..1 are multiplied by 255, integers within 0..255 are kept,
      and anything else (e.g. scikit-learn digits, floats 0..16) is stretched from the image's own min..max.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything that cannot be read as an image.
    """
    Image = _pil()
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if image_folder is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_folder), path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, ...
            raise ValueError(f"cannot read image file {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):
        # The undecoded form of a HF `datasets.Image` column: {"bytes": b"...", "path": "..."}.
        if image.get("bytes"):
            image = bytes(image["bytes"])
        elif image.get("path"):
            return to_rgb_image(image["path"], image_folder, array_value_range)
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(image, (bytes, bytearray)):
        import io

        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return opened.convert("RGB")
        except Exception as exc:
            raise ValueError(f"cannot decode image bytes: {type(exc).__name__}: {exc}") from exc
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # channels-first -> channels-last
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            if min(array.shape) == 0:
                raise ValueError(f"image array is empty, shape {image.shape}")
            gray = _array_to_uint8(array, array_value_range)
            return Image.fromarray(np.ascontiguousarray(np.stack([gray] * 3, axis=-1)), mode="RGB")
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            if min(array.shape[:2]) == 0:
                raise ValueError(f"image array is empty, shape {image.shape}")
            rgb = _array_to_uint8(array[..., :3], array_value_range)
            return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
        raise ValueError(
            f"image array must be (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got shape {image.shape}"
        )
    raise ValueError(
        f"image must be a PIL.Image, a numpy array, a file path, encoded bytes or None, got {type(image).__name__}"
    )


# --------------------------------------------------------------------------------------------------------------------
# The collator
# --------------------------------------------------------------------------------------------------------------------


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

    # ---------------------------------------------------------------------------------------------- text -> tokens
    def _turns(self, record: Mapping[str, Any], where: str, need_answer: bool = True) -> list[tuple[str, str]]:
        """The (question, answer) pairs of a record, placeholders stripped, validated.

        With `need_answer=False` (building prompts for generation) a missing final answer is allowed and returned
        as "".
        """
        if "conversations" in record:
            conversations = record["conversations"]
            if not isinstance(conversations, Sequence) or isinstance(conversations, str) or not conversations:
                raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns.")
            turns: list[tuple[str, str]] = []
            question: Optional[str] = None
            for t, turn in enumerate(conversations):
                if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
                    raise ValueError(f"{where}: conversation turn {t} must be a dict with 'from' and 'value'.")
                role = str(turn["from"]).lower()
                value = turn["value"]
                if not isinstance(value, str):
                    raise ValueError(f"{where}: conversation turn {t} 'value' must be a str, got {type(value).__name__}.")
                expected_human = t % 2 == 0
                if (expected_human and role not in HUMAN_ROLES) or (not expected_human and role not in GPT_ROLES):
                    raise ValueError(
                        f"{where}: conversation must alternate human/gpt starting with human; turn {t} is from "
                        f"{turn['from']!r} but {'human' if expected_human else 'gpt'} was expected."
                    )
                text = strip_image_placeholder(value, self.image_placeholder)
                if expected_human:
                    question = text
                else:
                    if not text.strip():
                        raise ValueError(f"{where}: empty answer (gpt turn {t}).")
                    turns.append((question or "", text.strip()))
                    question = None
            if question is not None and not need_answer:
                turns.append((question, ""))
            elif question is not None:
                raise ValueError(
                    f"{where}: conversation must alternate human/gpt and end with a gpt turn; the last human turn "
                    f"(turn {len(conversations) - 1}) has no answer."
                )
            return turns
        key = "question" if "question" in record else "prompt" if "prompt" in record else None
        if key is None:
            raise ValueError(
                f"{where}: record has neither 'question'/'prompt' nor 'conversations' (keys: {sorted(record)})."
            )
        question = record[key]
        if not isinstance(question, str):
            raise ValueError(f"{where}: {key!r} must be a str, got {type(question).__name__}.")
        answer = record.get("answer")
        if not need_answer:
            return [(strip_image_placeholder(question, self.image_placeholder), str(answer or "").strip())]
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise ValueError(f"{where}: empty answer (the 'answer' field is missing or blank).")
        if not isinstance(answer, str):
            raise ValueError(f"{where}: 'answer' must be a str, got {type(answer).__name__}.")
        return [(strip_image_placeholder(question, self.image_placeholder), answer.strip())]

    def _encode_turn(self, prompt: str, answer: str, first: bool) -> tuple[list[int], list[bool]]:
        """Token ids of ``prompt + " " + answer`` + EOS, and which of them belong to the answer.

        The turn is tokenized as *one* text so the tokens match what the model sees when it generates after the
        prompt (tokenizing the answer on its own can give different tokens, e.g. an extra "▁" with SentencePiece).
        With a fast tokenizer, a token is an answer token when its character span reaches past the end of the prompt;
        without offsets, the prompt is tokenized alone and its length is used as the boundary.
        """
        tok = self.tokenizer
        text = build_prompt(prompt, answer, self.prompt_template)
        boundary = len(build_prompt(prompt, None, self.prompt_template))
        ids: list[int]
        supervised: list[bool]
        try:
            enc = tok(text, add_special_tokens=first, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            supervised = [end > boundary for (_start, end) in enc["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError, KeyError):
            ids = list(tok(text, add_special_tokens=first)["input_ids"])
            n_prompt = len(tok(text[:boundary], add_special_tokens=first)["input_ids"])
            supervised = [i >= n_prompt for i in range(len(ids))]
        ids.append(int(tok.eos_token_id))
        supervised.append(True)
        return ids, supervised

    def _leading_special(self) -> int:
        """How many special tokens (e.g. BOS) the tokenizer puts in front of a text; kept when truncating."""
        if self._bos_len is None:
            with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
            n = 0
            if without and len(with_special) >= len(without):
                for k in range(len(with_special) - len(without) + 1):
                    if list(with_special[k : k + len(without)]) == list(without):
                        n = k
                        break
            self._bos_len = n
        return self._bos_len

    def _encode_record(self, record: Mapping[str, Any], where: str) -> tuple[list[int], list[int]]:
        turns = self._turns(record, where)
        ids: list[int] = []
        supervised: list[bool] = []
        first_prompt_len = 0
        for t, (question, answer) in enumerate(turns):
            turn_ids, turn_sup = self._encode_turn(question, answer, first=(t == 0))
            if t == 0:
                first_prompt_len = next((i for i, s in enumerate(turn_sup) if s), len(turn_sup))
            ids += turn_ids
            supervised += turn_sup
        if self.max_length is not None and len(ids) > self.max_length:
            excess = len(ids) - self.max_length
            keep_front = min(self._leading_special(), first_prompt_len)
            removable = max(first_prompt_len - keep_front, 0)
            cut = min(excess, removable)
            if cut:
                ids = ids[:keep_front] + ids[keep_front + cut :]
                supervised = supervised[:keep_front] + supervised[keep_front + cut :]
            ids, supervised = ids[: self.max_length], supervised[: self.max_length]
        if not any(supervised):
            raise ValueError(f"{where}: no answer token fits in max_length={self.max_length}.")
        if self.answer_only_loss:
            labels = [i if s else IGNORE_INDEX for i, s in zip(ids, supervised)]
        else:
            labels = list(ids)
        return ids, labels

    # ------------------------------------------------------------------------------------------------ images
    def _record_images(self, record: Mapping[str, Any], where: str) -> tuple[list[Any], bool]:
        """Images of a record as RGB PIL images, and whether the record gave a list (multi-image layout)."""
        raw = record.get("image")
        if raw is None:
            return [], False
        is_list = isinstance(raw, (list, tuple))
        items = list(raw) if is_list else [raw]
        images = []
        for k, item in enumerate(items):
            if item is None:
                continue
            label = f"{where}, image {k}" if is_list else where
            if self.image_processor is None:
                raise ValueError(f"{label}: the record has an image but the collator has no image_processor.")
            try:
                images.append(to_rgb_image(item, self.image_folder, self.array_value_range))
            except FileNotFoundError as exc:
                folder = f" (image_folder={os.fspath(self.image_folder)!r})" if self.image_folder is not None else ""
                raise ValueError(f"{label}: missing image file: {exc}{folder}") from exc
            except ValueError as exc:
                raise ValueError(f"{label}: unreadable image: {exc}") from exc
        return images, is_list

    def _process(self, images: list[Any]) -> torch.Tensor:
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.as_tensor(np.asarray(pixel_values))
        expected_dims = 4 if self.image_input_name == "pixel_values" else 3  # (N, C, H, W) or (N, tokens, dim)
        if pixel_values.dim() != expected_dims or pixel_values.shape[0] != len(images):
            raise ValueError(
                f"MemVPDataCollator: the image processor returned pixel_values of shape {tuple(pixel_values.shape)} "
                f"for {len(images)} images; expected ({len(images)}, C, H, W) (one fixed size for all images)."
            )
        return pixel_values

    def _empty_image_shape(self) -> tuple[torch.Size, torch.dtype]:
        """Shape of one processed image, found once by processing a black image (for all-text-only batches)."""
        if self._empty_image is None:
            Image = _pil()
            dummy = self._process([Image.new("RGB", (64, 64))])
            self._empty_image = (dummy.shape[1:], dummy.dtype)
        return self._empty_image

    # ------------------------------------------------------------------------------------------------ __call__
    def __call__(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch: prompt + answer tokens, answer-only labels, right padding, images."""
        if self.seq2seq:
            return self.seq2seq_batch(records)
        texts, per_record_images, any_list = self._read(records, with_answers=True)
        batch = self._pad([ids for ids, _ in texts], [labels for _, labels in texts])
        return self._add_images(batch, per_record_images, any_list)

    def prompts(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A generation batch: each record's first question as a prompt, with its images. Answers, if present, are
        ignored. Decoder-only: LEFT-padded (`generate` continues from the last position). Seq2seq: the encoder input,
        right-padded like `seq2seq_batch` (models with absolute positions, e.g. BART, must see the same positions)."""
        if self.seq2seq:
            return self._encoder_inputs(records)
        texts, per_record_images, any_list = self._read(records, with_answers=False)
        length = max(len(ids) for ids, _ in texts)
        input_ids = torch.full((len(texts), length), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((len(texts), length), dtype=torch.long)
        for row, (ids, _) in enumerate(texts):
            input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids) :] = 1
        return self._add_images({"input_ids": input_ids, "attention_mask": attention_mask}, per_record_images, any_list)

    def seq2seq_batch(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Encoder-decoder layout: the prompt feeds the encoder, the answer (+EOS) is the decoder's `labels`."""
        batch = self._encoder_inputs(records)
        answers = []
        for index, record in enumerate(records):
            turns = self._turns(record, f"record {index}")
            ids = list(self.tokenizer(" " + turns[0][1], add_special_tokens=False)["input_ids"])
            answers.append(ids + [int(self.tokenizer.eos_token_id)])
        width = max(len(a) for a in answers)
        labels = torch.full((len(answers), width), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(answers):
            labels[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch["labels"] = labels
        return batch

    def _encoder_inputs(self, records: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Each record's first question, right-padded, with its images: the encoder side of a seq2seq batch."""
        texts, per_record_images, any_list = self._read(records, with_answers=False)
        batch = self._pad([ids for ids, _ in texts], [ids for ids, _ in texts])
        batch.pop("labels")
        return self._add_images(batch, per_record_images, any_list)

    def _read(self, records: Sequence[Mapping[str, Any]], with_answers: bool):
        if not isinstance(records, Sequence) or len(records) == 0:
            raise ValueError("MemVPDataCollator: expected a non-empty list of records.")
        texts: list[tuple[list[int], list[int]]] = []
        per_record_images: list[list[Any]] = []
        any_list = False
        for index, record in enumerate(records):
            rid = record.get("id") if isinstance(record, Mapping) else None
            where = f"record {index}" + (f" (id={rid!r})" if rid is not None else "")
            if not isinstance(record, Mapping):
                raise ValueError(f"{where}: a record must be a dict, got {type(record).__name__}.")
            if with_answers:
                texts.append(self._encode_record(record, where))
            else:
                question = self._turns(record, where, need_answer=False)[0][0]
                ids = list(self.tokenizer(build_prompt(question, None, self.prompt_template))["input_ids"])
                texts.append((ids, ids))
            images, is_list = self._record_images(record, where)
            if self.num_images is not None and len(images) > self.num_images:
                raise ValueError(f"{where}: has {len(images)} images but num_images={self.num_images}.")
            any_list = any_list or is_list
            per_record_images.append(images)
        return texts, per_record_images, any_list

    def _add_images(
        self, batch: dict[str, torch.Tensor], per_record_images: list[list[Any]], any_list: bool
    ) -> dict[str, torch.Tensor]:
        if self.image_processor is None:
            return batch
        batch_size = len(per_record_images)
        flat = [image for images in per_record_images for image in images]
        if flat:
            processed = self._process(flat)
            image_shape, dtype = processed.shape[1:], processed.dtype
        else:
            processed = None
            image_shape, dtype = self._empty_image_shape()

        multi = self.num_images is not None or any_list
        slots = self.num_images if self.num_images is not None else max([len(i) for i in per_record_images] + [1])
        if multi:
            pixel_values = torch.zeros((batch_size, slots, *image_shape), dtype=dtype)
            image_mask = torch.zeros((batch_size, slots), dtype=torch.bool)
        else:
            pixel_values = torch.zeros((batch_size, *image_shape), dtype=dtype)
            image_mask = torch.zeros((batch_size,), dtype=torch.bool)
        cursor = 0
        for row, images in enumerate(per_record_images):
            for slot in range(len(images)):
                assert processed is not None
                if multi:
                    pixel_values[row, slot] = processed[cursor]
                    image_mask[row, slot] = True
                else:
                    pixel_values[row] = processed[cursor]
                    image_mask[row] = True
                cursor += 1
        batch[self.image_input_name] = pixel_values
        batch["image_mask"] = image_mask
        return batch

    def _pad(self, all_ids: list[list[int]], all_labels: list[list[int]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest row (rounded up to ``pad_to_multiple_of``); padding is -100 in the labels."""
        length = max(len(ids) for ids in all_ids)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(all_ids)
        input_ids = torch.full((batch_size, length), int(self.tokenizer.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, labs) in enumerate(zip(all_ids, all_labels)):
            n = len(ids)
            input_ids[row, :n] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            labels[row, :n] = torch.tensor(labs, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------------


def _resolve_image_field(
    value: Any, image_folder: Optional[PathLike], check_images: bool, where: str
) -> Union[None, str, list[Optional[str]]]:
    """Resolve an ``image`` field (path or list of paths) against ``image_folder``; check the files exist."""
    if value is None or value == "":
        return None

    def one(item: Any, label: str) -> Optional[str]:
        if item is None:
            return None
        if not isinstance(item, str) or not item:
            raise ValueError(f"{label}: 'image' must be a file path (str), got {item!r}.")
        path = item
        if image_folder is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_folder), path)
        if check_images and not os.path.isfile(path):
            raise ValueError(f"{label}: missing image file {path!r}.")
        return path

    if isinstance(value, list):
        return [one(item, f"{where}, image {k}") for k, item in enumerate(value)]
    return one(value, where)


def load_llava_json(
    path: PathLike, image_folder: Optional[PathLike] = None, *, check_images: bool = True
) -> list[dict[str, Any]]:
    """Load a LLaVA-format JSON file (a list of ``{"id", "image", "conversations"}``); also accepts JSON Lines.

    Image paths are resolved against ``image_folder`` (absolute paths are kept) so the records can go straight to a
    :class:`MemVPDataCollator` without it.  Records without ``image`` are text-only.  Each record's structure
    (human/gpt alternation, non-empty answers) is checked by the collator; this function checks the file itself,
    the ``conversations`` field and, with ``check_images``, that every image file exists -- one bad path is
    reported at load time with its file and entry, not hours into training.  Errors are ``ValueError``s naming the
    file and the entry (index in the list, or line number for JSON Lines).
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
        entries: list[tuple[str, Any]]
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
        entries = [(f"{path}: entry {i}", item) for i, item in enumerate(data)]
    except json.JSONDecodeError as exc:
        lines = text.splitlines()
        non_empty = [line for line in lines if line.strip()]
        if len(non_empty) <= 1:
            raise ValueError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
        entries = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}: line {lineno}", json.loads(line)))
            except json.JSONDecodeError as line_exc:
                raise ValueError(f"{path}: line {lineno}: invalid JSON: {line_exc.msg}") from line_exc
    records = []
    for where, item in entries:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(item).__name__}.")
        if "conversations" not in item:
            raise ValueError(f"{where}: LLaVA record has no 'conversations' field.")
        if not isinstance(item["conversations"], list) or not item["conversations"]:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list.")
        record = dict(item)
        record["image"] = _resolve_image_field(item.get("image"), image_folder, check_images, where)
        records.append(record)
    return records


def load_jsonl(
    path: PathLike, image_folder: Optional[PathLike] = None, *, check_images: bool = True, require_answer: bool = True
) -> list[dict[str, Any]]:
    """Load a simple JSON Lines file: one ``{"image": ..., "question": ..., "answer": ...}`` object per line.

    ``image`` may be absent/null (text-only row), a path (relative to ``image_folder``) or a list of paths;
    ``prompt`` is accepted instead of ``question``.  Other fields are kept.  Blank lines are skipped.  Errors are
    ``ValueError``s naming the file and line: invalid JSON, a non-object line, missing question or answer, a blank
    answer, and (with ``check_images``) a missing image file. ``require_answer=False`` reads question files for
    inference, where ``answer`` may be absent.
    """
    path = os.fspath(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno}).") from exc
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}.")
            question = item.get("question", item.get("prompt"))
            if not isinstance(question, str):
                raise ValueError(f"{where}: missing 'question' (or 'prompt') string field.")
            answer = item.get("answer")
            if require_answer and (not isinstance(answer, str) or not answer.strip()):
                raise ValueError(f"{where}: missing or empty 'answer' string field.")
            record = dict(item)
            record["image"] = _resolve_image_field(item.get("image"), image_folder, check_images, where)
            records.append(record)
    return records
