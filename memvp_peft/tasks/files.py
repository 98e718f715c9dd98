"""Dataset files -> records: LLaVA conversation JSON (or JSON Lines) and simple image/question/answer JSONL.

The loaders check what a file can get wrong -- invalid JSON or UTF-8, JSON nested too deeply to read, a non-object
entry, a missing field, an image or video path leading outside ``image_folder``, an image file that is missing, not
an image or over the pixel limit (:func:`memvp_peft.data.images.check_image_files`) -- and report it with the file
and the entry or line, at load time rather than hours into training.  So are the images that would never reach the
model: an image path in a field the collator does not read (``image_path``, ``img``, a capitalised ``Image``;
``image_column=`` names the field to read instead), and text that marks another number of images than the record
gives (:func:`memvp_peft.data.conversations.check_image_marks`: a LLaVA ``<image>`` with no image).  Image and video
paths (``image``, ``images``, ``video``, ``frames``) are resolved against ``image_folder`` here, so the records go
to a :class:`MemVPDataCollator` as they are.  The structure of a conversation (human/gpt alternation, non-empty
answers) is the collator's to check (:func:`memvp_peft.data.conversations.record_dialogue`), for records from any
source; each record carries its place in the file (:data:`ORIGIN_FIELD`) so that those errors name the dataset line
too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union

from ..data.conversations import ORIGIN_FIELD, check_image_marks, record_dialogue
from ..data.images import (
    PRECOMPUTED_FIELDS,
    RAW_IMAGE_FIELDS,
    PathLike,
    check_image_files,
    image_field,
    image_pixel_limit,
    resolve_image_path,
)
from ..data.video import FRAME_FIELDS

__all__ = ["load_jsonl", "load_llava_json"]


class _Images:
    """One load's image policy, and the (path, where) pairs its records name, checked together at the end."""

    def __init__(self, dataset: str, image_folder: Optional[PathLike], check: bool, decode: bool,
                 max_image_pixels: Optional[int], allow_outside: bool, image_column: Optional[str] = None,
                 image_names: Optional[Callable[[str], bool]] = None) -> None:
        self.image_names = image_names
        self.folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(dataset)
        self.check, self.decode, self.allow_outside = check, decode, allow_outside
        self.max_pixels = image_pixel_limit(max_image_pixels)  # a bad limit is refused before the file is read
        if image_column is not None and (not isinstance(image_column, str) or not image_column):
            raise ValueError(f"image_column must be a field name (str), got {image_column!r}.")
        self.image_column = None if image_column == "image" else image_column
        self.pending: list[tuple[str, str]] = []

    def resolve(self, value: Any, where: str, what: str = "image") -> Union[None, str, list[Optional[str]]]:
        """An image field (a path or a list of paths) resolved against the folder; missing/null is text-only."""
        if value is None or value == "":
            return None

        def one(item: Any, label: str) -> Optional[str]:
            if item is None:
                return None
            if self.image_names is not None and isinstance(item, str) and self.image_names(item):
                return item  # a name the caller resolves, not a path
            path = resolve_image_path(item, self.folder, self.allow_outside, label, what)
            self.pending.append((path, label))
            return path

        if isinstance(value, list):
            return [one(item, f"{where}, {what} {k}") for k, item in enumerate(value)]
        return one(value, where)

    def record(self, item: dict, where: str) -> dict:
        """The record as the collator gets it: its image and video paths resolved, its place in the file attached;
        refused when it holds an image the collator would not read or marks images it does not give."""
        record = dict(item)
        if self.image_column is not None:
            if record.get("image") is not None:
                raise ValueError(f"{where}: has both 'image' and the image_column {self.image_column!r}; give the "
                                 "images in one field.")
            record["image"] = record.pop(self.image_column, None)
        if isinstance(record.get("images"), list):  # a bare str under 'images' is refused by image_field below
            record["images"] = self.resolve(record["images"], where)
        record["image"] = self.resolve(record.get("image"), where)
        for field in FRAME_FIELDS:
            if isinstance(record.get(field), str):  # a video file: the path rule; the collator decodes its frames
                record[field] = resolve_image_path(record[field], self.folder, self.allow_outside, where, "video")
            elif isinstance(record.get(field), list):  # frames, each an image
                record[field] = self.resolve(record[field], where, "frame")
        record[ORIGIN_FIELD] = where
        image_field(record, where, read_video=True)  # two image fields, a stray image path, a bare 'images' str
        _check_marks(record, where)
        return record

    def check_all(self) -> None:
        if self.check:
            check_image_files(self.pending, self.decode, self.max_pixels)


