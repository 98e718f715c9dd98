"""Helpers for tests that start real multi-process runs (torchrun, the deepspeed launcher, accelerate)."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a rendezvous or a 1-process gloo group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict:
    """This process's environment for a child launch on the CPU: one OpenMP thread per rank, no GPU, unbuffered
    output, and none of the rendezvous variables a surrounding launcher may have set (the child sets its own)."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",  # never pick up a GPU: these tests are about the CPU/gloo path
        CUDA_VISIBLE_DEVICES="",
        PYTHONWARNINGS="ignore",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env
