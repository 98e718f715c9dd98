"""Dataset files -> records: LLaVA conversation JSON (or JSON Lines) and simple image/question/answer JSONL.

The loaders check what a file can get wrong -- invalid JSON, a non-object entry, a missing field, an image file that
does not exist -- and report it with the file and the entry or line, at load time rather than hours into training.
Image paths are resolved against ``image_folder`` here, so the records go to a :class:`MemVPDataCollator` as they
are.  The structure of a conversation (human/gpt alternation, non-empty answers) is the collator's to check
(:func:`memvp_peft.data.conversations.record_turns`), for records from any source.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Union

from .images import PathLike

__all__ = ["load_jsonl", "load_llava_json"]


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
