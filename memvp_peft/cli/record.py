"""`memvp_cli.json`: how `memvp-train` turned images into the adapter's visual input; and reading an adapter's files.

The adapter config records the MemVP math; it cannot say whether the images went through an external vision encoder
(and which), a VLM's own tower, or the built-in digit patches, how array images were scaled, how the pixels were
normalised (`image_normalization`), nor how the questions were prompted (`prompt_template`, `chat_template`). `memvp-train` writes
that here, next to the adapter, and `memvp-infer` reads it so that it feeds images exactly as training did.

Both files are read here, before any model loads, and every way they can be damaged (not JSON, not an object, a
missing or foreign `peft_type`, a value of the wrong type) is one `ValueError` naming the file: without it a damaged
folder surfaces as a KeyError or AttributeError traceback from inside peft or from the code that uses the value.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from .options import IMAGE_NORMALIZATIONS  # absent from records older than it: 'encoder'

CLI_RECORD = "memvp_cli.json"
#: the file peft writes next to the adapter weights (the same name as `tuner.save_load.CONFIG_NAME`)
ADAPTER_CONFIG = "adapter_config.json"
#: what `memvp-train` can record as `featurizer` (None: the images go through a vision encoder or a VLM tower)
FEATURIZERS = (None, "digit_patches")
#: what `memvp-train` can record as `kind` (how `load_base` loaded the base)
KINDS = (None, "causal", "seq2seq", "vlm")



def write_cli_record(output_dir: str, record: dict[str, Any]) -> None:
    """Write the record atomically (a staged file moved into place): a crash mid-write never leaves a truncated JSON
    that would make every later `memvp-infer` on this adapter fail."""
    path = os.path.join(output_dir, CLI_RECORD)
    staged = f"{path}.tmp-{os.getpid()}"
    try:
        with open(staged, "w") as handle:
            json.dump(record, handle, indent=2)
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):  # the write failed: drop the partial file, keep the previous record
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


def _check_record_value(path: str, key: str, value: Any) -> None:
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


def read_cli_record(adapter: str) -> dict[str, Any]:
    """The record, or {} for an adapter trained with the Python API (`memvp-infer` then asks for what it needs).

    Each value `memvp-infer` uses is checked (keys it does not know are kept and ignored, so that a record written
    by a newer `memvp-train` still reads)."""
    path = os.path.join(adapter, CLI_RECORD)
    if not os.path.isfile(path):
        return {}
    record = _read_json_object(path, "how memvp-train fed images to the adapter")
    for key, value in record.items():
        _check_record_value(path, key, value)
    return record


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
