"""Loading a base model for `memvp-train` and `memvp-infer`: a local folder or a Hub id, as `from_pretrained` takes.

Both programs must load a base the same way -- the same Auto class for the same name, the same revision, the same
tokenizer padding, the same image processor -- or an adapter trained by one would be evaluated by the other on a
different model. A Hub id is downloaded when online and read from the Hugging Face cache offline; a name that can be
neither is one clear error before anything loads (`memvp_peft.hub.check_model_source`). `trust_remote_code` is off
unless the user turns it on (`--trust_remote_code`), as in transformers: it runs code from the model repo.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from ..hub import MODEL_SOURCE, check_model_source, hub_errors, is_hub_id, is_offline, not_resolved_message
from ..vision import clip_style_image_processor


def load_base(path: str, load_in_4bit: bool, bf16: bool, *, revision: Optional[str] = None,
              trust_remote_code: bool = False, what: str = "model_name_or_path"):
    """(model, tokenizer, kind) for a local HF folder or a Hub id; kind is 'causal', 'seq2seq' or 'vlm'.

    `what` names where `path` came from in the errors (a flag, or the adapter's record). The model keeps `path` as
    its `name_or_path` (a Hub id stays the id, not its cache folder), which is what peft records in the adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    check_model_source(path, what, revision)
    hub: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    with hub_errors(path, what, revision):
        config = AutoConfig.from_pretrained(path, **hub)
        kwargs: dict[str, Any] = dict(hub)
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
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, kind


# Where a checkpoint folder keeps its image processor: transformers 4 (and an image processor saved on its own) writes
# preprocessor_config.json; transformers 5 saves a whole processor (e.g. a Llava one) as processor_config.json only.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def image_processor_for(name: Optional[str], vision_config: Any, *, revision: Optional[str] = None,
                        trust_remote_code: bool = False):
    """The image processor `name` (a folder or a Hub id) saved, if it saved one (either layout; its mean/std/size
    are what the encoder was trained with), else a CLIP-style one sized to the encoder.

    For a Hub id, "saved one" is asked of the cache, then (online) of the Hub. Offline, a cache that holds neither
    file may just not have fetched it -- `from_pretrained(ID)` of a model fetches no processor files -- and falling
    back to CLIP defaults would silently replace the repo's own normalisation, so that is an error; only a cache
    that knows the repo lacks both (huggingface_hub's `.no_exist` entries, written by an online look-up) gets the
    defaults."""
    from transformers import AutoImageProcessor

    if name and is_hub_id(name):
        if _hub_has_processor(name, revision):
            with hub_errors(name, "image processor of", revision):
                return AutoImageProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    elif name and any(os.path.isfile(os.path.join(name, file)) for file in PROCESSOR_FILES):
        return AutoImageProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    return clip_style_image_processor(int(vision_config.image_size))


def _hub_has_processor(name: str, revision: Optional[str]) -> bool:
    """Whether the Hub repo `name` holds processor files: the cache first, then (online only) the Hub itself."""
    from huggingface_hub import _CACHED_NO_EXIST, file_exists, try_to_load_from_cache

    found = [try_to_load_from_cache(name, file, revision=revision) for file in PROCESSOR_FILES]
    if any(isinstance(path, str) for path in found):
        return True
    if all(path is _CACHED_NO_EXIST for path in found):
        return False
    what = "the image processor of"
    if is_offline():
        from huggingface_hub import constants

        raise ValueError(
            f"{what} {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) while downloads are off "
            f"(HF_HUB_OFFLINE=1): neither {' nor '.join(PROCESSOR_FILES)} is cached, nor a record that the repo lacks "
            "them, and CLIP defaults would silently replace its own mean/std. Download the repo once online "
            f"(`hf download {name}`: all its files), or pass a local folder (one without processor files gets CLIP "
            "defaults sized to the encoder)."
        )
    try:  # not a download: one look-up per file; a failed look-up is an error, never "no processor"
        return any(file_exists(name, file, revision=revision) for file in PROCESSOR_FILES)
    except Exception as error:  # httpx errors (no connection), gated / unknown repo or revision
        raise ValueError(not_resolved_message(name, what, revision, cause=f"{type(error).__name__}: {error}")) \
            from error
