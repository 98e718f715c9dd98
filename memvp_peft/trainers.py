"""MemVP's TRL trainers (needs the `trl` extra: `pip install "memvp-peft[trl]"`): `MemVPSFTTrainer` and
`MemVPDPOTrainer`, TRL's `SFTTrainer` / `DPOTrainer` checked for MemVP and wired to its data path.

Plain `SFTTrainer` / `DPOTrainer` already train MemVP when they are given the right pieces (`docs/trl.md` shows both);
these subclasses add what a user of them would otherwise have to know:

* **Refusals at construction** (the checks at the end of this module): a model that is no MemVP adapter, packing /
  padding-free (one memory per row), Liger kernels (they rebind the FFN forward), a VLM's own processor with TRL's
  collator (placeholder tokens) -- except for SFT on a base of a supported VLM family, whose placeholders the model
  takes out of the sequence --, precomputed image columns TRL's collators would drop (they read `image`/`images`
  only, and the model would train text-only). Each names what it saw and the way out. The model itself refuses what
  reaches its forward (placeholder tokens, packed rows: `tuner/entry.py`), so that plain `SFTTrainer` /
  `DPOTrainer` fail loudly too, on the first batch.
* **SFT's data path**: with `data_collator=MemVPDataCollator(...)` the collator gets the raw records
  (`remove_unused_columns=False`, no dataset preparation) and TRL -- which asks for a processor whenever rows have
  images -- gets a `MemVPProcessor` of the collator's tokenizer and image processor; without a collator and without
  `processing_class`, the processor is `MemVPProcessor.from_pretrained` of the model's folder.
* **DPO's images**: TRL's DPO vision path (`DataCollatorForVisionPreference`) calls the processor on each prompt with
  its images and on the chosen / rejected completions: with `MemVPProcessor` the batch is `2B` rows without
  placeholder tokens plus `pixel_values` and `image_mask`, which the policy's forward (TRL's fused LM head) turns into
  the memory.
* **DPO's reference**: TRL computes it with the adapter disabled (a fresh `peft_config`) or with a frozen copy of the
  adapter named "ref" (a PeftModel passed in). For LoRA both are the initial policy, since LoRA starts as the
  identity; MemVP's memory does not start at zero, and with it disabled the base also reads no image -- so a disabled
  reference is a text-only model the initial policy is not. `MemVPDPOTrainer` therefore wraps a base model with
  `peft_config` itself and hands TRL the PeftModel: the reference is the copy of the initial adapter,
  image-conditioned, and the rewards start at zero as DPO assumes. (Plain `DPOTrainer` with `peft_config=MemVPConfig`
  also trains, against the text-only base.)

Everything else is TRL's own: the training loop, the fused LM head (whose loss MemVP makes image-conditioned,
`tuner/entry.py`), saving.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path

from .data.collator import MemVPDataCollator
from .data.images import PRECOMPUTED_FIELDS
from .processing import MemVPProcessor
from .tuner.config import MemVPConfig
from .tuner.model import MemVPModel
from .vision import IN_MEMORY_PREFIX, VLMFamily, family_of, supported_families

__all__ = ["MemVPDPOTrainer", "MemVPSFTTrainer"]

SFT_NAME = "MemVPSFTTrainer"
DPO_NAME = "MemVPDPOTrainer"
#: The dataset columns TRL's collators read images from.
TRL_IMAGE_COLUMNS = ("image", "images")


# ------------------------------------------------------------------------------------------------------------- SFT


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
        check_memvp_model(SFT_NAME, model, peft_config)
        args = _sft_config(args, model)
        check_sft_modes(args)
        if isinstance(data_collator, MemVPDataCollator):
            args = _raw_records(args)
            processing_class = _processor_for_collator(processing_class, data_collator)
        elif data_collator is None:
            rows = first_rows([train_dataset, eval_dataset])
            if processing_class is None and has_images(rows):  # TRL would load the folder's own (a VLM's) processor
                processing_class = processor_of_model(SFT_NAME, model, peft_config)
            check_processor(SFT_NAME, processing_class, rows, reads_vlm_processor=family_base(model) is not None)
            check_no_precomputed_images(
                SFT_NAME, rows,
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
        raise TypeError(
            f"{SFT_NAME}: processing_class must be a tokenizer or a processor, got {type(processing_class)}."
        )
    return processing_class


# ----------------------------------------------------------------------------------------------------------------- DPO


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
        check_memvp_model(DPO_NAME, model, peft_config)
        if data_collator is None:
            rows = first_rows([train_dataset, eval_dataset])
            if processing_class is None and has_images(rows):  # TRL would load the folder's own (a VLM's) processor
                processing_class = processor_of_model(DPO_NAME, model, peft_config)
            check_processor(DPO_NAME, processing_class, rows)
            check_no_precomputed_images(
                DPO_NAME, rows, "Give the raw images as an 'images' column (one list per row) with MemVPProcessor."
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


# -------------------------------------- what TRL's trainers would do wrong with a MemVP model, refused at construction


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


def family_base(model: Any) -> Optional[VLMFamily]:
    """The VLM family of `model` (a base, or a PeftModel around one) when its own processor's batches are read
    (`vision.families`); None otherwise, and for a model given by name (not loaded yet)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return family_of(model.get_base_model() if isinstance(model, PeftModel) else model)


def check_processor(trainer: str, processing_class: Any, rows: list[Mapping[str, Any]],
                    reads_vlm_processor: bool = False) -> None:
    """What TRL's vision collators tokenize with: a VLM's own processor writes its image placeholder tokens into
    `input_ids` (Llava's: one per patch) and gives no image mask -- read as it is on a base of a supported family
    (`reads_vlm_processor`: the model takes the placeholders out of the sequence), refused otherwise; a plain
    tokenizer cannot take images at all."""
    if (isinstance(processing_class, ProcessorMixin) and not isinstance(processing_class, MemVPProcessor)
            and not reads_vlm_processor):
        raise ValueError(
            f"{trainer}: processing_class is a {type(processing_class).__name__}, which expands each image into "
            "placeholder tokens in input_ids for the VLM's own input-space projector; MemVP reads images from its "
            "memory, and takes such placeholders out of the sequence only for SFT on a base of a supported VLM "
            f"family ({supported_families()}). Pass "
            "processing_class=MemVPProcessor.from_pretrained(<the same folder or Hub id>) (for a "
            "language model + separate encoder: MemVPProcessor(image_processor, tokenizer))."
        )
    if has_images(rows) and not isinstance(processing_class, ProcessorMixin):
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
