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
import importlib.util
import os
from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")

#: what every launcher (torchrun, the deepspeed launcher, accelerate launch) sets for each process it starts
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
# clusters whose own variables DeepSpeed turns into the launcher's (deepspeed.comm.comm: AzureML, SageMaker)
_CLUSTER_VARIABLES = ("AZUREML_EXPERIMENT_ID", "SM_TRAINING_ENV")


def check_deepspeed_launch(deepspeed_config: Optional[str]) -> None:
    """Refuse a `--deepspeed` run that DeepSpeed could not start, before anything is loaded or written.

    DeepSpeed joins its process group only when training begins (`deepspeed.initialize`, from the Trainer's first
    step). Without the variables a launcher sets, it then looks for an MPI job through `mpi4py` -- a plain
    `python -m memvp_peft.train --deepspeed ...` without mpi4py fails there with "No module named 'mpi4py'", after the
    run has started. Nothing is refused where DeepSpeed would find its ranks: under a launcher, in a process group
    already joined, with mpi4py installed (an MPI job, or a single process), or on a cluster DeepSpeed reads itself.
    """
    if not deepspeed_config or all(name in os.environ for name in LAUNCHER_VARIABLES):
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if importlib.util.find_spec("mpi4py") is not None or any(name in os.environ for name in _CLUSTER_VARIABLES):
        return
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    raise ValueError(
        f"--deepspeed {deepspeed_config} needs a launcher: DeepSpeed learns each process's rank from the variables "
        f"a launcher sets ({', '.join(missing)} are not set), and without them it looks for an MPI job through "
        "mpi4py, which is not installed. Run it under one, on one GPU too -- `torchrun --nproc_per_node 1 -m "
        "memvp_peft.train ...`, `deepspeed --num_gpus 1 --module memvp_peft.train ...` or `accelerate launch -m "
        "memvp_peft.train ...` -- or drop --deepspeed."
    )


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
