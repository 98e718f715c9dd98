"""The chat layouts of Hub datasets -> (user, assistant) exchanges: TRL's ``messages``, TRL's conversational
``prompt``/``completion`` and the_cauldron's ``texts``.

``messages`` (TRL, HuggingFaceH4/llava-instruct-mix-vsft) with typed or plain-string content::

    {"images": [<PIL>],
     "messages": [{"role": "system", "content": "Answer briefly."},                      # optional, first only
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]}

The ``{"type": "image"}`` entries only mark where an image was: MemVP has no image token, so they render to nothing;
they are counted, together with any ``<image>`` placeholder in the text, and the count is checked against the images
the record gives (``conversations.check_image_marks``: a mismatch means images and text do not belong together).
Plain-string content marks images with ``<image>`` placeholders, if at all; when a record's strings have none (and no
content is typed) there is nothing to check.  An entry that carries the image itself (``{"type": "image", "image":
<PIL>}``) or another kind of media is refused: its image would be dropped silently.  A message's text entries are
joined with a newline.  ``datasets`` stores typed content as structs with every key of the column (``{"type":
"image", "text": None}``; llava-instruct-mix adds an ``index``): keys whose value is None are ignored.

TRL's conversational prompt/completion layout splits the same messages in two, the images in ``images``::

    {"images": [<PIL>],
     "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]}],
     "completion": [{"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]}

It reads as the messages ``prompt + completion``; assistant messages inside the prompt are context (shown, never
supervised), as TRL trains on the completion only.

the_cauldron (HuggingFaceM4/the_cauldron)::

    {"images": [<PIL>], "texts": [{"user": "What digit?", "assistant": "seven", "source": "..."}, ...]}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

from .prompts import strip_image_placeholder

__all__ = ["cauldron_exchanges", "messages_exchanges", "prompt_completion_exchanges"]

# keys under which a content entry could carry an image (or its location) inline instead of marking its place
_INLINE_MEDIA_KEYS = ("image", "url", "path", "image_url", "video")


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _content_text(content: Any, label: str, placeholder: str) -> tuple[str, int, bool]:
    """A message's text (its text entries joined by newlines, placeholders removed), how many images it marks
    (``{"type": "image"}`` entries and ``placeholder``s) and whether the content is typed."""
    if isinstance(content, str):
        return strip_image_placeholder(content, placeholder), content.count(placeholder), False
    if not _is_list(content):
        raise ValueError(
            f"{label}: 'content' must be a str or a list of {{'type': 'text'|'image', ...}} entries, got "
            f"{type(content).__name__}."
        )
    parts: list[str] = []
    marks = 0
    for e, entry in enumerate(content):
        where = f"{label}, content entry {e}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("type"), str):
            raise ValueError(f"{where}: must be a dict with a 'type' ('text' or 'image'), got {entry!r}.")
        kind = entry["type"]
        if kind == "text":
            if not isinstance(entry.get("text"), str):
                raise ValueError(f"{where}: a text entry needs a 'text' string, got {entry.get('text')!r}.")
            parts.append(strip_image_placeholder(entry["text"], placeholder))
            marks += entry["text"].count(placeholder)
        elif kind == "image":
            inline = [key for key in _INLINE_MEDIA_KEYS if entry.get(key) is not None]
            if inline:
                raise ValueError(
                    f"{where}: the image entry carries the image itself ({inline}); MemVPDataCollator reads a record's "
                    "images from its 'images' (or 'image') field and the entry only marks its place: move the images "
                    "into an 'images' list, in the order of their entries."
                )
            marks += 1
        else:
            raise ValueError(
                f"{where}: content type {kind!r} is not read (only 'text' and 'image'); video is not supported yet."
            )
    return "\n".join(parts), marks, True


def messages_exchanges(
    messages: Any, where: str, placeholder: str, need_answer: bool
) -> tuple[Optional[str], list[tuple[str, str]], Optional[int]]:
    """The system text, the (user, assistant) exchanges and the image marks of a ``messages`` list (None when no
    content is typed and no string holds a placeholder: then the text says nothing about the images).

    An optional ``system`` message comes first; then user and assistant alternate, starting with the user, and (for
    training) end with the assistant.  Assistant texts are stripped and must not be empty.
    """
    if not _is_list(messages) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} messages.")
    return _exchanges([(f"{where}: message {m}", message) for m, message in enumerate(messages)], where, placeholder,
                      need_answer)


def prompt_completion_exchanges(
    prompt: Any, completion: Any, where: str, placeholder: str, need_answer: bool
) -> tuple[Optional[str], list[tuple[str, str]], Optional[int], int]:
    """:func:`messages_exchanges` of TRL's conversational ``prompt + completion``, plus how many leading exchanges
    are context: those answered inside the prompt, which TRL does not train on.  Messages are named by the list
    they are in (``prompt message 1``, ``completion message 0``).  A generation prompt needs no completion."""
    if not _is_list(prompt) or not prompt:
        raise ValueError(f"{where}: a conversational 'prompt' must be a non-empty list of {{'role', 'content'}} "
                         "messages.")
    if completion is None and not need_answer:
        completion = []
    if not _is_list(completion) or (need_answer and not completion):
        raise ValueError(
            f"{where}: with a conversational 'prompt' (a list of messages), 'completion' must be a non-empty list of "
            f"messages holding the assistant's answer (TRL's prompt/completion layout), got {completion!r}."
        )
    labelled = [(f"{where}: prompt message {m}", message) for m, message in enumerate(prompt)]
    labelled += [(f"{where}: completion message {m}", message) for m, message in enumerate(completion)]
    system, exchanges, marks = _exchanges(labelled, where, placeholder, need_answer)
    context = sum(1 for message in prompt if isinstance(message, Mapping) and
                  str(message.get("role")).lower() == "assistant")
    return system, exchanges, marks, context


def _exchanges(
    labelled: list[tuple[str, Any]], where: str, placeholder: str, need_answer: bool
) -> tuple[Optional[str], list[tuple[str, str]], Optional[int]]:
    """The rules of :func:`messages_exchanges` over ``(label, message)`` pairs, each error naming its message."""
    system: Optional[str] = None
    exchanges: list[tuple[str, str]] = []
    pending: Optional[str] = None
    marks = 0
    typed = False
    for m, (label, message) in enumerate(labelled):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"{label} must be a dict with 'role' and 'content'.")
        role = str(message["role"]).lower()
        text, count, is_typed = _content_text(message["content"], label, placeholder)
        marks += count
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
                f"system message); {label.rsplit(': ', 1)[-1]} is from {message['role']!r} but {expected!r} was "
                "expected."
            )
        if role == "user":
            pending = text
            continue
        if not text.strip():
            raise ValueError(f"{where}: empty answer (assistant {label.rsplit(': ', 1)[-1]}).")
        exchanges.append((pending or "", text.strip()))
        pending = None
    if pending is not None and need_answer:
        raise ValueError(
            f"{where}: messages must end with an assistant message; the last user message "
            f"({labelled[-1][0].rsplit(': ', 1)[-1]}) has no answer."
        )
    if pending is not None:
        exchanges.append((pending, ""))
    if not exchanges:
        raise ValueError(f"{where}: 'messages' holds no user message.")
    return system, exchanges, marks if typed or marks else None


def cauldron_exchanges(texts: Any, where: str, placeholder: str, need_answer: bool
                       ) -> tuple[list[tuple[str, str]], Optional[int]]:
    """The exchanges of a the_cauldron ``texts`` list (``source`` and other keys are not read) and the ``<image>``
    placeholders its texts hold (None without any)."""
    if not _is_list(texts) or not texts:
        raise ValueError(f"{where}: 'texts' must be a non-empty list of {{'user', 'assistant'}} exchanges.")
    exchanges = []
    marks = 0
    for t, item in enumerate(texts):
        if not isinstance(item, Mapping) or not isinstance(item.get("user"), str) or not isinstance(
            item.get("assistant"), str
        ):
            raise ValueError(f"{where}: texts item {t} must be a dict with 'user' and 'assistant' strings.")
        answer = strip_image_placeholder(item["assistant"], placeholder).strip()
        if need_answer and not answer:
            raise ValueError(f"{where}: empty answer (texts item {t}).")
        exchanges.append((strip_image_placeholder(item["user"], placeholder), answer))
        marks += item["user"].count(placeholder) + item["assistant"].count(placeholder)
    return exchanges, marks or None
