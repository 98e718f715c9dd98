"""How one call is measured, and on what: wall and CPU timers, the decode step clock, peak allocator bytes, KV-cache
bytes -- and the device, processor, load and package versions that every report records beside its numbers.

Apart from the sweep so that the sweep and the profiler time the very same calls, and so that what lies inside a
timed region (and what does not: gradient resets, mode switches) is visible in one place. Timings mean little
without the machine and its load, so the same place says what the calls ran on.

On CUDA the host only queues kernels, so a host clock around a call measures how fast Python enqueues, not how long
the GPU works. There every timed call starts on an idle device (`synchronize`), is bracketed by CUDA events and
ends with a synchronisation; "wall" is the events' elapsed time (first queued kernel to the last one finished) and
"cpu" the host process's CPU time, which shows how launch-bound a phase is. Decode steps are timestamped by an
event recorded on the stream at every step, and peaks come from `torch.cuda.max_memory_allocated`. What may run
where is decided before anything is built (`cli.device_problem`).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .methods import Batch, Method


def package_version(package: str) -> Optional[str]:
    """The installed version of `package`, or None where its metadata is missing."""
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # pragma: no cover
        return None


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load average (None where the platform has none): how busy the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux, else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: str) -> str:
    """What the numbers were measured on: the GPU's name for CUDA (the CPU is recorded separately)."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on `device` (a no-op on CPU, where every op has finished when it returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a HF KV cache (``DynamicCache`` with ``.layers`` or the legacy tuple of tuples)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        total = 0
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (tuple, list)):
        return sum(cache_nbytes(item) for item in cache)
    return 0


@contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence the profiler's native (kineto) start/stop lines on fd 2; Python exceptions still propagate."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # pragma: no cover  (no real fd 2)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_allocated_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated by torch's allocator of `device` while `fn` runs, above the level before it.

    CPU: from the allocation/free events of ``torch.profiler`` with ``profile_memory=True`` (running sum of the event
    sizes, in time order; frees of tensors that existed before count negative, so the number is the net growth).
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the level before.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []

    def walk(node: Any) -> None:
        if type(node.extra_fields).__name__ == "_ExtraFields_Allocation":
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return peak


class _StepClock:
    """StoppingCriteria that timestamps every generated token and never stops generation itself.

    On CUDA the stamp is an event recorded on the stream (the host reaches the criteria before the GPU has finished
    the step); `seconds_since` reads it after the call, once everything has been synchronised."""

    def __init__(self, device: torch.device) -> None:
        from transformers import StoppingCriteria

        outer = self
        self.cuda = device.type == "cuda"

        class Clock(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                if outer.cuda:
                    event = torch.cuda.Event(enable_timing=True)
                    event.record()
                    outer.stamps.append(event)
                else:
                    outer.stamps.append(time.perf_counter())
                outer.cpu_stamps.append(time.process_time())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.stamps: list[Any] = []
        self.cpu_stamps: list[float] = []
        self.criteria = Clock()

    def start(self) -> Any:
        """A stamp for the start of the call, of the same kind as the steps' stamps."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, earlier: Any, later: Any) -> float:
        return earlier.elapsed_time(later) / 1e3 if self.cuda else later - earlier


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, float]]:
    """Run `fn`; its wall-clock seconds and this process's CPU seconds (``time.process_time``).

    With one torch thread the CPU time is the wall time minus the time the process sat descheduled: on a machine
    shared with other jobs it is the steadier measure. With several threads it sums them (CPU-seconds). On CUDA the
    wall time is that of CUDA events around the call on an idle device (see the module docstring).
    """
    if device.type != "cuda":
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cpu = time.process_time()
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, {"wall": start.elapsed_time(end) / 1e3, "cpu": time.process_time() - cpu}


def time_train_step(method: Method, batch: Batch) -> dict[str, float]:
    """One forward + backward; the gradients are reset before and after, outside the timed region."""
    method.train(True)
    method.zero_grad()
    _, timing = _timed(lambda: method.loss(batch).backward(), method.device)
    method.zero_grad()
    return timing


@torch.no_grad()
def time_prefill(method: Method, batch: Batch) -> tuple[dict[str, float], int]:
    """One forward over the prompt as `generate` does first; its timing and the bytes of the KV cache it built."""
    method.train(False)
    out, timing = _timed(lambda: method.prefill(batch), method.device)
    return timing, cache_nbytes(out.past_key_values)


@torch.no_grad()
def time_generate(method: Method, batch: Batch, new_tokens: int) -> tuple[dict[str, float], dict[str, float]]:
    """(time to first token, decode seconds per token after the first) of one greedy generate call."""
    from transformers import StoppingCriteriaList

    method.train(False)
    clock = _StepClock(method.device)
    synchronize(method.device)
    start, cpu_start = clock.start(), time.process_time()
    out = method.generate(batch, new_tokens, stopping_criteria=StoppingCriteriaList([clock.criteria]))
    synchronize(method.device)
    stamps, cpu = clock.stamps, clock.cpu_stamps
    generated = method.new_tokens(batch, out).shape[1]
    if len(stamps) < 2 or generated != new_tokens:
        raise RuntimeError(f"{method.name}: expected {new_tokens} new tokens, got {generated} ({len(stamps)} steps)")
    steps = len(stamps) - 1
    return (
        {"wall": clock.seconds(start, stamps[0]), "cpu": cpu[0] - cpu_start},
        {"wall": clock.seconds(stamps[0], stamps[-1]) / steps, "cpu": (cpu[-1] - cpu[0]) / steps},
    )


def median(values: list[float]) -> float:
    """Median of `values`, NaN for none (a phase that was not measured)."""
    return float(statistics.median(values)) if values else float("nan")
