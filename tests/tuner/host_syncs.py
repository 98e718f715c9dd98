"""Counting host-device synchronisations on CPU: every call that would make the host wait for an accelerator.

On a GPU, `.item()`, `.tolist()`, `.cpu()`, `bool(t)`, `int(t)`, `torch.equal`, `nonzero`, boolean-mask indexing
and their kin copy a value to the host and stall the pipeline; on CPU they cost nothing, which is how they slip into
a hot path unnoticed. `SyncCounter` intercepts them for real while a model runs on CPU -- Python-level calls through
a `TorchFunctionMode`, aten-level ones (`_local_scalar_dense`, `nonzero`, ...) through a `TorchDispatchMode`, so
C++ code paths such as autograd formulas are seen too -- and attributes each one to the code that made it: the
first frame outside torch, `memvp_peft` or anything else (transformers, peft, the test). A sync made inside MemVP's
input validation (the checks of `tuner/visual_inputs.py`, the placeholder check of `tuner/entry.py`) is marked as
such: those are the value checks that run once per call, at its entry, on CPU tensors.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import memvp_peft

TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
PACKAGE_DIR = os.path.dirname(memvp_peft.__file__) + os.sep
HERE = os.path.abspath(__file__)
VALIDATION_FILE = os.path.join(PACKAGE_DIR, "tuner", "visual_inputs.py")
#: the checks of VALIDATION_FILE (the rest of it lays the inputs out and has them encoded: no validation)
VALIDATION_CHECKS = {"check_pixel_values", "validate_visual_inputs", "cast_checked", "_row_images",
                     "_checked_visual_tokens"}
VALIDATION_FUNCTIONS = {"_reject_image_placeholders"}

T = torch.Tensor
#: Python-level calls that read a tensor's value on the host
SYNC_CALLS = {
    T.item, T.tolist, T.cpu, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__, T.__complex__,
    T.nonzero, T.equal, T.allclose, T.is_nonzero, T.masked_select, T.unique, T.unique_consecutive, T.argwhere,
    torch.nonzero, torch.equal, torch.allclose, torch.is_nonzero, torch.masked_select, torch.unique,
    torch.unique_consecutive, torch.argwhere,
}
#: aten ops whose output size or result is a value the host must read
SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive"}  # + repeat_interleave.Tensor without an output_size (see _AtenLevel)


@dataclass(frozen=True)
class Sync:
    """One host read: what was called, at which level, by whom (`file:line function`), inside validation or not."""

    call: str
    level: str  # "python" or "aten"
    where: str
    ours: bool
    in_validation: bool


def _caller() -> tuple[str, bool, bool]:
    """The first frame outside torch and this helper, whether it is memvp_peft's, and whether any frame on the
    stack is MemVP's input validation."""
    frame = sys._getframe(2)
    found = None
    in_validation = False
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        name = frame.f_code.co_name
        if (path == VALIDATION_FILE and name in VALIDATION_CHECKS) or (
                name in VALIDATION_FUNCTIONS and path.startswith(PACKAGE_DIR)):
            in_validation = True
        if found is None and not path.startswith(TORCH_DIR) and path != HERE:
            found = (f"{os.path.relpath(path)}:{frame.f_lineno} {frame.f_code.co_name}", path.startswith(PACKAGE_DIR))
        frame = frame.f_back
    where, ours = found or ("<torch>", False)
    return where, ours, in_validation


def _indexes_with_a_bool_tensor(args: tuple) -> bool:
    """`x[mask]` with a boolean tensor: the output size depends on the mask's values."""
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def _moves_to_host(func: object, args: tuple, kwargs: dict) -> bool:
    """`.to("cpu")`: a copy to the host, spelled out in the code (a no-op on CPU tensors, a sync from an accelerator).
    A `torch.device` target is not counted: on CPU, `.to(device=x.device)` -- following another tensor, harmless on
    any device -- looks the same as a deliberate move to the host."""
    if func is not T.to:
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, str) and torch.device(t).type == "cpu" for t in targets)


class _PythonLevel(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        sync = func in SYNC_CALLS or (func is T.__getitem__ and _indexes_with_a_bool_tensor(args)) or (
            func in (torch.repeat_interleave, T.repeat_interleave) and len(args) > 1
            and isinstance(args[1], torch.Tensor) and kwargs.get("output_size") is None
        ) or _moves_to_host(func, args, kwargs)
        if sync:
            self.counter.record(name, "python")
        return func(*args, **kwargs)


class _AtenLevel(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name().split("::")[-1]
        if name == "repeat_interleave.Tensor":
            sync = kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
        else:
            sync = name in SYNC_OPS or name.split(".")[0] in SYNC_OPS
        if sync:
            self.counter.record(name, "aten")
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager recording every host read made inside it (both levels; see the module docstring)."""

    def __init__(self) -> None:
        self.syncs: list[Sync] = []
        self._modes = (_PythonLevel(self), _AtenLevel(self))

    def record(self, call: str, level: str) -> None:
        where, ours, in_validation = _caller()
        self.syncs.append(Sync(call, level, where, ours, in_validation))

    def __enter__(self) -> "SyncCounter":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def ours_outside_validation(self) -> list[Sync]:
        """Host reads that memvp_peft's own code made anywhere but in the validation at a call's entry."""
        return [s for s in self.syncs if s.ours and not s.in_validation]

    def in_validation(self, level: str) -> list[Sync]:
        return [s for s in self.syncs if s.in_validation and s.level == level]

    def outside_validation(self, level: str) -> list[Sync]:
        """Every host read at `level` outside MemVP's validation, whoever made it."""
        return [s for s in self.syncs if not s.in_validation and s.level == level]
