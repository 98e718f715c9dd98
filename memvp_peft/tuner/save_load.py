"""MemVP's rules for adapter files: what may be saved, what must be loaded, and an atomic, rank-0-only save.

The rules live where peft asks each tuner for them, so importing memvp_peft changes nothing for other peft users:

* saving -- `MemVPModel._get_adapter_state_dict` calls `refuse_partitioned_tensors` before peft writes the weights
  or the config (only its model card, README.md, is written by then): a DeepSpeed ZeRO-3 rank holding 0-element
  partitions must never replace a good adapter with empty tensors;
* loading -- `MemVPModel._remap_adapter_state_dict_for_load` insists on every adapter tensor with the right shape
  (peft only warns about missing keys; for MemVP a missing projector would silently stay random).

`PeftModel.save_pretrained` writes files in place, one after the other (peft does so for every tuner). Where a crash
must never cost the previous adapter -- memvp-train, the Trainer recipe -- `save_adapter(model, folder)` stages the
whole save next to the target and then moves it in file by file (weights before config), and `atomic_saves(model)`
makes one PeftModel *instance* save that way, so the HF `Trainer` (which calls `model.save_pretrained`) does too.
`check_adapter_folder` reads a folder before loading and names the file when it is incomplete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import types
from typing import Any, Mapping

import torch

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
STAGING_PREFIX = ".memvp-saving-"


def refuse_partitioned_tensors(state_dict: Mapping[str, torch.Tensor], where: str = "the adapter") -> None:
    """Raise a ValueError when a tensor about to be saved has 0 elements (an unconsolidated ZeRO-3 partition)."""
    empty = [key for key, value in state_dict.items() if isinstance(value, torch.Tensor) and value.numel() == 0]
    if empty:
        raise ValueError(
            f"MemVP refused to save {where}: tensors {empty[:5]} have 0 elements. These are unconsolidated DeepSpeed "
            "ZeRO-3 partitions: save from global rank 0 with the gathered state dict (trainer.save_model does this "
            "when TrainingArguments reports the right world size; on CPU pass use_cpu=True)."
        )


def check_adapter_file_complete(path: str) -> None:
    """Raise a ValueError if a saved adapter file is unreadable or holds empty (partitioned) tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            empty = [key for key in handle.keys() if handle.get_slice(key).get_shape().count(0)]
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(f"MemVP adapter file {path} is truncated or not a safetensors file: {error}") from error
    if empty:
        raise ValueError(f"MemVP adapter file {path} holds 0-element tensors {empty[:5]} (unconsolidated ZeRO-3 save).")


def check_adapter_folder(folder: str) -> None:
    """Check that `folder` holds a complete adapter (config + readable weights) before anything loads it."""
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(f"{folder} is not an adapter folder (no {CONFIG_NAME}).")
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise ValueError(f"MemVP adapter folder {folder} has no {WEIGHTS_NAME} (was the save interrupted?).")
    check_adapter_file_complete(weights)


def global_rank() -> int:
    """This process's rank: from the initialised process group, else the launcher's `RANK`, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


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


def save_adapter(peft_model: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """`peft_model.save_pretrained(save_directory, ...)`, staged: the previous adapter stays until the new one is whole.

    Only global rank 0 writes (and only when `is_main_process` is not False). The save goes to a temporary folder
    inside `save_directory`, is checked (readable, no 0-element tensors) and then moved into place with `os.replace`,
    weights before config; the staging folder is removed whatever happens.
    """
    if not kwargs.get("is_main_process", True) or global_rank() != 0:
        return None
    save = type(peft_model).save_pretrained
    os.makedirs(save_directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=save_directory)
    try:
        save(peft_model, staging, *args, **kwargs)
        for folder, _, files in os.walk(staging):
            if WEIGHTS_NAME in files:
                check_adapter_file_complete(os.path.join(folder, WEIGHTS_NAME))
        _move_tree(staging, save_directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return None


def atomic_saves(peft_model: Any) -> Any:
    """Make this one PeftModel instance save through `save_adapter` (the class and other models are untouched).

    The HF `Trainer` saves with `self.model.save_pretrained(...)`; an instance attribute is what it finds first.
    Returns the model, for chaining.
    """

    def save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
        return save_adapter(self, save_directory, *args, **kwargs)

    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    return peft_model
