"""`MemVPSFTTrainer`: TRL's `SFTTrainer`, checked for MemVP and wired to MemVP's data path.

Plain `SFTTrainer` already trains MemVP when it is given the right pieces (`docs/trl.md`); this subclass adds what a
user of it would otherwise have to know:

* **Refusals at construction** (`checks.py`): a model that is no MemVP adapter, packing / padding-free (one memory per
  row), Liger kernels (they rebind the FFN forward), a VLM's own processor with TRL's collator (placeholder tokens),
  precomputed image columns TRL's collator would drop.
* **The data path**: with `data_collator=MemVPDataCollator(...)` the collator gets the raw records
  (`remove_unused_columns=False`, no dataset preparation) and TRL -- which asks for a processor whenever rows have
  images -- gets a `MemVPProcessor` of the collator's tokenizer and image processor; without a collator and without
  `processing_class`, the processor is `MemVPProcessor.from_pretrained` of the model's folder.

Everything else is `SFTTrainer`'s own: the training loop, the fused LM head (whose loss MemVP makes image-conditioned,
`tuner/entry.py`), saving.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from trl import SFTConfig, SFTTrainer

from ..data.collator import MemVPDataCollator
from ..processing import MemVPProcessor
from .checks import (
    check_memvp_model,
    check_no_precomputed_images,
    check_processor,
    check_sft_modes,
    first_rows,
    has_images,
    model_id,
    processor_of_model,
)

__all__ = ["MemVPSFTTrainer"]

NAME = "MemVPSFTTrainer"


class MemVPSFTTrainer(SFTTrainer):
    """`SFTTrainer` for a MemVP adapter; takes the same arguments (see the module docstring for what it adds).

    Two ways, as with SFTTrainer: `model=<MemVP PeftModel>`, or `model=<base>` with `peft_config=MemVPConfig(...)`;
    and two data paths: TRL's own layout (`images` + `messages`, or `prompt`/`completion`) with
    `processing_class=MemVPProcessor(...)`, or any layout `MemVPDataCollator` reads with `data_collator=`.
    """

    def __init__(
        self,
        model: Any,
        args: Optional[Any] = None,
        data_collator: Optional[Any] = None,
        train_dataset: Optional[Any] = None,
        eval_dataset: Optional[Any] = None,
        processing_class: Optional[Any] = None,
        **kwargs: Any,
    ) -> None:
        peft_config = kwargs.get("peft_config")
        check_memvp_model(NAME, model, peft_config)
        args = _sft_config(args, model)
        check_sft_modes(args)
        if isinstance(data_collator, MemVPDataCollator):
            args = _raw_records(args)
            processing_class = _processor_for_collator(processing_class, data_collator)
        elif data_collator is None:
            rows = first_rows([train_dataset, eval_dataset])
            if processing_class is None and has_images(rows):  # TRL would load the folder's own (a VLM's) processor
                processing_class = processor_of_model(NAME, model, peft_config)
            check_processor(NAME, processing_class, rows)
            check_no_precomputed_images(
                NAME, rows,
                "Give the images as an 'image'/'images' column, or pass data_collator=MemVPDataCollator(...), "
                "which reads precomputed pixel_values / image_features.",
            )
        super().__init__(
            model, args=args, data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, **kwargs,
        )
        _visual_memory_back_to_fp32(self.model)


def _visual_memory_back_to_fp32(model: Any) -> None:
    """On a quantised base TRL casts every trainable parameter to bf16 (QLoRA's recommendation for LoRA A/B). MemVP's
    visual memory stays fp32 there, as on any quantised base (`MEMVP_SPEC.md`): `p_v` starts at zero and the
    projector's output is scaled by lambda = 0.01, so bf16's 8-bit mantissa would round away the small early updates
    of both. The LoRA part keeps TRL's bf16."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)):
        return
    tuner = getattr(model, "base_model", None)
    for parameter in getattr(tuner, "memvp_memory", {}).parameters() if tuner is not None else ():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def _sft_config(args: Optional[Any], model: Any) -> SFTConfig:
    """`args` as the SFTConfig SFTTrainer would build from it (checked before SFTTrainer runs)."""
    if isinstance(args, SFTConfig):
        return args
    if args is None:
        return SFTConfig(f"{(model_id(model) or type(model).__name__).split('/')[-1]}-SFT")
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict hides it, as SFTTrainer notes
    return SFTConfig(**values)


def _raw_records(args: SFTConfig) -> SFTConfig:
    """MemVPDataCollator collates raw records: keep every column, skip TRL's tokenization (set on `args`, as
    SFTTrainer itself adjusts the config it is given)."""
    args.remove_unused_columns = False
    args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return args


def _processor_for_collator(processing_class: Any, collator: MemVPDataCollator) -> Any:
    """TRL asks for a ProcessorMixin whenever rows have images; the collator's own pair is the one to save."""
    if processing_class is None or isinstance(processing_class, PreTrainedTokenizerBase):
        tokenizer = processing_class if processing_class is not None else collator.tokenizer
        if collator.image_processor is None:
            return tokenizer
        return MemVPProcessor(collator.image_processor, tokenizer)
    if not isinstance(processing_class, ProcessorMixin):
        raise TypeError(f"{NAME}: processing_class must be a tokenizer or a processor, got {type(processing_class)}.")
    return processing_class
