"""Dialogues -> token ids and labels through the base model's chat template (``tokenizer.apply_chat_template``).

A chat model was tuned on its template; prompting it with ``Question: ...\\nAnswer:`` instead wastes what it knows.
So when the base has a template the collator renders every record with it, and three things must hold:

* **No image in the text.**  MemVP has no image placeholder token: messages go to the template as text only
  (``{"type": "image"}`` entries are dropped, ``<image>`` is stripped), so a template renders no image token.
* **Loss on the assistant turns only**, found without relying on template markup: for assistant message ``j``, the
  conversation up to ``j`` is rendered with ``add_generation_prompt=True`` (where the answer starts) and up to and
  including ``j`` (where it ends, the template's end-of-turn tokens included, so the model learns to stop).  Both
  renderings must be prefixes of the whole conversation's text -- a template that renders a prefix differently
  (e.g. one that rewrites earlier turns) is refused, since no span could then be trusted.
* **Generation sees what training saw.**  The generation prompt of each assistant turn, tokenized on its own, must
  be exactly the first tokens of the training row; otherwise the model would be prompted with tokens it was never
  trained on, which no error would ever reveal.

Every message text must appear in the rendering: a template that drops a system message, or one written for typed
content only (which shows nothing for a plain string), is caught here.  Plain-string content is tried first, then
typed ``[{"type": "text", "text": ...}]`` content.  Rendered text is tokenized with ``add_special_tokens=False``,
as ``apply_chat_template(tokenize=True)`` does (templates write BOS themselves).
"""

from __future__ import annotations

from typing import Any, Optional

from .conversations import Dialogue
from .tokenization import truncate_row

__all__ = ["ChatTemplateRenderer", "chat_template_of"]


def chat_template_of(tokenizer: Any, processor: Any = None) -> Optional[str]:
    """The chat template the base comes with: the tokenizer's, else the processor's (a VLM ``ProcessorMixin`` may
    hold it apart from its tokenizer); None when neither has one."""
    for owner in (tokenizer, processor):
        template = getattr(owner, "chat_template", None)
        if isinstance(template, str) and template.strip():
            return template
    return None


