"""A record -> its :class:`Dialogue`: the one place that knows the text layouts of datasets, and the one rendering
of a question as a prompt (:func:`build_prompt`).

Every layout comes out of :func:`record_dialogue` as the same object -- an optional system text and the record's
(user, assistant) exchanges -- checked the same way, so tokenisation (with a prompt template or a chat template) never
has to care which layout a record came in:

* simple: ``question`` (or ``prompt``) + ``answer`` (a str; an int is written in decimal);
* multiple choice: ``question`` + ``choices`` + an int ``answer`` (+ ``hint``, ``caption``): the authors' ScienceQA
  prompt (:mod:`.multiple_choice`), the answer following the prompt directly;
* LLaVA ``conversations``: ``[{"from": "human"|"gpt", "value": ...}, ...]``;
* the chat layouts of Hub datasets: TRL's ``messages``, TRL's conversational ``prompt``/``completion`` and
  the_cauldron's ``texts`` (below).

Whatever the layout, the images a record's text marks -- ``<image>`` placeholders, ``{"type": "image"}`` entries --
are counted (:attr:`Dialogue.image_marks`) and :func:`check_image_marks` holds them against the images the record
gives: text that speaks of an image the record does not have means the image never reaches the model.

Errors name the record (``where``) and the turn, because a bad record is usually one line among thousands of a
dataset file.

The prompt template, the conversation roles and the ``<image>`` placeholder: training (the collator) and generation
(``memvp-infer``, the benchmark, user code) must render a question the very same way, or the model is asked something
it was never trained on; :func:`build_prompt` is that single rendering.  MemVP does not put images in the sequence,
so the placeholder is removed (:func:`strip_image_placeholder`), never expanded.

``messages`` (TRL, HuggingFaceH4/llava-instruct-mix-vsft) with typed or plain-string content::

    {"images": [<PIL>],
     "messages": [{"role": "system", "content": "Answer briefly."},                      # optional, first only
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "seven"}]}]}

The ``{"type": "image"}`` entries only mark where an image was: MemVP has no image token, so they render to nothing;
they are counted, together with any ``<image>`` placeholder in the text, and the count is checked against the images
the record gives (:func:`check_image_marks`: a mismatch means images and text do not belong together).  Plain-string
content marks images with ``<image>`` placeholders, if at all; when a record's strings have none (and no content is
typed) there is nothing to check.  An entry that carries the image itself (``{"type": "image", "image": <PIL>}``) or
another kind of media is refused: its image would be dropped silently.  A message's text entries are joined with a
newline.  ``datasets`` stores typed content as structs with every key of the column (``{"type": "image", "text":
None}``; llava-instruct-mix adds an ``index``): keys whose value is None are ignored.

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

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .multiple_choice import multiple_choice_prompt, multiple_choice_target

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "GPT_ROLES",
    "HUMAN_ROLES",
    "IMAGE_PLACEHOLDER",
    "ORIGIN_FIELD",
    "TEXT_LAYOUTS",
    "Dialogue",
    "build_prompt",
    "cauldron_exchanges",
    "check_image_marks",
    "first_answer",
    "messages_exchanges",
    "prompt_completion_exchanges",
    "record_dialogue",
    "record_label",
    "strip_image_placeholder",
]

#: Default prompt; ``{question}`` is replaced by the question text.  The answer follows after a single space.
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

#: The image placeholder used by LLaVA data.  MemVP does not put images in the sequence, so it is stripped.
IMAGE_PLACEHOLDER = "<image>"

#: The `from` values LLaVA-style data uses for the two sides of a conversation (case-insensitive).
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant"})

# The field in which the dataset loaders (`memvp_peft.tasks`) record where a record came from, e.g.
# "data.jsonl: line 7" or "llava.json: entry 12 (id='0001')"; a field of the record, so it travels wherever the
# record goes (a shuffled split, a Trainer's batches, a `datasets.Dataset`).
ORIGIN_FIELD = "memvp_origin"

#: The fields that hold a whole conversation; a record has at most one of them (or a simple question instead, or
#: TRL's conversational `prompt` -- a list of messages -- with its `completion`).
TEXT_LAYOUTS = ("conversations", "messages", "texts")


@dataclass(frozen=True)
class Dialogue:
    """A record's text, whatever its layout.

    Attributes:
        exchanges: the (user, assistant) pairs in order, ``<image>`` placeholders removed; when a generation prompt
            is built from a record without answers, the last assistant text is ``""``.
        system: the text of a leading ``system`` message (``messages`` layout), else None.
        preformatted: the user text is already the whole prompt (a multiple-choice record): no prompt template is
            applied and the answer follows it directly (``separator`` is ``""``, otherwise one space).
        image_marks: how many images the text marks -- ``<image>`` placeholders in any layout, plus
            ``{"type": "image"}`` entries of typed content -- checked against the images the record gives
            (:func:`check_image_marks`); None when the text marks none and has no typed content (it then says
            nothing about the images).
        context_exchanges: how many leading exchanges are context, shown but never supervised: those a TRL
            conversational ``prompt`` answers itself (the loss is on the ``completion``).
    """

    exchanges: tuple[tuple[str, str], ...]
    system: Optional[str] = None
    preformatted: bool = False
    image_marks: Optional[int] = None
    context_exchanges: int = 0

    @property
    def separator(self) -> str:
        """What joins a prompt and its answer without a chat template: one space, none for a preformatted prompt."""
        return "" if self.preformatted else " "


def record_label(index: int, record: Any) -> str:
    """How errors name a record of a batch: its place in its dataset file when a loader recorded it (the position
    in a shuffled batch says nothing about which line to fix), else its position in the batch and its ``id``."""
    if isinstance(record, Mapping) and isinstance(record.get(ORIGIN_FIELD), str):
        return record[ORIGIN_FIELD]
    rid = record.get("id") if isinstance(record, Mapping) else None
    return f"record {index}" + (f" (id={rid!r})" if rid is not None else "")


def record_dialogue(
    record: Mapping[str, Any], where: str, placeholder: str = IMAGE_PLACEHOLDER, need_answer: bool = True
) -> Dialogue:
    """The checked :class:`Dialogue` of a record, in any layout of the module docstring.

    With ``need_answer=False`` (building prompts for generation) a missing final answer is allowed (returned as
    ``""``).  A record with two layouts at once (say ``messages`` and ``question``) is refused: which one is meant
    cannot be known, and training on the wrong one would be silent.
    """
    conversational = _is_list(record.get("prompt"))  # TRL's conversational prompt: a list of messages
    layouts = [key for key in TEXT_LAYOUTS if record.get(key) is not None] + (["prompt"] if conversational else [])
    simple = [key for key in ("question", "prompt") if record.get(key) is not None and not (
        key == "prompt" and conversational)]
    if len(layouts) + bool(simple) > 1:
        raise ValueError(
            f"{where}: the record has several text layouts ({layouts + simple[:1]}); give exactly one of "
            "'question'/'prompt' (+ 'answer'), 'conversations', 'messages', 'texts' or a conversational 'prompt' "
            "(+ 'completion')."
        )
    if record.get("completion") is not None and not conversational:
        raise ValueError(
            f"{where}: 'completion' is read with a conversational 'prompt' (TRL's prompt/completion layout: both lists "
            "of {'role', 'content'} messages); for plain text give 'question' and 'answer'."
        )
    if layouts == ["conversations"]:
        exchanges, marks = _llava_exchanges(record["conversations"], where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), image_marks=marks)
    if layouts == ["messages"]:
        system, exchanges, marks = messages_exchanges(record["messages"], where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), system=system, image_marks=marks)
    if layouts == ["prompt"]:
        system, exchanges, marks, context = prompt_completion_exchanges(
            record["prompt"], record.get("completion"), where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), system=system, image_marks=marks, context_exchanges=context)
    if layouts == ["texts"]:
        exchanges, marks = cauldron_exchanges(record["texts"], where, placeholder, need_answer)
        return Dialogue(tuple(exchanges), image_marks=marks)
    if not simple:
        raise ValueError(
            f"{where}: the record has none of the text layouts 'question'/'prompt' (+ 'answer'), 'conversations', "
            f"'messages', 'texts', a conversational 'prompt' + 'completion' (keys: {sorted(record)})."
        )
    return _simple_dialogue(record, simple[0], where, placeholder, need_answer)


def check_image_marks(dialogue: Dialogue, given: int, where: str, placeholder: str = IMAGE_PLACEHOLDER,
                      fields: Iterable[str] = ()) -> None:
    """Refuse a record whose text marks another number of images than it gives (``given``), in any layout.

    The one check of marks against images, at load time (the dataset loaders) and per batch (the collator).  Marks
    are optional (``dialogue.image_marks`` None: images are taken unchecked), but text that marks an image the record
    does not give -- a LLaVA ``<image>`` whose ``image`` field is missing or spelt otherwise, a question written for
    an image that never came -- would train text-only while the text speaks of a picture; and a number of marks
    other than the images means text and images do not belong together.  ``fields`` (the record's keys) are named
    when no image was given, to point at one under another name.
    """
    marks = dialogue.image_marks
    if marks is None or marks == given:
        return
    hint = ""
    if given == 0:
        hint = (f" The record gives no image in 'image' or 'images' (its fields: {sorted(fields)}): if its images are "
                "under another name, put them under 'image' (memvp-train: --image_column NAME); a text-only record "
                f"must not mark images (remove the {placeholder!r}).")
    raise ValueError(
        f"{where}: its text marks {marks} images ({placeholder!r} placeholders and {{'type': 'image'}} entries of "
        f"typed content) but the record gives {given}; each mark stands for one image, in order.{hint}"
    )


def first_answer(record: Mapping[str, Any], placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """The answer to a record's first question, as training renders it: what generation from
    ``MemVPDataCollator.prompts`` (the first question) is scored against.  A multiple-choice record gives
    ``"The answer is B."``."""
    return record_dialogue(record, record_label(0, record), placeholder).exchanges[0][1]


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


def _marks(texts: Iterable[str], placeholder: str) -> Optional[int]:
    """The placeholders in a layout's texts, None when there are none (the text then says nothing of images)."""
    return sum(text.count(placeholder) for text in texts) or None


def _llava_exchanges(conversations: Any, where: str, placeholder: str, need_answer: bool
                     ) -> tuple[list[tuple[str, str]], Optional[int]]:
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
        text = strip_image_placeholder(value, placeholder)
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
    return turns, _marks((turn["value"] for turn in conversations), placeholder)


def _simple_dialogue(record: Mapping[str, Any], key: str, where: str, placeholder: str, need_answer: bool) -> Dialogue:
    question = record[key]
    if not isinstance(question, str):
        raise ValueError(f"{where}: {key!r} must be a str, got {type(question).__name__}.")
    marks = _marks([question], placeholder)
    question = strip_image_placeholder(question, placeholder)
    answer = record.get("answer")
    if record.get("choices") is not None:
        dialogue = _multiple_choice_dialogue(record, question, answer, where, need_answer)
        return Dialogue(dialogue.exchanges, preformatted=True, image_marks=marks)
    if not need_answer:
        return Dialogue(((question, ""),), image_marks=marks)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError(f"{where}: empty answer (the 'answer' field is missing or blank).")
    return Dialogue(((question, _answer_text(answer, where)),), image_marks=marks)


def _answer_text(answer: Any, where: str) -> str:
    """A simple record's answer as text: a str stripped, an int in decimal; bool and float refused."""
    if isinstance(answer, str):
        return answer.strip()
    if isinstance(answer, (bool, np.bool_)):
        raise ValueError(
            f"{where}: 'answer' is a bool ({answer!r}): give the answer as text (str), e.g. 'yes'/'no', or as the index "
            "(int) of the right option together with 'choices'."
        )
    if isinstance(answer, numbers.Integral):
        return str(int(answer))
    if isinstance(answer, numbers.Real):
        raise ValueError(
            f"{where}: 'answer' is a float ({answer!r}): refused rather than guessing how to write it (2.0 or 2?); "
            "give the answer as text (str). Integer answers are written in decimal; with 'choices' an int answer "
            "is the index of the right option."
        )
    raise ValueError(f"{where}: 'answer' must be a str (or an int), got {type(answer).__name__}.")


def _multiple_choice_dialogue(
    record: Mapping[str, Any], question: str, answer: Any, where: str, need_answer: bool
) -> Dialogue:
    """``choices`` + an int ``answer``: the authors' QCM prompt and ``The answer is X.`` right after it."""
    choices = record["choices"]
    try:
        prompt = multiple_choice_prompt(question, choices, record.get("hint"), record.get("caption"))
        if not need_answer:  # a generation prompt: the answer, if any, is not read
            return Dialogue(((prompt, ""),), preformatted=True)
        if answer is None:
            raise ValueError("empty answer (the 'answer' field is missing): a multiple-choice record needs the "
                             "index (int) of the right option.")
        if isinstance(answer, str):
            raise ValueError(
                f"has 'choices' but its 'answer' is a str ({answer!r}); a multiple-choice answer is the index (int) "
                "of the right option in 'choices'."
            )
        if isinstance(answer, (bool, np.bool_)) or not isinstance(answer, numbers.Integral):
            raise ValueError(
                f"has 'choices' but its 'answer' is {answer!r} ({type(answer).__name__}); a multiple-choice answer is "
                "the index (int) of the right option in 'choices'."
            )
        target = multiple_choice_target(int(answer), choices)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    return Dialogue(((prompt, target),), preformatted=True)


# keys under which a content entry could carry an image (or its location) inline instead of marking its place
_INLINE_MEDIA_KEYS = ("image", "url", "path", "image_url", "video")


def _is_list(value: Any) -> bool:
    """Whether `value` is a list of items (messages, content entries, exchanges), not a text."""
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