def _check_marks(record: dict, where: str) -> None:
    """The marks of the record's text against its raw images, at load time (precomputed tensors and video are
    counted by the collator).  A record whose text the collator will refuse anyway is left to it: it names the
    problem with every check of the layout."""
    if any(record.get(field) is not None for field in PRECOMPUTED_FIELDS + ("video", "frames")):
        return
    try:
        dialogue = record_dialogue(record, where, need_answer=False)
    except ValueError:
        return
    given = 0
    for field in RAW_IMAGE_FIELDS:
        value = record.get(field)
        given += sum(item is not None for item in value) if isinstance(value, list) else value is not None
    check_image_marks(dialogue, given, where, fields=record.keys())


def _where(base: str, item: Any) -> str:
    """How errors (and the collator, through ``ORIGIN_FIELD``) name a record: its place in the file, and its id."""
    rid = item.get("id") if isinstance(item, dict) else None
    return base + (f" (id={rid!r})" if rid is not None else "")


def _parse_line(line: str, where: str) -> Any:
    try:
        return json.loads(line.rstrip("\r\n"))  # with its newline, an unfinished line's error would be on "line 2"
    except json.JSONDecodeError as exc:  # a line on its own: json's column is the column in the file
        raise ValueError(f"{where}, column {exc.colno}: invalid JSON: {exc.msg}.") from exc
    except RecursionError as exc:
        raise ValueError(f"{where}: {_TOO_DEEP}") from exc


# json reads nested arrays and objects recursively: past Python's recursion limit it raises RecursionError
_TOO_DEEP = ("JSON nested too deeply to read (deeper than Python's recursion limit, about "
             f"{sys.getrecursionlimit()} levels); a dataset record is a few levels deep.")


def _deepest_line(text: str) -> int:
    """The line on which `text`'s JSON nesting is deepest (brackets inside strings not counted): where to look when
    the whole file is too deep to parse."""
    depth = deepest = 0
    line = deepest_line = 1
    in_string = escaped = False
    for char in text:
        if char == "\n":
            line += 1
        elif in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, deepest_line = depth, line
        elif char in "]}":
            depth -= 1
    return deepest_line


