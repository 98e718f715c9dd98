"""The text side of a record: the prompt template, the conversation roles and the ``<image>`` placeholder.

Training (the collator) and generation (``memvp-infer``, the benchmark, user code) must render a question the very same
way, or the model is asked something it was never trained on; :func:`build_prompt` is that single rendering.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "GPT_ROLES",
    "HUMAN_ROLES",
    "IMAGE_PLACEHOLDER",
    "build_prompt",
    "strip_image_placeholder",
]

#: Default prompt; ``{question}`` is replaced by the question text.  The answer follows after a single space.
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"

#: The image placeholder used by LLaVA data.  MemVP does not put images in the sequence, so it is stripped.
IMAGE_PLACEHOLDER = "<image>"

#: The `from` values LLaVA-style data uses for the two sides of a conversation (case-insensitive).
HUMAN_ROLES = frozenset({"human", "user"})
GPT_ROLES = frozenset({"gpt", "assistant"})


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
