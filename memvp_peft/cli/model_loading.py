"""What `memvp-train` and `memvp-infer` both load, loaded the same way by both: a base model (a local folder or a Hub
id, as `from_pretrained` takes) with its image processor, and an adapter's two files -- its `adapter_config.json` and
the run manifest `memvp_cli.json`.

Why one module: an adapter only answers as it was trained when the other program sees the same model and feeds it the
same way. Both programs load a base with the same Auto class for the same name, the same revision, the same tokenizer
padding, the same image processor -- or an adapter trained by one would be evaluated by the other on a different
model. A Hub id is downloaded when online and read from the Hugging Face cache offline; a name that can be neither is
one clear error before anything loads (`memvp_peft.hub.check_model_source`). `trust_remote_code` is off unless the user
turns it on (`--trust_remote_code`), as in transformers: it runs code from the model repo.

The run manifest: the adapter config holds the MemVP math; it cannot say whether the images went through an external
vision encoder (and which), a VLM's own tower, or the built-in digit patches, how array images were scaled, how the
pixels were normalised (`image_normalization`), nor how the questions were prompted (`prompt_template`,
`chat_template`). `memvp-train` writes that into `memvp_cli.json` next to the adapter, and `memvp-infer` reads it so
that it feeds images exactly as training did.

Both adapter files are read before any model loads, and every way they can be damaged (not JSON, not an object, a
missing or foreign `peft_type`, a value of the wrong type) is one `ValueError` naming the file: without it a damaged
folder surfaces as a KeyError or AttributeError traceback from inside peft or from the code that uses the value.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from typing import Any, Iterator, Optional

import torch

from ..hub import check_model_source, hub_errors, is_hub_id, is_offline, not_resolved_message
from ..vision import clip_style_image_processor
from .options import IMAGE_NORMALIZATIONS  # absent from manifests older than it: 'encoder'


# ------------------------------------------------------------------------------------------------------ the base model


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


@contextlib.contextmanager
def without_peft_probe_warning() -> Iterator[None]:
    """Silence one FutureWarning while a model is wrapped or loaded with peft, and only that one.

    peft 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in
    favour of `is_activation_checkpointing`: every `get_peft_model` / `PeftModel.from_pretrained` printed the warning,
    about code that is neither ours nor the user's. Scoped (`catch_warnings`), so the process's filters are unchanged.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


# ---------------------------------------------------------------------------------------------------- the run manifest

#: the run manifest: how `memvp-train` fed images and prompts to the adapter
RUN_MANIFEST = "memvp_cli.json"
#: the file peft writes next to the adapter weights (the same name as `tuner.save_load.CONFIG_NAME`)
ADAPTER_CONFIG = "adapter_config.json"
#: what the manifest may hold as `featurizer` (None: the images go through a vision encoder or a VLM tower)
FEATURIZERS = (None, "digit_patches")
#: what the manifest may hold as `kind` (how `load_base` loaded the base)
KINDS = (None, "causal", "seq2seq", "vlm")


def write_run_manifest(output_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (a staged file moved into place): a crash mid-write never leaves a truncated JSON
    that would make every later `memvp-infer` on this adapter fail."""
    path = os.path.join(output_dir, RUN_MANIFEST)
    staged = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staged, "w") as handle:
            json.dump(manifest, handle, indent=2)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):  # the write failed: drop the partial file, keep the previous manifest
            os.remove(staged)


def _read_json_object(path: str, holds: str) -> dict[str, Any]:
    """The JSON object in `path`; anything else (unreadable, not JSON, a list, null) is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         "the adapter folder is damaged: save or train the adapter again.") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({holds}), got {type(data).__name__}.")
    return data


def _check_manifest_value(path: str, key: str, value: Any) -> None:
    if key == "featurizer" and value not in FEATURIZERS:
        raise ValueError(f"{path}: 'featurizer' must be one of {list(FEATURIZERS)}, got {value!r}.")
    if key == "kind" and value not in KINDS:
        raise ValueError(f"{path}: 'kind' must be one of {list(KINDS)}, got {value!r}.")
    if key == "vision_model_name_or_path" and value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"{path}: 'vision_model_name_or_path' must be a folder path, a Hub id or null, got {value!r}.")
    if key == "image_normalization" and value not in IMAGE_NORMALIZATIONS:
        raise ValueError(f"{path}: 'image_normalization' must be one of {list(IMAGE_NORMALIZATIONS)}, got {value!r}.")
    if key == "prompt_template" and value is not None and not (isinstance(value, str) and "{question}" in value):
        raise ValueError(f"{path}: 'prompt_template' must be null or a str with a {{question}} field, got {value!r}.")
    if key == "chat_template" and value is not None and not isinstance(value, bool):
        raise ValueError(f"{path}: 'chat_template' must be true, false or null, got {value!r}.")
    if key == "array_value_range" and value is not None:
        numbers = isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not numbers or value[0] >= value[1]:
            raise ValueError(f"{path}: 'array_value_range' must be null or [low, high] with finite low < high, "
                             f"got {value!r}.")


def read_run_manifest(adapter: str) -> dict[str, Any]:
    """The run manifest, or {} for an adapter trained with the Python API (`memvp-infer` then asks for what it needs).

    Each value `memvp-infer` uses is checked (keys it does not know are kept and ignored, so that a manifest written
    by a newer `memvp-train` still reads)."""
    path = os.path.join(adapter, RUN_MANIFEST)
    if not os.path.isfile(path):
        return {}
    manifest = _read_json_object(path, "how memvp-train fed images to the adapter")
    for key, value in manifest.items():
        _check_manifest_value(path, key, value)
    return manifest


def read_adapter_config(adapter: str) -> Any:
    """The adapter's `MemVPConfig`, read from `adapter/adapter_config.json` with one clear error for each way the
    file can be wrong: peft's own reader answers a list or null with a TypeError, a missing `peft_type` with a
    TypeError and another method's config by loading that method (which then fails on the MemVP weights)."""
    from ..tuner.config import MemVPConfig
    from ..tuner.config import MEMVP_NAME, is_memvp_peft_type

    path = os.path.join(adapter, ADAPTER_CONFIG)
    data = _read_json_object(path, "a peft adapter config")
    if "peft_type" not in data:
        raise ValueError(f"{path} has no 'peft_type': it is not a peft adapter config (expected peft_type "
                         f"{MEMVP_NAME!r}).")
    if not is_memvp_peft_type(data["peft_type"]):
        raise ValueError(f"{path} is a {data['peft_type']!r} adapter, not a MemVP one (peft_type {MEMVP_NAME!r}); "
                         "memvp-infer runs MemVP adapters -- load other methods with peft's PeftModel.from_pretrained.")
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{path}: 'base_model_name_or_path' must be a folder path, a Hub id or null, got {base!r}.")
    try:
        return MemVPConfig.from_pretrained(adapter)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{path} is not a valid MemVP adapter config: {error}") from error
