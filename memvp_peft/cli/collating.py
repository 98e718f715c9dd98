"""Records -> batches the same way in `memvp-train` and `memvp-infer`: the image processor, the prompt, the record.

An adapter only answers well when it is prompted and fed pixels exactly as it was trained, so both programs build
their `MemVPDataCollator` here, and what training chose -- the `--image_normalization`, the `--prompt_template`,
whether the base's chat template rendered the rows -- is written to `memvp_cli.json` (`collation_record`) and read
back by `memvp-infer` (`collator_from_record`). A record written before these keys existed reads as what training
did then: the encoder's processor, the default template, the collator's own chat-template rule.
"""

from __future__ import annotations

from typing import Any, Optional

from ..tasks.scienceqa import is_scienceqa_dataset
from ..vision import imagenet_image_processor
from .base_loading import image_processor_for
from .record import CLI_RECORD


def fixed_prompt_dataset(dataset: Optional[str]) -> bool:
    """Whether `dataset` has a prompt of its own that no chat template may replace: the built-in `digits` task
    (today's `Question: ... Answer:` rows, the prompt its demo numbers were measured with) and ScienceQA (the
    authors' QCM-A prompt, which the paper's numbers come from)."""
    return dataset == "digits" or is_scienceqa_dataset(dataset or "")


def chat_template_choice(dataset: Optional[str]) -> Optional[bool]:
    """The collator's `chat_template` argument for a run on `dataset`: False for a dataset with a fixed prompt,
    None (the collator's rule: the base's chat template when it has one) for the others."""
    return False if fixed_prompt_dataset(dataset) else None


def encoder_image_processor(name: Optional[str], vision_config: Any, normalization: str, *,
                            revision: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """The image processor for an encoder (or a VLM's tower) of `vision_config`: with `normalization` 'imagenet'
    the authors' transform sized to the encoder (`vision.imagenet_image_processor`), with 'encoder' the processor
    `name` saved (else CLIP defaults: `base_loading.image_processor_for`)."""
    if normalization == "imagenet":
        return imagenet_image_processor(int(vision_config.image_size))
    return image_processor_for(name, vision_config, revision=revision, trust_remote_code=trust_remote_code)


def build_collator(tokenizer: Any, processor: Any, *, input_name: str, kind: str, max_length: Optional[int] = None,
                   array_value_range: Optional[tuple[float, float]] = None, prompt_template: Optional[str] = None,
                   chat_template: Optional[bool] = None, image_grid: Optional[Any] = None,
                   num_frames: Optional[int] = None) -> Any:
    """The `MemVPDataCollator` of a run (image paths are resolved by the loaders before records get here); tiles
    and frames as the adapter's `image_grid` / `num_frames` lay them out (`long_context.py`)."""
    from ..data import MemVPDataCollator

    kwargs: dict[str, Any] = {} if max_length is None else {"max_length": max_length}
    return MemVPDataCollator(
        tokenizer, processor, prompt_template=prompt_template, chat_template=chat_template,
        array_value_range=array_value_range, image_input_name=input_name, seq2seq=(kind == "seq2seq"),
        image_grid=image_grid, num_frames=num_frames, **kwargs,
    )


def collation_record(collator: Any, prompt_template: Optional[str], image_normalization: str) -> dict[str, Any]:
    """What `memvp_cli.json` keeps of how the rows were built: the template given (None: the default one), whether
    the chat template rendered them, and the image normalisation."""
    return {"prompt_template": prompt_template, "chat_template": bool(collator.uses_chat_template),
            "image_normalization": image_normalization,
            "image_grid": list(collator.image_grid) if collator.image_grid else None, "num_frames": collator.num_frames}


def collator_from_record(tokenizer: Any, processor: Any, record: dict[str, Any], *, input_name: str, kind: str,
                         prompt_template: Optional[str] = None) -> Any:
    """The collator `memvp-infer` prompts with: the template and chat-template choice training recorded, or
    `prompt_template` (`--prompt_template`) when given, which then renders the questions without a chat template."""
    chat = record.get("chat_template")
    template = record.get("prompt_template")
    if prompt_template is not None:
        template, chat = prompt_template, False
    array_range = tuple(record["array_value_range"]) if record.get("array_value_range") else None
    try:
        return build_collator(tokenizer, processor, input_name=input_name, kind=kind, prompt_template=template,
                              chat_template=chat, array_value_range=array_range, image_grid=record.get("image_grid"),
                              num_frames=record.get("num_frames"))
    except ValueError as error:
        raise ValueError(f"the adapter's {CLI_RECORD} says its rows were built with prompt_template={template!r}, "
                         f"chat_template={chat!r}, which this base cannot rebuild: {error}") from error
