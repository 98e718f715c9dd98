"""The model card (`README.md`) of a saved MemVP adapter: what it is, how to load it, and what it was trained on.

peft's `PeftModel.save_pretrained` writes a generic card (`library_name: peft`, the base model, the peft version)
before the weights; a reader of that card -- on the Hub or in a folder -- learns neither that the adapter needs
memvp-peft nor which vision encoder its memory was trained to read. `MemVPConfig.save_pretrained`, which peft calls
last for every save, adds one MemVP section here, and `memvp-train` adds the data and the held-out figures it knows.

The section sits between two HTML comments, so a later save replaces it instead of appending a second one, and
whatever the user wrote elsewhere in the card is kept. The card is written through a temporary file and one
rename (`save_load.replace_file`): a kill mid-write leaves the previous card, never half of one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from huggingface_hub import ModelCard, ModelCardData

from .save_load import MODEL_CARD, replace_file, staging_folder_inside

SECTION_START = "<!-- memvp-peft: start -->"
SECTION_END = "<!-- memvp-peft: end -->"
CARD_TAGS = ("memvp", "memvp-peft", "vision-language")
PAPER = "https://arxiv.org/abs/2405.05615"
AUTO_CLASSES = {"SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TaskType.SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def memvp_card_section(
    config: Any, dataset: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None
) -> str:
    """The card's MemVP section for `config` (a MemVPConfig), with the training data and figures when known."""
    base = config.base_model_name_or_path or "<the base model this adapter was trained on>"
    auto_class = AUTO_CLASSES.get(str(config.task_type), "AutoModelForCausalLM")  # a VLM: its own class, same call
    encoder = config.vision_encoder
    if encoder:
        encoder_line = (
            f"- **Vision encoder:** `{encoder}` (recorded in `adapter_config.json`; `PeftModel.from_pretrained` "
            "attaches it, so `pixel_values` work directly)"
        )
    else:
        encoder_line = (
            "- **Vision encoder:** none recorded: pass `image_features` (patch features of the encoder the adapter "
            "was trained with) or attach an encoder with `memvp_peft.attach_vision_encoder`"
        )
    lines = [
        SECTION_START,
        "## MemVP adapter (memvp-peft)",
        "",
        f"A [MemVP]({PAPER}) adapter (Memory-Space Visual Prompting, ICML 2024) made with "
        "[memvp-peft](https://pypi.org/project/memvp-peft/): the image's projected features are appended to the "
        "key-value memory of every FFN of the frozen language model instead of being prepended as tokens, so the "
        "sequence never grows. It cannot be merged into the base weights (the memory depends on the input).",
        "",
        "Load it with memvp-peft imported first (the import registers the `MEMVP` peft type; without it peft "
        "cannot read `adapter_config.json`):",
        "",
        "```python",
        "import memvp_peft  # pip install memvp-peft",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f"base = {auto_class}.from_pretrained({json.dumps(base)})",
        "model = PeftModel.from_pretrained(base, \"<this folder or Hub id>\")",
        "```",
        "",
        f"- **Base model:** `{base}` (frozen)",
        encoder_line,
        f"- **Memory:** {config.num_memory_slots} slots of {config.visual_dim}-dim visual features, read "
        f"`{config.memory_read}`, scale s = {config.memory_scale}, lambda = {config.visual_scale}",
    ]
    if config.lora_config is not None:
        lines.append(f"- **LoRA part:** r = {config.lora_config.get('r')}, targets "
                     f"`{config.lora_config.get('target_modules')}` (saved in the same file)")
    if dataset:
        lines.append(f"- **Training data:** {dataset}")
    for key, label in (("heldout_accuracy", "Held-out accuracy"), ("final_loss", "Final training loss"),
                       ("global_steps", "Training steps")):
        value = (metrics or {}).get(key)
        if value is None:
            continue
        shown = f"{value:.2%}" if key == "heldout_accuracy" else (f"{value:.4f}" if isinstance(value, float) else value)
        lines.append(f"- **{label}:** {shown}")
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_model_card(
    folder: str, config: Any, dataset: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None
) -> None:
    """Add (or replace) the MemVP section and tags of the card in `folder`, keeping the rest of the card."""
    path = os.path.join(folder, MODEL_CARD)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = card.data.get("library_name") or "peft"  # peft loads it: the Hub's "use this model"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(CARD_TAGS))
    section = memvp_card_section(config, dataset=dataset, metrics=metrics)
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    else:
        text = section + "\n\n" + text.lstrip("\n")
    card.text = text
    with staging_folder_inside(folder) as staging:  # a kill leaves the previous card; recovery removes the staging
        staged = os.path.join(staging, MODEL_CARD)
        card.save(staged)
        replace_file(staged, path)
