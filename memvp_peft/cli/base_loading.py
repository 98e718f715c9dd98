"""Loading a local base model for `memvp-train` and `memvp-infer`.

Both programs must load a base the same way -- the same Auto class for the same folder, the same tokenizer padding,
the same image processor -- or an adapter trained by one would be evaluated by the other on a different model. Nothing
is downloaded: a path that is not a local model folder is a clear error that says what to pass instead.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..vision import clip_style_image_processor


#: what a base model path must be, and how to get a Hub model there (the programs never download)
LOCAL_MODEL_FOLDER = (
    "a local Hugging Face model folder (config.json, the weights and the tokenizer files, as save_pretrained writes "
    "them). Hub ids are not downloaded: save the Hub model first -- `AutoModelForCausalLM.from_pretrained(ID)"
    ".save_pretrained(DIR)` and the same for its tokenizer, or `hf download ID --local-dir DIR` -- and pass DIR"
)


def check_base_folder(path: str, what: str = "model_name_or_path") -> None:
    """Refuse a base path that cannot be a local model folder, before anything loads: `what` names where the path
    came from (a flag, or the adapter's record), so that the message says what the user should change."""
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a local folder; pass {LOCAL_MODEL_FOLDER}.")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{what} {path!r} is a folder but not a Hugging Face model (no config.json); "
                         f"pass {LOCAL_MODEL_FOLDER}.")


def load_base(path: str, load_in_4bit: bool, bf16: bool):
    """(model, tokenizer, kind) for a local HF folder; kind is 'causal', 'seq2seq' or 'vlm'."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    check_base_folder(path)
    config = AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if bf16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
        kwargs["device_map"] = "cpu" if not torch.cuda.is_available() else None
    if getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None:
        from transformers import AutoModelForImageTextToText

        model, kind = AutoModelForImageTextToText.from_pretrained(path, **kwargs), "vlm"
    elif getattr(config, "is_encoder_decoder", False):
        model, kind = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs), "seq2seq"
    else:
        model, kind = AutoModelForCausalLM.from_pretrained(path, **kwargs), "causal"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kind


# Where a checkpoint folder keeps its image processor: transformers 4 (and an image processor saved on its own) writes
# preprocessor_config.json; transformers 5 saves a whole processor (e.g. a Llava one) as processor_config.json only.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def image_processor_for(folder: Optional[str], vision_config: Any):
    """The folder's own image processor if it saved one (either layout; its mean/std/size are what the encoder was
    trained with), else a CLIP-style one sized to the encoder."""
    from transformers import AutoImageProcessor

    if folder and any(os.path.isfile(os.path.join(folder, name)) for name in PROCESSOR_FILES):
        return AutoImageProcessor.from_pretrained(folder)
    return clip_style_image_processor(int(vision_config.image_size))
