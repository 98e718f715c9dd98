"""Leaving a torch.distributed run cleanly.

A DeepSpeed engine holds gloo/NCCL process-group handles. Left to interpreter exit, they are destroyed in no particular
order, and a rank that finishes before the others (in `memvp-train`, every rank but 0 while rank 0 evaluates the saved
adapter) occasionally aborts with "terminate called without an active exception" after all its work is done -- torchrun
then reports the whole run as failed. Tearing the process group down explicitly, once the objects that hold it are
gone, made that rarer but not impossible (it still happened in 1 of ~20 CI runs under ZeRO-3, with the early rank
idle for the seconds rank 0 spent answering). So a successful run also *finishes together*: every rank waits at a
last barrier (:func:`wait_for_every_rank`) until rank 0's single-process work is done, and only then does each tear
its group down -- no rank ever leaves while a peer still holds the group.
"""

from __future__ import annotations

import gc
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def leave_process_group() -> None:
    """Destroy the default process group (and every subgroup) if this process joined one; a no-op otherwise.

    Call it at the very end of a launched program, after the Trainer and its DeepSpeed engine are out of scope:
    `gc.collect()` first frees the engine's reference cycles so that nothing uses a group after it is destroyed.
    It is local to the process (no collective), so a rank that finishes early does not wait for the others.
    """
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_then_leave_process_group(main: Callable[[], T]) -> T:
    """Run a launched program's `main()` and leave the process group afterwards, whether it returned or raised.

    The one exit path of a script run under torchrun (the integrations/ recipes): left to interpreter exit, the
    teardown would happen in no particular order (module docstring). Returns what `main()` returned.
    """
    try:
        return main()
    finally:
        leave_process_group()


def wait_for_every_rank() -> None:
    """A last barrier on the success path of a launched program; a no-op outside a multi-process run.

    Call it once every rank's work is done (rank 0 included), before :func:`leave_process_group`. Never call it from
    an error path: a rank that failed mid-collective would wait here for peers that wait elsewhere; on failure
    torchrun stops the other ranks itself.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            torch.distributed.barrier()
