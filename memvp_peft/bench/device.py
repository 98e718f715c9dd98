"""Where the benchmark runs: the device and compute dtype it was asked for, refused clearly when they cannot be had.

The timers and the peak-memory probe (`measure`) branch on the device of the method they measure: on CPU, wall and
process CPU clocks and the allocator events of `torch.profiler`; on CUDA, CUDA events around a synchronised call and
`torch.cuda.max_memory_allocated`. Those CUDA branches cannot run on a machine without a GPU, so everything they
need to *refuse* is decided here, before a model is built, and is testable anywhere.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


def device_problem(device: str, dtype: str) -> Optional[str]:
    """Why `--device device --dtype dtype` cannot run here (None when it can)."""
    if device not in DEVICES:
        return f"--device must be one of {', '.join(DEVICES)}, got {device!r}"
    if dtype not in DTYPES:
        return f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"
    if device == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if built is None
                   else f"this torch was built with CUDA {built} but no GPU is visible (CUDA_VISIBLE_DEVICES, driver)")
            return f"--device cuda was asked for, but CUDA is not available: {why}. Use --device cpu."
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return f"--dtype bfloat16 is not supported on {torch.cuda.get_device_name()}; use --dtype float16."
    return None


def device_name(device: str) -> str:
    """What the numbers were measured on: the GPU's name for CUDA (the CPU is recorded separately)."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def check_modes(args: argparse.Namespace) -> Optional[str]:
    """Modes that only exist on CPU (None when the combination is fine)."""
    if args.device == "cpu":
        return None
    if args.profile:
        return ("--profile attributes torch.profiler's self CPU time per op and runs on --device cpu only; on a GPU "
                "profile with torch.profiler (ProfilerActivity.CUDA) or Nsight Systems around `memvp-bench`")
    if args.accuracy:
        return "--accuracy trains tiny digit models and runs on --device cpu only"
    return None


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on CPU, where every op has finished when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
