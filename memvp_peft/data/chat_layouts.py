"""The chat layouts of Hub datasets -> (user, assistant) exchanges: TRL's ``messages`` and the_cauldron's ``texts``.

``messages`` (TRL, HuggingFaceH4/llava-instruct-mix-vsft) with typed or plain-string content::

    {"images": [<PIL>],
     "messages": [{"role": "system", "content": "Answer briefly."},                      # optional, first only
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]}

The ``{"type": "image"}`` entries only mark where an image was: MemVP has no image token, so they render to nothing;
they are counted, and the collator checks the count against the images the record gives (a mismatch means images
and text do not belong together).  Plain-string content marks images with ``<image>`` placeholders, if at all: those
are counted instead, and when a record's strings have none there is nothing to check.  An entry that carries the image itself (``{"type": "image", "image": <PIL>}``) or
another kind of media is refused: its image would be dropped silently.  A message's text entries are joined with a
newline.  ``datasets`` stores typed content as structs with every key of the column (``{"type": "image", "text":
None}``): keys whose value is None are ignored.

the_cauldron (HuggingFaceM4/the_cauldron)::

    {"images": [<PIL>], "texts": [{"user": "What digit?", "assistant": "seven", "source": "..."}, ...]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .prompts import strip_image_placeholder

__all__ = ["cauldron_exchanges", "messages_exchanges"]

# keys under which a content entry could carry an image (or its location) inline instead of marking its place
_INLINE_MEDIA_KEYS = ("image", "url", "path", "image_url", "video")


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _content_text(content: Any, label: str, placeholder: str) -> tuple[str, int, bool]:
    """A message's text (its text entries joined by newlines, placeholders removed), its image-entry count (of a
    string: its placeholders) and whether the content is typed."""
    if isinstance(content, str):
        return strip_image_placeholder(content, placeholder), content.count(placeholder), False
    if not _is_list(content):
        raise ValueError(
            f"{label}: 'content' must be a str or a list of {{'type': 'text'|'image', ...}} entries, got "
            f"{type(content).__name__}."
        )
    parts: list[str] = []
    images = 0
    for e, entry in enumerate(content):
        where = f"{label}, content entry {e}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("type"), str):
            raise ValueError(f"{where}: must be a dict with a 'type' ('text' or 'image'), got {entry!r}.")
        kind = entry["type"]
        if kind == "text":
            if not isinstance(entry.get("text"), str):
                raise ValueError(f"{where}: a text entry needs a 'text' string, got {entry.get('text')!r}.")
            parts.append(strip_image_placeholder(entry["text"], placeholder))
        elif kind == "image":
            inline = [key for key in _INLINE_MEDIA_KEYS if entry.get(key) is not None]
            if inline:
                raise ValueError(
                    f"{where}: the image entry carries the image itself ({inline}); MemVPDataCollator reads a record's "
                    "images from its 'images' (or 'image') field and the entry only marks its place: move the images "
                    "into an 'images' list, in the order of their entries."
                )
            images += 1
        else:
            raise ValueError(
                f"{where}: content type {kind!r} is not read (only 'text' and 'image'); video is not supported yet."
            )
    return "\n".join(parts), images, True


def messages_exchanges(
    messages: Any, where: str, placeholder: str, need_answer: bool
) -> tuple[Optional[str], list[tuple[str, str]], Optional[int]]:
    """The system text, the (user, assistant) exchanges and the image-entry count of a ``messages`` list (None when
    no content is typed and no string holds a placeholder: then the text says nothing about the images).

    An optional ``system`` message comes first; then user and assistant alternate, starting with the user, and (for
    training) end with the assistant.  Assistant texts are stripped and must not be empty.
    """
    if not _is_list(messages) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} messages.")
    system: Optional[str] = None
    exchanges: list[tuple[str, str]] = []
    pending: Optional[str] = None
    images = 0
    typed = False
    for m, message in enumerate(messages):
        label = f"{where}: message {m}"
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{label} must be a dict with 'role' and 'content'.")
        role = str(message["role"]).lower()
        text, count, is_typed = _content_text(message["content"], label, placeholder)
        images += count
        typed = typed or is_typed
        expected = "user" if pending is None else "assistant"
        if role == "system" and m == 0:
            system = text
            continue
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"{label}: unknown role {message['role']!r} (expected 'system', 'user' or 'assistant').")
        if role != expected:
            raise ValueError(
                f"{label}: messages must alternate user/assistant, starting with the user (after an optional first "
                f"system message); message {m} is from {message['role']!r} but {expected!r} was expected."
            )
        if role == "user":
            pending = text
            continue
        if not text.strip():
            raise ValueError(f"{where}: empty answer (assistant message {m}).")
        exchanges.append((pending or "", text.strip()))
        pending = None
    if pending is not None and need_answer:
        raise ValueError(
            f"{where}: messages must end with an assistant message; the last user message (message "
            f"{len(messages) - 1}) has no answer."
        )
    if pending is not None:
        exchanges.append((pending, ""))
    if not exchanges:
        raise ValueError(f"{where}: 'messages' holds no user message.")
    return system, exchanges, images if typed or images else None


def cauldron_exchanges(texts: Any, where: str, placeholder: str, need_answer: bool) -> list[tuple[str, str]]:
    """The exchanges of a the_cauldron ``texts`` list (``source`` and other keys are not read)."""
    if not _is_list(texts) or not texts:
        raise ValueError(f"{where}: 'texts' must be a non-empty list of {{'user', 'assistant'}} exchanges.")
    exchanges = []
    for t, item in enumerate(texts):
        if not isinstance(item, Mapping) or not isinstance(item.get("user"), str) or not isinstance(
            item.get("assistant"), str
        ):
            raise ValueError(f"{where}: texts item {t} must be a dict with 'user' and 'assistant' strings.")
        answer = strip_image_placeholder(item["assistant"], placeholder).strip()
        if need_answer and not answer:
            raise ValueError(f"{where}: empty answer (texts item {t}).")
        exchanges.append((strip_image_placeholder(item["user"], placeholder), answer))
    return exchanges
