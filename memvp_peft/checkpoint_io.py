"""Safe adapter checkpoints: atomic saves, rank-0-only writes, and loading errors that name the file.

peft's `PeftModel.save_pretrained` writes straight into the target folder, so a crash mid-save (or a DeepSpeed rank
that believes it is the main process and holds only empty ZeRO-3 partitions) can leave a broken adapter where the
previous good one was. For MemVP models we wrap the two entry points:

* `save_pretrained`: only global rank 0 writes; everything is first written to a temporary folder next to the
  target, checked (no 0-element tensors), and then moved into place file by file with `os.replace` (atomic on
  POSIX), weights before config. The previous adapter stays intact until the new one is complete.
* `load_adapter` (used by `PeftModel.from_pretrained`): a truncated/corrupt `adapter_model.safetensors` or weights
  that do not fit the model raise a `ValueError` naming the file and the problem.

Non-MemVP models pass through untouched.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from peft import PeftModel

from .registration import MEMVP_PEFT_TYPE

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


def _is_memvp_model(model: Any) -> bool:
    return any(getattr(c, "peft_type", None) == MEMVP_PEFT_TYPE for c in getattr(model, "peft_config", {}).values())


def _global_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def check_adapter_file_complete(path: str) -> None:
    """Raise a ValueError if a saved adapter file is unreadable or holds empty (partitioned) tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            empty = [key for key in handle.keys() if handle.get_slice(key).get_shape().count(0)]
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"MemVP adapter file {path} is truncated or not a safetensors file: {error}") from error
    if empty:
        raise ValueError(
            f"MemVP refused to save {path}: tensors {empty[:5]} have 0 elements. These are unconsolidated DeepSpeed "
            "ZeRO-3 partitions: save from global rank 0 with the gathered state dict (trainer.save_model does this "
            "when TrainingArguments reports the right world size; on CPU pass use_cpu=True)."
        )


def _move_tree(source: str, target: str) -> None:
    """Move every file of `source` into `target` with atomic per-file replaces, weights first and config last."""
    entries = sorted(os.listdir(source), key=lambda name: (name == CONFIG_NAME, name))
    for name in entries:
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
            _move_tree(src, dst)
        else:
            os.replace(src, dst)


def atomic_save(original_save):
    @functools.wraps(original_save)
    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any):
        if not _is_memvp_model(self):
            return original_save(self, save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True) or _global_rank() != 0:
            return None
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".memvp-saving-", dir=save_directory)
        try:
            result = original_save(self, staging, *args, **kwargs)
            for folder, _, files in os.walk(staging):
                if WEIGHTS_NAME in files:
                    check_adapter_file_complete(os.path.join(folder, WEIGHTS_NAME))
            _move_tree(staging, save_directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    save_pretrained._memvp_atomic = True
    return save_pretrained


def _adapter_folder(model_id: Any, kwargs: dict) -> str | None:
    folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
    config = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as handle:
            peft_type = json.load(handle).get("peft_type")
    except (OSError, ValueError) as error:
        raise ValueError(f"MemVP: cannot read adapter config {config}: {error}") from error
    return folder if peft_type == MEMVP_PEFT_TYPE.value else None


def checked_load(original_load):
    @functools.wraps(original_load)
    def load_adapter(self, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
        folder = _adapter_folder(model_id, kwargs)
        if folder is None:
            return original_load(self, model_id, adapter_name, *args, **kwargs)
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise ValueError(f"MemVP adapter folder {folder} has no {WEIGHTS_NAME} (was the save interrupted?).")
        check_adapter_file_complete(weights)
        try:
            return original_load(self, model_id, adapter_name, *args, **kwargs)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"MemVP could not load {weights}: {error}") from error

    load_adapter._memvp_checked = True
    return load_adapter


def install() -> None:
    """Wrap `PeftModel.save_pretrained`/`load_adapter` once (idempotent)."""
    if not getattr(PeftModel.save_pretrained, "_memvp_atomic", False):
        PeftModel.save_pretrained = atomic_save(PeftModel.save_pretrained)
    if not getattr(PeftModel.load_adapter, "_memvp_checked", False):
        PeftModel.load_adapter = checked_load(PeftModel.load_adapter)
