"""`MemVPProcessor`: a tokenizer and an image processor as one transformers `ProcessorMixin`, built for MemVP, and its
registration with `AutoProcessor`.

A VLM processor (Llava's) expands every `<image>` of a text into hundreds of placeholder tokens, because its model puts
the image *into the sequence*. MemVP puts the image into the FFN memory, so its processor does the opposite: each image
token of a text is replaced by nothing, the text is tokenized as plain text, and the images come back as
`pixel_values` with an `image_mask` saying which rows (or slots) hold one. That is the batch a MemVP model reads, and
it is what TRL's vision collators (`SFTTrainer`, `DPOTrainer` with `processing_class=`) pass on to the model.

Everything else is transformers' own machinery: `apply_chat_template` (the image entries of a conversation render
to the image token, below), the replacement bookkeeping that keeps assistant masks aligned,
`save_pretrained` / `from_pretrained` / `AutoProcessor.from_pretrained` (`processor_config.json`, the tokenizer's
files, `chat_template.jinja`).

Chat templates: an image entry renders to the processor's image token, and the processor's `__call__` replaces that
token by nothing. Why a token rather than rendering images to nothing directly: transformers' `ProcessorMixin` counts
the image tokens of every text against the images it gets, and records where each one was replaced, so the assistant
masks it computes from the rendered text (`return_assistant_tokens_mask`, TRL's `assistant_only_loss`) still line up
with the tokens after the replacement. MemVP's sequence carries no image: the text the tokenizer sees has no
placeholder left. Three kinds of template meet the processor:

* `default_chat_template(image_token)`: for bases without a template. It renders a conversation exactly as
  `MemVPDataCollator` lays out a record (`[BOS]Question: {q}\\nAnswer: {a}[EOS]...`, the collator's default prompt), so
  a model trained through TRL answers the prompts `memvp-infer` and the collator build, and it marks the assistant
  turns with `{% generation %}` (TRL's `assistant_only_loss` needs the markers).
* a VLM processor's own template (Llava's renders `<image>` per image entry): used as it is.
* a text-only LLM's template reads message contents as strings; TRL hands it typed lists
  (`[{"type": "image"}, {"type": "text", "text": ...}]`). `wrap_text_template` prefixes it with a block that turns
  each list into a string (text parts joined, the image token in place of each image) before the template proper runs.

Registration: importing this module registers `MemVPProcessor` with `AutoProcessor`, so `AutoProcessor.from_pretrained`
of a folder a MemVPProcessor saved returns one (after `import memvp_peft`, as for the adapter itself). `AutoProcessor`
finds the class a `processor_config.json` names among transformers' own processors and those registered with
`AutoProcessor.register(config_class, processor_class)`. Registration is keyed by a model config class: that key is
also how `AutoProcessor` picks a processor for a folder whose files name none (by `type(config)`). MemVP is not a
model, so the key here is `MemVPProcessorConfig`, a config class no checkpoint has: the registration makes the name
`MemVPProcessor` resolvable and changes the processor `AutoProcessor` chooses for no model.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from transformers import AutoImageProcessor, AutoProcessor, PreTrainedConfig, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_processing_base import ImageProcessingMixin

from .data.conversations import DEFAULT_PROMPT_TEMPLATE, IMAGE_PLACEHOLDER
from .data.images import assemble_images, process_images, to_rgb_image

__all__ = ["WRAP_MARKER", "MemVPProcessor", "MemVPProcessorConfig", "default_chat_template", "register_memvp_processor",
           "wrap_text_template"]

class MemVPProcessor(ProcessorMixin):
    """Tokenizer + image processor for MemVP: no image placeholder tokens in `input_ids`; `pixel_values` and
    `image_mask` beside them.

    Args:
        image_processor: the vision encoder's image processor (e.g. `CLIPImageProcessor`); one fixed output size.
        tokenizer: the language model's tokenizer (a pad token is needed for batches).
        chat_template: the template `apply_chat_template` renders; it must write `image_token` for each image entry.
            `None`: the tokenizer's own template made to read typed contents (`wrap_text_template`), or, when the
            tokenizer has none, `default_chat_template` (the `MemVPDataCollator` layout).
        image_token: the text that stands for an image (LLaVA data and Llava's template write `<image>`). Each one is
            replaced by nothing before tokenization.
        num_images: `None`: a batch whose texts have at most one image each gives `pixel_values` `(B, C, H, W)` and
            `image_mask` `(B,)`, otherwise `(B, I, C, H, W)` / `(B, I)` with `I` the most images of a text. An int:
            always `I = num_images` slots (stable shapes; a text with more images is refused).

    `from_pretrained` also reads folders that are not a MemVPProcessor's: a VLM folder (its tokenizer, image
    processor and chat template), or a language model's folder with `image_processor=` the encoder's folder or object.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Optional[Union[str, dict[str, str]]] = None,
        image_token: str = IMAGE_PLACEHOLDER,
        num_images: Optional[int] = None,
    ) -> None:
        if not isinstance(image_token, str) or not image_token:
            raise ValueError(f"MemVPProcessor: image_token must be a non-empty string, got {image_token!r}.")
        if num_images is not None and (not isinstance(num_images, int) or num_images < 1):
            raise ValueError(f"MemVPProcessor: num_images must be an int >= 1 or None, got {num_images!r}.")
        self.image_token = image_token
        self.num_images = num_images
        if chat_template is None:
            own = getattr(tokenizer, "chat_template", None)
            if isinstance(own, str):
                chat_template = wrap_text_template(own, image_token)
            elif isinstance(own, dict) and own:  # named templates ("default", "tool_use", ...): each one
                chat_template = {name: wrap_text_template(t, image_token) for name, t in own.items()}
            else:
                chat_template = default_chat_template(image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    # ------------------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, image_processor: Any = None,
                        **kwargs: Any) -> "MemVPProcessor":
        """A MemVPProcessor from a saved one, a VLM's folder or Hub id, or a language model's with `image_processor=`.

        `image_processor` may be an image processor object or what `AutoImageProcessor.from_pretrained` accepts (the
        vision encoder's folder or Hub id); it replaces the folder's own. Other keyword arguments (`revision`,
        `cache_dir`, `local_files_only`, ...) go to every `from_pretrained` this makes.
        """
        hub = {k: v for k, v in kwargs.items() if k not in ("chat_template", "image_token", "num_images")}
        if _saved_processor_class(pretrained_model_name_or_path, hub) == cls.__name__:
            processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
            if image_processor is not None:
                processor.image_processor = _image_processor(image_processor, hub)
            return processor
        loaded = AutoProcessor.from_pretrained(pretrained_model_name_or_path, **hub)
        options = {k: kwargs[k] for k in ("chat_template", "image_token", "num_images") if k in kwargs}
        if isinstance(loaded, ProcessorMixin):  # a VLM's processor: its tokenizer, images and template
            tokenizer = getattr(loaded, "tokenizer", None)
            own_images = getattr(loaded, "image_processor", None)
            options.setdefault("image_token", getattr(loaded, "image_token", None) or IMAGE_PLACEHOLDER)
            if isinstance(loaded.chat_template, (str, dict)) and loaded.chat_template:
                options.setdefault("chat_template", loaded.chat_template)
        elif isinstance(loaded, PreTrainedTokenizerBase):
            tokenizer, own_images = loaded, None
        else:  # an image processor alone: no text side
            tokenizer, own_images = None, loaded
        if tokenizer is None:
            raise ValueError(
                f"MemVPProcessor.from_pretrained: {pretrained_model_name_or_path!r} has no tokenizer; pass the "
                "language model's folder (or Hub id) first and the encoder's as image_processor=."
            )
        images = _image_processor(image_processor, hub) if image_processor is not None else own_images
        if images is None:
            raise ValueError(
                f"MemVPProcessor.from_pretrained: {pretrained_model_name_or_path!r} holds a tokenizer but no image "
                "processor; pass the vision encoder's folder or Hub id (or an image processor object) as "
                "image_processor=, e.g. MemVPProcessor.from_pretrained(llm, image_processor='openai/clip-vit-large-"
                "patch14')."
            )
        return cls(images, tokenizer, **options)

    # ------------------------------------------------------------------------------------------------------ calling

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        """`input_ids`/`attention_mask` of `text` with every `image_token` removed, plus `pixel_values` and
        `image_mask` for `images` (when any text has one).

        `images`: one list per text (TRL's layout; `[]` for a text without image), one image per text, or -- for a
        single text -- an image or a list of its images. A flat list for several texts is split by the number of
        image tokens in each text. Every text with images either names each with an `image_token` or names none.
        """
        if text is None:
            raise ValueError("MemVPProcessor: `text` is required (MemVP conditions a language model on images).")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("MemVPProcessor: `text` must be a string or a list of strings.")
        per_text = self._images_per_text(images, texts)
        has_images = any(per_text)
        output = super().__call__(images=per_text if has_images else None, text=texts, **kwargs)
        if has_images:
            # The image tensors are built here, not by the image processor call above (see `_process_images`).
            flat = process_images(self.image_processor, [image for row in per_text for image in row], "pixel_values")
            cursor, per_row = 0, []
            for row in per_text:
                per_row.append(list(flat[cursor : cursor + len(row)]))
                cursor += len(row)
            several = max(len(row) for row in per_text) > 1
            pixel_values, image_mask = assemble_images(per_row, several, num_images=self.num_images, blank=None)
            output["pixel_values"], output["image_mask"] = pixel_values, image_mask
        return output

    def _images_per_text(self, images: Any, texts: list[str]) -> list[list[Any]]:
        """`images` as one list of RGB images per text, checked against the image tokens of each text."""
        counts = [t.count(self.image_token) for t in texts]
        if images is None:
            nested: list[list[Any]] = [[] for _ in texts]
        elif not isinstance(images, (list, tuple)):
            nested = [[images]] if len(texts) == 1 else None  # type: ignore[assignment]
        elif all(isinstance(item, (list, tuple)) for item in images) and images:
            nested = [list(item) for item in images]
        elif len(texts) == 1:
            nested = [list(images)]
        elif sum(counts) == len(images):
            it = iter(images)
            nested = [[next(it) for _ in range(n)] for n in counts]
        elif sum(counts) == 0 and len(images) == len(texts):
            nested = [[image] for image in images]
        else:
            nested = None  # type: ignore[assignment]
        if nested is None or len(nested) != len(texts):
            raise ValueError(
                f"MemVPProcessor: cannot tell which of the images belong to which of the {len(texts)} texts; pass one "
                "list of images per text (an empty list for a text without image)."
            )
        for row, (row_images, count) in enumerate(zip(nested, counts)):
            if count not in (0, len(row_images)):
                raise ValueError(
                    f"MemVPProcessor: text {row} has {count} {self.image_token!r} token(s) but {len(row_images)} "
                    "image(s); write one per image, or none (MemVP reads the images from the memory, not the text)."
                )
            if self.num_images is not None and len(row_images) > self.num_images:
                raise ValueError(f"MemVPProcessor: text {row} has {len(row_images)} images but num_images={self.num_images}.")
        if any(nested) and self.image_processor is None:
            raise ValueError("MemVPProcessor: images were given but the processor has no image_processor.")
        return [[to_rgb_image(image) for image in row_images] for row_images in nested]

    def validate_inputs(self, images: Any = None, text: Any = None, **kwargs: Any) -> None:
        """Counts were checked per text in `_images_per_text` (the mixin's check is batch-wide and would refuse a text
        that carries its images without naming them)."""

    def _process_images(self, images: Any, **kwargs: Any) -> tuple[dict, list[str]]:
        """Only the text replacements: one empty string per image, so each image token renders to nothing. The tensors
        are built in `__call__` from the per-text lists, which the mixin would flatten (losing which text has which
        image)."""
        return {}, ["" for row in images for _ in row]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_mask"]


def _saved_processor_class(name_or_path: Any, hub: dict) -> Optional[str]:
    """The `processor_class` a folder's (or Hub repo's) `processor_config.json` names, or None without one."""
    try:
        processor_dict, _ = ProcessorMixin.get_processor_dict(name_or_path, **hub)
    except (OSError, ValueError):
        return None
    return processor_dict.get("processor_class")


def _image_processor(value: Any, hub: dict) -> Any:
    if isinstance(value, ImageProcessingMixin):
        return value
    return AutoImageProcessor.from_pretrained(value, **hub)


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


class MemVPProcessorConfig(PreTrainedConfig):
    """The registration key of `MemVPProcessor` (see the module docstring); never instantiated by a checkpoint."""

    model_type = "memvp_processor"


def register_memvp_processor() -> None:
    """Make `AutoProcessor.from_pretrained` resolve `"processor_class": "MemVPProcessor"` (idempotent)."""
    AutoProcessor.register(MemVPProcessorConfig, MemVPProcessor, exist_ok=True)


register_memvp_processor()
