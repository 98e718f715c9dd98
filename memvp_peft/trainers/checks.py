"""What TRL's trainers would do wrong with a MemVP model, refused before anything trains.

Each check names what it saw and the way out. They run in the constructors of `MemVPSFTTrainer` /
`MemVPDPOTrainer`; the model itself refuses what reaches its forward (placeholder tokens, packed rows: `tuner/entry.py`)
so that plain `SFTTrainer` / `DPOTrainer` fail loudly too, on the first batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

from peft import PeftConfig, PeftModel
from transformers import ProcessorMixin

from ..data.images import PRECOMPUTED_FIELDS
from ..processing import MemVPProcessor
from ..tuner.config import MemVPConfig
from ..tuner.model import MemVPModel
from ..vision import IN_MEMORY_PREFIX

__all__ = [
    "check_memvp_model",
    "check_no_precomputed_images",
    "check_processor",
    "check_sft_modes",
    "first_rows",
    "has_images",
    "is_memvp_peft_model",
    "model_id",
    "processor_of_model",
]

#: The dataset columns TRL's collators read images from.
TRL_IMAGE_COLUMNS = ("image", "images")


def is_memvp_peft_model(model: Any) -> bool:
    return isinstance(model, PeftModel) and isinstance(getattr(model, "base_model", None), MemVPModel)


def check_memvp_model(trainer: str, model: Any, peft_config: Optional[PeftConfig]) -> None:
    """The trainer trains a MemVP adapter: a MemVP PeftModel, or a base model with `peft_config=MemVPConfig(...)`,
    whose rows are the ones the trainer built (no `cls_token`)."""
    if peft_config is not None and not isinstance(peft_config, MemVPConfig):
        raise ValueError(
            f"{trainer} trains a MemVP adapter, but peft_config is a {type(peft_config).__name__}; pass "
            "peft_config=MemVPConfig(...) (LoRA goes inside it: MemVPConfig(lora_config=...)), or use TRL's own "
            "trainer for other adapters."
        )
    if peft_config is None and not is_memvp_peft_model(model):
        raise ValueError(
            f"{trainer} trains a MemVP adapter: pass a MemVP PeftModel (get_peft_model(model, MemVPConfig(...))) or "
            f"a base model with peft_config=MemVPConfig(...); got a {type(model).__name__} without a MemVPConfig."
        )
    configs = [peft_config] if peft_config is not None else list(model.peft_config.values())
    if any(getattr(config, "cls_token", False) for config in configs):
        raise ValueError(
            f"{trainer}: the adapter has cls_token=True (ADEM-VL's CLS input token), which grows every row of the "
            "input inside the model; TRL's trainers score the logits against the masks and labels of the rows they "
            "built. Train it with memvp-train or the HF Trainer (the model computes the loss on the grown rows)."
        )


def check_sft_modes(args: Any) -> None:
    """Training modes whose batches a memory-space tuner cannot read correctly, refused by name."""
    if getattr(args, "packing", False) or getattr(args, "eval_packing", None):
        raise ValueError(
            "MemVPSFTTrainer: packing=True (or eval_packing) concatenates several samples into one row, but MemVP's "
            "visual memory is one per row: the samples would read each other's images. Set packing=False and "
            "eval_packing=False."
        )
    if getattr(args, "padding_free", False):
        raise ValueError(
            "MemVPSFTTrainer: padding_free=True flattens the batch into a single row, but MemVP's visual memory is one "
            "per row: every sample would read one image. Set padding_free=False."
        )
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "MemVPSFTTrainer: use_liger_kernel=True makes Liger rebind the FFN modules' forward (its SwiGLU/GeGLU "
            "kernels), which bypasses MemVP's memory in the FFN: the model would train text-only. Set "
            "use_liger_kernel=False."
        )


def check_processor(trainer: str, processing_class: Any, rows: list[Mapping[str, Any]]) -> None:
    """What TRL's vision collators tokenize with: a VLM's own processor writes its image placeholder tokens into
    `input_ids` (Llava's: one per patch) and gives no image mask; a plain tokenizer cannot take images at all."""
    if isinstance(processing_class, ProcessorMixin) and not isinstance(processing_class, MemVPProcessor):
        raise ValueError(
            f"{trainer}: processing_class is a {type(processing_class).__name__}, which expands each image into "
            "placeholder tokens in input_ids for the VLM's own input-space projector; MemVP reads images from its "
            "memory. Pass processing_class=MemVPProcessor.from_pretrained(<the same folder or Hub id>) (for a "
            "language model + separate encoder: MemVPProcessor(image_processor, tokenizer))."
        )
    if has_images(rows) and not isinstance(processing_class, MemVPProcessor):
        raise ValueError(
            f"{trainer}: the dataset has images ('image'/'images') but processing_class is a "
            f"{type(processing_class).__name__}, which cannot process them; pass "
            "processing_class=MemVPProcessor(image_processor, tokenizer) (the vision encoder's image processor and "
            "this tokenizer), or MemVPProcessor.from_pretrained(<model folder>, image_processor=<encoder folder>)."
        )


def has_images(rows: list[Mapping[str, Any]]) -> bool:
    """Whether TRL will treat the data as a vision dataset (it looks for `image`/`images` in the first row)."""
    return any(row.get(name) is not None for row in rows for name in TRL_IMAGE_COLUMNS)


def first_rows(datasets: Iterable[Any]) -> list[Mapping[str, Any]]:
    """The first row of each dataset given (None entries skipped; a dict of eval datasets counts each)."""
    rows = []
    for dataset in datasets:
        if dataset is None:
            continue
        for part in dataset.values() if isinstance(dataset, Mapping) else (dataset,):
            row = next(iter(part), None)
            if isinstance(row, Mapping):
                rows.append(row)
    return rows


def check_no_precomputed_images(trainer: str, rows: list[Mapping[str, Any]], way_out: str) -> None:
    """TRL's collators read images from `image`/`images` only: a precomputed column would be dropped and the model
    trained text-only."""
    for row in rows:
        present = [name for name in PRECOMPUTED_FIELDS if row.get(name) is not None]
        if present and not any(row.get(name) is not None for name in TRL_IMAGE_COLUMNS):
            raise ValueError(
                f"{trainer}: the dataset has precomputed {present} but TRL's collator reads images from 'image' / "
                f"'images' only and would drop that column, training text-only. {way_out}"
            )


def model_id(model: Any) -> str:
    """The folder or Hub id a model was loaded from ('' for a model built in memory)."""
    if isinstance(model, str):
        return model
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or ""


def processor_of_model(trainer: str, model: Any, peft_config: Optional[PeftConfig] = None) -> MemVPProcessor:
    """Without `processing_class`, TRL loads the model folder's processor (a VLM's would expand `<image>`); MemVP's
    reads the same folder. A language model with `MemVPConfig(vision_encoder=<folder or Hub id>)` gets that encoder's
    image processor: pixels must be prepared the way the encoder the memory reads was trained (size, mean, std)."""
    name = model_id(model)
    if not name:
        raise ValueError(
            f"{trainer}: the model was not loaded from a folder or Hub id, so there is no processor to load; pass "
            "processing_class=MemVPProcessor(image_processor, tokenizer)."
        )
    encoder = _recorded_encoder(model, peft_config)
    return MemVPProcessor.from_pretrained(name, image_processor=encoder)


def _recorded_encoder(model: Any, peft_config: Optional[PeftConfig]) -> Optional[str]:
    """The vision encoder a MemVP config names as a folder or Hub id (None for a VLM's own tower or an encoder built
    in memory, whose image processor is the model folder's own or must be given)."""
    if not isinstance(peft_config, MemVPConfig) and is_memvp_peft_model(model):
        peft_config = model.peft_config[model.active_adapter]
    encoder = getattr(peft_config, "vision_encoder", None)
    if not isinstance(encoder, str) or encoder.startswith(IN_MEMORY_PREFIX):
        return None
    return encoder
