"""The chat templates of `MemVPProcessor`: an image entry renders to the processor's image token, and the processor's
`__call__` replaces that token by nothing.

Why a token rather than rendering images to nothing directly: transformers' `ProcessorMixin` counts the image tokens
of every text against the images it gets, and records where each one was replaced, so the assistant masks it computes
from the rendered text (`return_assistant_tokens_mask`, TRL's `assistant_only_loss`) still line up with the tokens after
the replacement. MemVP's sequence carries no image: the text the tokenizer sees has no placeholder left.

Three kinds of template meet the processor:

* `default_chat_template(image_token)`: for bases without a template. It renders a conversation exactly as
  `MemVPDataCollator` lays out a record (`[BOS]Question: {q}\\nAnswer: {a}[EOS]...`, the collator's default prompt), so
  a model trained through TRL answers the prompts `memvp-infer` and the collator build, and it marks the assistant
  turns with `{% generation %}` (TRL's `assistant_only_loss` needs the markers).
* a VLM processor's own template (Llava's renders `<image>` per image entry): used as it is.
* a text-only LLM's template reads message contents as strings; TRL hands it typed lists
  (`[{"type": "image"}, {"type": "text", "text": ...}]`). `wrap_text_template` prefixes it with a block that turns
  each list into a string (text parts joined, the image token in place of each image) before the template proper runs.
"""

from __future__ import annotations

import json

from ..data.prompts import DEFAULT_PROMPT_TEMPLATE

__all__ = ["WRAP_MARKER", "default_chat_template", "wrap_text_template"]

#: First line of a wrapped template: a template that has it is never wrapped twice (e.g. after a save and a reload).
WRAP_MARKER = "{#- memvp: typed message contents become strings, each image entry the image token -#}"


def _literal(text: str) -> str:
    """`text` as a Jinja string literal (JSON's double-quoted escaping is valid Jinja)."""
    return json.dumps(text)


def _content_loop(target: str, content: str, image_token: str) -> str:
    """Jinja that appends the string form of a typed `content` list to the namespace attribute `target`."""
    return (
        f"{{%- for part in {content} -%}}"
        f"{{%- if part['type'] == 'text' -%}}{{%- set {target} = {target} ~ part['text'] -%}}"
        f"{{%- elif part['type'] == 'image' -%}}{{%- set {target} = {target} ~ {_literal(image_token)} -%}}"
        "{%- else -%}{{ raise_exception('MemVPProcessor reads text and image entries; a message holds a ' ~ "
        "part['type'] ~ ' entry.') }}"
        "{%- endif -%}{%- endfor -%}"
    )


def default_chat_template(image_token: str) -> str:
    """The template for bases without one: `MemVPDataCollator`'s layout (see the module docstring)."""
    question_prefix, question_suffix = DEFAULT_PROMPT_TEMPLATE.split("{question}")
    return (
        "{%- set ns = namespace(text='') -%}"
        "{%- if bos_token is defined and bos_token -%}{{ bos_token }}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- set ns.text = '' -%}" + _content_loop("ns.text", "message['content']", image_token) +
        "{%- endif -%}"
        "{%- if message['role'] == 'system' -%}{{ ns.text ~ '\\n' }}"
        f"{{%- elif message['role'] == 'user' -%}}{{{{ {_literal(question_prefix)} ~ ns.text ~ "
        f"{_literal(question_suffix)} }}}}"
        "{%- elif message['role'] == 'assistant' -%}{% generation %}{{ ' ' ~ ns.text ~ eos_token }}{% endgeneration %}"
        "{%- else -%}{{ raise_exception('MemVPProcessor: unknown role ' ~ message['role'] ~ "
        "' (expected system, user or assistant).') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def wrap_text_template(template: str, image_token: str) -> str:
    """`template` (a text-only LLM's) preceded by the block that turns typed contents into strings.

    The block rebuilds `messages` with `dict(message, content=...)`, so every other key of a message (`name`,
    `tool_calls`, ...) reaches the template unchanged; string contents and messages without content pass as they are.
    """
    if template.startswith(WRAP_MARKER):
        return template
    preamble = (
        WRAP_MARKER
        + "{%- set memvp = namespace(messages=[], text='') -%}"
        "{%- for memvp_message in messages -%}"
        "{%- if memvp_message['content'] is defined and memvp_message['content'] is not none "
        "and memvp_message['content'] is not string -%}"
        "{%- set memvp.text = '' -%}" + _content_loop("memvp.text", "memvp_message['content']", image_token) +
        "{%- set memvp.messages = memvp.messages + [dict(memvp_message, content=memvp.text)] -%}"
        "{%- else -%}{%- set memvp.messages = memvp.messages + [memvp_message] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = memvp.messages -%}"
    )
    return preamble + template
