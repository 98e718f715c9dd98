"""`MemVPDPOTrainer`: TRL's `DPOTrainer` with images for a MemVP adapter.

TRL's DPO vision path (`DataCollatorForVisionPreference`) calls the processor on each prompt with its images and on
the chosen / rejected completions: with `MemVPProcessor` the batch is `2B` rows without placeholder tokens plus
`pixel_values` and `image_mask`, which the policy's forward (TRL's fused LM head) turns into the memory.

The reference. TRL computes it with the adapter disabled (a fresh `peft_config`) or with a frozen copy of the
adapter named "ref" (a PeftModel passed in). For LoRA both are the initial policy, since LoRA starts as the identity;
MemVP's memory does not start at zero, and with it disabled the base also reads no image -- so a disabled reference
is a text-only model the initial policy is not. This trainer therefore wraps a base model with `peft_config` itself and
hands TRL the PeftModel: the reference is the copy of the initial adapter, image-conditioned, and the rewards start at
zero as DPO assumes. (Plain `DPOTrainer` with `peft_config=MemVPConfig` also trains, against the text-only base.)

Refused at construction: a model that is no MemVP adapter, a VLM's own processor, precomputed image columns (TRL's
preference collators read `image`/`images` only and would train text-only).
"""

from __future__ import annotations

from typing import Any, Optional

from peft import PeftModel, get_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import create_model_from_path

from .checks import (
    check_memvp_model,
    check_no_precomputed_images,
    check_processor,
    first_rows,
    has_images,
    processor_of_model,
)

__all__ = ["MemVPDPOTrainer"]

NAME = "MemVPDPOTrainer"


class MemVPDPOTrainer(DPOTrainer):
    """`DPOTrainer` for a MemVP adapter (same arguments); see the module docstring for the reference model."""

    def __init__(
        self,
        model: Any,
        ref_model: Optional[Any] = None,
        args: Optional[DPOConfig] = None,
        data_collator: Optional[Any] = None,
        train_dataset: Optional[Any] = None,
        eval_dataset: Optional[Any] = None,
        processing_class: Optional[Any] = None,
        **kwargs: Any,
    ) -> None:
        peft_config = kwargs.pop("peft_config", None)
        check_memvp_model(NAME, model, peft_config)
        if data_collator is None:
            rows = first_rows([train_dataset, eval_dataset])
            if processing_class is None and has_images(rows):  # TRL would load the folder's own (a VLM's) processor
                processing_class = processor_of_model(NAME, model, peft_config)
            check_processor(NAME, processing_class, rows)
            check_no_precomputed_images(
                NAME, rows, "Give the raw images as an 'images' column (one list per row) with MemVPProcessor."
            )
        if peft_config is not None and ref_model is None and not isinstance(model, PeftModel):  # TRL refuses both
            if isinstance(model, str):  # loaded as DPOTrainer would, so the adapter can wrap it here
                init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
                init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
                quantization = kwargs.pop("quantization_config", None)
                if quantization is not None:
                    init_kwargs["quantization_config"] = quantization
                model = create_model_from_path(model, **init_kwargs)
                if args is not None:
                    args.model_init_kwargs = None
            model, peft_config = get_peft_model(model, peft_config), None
        super().__init__(
            model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config, **kwargs,
        )