def _utf8_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; split on "\\n" only, as json counts lines."""
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: not UTF-8 text (byte {exc.start + 1}: {exc.reason}).") from exc
            if line.strip():
                yield lineno, line


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"{path}: line {lineno}: not UTF-8 text ({exc.reason}).") from exc


def load_llava_json(
    path: PathLike,
    image_folder: Optional[PathLike] = None,
    *,
    check_images: bool = True,
    decode_images: bool = True,
    max_image_pixels: Optional[int] = None,
    allow_outside_image_folder: bool = False,
    image_column: Optional[str] = None,
) -> list[dict[str, Any]]:
    """Load a LLaVA-format JSON file (a list of ``{"id", "image", "conversations"}``); also accepts JSON Lines.

    Image paths (``image``, ``images``; ``video`` and ``frames`` too) are resolved against ``image_folder``
    (default: the dataset file's folder) so the records can go straight to a :class:`MemVPDataCollator` without it;
    a path leading outside the folder (absolute, or with ``..``) is refused unless
    ``allow_outside_image_folder=True``.  Records without ``image`` are text-only; ``image_column`` names another
    field to read the images from (it becomes ``image``).  An image path in a field that is not read, and a text
    marking more or fewer images (``<image>``) than the record gives, are refused.  With
    ``check_images`` every image file is opened: it must exist, be an image within ``max_image_pixels`` (default:
    ``PIL.Image.MAX_IMAGE_PIXELS``) and, with ``decode_images``, decode completely (``decode_images=False`` reads
    only the header: much faster on large datasets, and corrupt pixel data is then found by the collator).  Each
    record's structure (human/gpt alternation, non-empty answers) is checked by the collator; this function checks
    the file itself and the ``conversations`` field.  Errors are ``ValueError``s naming the file and the entry
    (index in the list and id, or line number for JSON Lines; line and column for invalid JSON); nothing is
    written.
    """
    path = os.fspath(path)
    images = _Images(path, image_folder, check_images, decode_images, max_image_pixels, allow_outside_image_folder,
                     image_column)
    text = _read_text(path)
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}.")
        entries = [(_where(f"{path}: entry {i}", item), item) for i, item in enumerate(data)]
    except RecursionError as exc:
        raise ValueError(f"{path}: line {_deepest_line(text)}: {_TOO_DEEP}") from exc
    except json.JSONDecodeError as exc:
        # JSON Lines reads as one object followed by "Extra data"; anything else is a JSON error where json says.
        if exc.msg != "Extra data" or not text.lstrip().startswith("{"):
            raise ValueError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}.") from exc
        entries = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                item = _parse_line(line, f"{path}: line {lineno}")
                entries.append((_where(f"{path}: line {lineno}", item), item))
    records = []
    for where, item in entries:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(item).__name__}.")
        if "conversations" not in item:
            raise ValueError(f"{where}: LLaVA record has no 'conversations' field.")
        if not isinstance(item["conversations"], list) or not item["conversations"]:
            raise ValueError(f"{where}: 'conversations' must be a non-empty list.")
        records.append(images.record(item, where))
    images.check_all()
    return records


def load_jsonl(
    path: PathLike,
    image_folder: Optional[PathLike] = None,
    *,
    check_images: bool = True,
    require_answer: bool = True,
    decode_images: bool = True,
    max_image_pixels: Optional[int] = None,
    allow_outside_image_folder: bool = False,
    image_column: Optional[str] = None,
    image_names: Optional[Callable[[str], bool]] = None,
) -> list[dict[str, Any]]:
    """Load a simple JSON Lines file: one ``{"image": ..., "question": ..., "answer": ...}`` object per line.

    ``image`` may be absent/null (text-only row), a path (relative to ``image_folder``, default: the file's folder)
    or a list of paths; ``prompt`` is accepted instead of ``question``.  Other fields are kept.  Blank lines are
    skipped.  Errors are ``ValueError``s naming the file and line: invalid JSON (with its column) or UTF-8, a
    non-object line, missing question or answer, a blank answer, and the image checks of :func:`load_llava_json`
    (the same ``check_images``, ``decode_images``, ``max_image_pixels``, ``allow_outside_image_folder`` and
    ``image_column``).
    ``require_answer=False`` reads question files for inference, where ``answer`` may be absent.
    ``image_names`` tells the image values that are names rather than paths (memvp-infer's built-in
    ``digits:INDEX``): they are left as written, for the caller to resolve.
    """
    path = os.fspath(path)
    images = _Images(path, image_folder, check_images, decode_images, max_image_pixels, allow_outside_image_folder,
                     image_column, image_names)
    records = []
    for lineno, line in _utf8_lines(path):
        item = _parse_line(line, f"{path}: line {lineno}")
        where = _where(f"{path}: line {lineno}", item)
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}.")
        question = item.get("question", item.get("prompt"))
        if not isinstance(question, str):
            raise ValueError(f"{where}: missing 'question' (or 'prompt') string field.")
        answer = item.get("answer")
        if require_answer and (not isinstance(answer, str) or not answer.strip()):
            raise ValueError(f"{where}: missing or empty 'answer' string field.")
        records.append(images.record(item, where))
    images.check_all()
    return records