class ChatTemplateRenderer:
    """Renders and tokenizes :class:`Dialogue` objects with one chat template (checks in the module docstring)."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self._typed: Optional[bool] = None  # content style the template reads: found on first use

    # ------------------------------------------------------------------------------------------------ rendering
    @staticmethod
    def _roles(dialogue: Dialogue, with_answers: bool = True) -> list[tuple[str, str]]:
        """(role, text) of every message; a final empty answer (a prompt-only record) is left out."""
        messages = [("system", dialogue.system)] if dialogue.system is not None else []
        for user, assistant in dialogue.exchanges:
            messages.append(("user", user))
            if with_answers and assistant:
                messages.append(("assistant", assistant))
        return messages

    def _apply(self, messages: list[tuple[str, str]], generation_prompt: bool, typed: bool, where: str) -> str:
        conversation = [
            {"role": role, "content": [{"type": "text", "text": text}] if typed else text} for role, text in messages
        ]
        try:
            rendered = self.tokenizer.apply_chat_template(
                conversation, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja2 TemplateError from raise_exception(), or a template bug
            raise ValueError(f"{where}: the chat template refused the conversation: {type(exc).__name__}: {exc}") from exc
        if not isinstance(rendered, str):
            raise ValueError(f"{where}: the chat template rendered {type(rendered).__name__}, expected text.")
        return rendered

    def render(self, messages: list[tuple[str, str]], generation_prompt: bool, where: str) -> str:
        """The template's text for ``messages``; every message's text must be in it (see the module docstring)."""
        styles = [self._typed] if self._typed is not None else [False, True]
        problems: list[ValueError] = []  # a style that renders but loses text says more than one that fails
        for typed in styles:
            try:
                rendered = self._apply(messages, generation_prompt, typed, where)
            except ValueError as exc:
                problems.append(exc)
                continue
            missing = [(role, text) for role, text in messages if text.strip() and text.strip() not in rendered]
            if not missing:
                self._typed = typed
                return rendered
            problems.insert(0, ValueError(
                f"{where}: the chat template does not show the text of every message: {missing[0][0]} text "
                f"{missing[0][1][:60]!r} is missing from its rendering {rendered[:200]!r} (a template that drops this "
                "role, or reads content another way). Use chat_template=False to train with the prompt template "
                "instead."
            ))
        raise problems[0]

    # ------------------------------------------------------------------------------------------------ tokens
    def _tokenize(self, text: str) -> tuple[list[int], Optional[list[int]]]:
        """Ids of ``text`` (no special tokens added) and each token's start character, when the tokenizer gives
        offsets."""
        try:
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            return list(encoded["input_ids"]), [start for start, _end in encoded["offset_mapping"]]
        except (NotImplementedError, TypeError, ValueError, KeyError):
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), None

    def _prefix_length(self, prefix: str, full: str, ids: list[int], what: str, where: str) -> int:
        """How many tokens of ``ids`` (the tokens of ``full``) the text ``prefix`` is; refused when ``prefix`` is not
        the start of ``full``, or does not tokenize to the start of ``ids`` on its own."""
        if not full.startswith(prefix):
            at = next((i for i, (a, b) in enumerate(zip(prefix, full)) if a != b), min(len(prefix), len(full)))
            raise ValueError(
                f"{where}: the chat template renders the conversation up to {what} as text that is not the start of "
                f"the whole conversation's text (they differ at character {at}: {prefix[at:at + 40]!r} vs "
                f"{full[at:at + 40]!r}), so the assistant turns cannot be located; this template rewrites earlier turns "
                "depending on what follows. Use chat_template=False, or a template whose renderings grow by appending."
            )
        own = self._tokenize(prefix)[0]
        if ids[: len(own)] != own:
            at = next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))
            raise ValueError(
                f"{where}: the chat template's text up to {what} tokenizes differently on its own (token {at}: "
                f"{own[at:at + 3]}) than inside the whole conversation ({ids[at:at + 3]}): generation would be prompted "
                "with tokens the model was not trained on. Use chat_template=False, or a template whose generation "
                "prompt ends at a token boundary (e.g. with a special token or a newline)."
            )
        return len(own)

    def encode(self, dialogue: Dialogue, where: str, max_length: Optional[int]) -> tuple[list[int], list[bool]]:
        """The ids of a training row and which of them are supervised (the assistant turns), truncated to
        ``max_length`` by removing tokens from the start of the first user text (the template's header kept)."""
        messages = self._roles(dialogue)
        full = self.render(messages, False, where)
        ids, starts = self._tokenize(full)
        supervised = [False] * len(ids)
        answers = 0
        for j, (role, _text) in enumerate(messages):
            if role != "assistant":
                continue
            answers += 1
            if answers <= dialogue.context_exchanges:  # answered by a TRL prompt: context, not trained on
                continue
            what = f"assistant message {j}"
            begin = self._prefix_length(self.render(messages[:j], True, where), full, ids, f"{what} (its generation "
                                        "prompt)", where)
            after = self.render(messages[: j + 1], False, where)
            if starts is not None:
                if not full.startswith(after):
                    self._prefix_length(after, full, ids, f"the end of {what}", where)  # raises, naming the difference
                end = begin + sum(1 for start in starts[begin:] if start < len(after))
            else:
                end = self._prefix_length(after, full, ids, f"the end of {what}", where)
            supervised[begin:end] = [True] * (end - begin)
        cut = self._first_question_tokens(dialogue, full, ids, starts, supervised) if max_length else (0, 0)
        return truncate_row(ids, supervised, max_length, cut, where)

    def _first_question_tokens(
        self, dialogue: Dialogue, full: str, ids: list[int], starts: Optional[list[int]], supervised: list[bool]
    ) -> tuple[int, int]:
        """The token range of the first user text: what truncation may remove (never the template's header or the
        generation prompt around it)."""
        first_answer = next((i for i, s in enumerate(supervised) if s), len(ids))
        question = dialogue.exchanges[0][0].strip()
        offset = full.find(dialogue.system) + len(dialogue.system) if dialogue.system else 0
        position = full.find(question, max(offset, 0)) if question else -1
        if position < 0:
            return first_answer, first_answer  # nothing identifiable to remove: cut on the right only

        def tokens_before(char: int) -> int:
            if starts is not None:
                return sum(1 for start in starts if start < char)
            return len(self._tokenize(full[:char])[0])

        return tokens_before(position), min(tokens_before(position + len(question)), first_answer)

    def encode_prompt(self, dialogue: Dialogue, where: str, answer_prefix: str = "") -> list[int]:
        """A generation prompt: the system text and first user message with ``add_generation_prompt=True``, then
        ``answer_prefix`` (the start of the answer) directly after it."""
        messages = self._roles(dialogue)
        first_user = next(i for i, (role, _text) in enumerate(messages) if role == "user")
        return self._tokenize(self.render(messages[: first_user + 1], True, where) + answer_prefix)[0]
