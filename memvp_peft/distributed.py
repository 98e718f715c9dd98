"""Leaving a torch.distributed run cleanly.

A DeepSpeed engine holds gloo/NCCL process-group handles. Left to interpreter exit, they are destroyed in no particular
order, and a rank that finishes before the others (in `memvp-train`, every rank but 0 while rank 0 evaluates the saved
adapter) occasionally aborts with "terminate called without an active exception" after all its work is done -- torchrun
then reports the whole run as failed. Tearing the process group down explicitly, once the objects that hold it are
gone, makes the exit deterministic.
"""

from __future__ import annotations

import gc

import torch


def leave_process_group() -> None:
    """Destroy the default process group (and every subgroup) if this process joined one; a no-op otherwise.

    Call it at the very end of a launched program, after the Trainer and its DeepSpeed engine are out of scope:
    `gc.collect()` first frees the engine's reference cycles so that nothing uses a group after it is destroyed.
    It is local to the process (no collective), so a rank that finishes early does not wait for the others.
    """
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
