"""Benchmark MemVP against input-space visual prompting + LoRA (LLaVA style) and text-only + LoRA.

    python -m memvp_peft.bench                       # 3x3 sweep N in {64,256,576} x T in {32,64,256}, B=4
    python -m memvp_peft.bench --quick               # CI smoke: tiny model, one point, one repeat (< 30 s)
    python -m memvp_peft.bench --accuracy            # accuracy at equal budget on scikit-learn's real digits
    python -m memvp_peft.bench --profile             # + torch.profiler tables of MemVP vs text-only (one point)

(also installed as the console script ``memvp-bench``). Three methods on ONE frozen base model, built and measured
in one process, interleaved (each repeat runs A, B, C back to back per phase, the first method rotating: A, B, C,
B, C, A, ...); tables give the median over the repeats, ratios the median of the per-repeat ratios (calls of one
repeat share the machine's load, so the ratio cancels most drift). Wall clock and process CPU time are both kept.
The methods:

* ``memvp``: this package. ``num_memory_slots = N + extra_slots`` (the authors' 256 -> 320), projector hidden 128,
  the paper's dropout 0.1 / scales. The sequence stays T tokens long.
* ``input_lora``: LLaVA-style input-space prompting: the same kind of projector (Linear -> SiLU -> Linear to the
  model width) applied to the N visual features, prepended as N extra input embeddings via ``inputs_embeds``
  (attention mask ones, labels -100), plus peft LoRA r=8 on q_proj/v_proj. The sequence is N + T tokens long.
* ``text_lora``: the same LoRA on the T text tokens alone (no image): the floor every visual method pays.

Per (N, T) and method: training step (forward + backward, optimizer excluded, gradients reset with
``zero_grad(set_to_none=True)`` outside the timed region), prefill latency (one forward over the prompt with
``use_cache=True, logits_to_keep=1`` -- what ``generate`` does first), decode time per token with the KV cache
(greedy ``generate`` with ``min_new_tokens = max_new_tokens = 32``; per-step timestamps from a StoppingCriteria,
(t_32 - t_1) / 31), KV-cache bytes (``past_key_values`` after prefill), MemVP's per-call memory K/V bytes, trainable
parameters, and peak memory: the peak of torch's CPU allocator above the level before the call (bytes allocated
by tensors; from the allocation events of ``torch.profiler(profile_memory=True)``, measured in a separate untimed
run). Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` into ``--output_dir``, and compares every
ratio with what matmul FLOPs predict (``flop_model``). See docs/benchmarks.md for measured results.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from .tuner.memory import build_projector

METHODS = ("memvp", "input_lora", "text_lora")
METHOD_LABELS = {
    "memvp": "MemVP",
    "input_lora": "input-space + LoRA",
    "text_lora": "text only + LoRA",
}
DEFAULT_MODEL = dict(
    vocab_size=2000, hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
    num_key_value_heads=8,
)
QUICK_MODEL = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=2,
    num_key_value_heads=2,
)


# ------------------------------------------------------------------------------------------------------ measuring


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
def _quiet_native_stderr() -> Iterator[None]:
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


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated by torch's CPU allocator while `fn` runs, above the level before it.

    From the allocation/free events of ``torch.profiler`` with ``profile_memory=True`` (running sum of the event
    sizes, in time order; frees of tensors that existed before count negative, so the number is the net growth).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    """StoppingCriteria that timestamps every generated token and never stops generation itself."""

    def __init__(self) -> None:
        from transformers import StoppingCriteria

        outer = self

        class Clock(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                outer.stamps.append(time.perf_counter())
                outer.cpu_stamps.append(time.process_time())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []
        self.criteria = Clock()


def count_trainable(modules: list[nn.Module]) -> int:
    seen, total = set(), 0
    for module in modules:
        for param in module.parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


# ------------------------------------------------------------------------------------------------------- methods


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_features: torch.Tensor


class Method:
    """One way of feeding the image: uniform train / prefill / generate calls for the benchmark."""

    name: str
    model: nn.Module

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model]

    def trainable_parameters(self) -> int:
        return count_trainable(self.trainable_modules())

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    def train(self, mode: bool = True) -> None:
        for module in self.trainable_modules():
            module.train(mode)

    #: whether `generate` returns the prompt in front of the new tokens (not with `inputs_embeds`)
    returns_prompt = True

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for `batch` (without labels)."""
        raise NotImplementedError

    def labels(self, batch: Batch) -> torch.Tensor:
        return batch.labels

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.model(**self.inputs(batch), labels=self.labels(batch)).loss

    def prefill(self, batch: Batch) -> Any:
        return self.model(**self.inputs(batch), use_cache=True, logits_to_keep=1)

    def generate(self, batch: Batch, new_tokens: int, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**self.inputs(batch), **_generate_kwargs(self.model, new_tokens), **kwargs)

    def new_tokens(self, batch: Batch, output: torch.Tensor) -> torch.Tensor:
        """The generated tokens of `generate`'s output (the prompt removed where it was returned)."""
        return output[:, batch.input_ids.shape[1] :] if self.returns_prompt else output

    def visual_state_bytes(self, batch: Batch) -> int:
        """Bytes of per-call state besides the KV cache (MemVP's keys/values of the memory)."""
        return 0

    def sequence_length(self, batch: Batch) -> int:
        return batch.input_ids.shape[1]


def _generate_kwargs(model: nn.Module, new_tokens: int) -> dict[str, Any]:
    config = model.config if hasattr(model, "config") else None
    pad = getattr(config, "pad_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=pad)


class MemVPMethod(Method):
    name = "memvp"

    def __init__(self, base: nn.Module, visual_dim: int, num_slots: int, projector_hidden_dim: int) -> None:
        import memvp_peft  # noqa: F401  (registers the MEMVP peft type)
        from peft import get_peft_model

        from .tuner.config import MemVPConfig

        self.num_slots = num_slots
        config = MemVPConfig(
            visual_dim=visual_dim, num_memory_slots=num_slots, projector_hidden_dim=projector_hidden_dim,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, config)

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "image_features": batch.image_features}

    def visual_state_bytes(self, batch: Batch) -> int:
        d = self.model.get_input_embeddings().weight.shape[1]
        return 2 * batch.input_ids.shape[0] * self.num_slots * d * 4  # K and V of the memory, (B, n, d) fp32


class LoRAMethod(Method):
    """peft LoRA on the frozen base; with ``visual=True`` the projected features are prepended as input embeddings."""

    def __init__(
        self, base: nn.Module, visual: bool, visual_dim: int, projector_hidden_dim: int, lora_r: int,
        lora_alpha: int, lora_dropout: float, target_modules: list[str],
    ) -> None:
        from peft import LoraConfig, get_peft_model

        self.name = "input_lora" if visual else "text_lora"
        self.visual = visual
        self.returns_prompt = not visual  # generate() from inputs_embeds returns only the new tokens
        config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, config)
        d = self.model.get_input_embeddings().weight.shape[1]
        self.projector = build_projector(visual_dim, projector_hidden_dim, d) if visual else None

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model] + ([self.projector] if self.projector is not None else [])

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        if not self.visual:
            return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        visual = self.projector(batch.image_features.to(embeds.dtype))
        ones = torch.ones(visual.shape[:2], dtype=batch.attention_mask.dtype)
        return {
            "inputs_embeds": torch.cat([visual, embeds], dim=1),
            "attention_mask": torch.cat([ones, batch.attention_mask], dim=1),
        }

    def labels(self, batch: Batch) -> torch.Tensor:
        if not self.visual:
            return batch.labels
        ignore = torch.full(batch.image_features.shape[:2], -100, dtype=batch.labels.dtype)  # no loss on the image
        return torch.cat([ignore, batch.labels], dim=1)

    def sequence_length(self, batch: Batch) -> int:
        return batch.input_ids.shape[1] + (batch.image_features.shape[1] if self.visual else 0)


# ---------------------------------------------------------------------------------------------------- base model


def build_base_model(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, local_files_only=True, torch_dtype=torch.float32
        )
    else:
        shape = dict(QUICK_MODEL if args.quick else DEFAULT_MODEL)
        for key, arg in (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
                         ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size")):
            if getattr(args, arg) is not None:
                shape[key] = getattr(args, arg)
        if args.hidden_size is not None:
            shape["num_attention_heads"] = shape["num_key_value_heads"] = max(1, args.hidden_size // 64)
        longest = max(args.num_visual_tokens) + max(args.text_lengths) + args.new_tokens + 8
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(
            LlamaConfig(**shape, max_position_embeddings=max(2048, longest), pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
        )
    model.requires_grad_(False)
    return model


def describe_model(model: nn.Module) -> dict[str, Any]:
    config = model.config
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "hidden_size": get("hidden_size", "d_model", "n_embd"),
        "num_layers": get("num_hidden_layers", "n_layer"),
        "intermediate_size": get("intermediate_size", "ffn_dim", "n_inner"),
        "num_attention_heads": get("num_attention_heads", "n_head"),
        "num_key_value_heads": get("num_key_value_heads"),
        "vocab_size": get("vocab_size"),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def forward_flops_per_token(info: dict[str, Any], context: float) -> float:
    """Matmul FLOPs of one token's forward through a Llama-shaped model attending to `context` earlier tokens."""
    d, layers, inter = info["hidden_size"], info["num_layers"], info["intermediate_size"] or 4 * info["hidden_size"]
    heads, kv = info["num_attention_heads"] or 1, info["num_key_value_heads"] or info["num_attention_heads"] or 1
    kv_width = d * kv // heads
    per_layer = 2 * (2 * d * d + 2 * d * kv_width + 3 * d * inter) + 4 * context * d
    return layers * per_layer


# --------------------------------------------------------------------------------------------------------- sweep


def make_batch(batch_size: int, text_len: int, visual_tokens: int, visual_dim: int, vocab: int, seed: int) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch_size, text_len), generator=generator)
    return Batch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        labels=ids.clone(),
        image_features=torch.randn(batch_size, visual_tokens, visual_dim, generator=generator),
    )


def _timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run `fn`; its wall-clock seconds and this process's CPU seconds (``time.process_time``).

    With one torch thread the CPU time is the wall time minus the time the process sat descheduled: on a machine
    shared with other jobs it is the steadier measure. With several threads it sums them (CPU-seconds).
    """
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def time_train_step(method: Method, batch: Batch) -> dict[str, float]:
    method.train(True)
    method.zero_grad()
    _, timing = _timed(lambda: method.loss(batch).backward())
    method.zero_grad()
    return timing


@torch.no_grad()
def time_prefill(method: Method, batch: Batch) -> tuple[dict[str, float], int]:
    method.train(False)
    out, timing = _timed(lambda: method.prefill(batch))
    return timing, cache_nbytes(out.past_key_values)


@torch.no_grad()
def time_generate(method: Method, batch: Batch, new_tokens: int) -> tuple[dict[str, float], dict[str, float]]:
    """(time to first token, decode seconds per token after the first) of one greedy generate call."""
    from transformers import StoppingCriteriaList

    method.train(False)
    clock = _StepClock()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = method.generate(batch, new_tokens, stopping_criteria=StoppingCriteriaList([clock.criteria]))
    stamps, cpu = clock.stamps, clock.cpu_stamps
    generated = method.new_tokens(batch, out).shape[1]
    if len(stamps) < 2 or generated != new_tokens:
        raise RuntimeError(f"{method.name}: expected {new_tokens} new tokens, got {generated} ({len(stamps)} steps)")
    steps = len(stamps) - 1
    return (
        {"wall": stamps[0] - start, "cpu": cpu[0] - cpu_start},
        {"wall": (stamps[-1] - stamps[0]) / steps, "cpu": (cpu[-1] - cpu[0]) / steps},
    )


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    base = build_base_model(args)
    info = describe_model(base)
    vocab = info["vocab_size"]
    d = info["hidden_size"]
    methods_wanted = [m for m in METHODS if m in args.methods]

    # Each method owns a deep copy of the same frozen base (peft modifies the model in place).
    lora_methods: dict[str, Method] = {}
    for name in ("input_lora", "text_lora"):
        if name in methods_wanted:
            lora_methods[name] = LoRAMethod(
                copy.deepcopy(base), name == "input_lora", args.visual_dim, args.projector_hidden_dim, args.lora_r,
                args.lora_alpha, args.lora_dropout, args.lora_targets,
            )
    memvp_cache: dict[int, MemVPMethod] = {}

    def method_for(name: str, visual_tokens: int) -> Method:
        if name != "memvp":
            return lora_methods[name]
        slots = visual_tokens + args.extra_slots
        if slots not in memvp_cache:
            memvp_cache.clear()  # one MemVP model alive at a time
            memvp_cache[slots] = MemVPMethod(copy.deepcopy(base), args.visual_dim, slots, args.projector_hidden_dim)
        return memvp_cache[slots]

    points = [(n, t) for n in args.num_visual_tokens for t in args.text_lengths]
    load_start = _loadavg()
    phases = 3
    per_point = len(methods_wanted) * (phases * (args.repeats + 1) + (0 if args.no_memory else 2))
    progress = tqdm(total=len(points) * per_point, desc="memvp-bench", unit="call", dynamic_ncols=True,
                    disable=args.no_progress)
    results = []
    for point_index, (visual_tokens, text_len) in enumerate(points):
        batch = make_batch(args.batch_size, text_len, visual_tokens, args.visual_dim, vocab, args.seed + point_index)
        methods = [method_for(name, visual_tokens) for name in methods_wanted]
        samples: dict[str, dict[str, list[float]]] = {
            m.name: {f"{k}{c}": [] for k in ("train", "prefill", "ttft", "decode") for c in ("", "_cpu")}
            for m in methods
        }

        def record(name: str, key: str, timing: dict[str, float]) -> None:
            samples[name][key].append(timing["wall"])
            samples[name][f"{key}_cpu"].append(timing["cpu"])

        kv_bytes: dict[str, int] = {}
        progress.set_postfix_str(f"N={visual_tokens} T={text_len}")
        # warm-up (untimed): one call of every phase per method
        for method in methods:
            time_train_step(method, batch)
            progress.update(1)
            _, kv_bytes[method.name] = time_prefill(method, batch)
            progress.update(1)
            time_generate(method, batch, args.new_tokens)
            progress.update(1)
        # interleaved repeats: A, B, C, B, C, A, C, A, B, ... within each phase (the first method rotates so that no
        # method always runs right after the same other one)
        for repeat in range(args.repeats):
            order = methods[repeat % len(methods):] + methods[: repeat % len(methods)]
            for method in order:
                record(method.name, "train", time_train_step(method, batch))
                progress.update(1)
            for method in order:
                record(method.name, "prefill", time_prefill(method, batch)[0])
                progress.update(1)
            for method in order:
                ttft, decode = time_generate(method, batch, args.new_tokens)
                record(method.name, "ttft", ttft)
                record(method.name, "decode", decode)
                progress.update(1)
        peaks: dict[str, dict[str, Optional[int]]] = {m.name: {"train": None, "generate": None} for m in methods}
        if not args.no_memory:
            for method in methods:
                method.train(True)
                method.zero_grad()
                peaks[method.name]["train"] = peak_allocated_bytes(lambda: method.loss(batch).backward())
                method.zero_grad()
                progress.update(1)
                method.train(False)
                with torch.no_grad():
                    peaks[method.name]["generate"] = peak_allocated_bytes(
                        lambda: method.generate(batch, args.new_tokens)
                    )
                progress.update(1)
        for method in methods:
            s = samples[method.name]
            results.append({
                "N": visual_tokens,
                "T": text_len,
                "B": args.batch_size,
                "method": method.name,
                "label": METHOD_LABELS[method.name],
                "sequence_length": method.sequence_length(batch),
                "num_memory_slots": getattr(method, "num_slots", None),
                "trainable_params": method.trainable_parameters(),
                "train_step_ms": 1e3 * _median(s["train"]),
                "prefill_ms": 1e3 * _median(s["prefill"]),
                "ttft_ms": 1e3 * _median(s["ttft"]),
                "decode_ms_per_token": 1e3 * _median(s["decode"]),
                "train_step_cpu_ms": 1e3 * _median(s["train_cpu"]),
                "prefill_cpu_ms": 1e3 * _median(s["prefill_cpu"]),
                "decode_cpu_ms_per_token": 1e3 * _median(s["decode_cpu"]),
                "train_step_min_ms": 1e3 * min(s["train"]),
                "prefill_min_ms": 1e3 * min(s["prefill"]),
                "decode_min_ms_per_token": 1e3 * min(s["decode"]),
                "kv_cache_bytes": kv_bytes[method.name],
                "visual_state_bytes": method.visual_state_bytes(batch),
                "peak_train_bytes": peaks[method.name]["train"],
                "peak_generate_bytes": peaks[method.name]["generate"],
                "samples_ms": {k: [round(1e3 * v, 3) for v in vals] for k, vals in s.items()},
            })
    progress.close()

    meta = {
        "command": "python -m memvp_peft.bench " + " ".join(args.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "model": info,
        "model_name_or_path": args.model_name_or_path or "built-in LlamaConfig (random init)",
        "batch_size": args.batch_size,
        "visual_dim": args.visual_dim,
        "projector_hidden_dim": args.projector_hidden_dim,
        "extra_slots": args.extra_slots,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "targets": args.lora_targets},
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "dtype": "float32",
        "timing": (
            "median of interleaved repeats (round-robin over the methods, first method rotated each repeat) after one "
            "warm-up call; train step = forward + backward (optimizer "
            "excluded); prefill = one forward with use_cache=True, logits_to_keep=1; decode = (t_last - t_first) / "
            "(new_tokens - 1) from StoppingCriteria timestamps inside one greedy generate call"
        ),
        "memory": (
            "peak bytes allocated by torch's CPU allocator above the level before the call, from "
            "torch.profiler(profile_memory=True) allocation events, in a separate untimed run"
        ),
    }
    report = {"meta": meta, "results": results, "ratios": compute_ratios(results, info, args)}
    report["targets"] = check_targets(report["ratios"])
    return report


def flop_model(info: dict[str, Any], visual_tokens: int, text_len: int, slots: int, args: argparse.Namespace,
               new_tokens: int) -> dict[str, dict[str, float]]:
    """Matmul FLOPs per sample of every method and phase (LoRA's own FLOPs, < 0.5%, are ignored).

    Forward of a token: `forward_flops_per_token` (+ the LM head: on every position in training, on the last one in
    prefill). Backward of the frozen base computes input gradients only (~1x the forward of each layer it passes).
    How far back it must go differs: LoRA on q/v of layer 0 (and input-space's projector under layer 0) need every
    layer's backward, while MemVP's first trainable tensors are the keys/values read *inside* layer 0's FFN, so
    layer 0's attention and FFN get no backward at all. MemVP's memory branch act(x K^T) V costs 4*n*d per token per
    layer forward and 8*n*d backward (dX, d(scores), dK, dV; 6*n*d in layer 0, which needs no dX). Its projector
    runs on N visual tokens, as input-space's does.
    """
    d, layers, vocab = info["hidden_size"], info["num_layers"], info["vocab_size"]
    heads = info["num_attention_heads"] or 1
    kv_width = d * (info["num_key_value_heads"] or heads) // heads
    head = 2 * d * vocab
    qkv = 2 * (d * d + 2 * d * kv_width)  # layer 0's q/k/v input gradients: never needed (embeddings are frozen)
    dv, hid = args.visual_dim, args.projector_hidden_dim
    proj_fwd = 2 * visual_tokens * (dv * hid + hid * d)
    proj_train = proj_fwd + 2 * visual_tokens * (dv * hid + 2 * hid * d)  # + dW1, dW2 and d(hidden)
    mem_fwd = 4 * slots * d * layers
    mem_bwd = 8 * slots * d * (layers - 1) + 6 * slots * d
    t_all, v_all = text_len, text_len + visual_tokens
    body = lambda tokens: tokens * forward_flops_per_token(info, tokens / 2)  # noqa: E731  (causal: mean context L/2)
    lora_train = lambda tokens: 2 * (body(tokens) + tokens * head) - tokens * qkv  # noqa: E731
    decode_ctx = lambda length: forward_flops_per_token(info, length + new_tokens / 2) + head  # noqa: E731
    return {
        "text_lora": {"train": lora_train(t_all), "prefill": body(t_all) + head, "decode": decode_ctx(t_all)},
        "memvp": {
            "train": body(t_all) * (1 + (layers - 1) / layers) + 2 * t_all * head + t_all * (mem_fwd + mem_bwd)
            + proj_train,
            "prefill": body(t_all) + head + t_all * mem_fwd + proj_fwd,
            "decode": decode_ctx(t_all) + mem_fwd,
        },
        "input_lora": {"train": lora_train(v_all) + proj_train, "prefill": body(v_all) + head + proj_fwd,
                       "decode": decode_ctx(v_all)},
    }


def _paired(numerator: list[float], denominator: list[float]) -> float:
    """Median over the repeats of the per-repeat ratio: calls of one repeat ran back to back, so they share the
    machine's load at that moment and the ratio cancels most of the drift that other jobs cause."""
    ratios = [a / b for a, b in zip(numerator, denominator) if b > 0]
    return float(statistics.median(ratios)) if ratios else float("nan")


# (ratio key, numerator method, denominator method, sample key)
RATIO_DEFS = (
    ("train_speedup_vs_input", "input_lora", "memvp", "train"),
    ("prefill_speedup_vs_input", "input_lora", "memvp", "prefill"),
    ("decode_memvp_over_input", "memvp", "input_lora", "decode"),
    ("train_memvp_over_text", "memvp", "text_lora", "train"),
    ("prefill_memvp_over_text", "memvp", "text_lora", "prefill"),
    ("decode_memvp_over_text", "memvp", "text_lora", "decode"),
)


def compute_ratios(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> list[dict]:
    """MemVP vs the baselines per (N, T) (paired per-repeat ratios, wall and CPU time), and the ratios that matmul
    FLOPs predict -- for MemVP / text-only that is the physical floor."""
    by_key = {(r["N"], r["T"], r["method"]): r for r in results}
    ratios = []
    for n_vis, t_len in sorted({(r["N"], r["T"]) for r in results}):
        rows = {m: by_key.get((n_vis, t_len, m)) for m in METHODS}
        row: dict[str, Any] = {"N": n_vis, "T": t_len}
        for key, num, den, sample in RATIO_DEFS:
            if rows[num] and rows[den]:
                a, b = rows[num]["samples_ms"], rows[den]["samples_ms"]
                row[key] = _paired(a[sample], b[sample])
                row[f"cpu_{key}"] = _paired(a[f"{sample}_cpu"], b[f"{sample}_cpu"])
        mem = rows["memvp"]
        if mem and info.get("hidden_size") and info.get("num_layers") and info.get("vocab_size"):
            flops = flop_model(info, n_vis, t_len, mem["num_memory_slots"], args, args.new_tokens)
            row["gflops_per_sample"] = {m: {k: round(v / 1e9, 4) for k, v in f.items()} for m, f in flops.items()}
            row["flops_train_speedup_vs_input"] = flops["input_lora"]["train"] / flops["memvp"]["train"]
            row["flops_prefill_speedup_vs_input"] = flops["input_lora"]["prefill"] / flops["memvp"]["prefill"]
            row["floor_train_over_text"] = flops["memvp"]["train"] / flops["text_lora"]["train"]
            row["floor_prefill_over_text"] = flops["memvp"]["prefill"] / flops["text_lora"]["prefill"]
            if "train_memvp_over_text" in row:
                row["train_memvp_over_floor"] = row["train_memvp_over_text"] / row["floor_train_over_text"]
                row["prefill_memvp_over_floor"] = row["prefill_memvp_over_text"] / row["floor_prefill_over_text"]
        ratios.append(row)
    return ratios


TARGETS = (
    ("train_speedup_vs_input", ">=", 5.0, "MemVP training step >= 5x faster than input-space + LoRA"),
    ("train_memvp_over_text", "<=", 1.10, "MemVP training step <= 1.10x the text-only step"),
    ("prefill_speedup_vs_input", ">=", 5.0, "MemVP prefill >= 5x faster than input-space + LoRA"),
    ("decode_memvp_over_input", "<=", 1.0, "MemVP decode per token no slower than input-space + LoRA"),
)


FLOP_PREDICTION = {
    "train_speedup_vs_input": "flops_train_speedup_vs_input",
    "train_memvp_over_text": "floor_train_over_text",
    "prefill_speedup_vs_input": "flops_prefill_speedup_vs_input",
    "prefill_memvp_over_text": "floor_prefill_over_text",
}


def check_targets(ratios: list[dict[str, Any]], point: tuple[int, int] = (256, 64)) -> dict[str, Any]:
    row = next((r for r in ratios if (r["N"], r["T"]) == point), None)
    if row is None:
        return {"point": None, "checks": []}
    checks = []
    for key, op, bound, text in TARGETS:
        value = row.get(key)
        if value is None:
            continue
        met = value >= bound if op == ">=" else value <= bound
        cpu = row.get(f"cpu_{key}")
        predicted = row.get(FLOP_PREDICTION.get(key, ""))
        checks.append({
            "target": text, "metric": key, "value": round(value, 3), "bound": f"{op} {bound}", "met": met,
            "cpu_value": None if cpu is None else round(cpu, 3),
            "cpu_met": None if cpu is None else (cpu >= bound if op == ">=" else cpu <= bound),
            "flops_predicted": None if predicted is None else round(predicted, 3),
        })
    return {"point": {"N": point[0], "T": point[1]}, "checks": checks}


# -------------------------------------------------------------------------------------------------------- output


def _version(package: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # pragma: no cover
        return None


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mb(value: Optional[int]) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def markdown_report(report: dict[str, Any]) -> str:
    meta = report["meta"]
    model = meta["model"]
    lines = [
        "# memvp-bench results",
        "",
        f"Model: {meta['model_name_or_path']} ({model['model_type']}, width {model['hidden_size']}, "
        f"{model['num_layers']} layers, FFN {model['intermediate_size']}, vocab {model['vocab_size']}, "
        f"{model['parameters'] / 1e6:.1f}M params, {meta['dtype']}). Batch {meta['batch_size']}, visual_dim "
        f"{meta['visual_dim']}, {meta['new_tokens']} new tokens, median of {meta['repeats']} interleaved repeats.",
        f"Machine: {meta['processor']}, {meta['cpu_count']} CPUs, torch {meta['torch']} ({meta['torch_threads']} "
        f"threads), transformers {meta['transformers']}, peft {meta['peft']}.",
        f"Timing: {meta['timing']}.",
        f"Memory: {meta['memory']}.",
        "",
        "| N | T | method | seq len | trainable | train step ms | prefill ms | decode ms/token | KV cache MB "
        "| MemVP K/V MB | peak train MB | peak generate MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['N']} | {r['T']} | {r['label']} | {r['sequence_length']} | {r['trainable_params']:,} | "
            f"{r['train_step_ms']:.1f} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
            f"{_mb(r['kv_cache_bytes'])} | {_mb(r['visual_state_bytes']) if r['visual_state_bytes'] else '-'} | "
            f"{_mb(r['peak_train_bytes'])} | {_mb(r['peak_generate_bytes'])} |"
        )
    lines += [
        "",
        "Ratios, each the median over the repeats of the per-repeat ratio (calls of one repeat ran back to back). "
        "speed-up = input-space time / MemVP time; 'MemVP/x' = MemVP time / x time. Each cell: wall clock / CPU "
        "time of the process [prediction from matmul FLOPs, `flop_model`; for MemVP/text that is the physical "
        "floor: text-only + the memory branch + the projector, with MemVP's shorter backward].",
        "",
        "| N | T | train speed-up vs input | train MemVP/text | prefill speed-up vs input | prefill MemVP/text "
        "| decode MemVP/input | decode MemVP/text |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict[str, Any], key: str, predicted: Optional[str] = None) -> str:
        if key not in row:
            return "-"
        text = f"{row[key]:.2f} / {row.get('cpu_' + key, float('nan')):.2f}"
        if predicted and predicted in row:
            text += f" [{row[predicted]:.2f}]"
        return text

    for row in report["ratios"]:
        lines.append(
            f"| {row['N']} | {row['T']} | {cell(row, 'train_speedup_vs_input', 'flops_train_speedup_vs_input')} | "
            f"{cell(row, 'train_memvp_over_text', 'floor_train_over_text')} | "
            f"{cell(row, 'prefill_speedup_vs_input', 'flops_prefill_speedup_vs_input')} | "
            f"{cell(row, 'prefill_memvp_over_text', 'floor_prefill_over_text')} | "
            f"{cell(row, 'decode_memvp_over_input')} | {cell(row, 'decode_memvp_over_text')} |"
        )
    targets = report.get("targets", {})
    if targets.get("checks"):
        point = targets["point"]
        lines += ["", f"Targets at N={point['N']}, T={point['T']}:", ""]
        for check in targets["checks"]:
            extra = f"; CPU time {check['cpu_value']}" if check.get("cpu_value") is not None else ""
            if check.get("flops_predicted") is not None:
                extra += f"; matmul FLOPs predict {check['flops_predicted']}"
            lines.append(f"- {'met' if check['met'] else 'NOT met'}: {check['target']} (wall clock {check['value']}"
                         f"{extra}; target {check['bound']})")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    points = sorted({(r["N"], r["T"]) for r in results})
    labels = [f"N={n}\nT={t}" for n, t in points]
    methods = [m for m in METHODS if any(r["method"] == m for r in results)]
    panels = [
        ("train_step_ms", "training step (fwd+bwd), ms", 1.0),
        ("prefill_ms", "prefill latency, ms", 1.0),
        ("decode_ms_per_token", "decode per token (KV cache), ms", 1.0),
        ("peak_train_bytes", "peak train memory, MiB", 1 / 2**20),
        ("kv_cache_bytes", "KV cache after prefill, MiB", 1 / 2**20),
    ]
    colors = {"memvp": "tab:green", "input_lora": "tab:red", "text_lora": "tab:gray"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    width = 0.8 / max(1, len(methods))
    for ax, (key, title, scale) in zip(axes.flat, panels):
        measured = False
        for i, method in enumerate(methods):
            values = []
            for point in points:
                row = next((r for r in results if (r["N"], r["T"]) == point and r["method"] == method), None)
                value = row.get(key) if row else None
                values.append(float("nan") if value is None else value * scale)
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(points))]
            ax.bar(xs, values, width, label=METHOD_LABELS[method], color=colors[method])
            measured = measured or any(v > 0 for v in values if not math.isnan(v))
        ax.set_title(title)
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels(labels, fontsize=7)
        if measured:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.grid(axis="y", alpha=0.3)
    ax = axes.flat[5]
    ratios = report["ratios"]
    xs = range(len(ratios))
    for key, label, marker in (
        ("train_speedup_vs_input", "train: input-space / MemVP", "o"),
        ("prefill_speedup_vs_input", "prefill: input-space / MemVP", "s"),
        ("train_memvp_over_text", "train: MemVP / text-only", "^"),
        ("decode_memvp_over_input", "decode: MemVP / input-space", "v"),
    ):
        ax.plot(list(xs), [r.get(key, float("nan")) for r in ratios], marker=marker, label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"N={r['N']}\nT={r['T']}" for r in ratios], fontsize=7)
    ax.set_yscale("log")
    ax.set_title("ratios")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(
        f"MemVP vs input-space + LoRA vs text-only + LoRA -- width {meta['model']['hidden_size']}, "
        f"{meta['model']['num_layers']} layers, B={meta['batch_size']}, {meta['processor']}, "
        f"{meta['torch_threads']} threads, torch {meta['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], output_dir: Path, stem: str, markdown: str,
                  plot: Optional[Callable[[dict, Path], None]]) -> dict[str, str]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{stem}.json", "markdown": output_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        else:
            paths["png"] = output_dir / f"{stem}.png"
            plot(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------------------------------------------- profiling


def _classify(name: str, shapes: list, dims: dict[str, int]) -> str:
    """Attribute one profiled op (name + input shapes) to a part of the step, by the sizes it touches."""
    flat = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) > 0]
    if not flat:
        return "ops without recorded tensor shapes (KV-cache cat, allocations, casts)"
    sizes = {d for s in flat for d in s}
    if dims["slots"] in sizes:
        if any(k in name for k in ("bmm", "matmul", "::mm", "baddbmm")):
            return "MemVP memory branch: matmuls x K^T, a V (+ their backward)"
        return "MemVP memory branch: act/dropout/scale/add, K/V build, dK/dV accumulation"
    if dims["visual_dim"] in sizes or dims["proj_hidden"] in sizes or any(
        len(s) == 3 and s[0] == dims["batch"] and s[1] == dims["visual_tokens"] for s in flat
    ):
        return "projector + visual-feature checks"
    if any(len(s) == 2 and dims["lora_r"] in s for s in flat):
        return "LoRA matmuls"
    if "bernoulli" in name or "dropout" in name:
        return "dropout outside the memory branch (LoRA dropout)"
    return "frozen base model (matmuls, attention, norms, loss)"


def profile_point(args: argparse.Namespace, output_dir: Path) -> dict[str, str]:
    """torch.profiler op tables of training steps and prefills of MemVP and text-only + LoRA, and a breakdown."""
    from torch.profiler import ProfilerActivity, profile

    base = build_base_model(args)
    info = describe_model(base)
    visual_tokens, text_len = args.profile_point
    batch = make_batch(args.batch_size, text_len, visual_tokens, args.visual_dim, base.config.vocab_size, args.seed)
    slots = visual_tokens + args.extra_slots
    dims = dict(slots=slots, visual_dim=args.visual_dim, proj_hidden=args.projector_hidden_dim, batch=args.batch_size,
                visual_tokens=visual_tokens, lora_r=args.lora_r)
    if len({slots, info["hidden_size"], info["intermediate_size"], args.visual_dim, args.projector_hidden_dim}) < 5:
        print("warning: profile breakdown is ambiguous (two of slots/width/FFN/visual_dim/projector are equal)")
    methods = [
        MemVPMethod(copy.deepcopy(base), args.visual_dim, slots, args.projector_hidden_dim),
        LoRAMethod(copy.deepcopy(base), False, args.visual_dim, args.projector_hidden_dim, args.lora_r,
                   args.lora_alpha, args.lora_dropout, args.lora_targets),
    ]
    calls = max(3, args.repeats)
    written: dict[str, str] = {}
    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    for phase in ("train", "prefill"):
        runs = {
            m.name: (lambda m=m: time_train_step(m, batch)) if phase == "train" else (lambda m=m: time_prefill(m, batch))
            for m in methods
        }
        for run in runs.values():
            run()
        # one short profile per call, interleaved A, B, A, B, ... so that machine noise hits both methods alike
        sums: dict[str, dict[str, float]] = {m.name: {} for m in methods}
        tables: dict[str, Any] = {}
        for _ in range(calls):
            for method in methods:
                with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    runs[method.name]()
                averages = prof.key_averages(group_by_input_shape=True)
                tables.setdefault(method.name, averages)
                for event in averages:
                    category = _classify(event.key, event.input_shapes or [], dims)
                    parts = sums[method.name]
                    parts[category] = parts.get(category, 0.0) + event.self_cpu_time_total / 1e3 / calls
        for method in methods:
            path = output_dir / f"profile_{method.name}_{phase}_N{visual_tokens}_T{text_len}.txt"
            table = tables[method.name].table(sort_by="self_cpu_time_total", row_limit=45)
            path.write_text(f"{method.name} {phase}, one call (the first of {calls} profiled), N={visual_tokens} "
                            f"T={text_len}\n{table}\n")
            written[f"{method.name}_{phase}"] = str(path)
        breakdown[phase] = sums
    lines = [
        f"# Where the time goes: MemVP vs text only + LoRA (N={visual_tokens}, T={text_len}, B={args.batch_size}, "
        f"width {info['hidden_size']}, {info['num_layers']} layers, {slots} memory slots, "
        f"{torch.get_num_threads()} threads)",
        "",
        "Self CPU time per call (ms) from torch.profiler, ops attributed by the tensor sizes they touch.",
        "",
    ]
    for phase, per_method in breakdown.items():
        categories = sorted({c for parts in per_method.values() for c in parts},
                            key=lambda c: -max(p.get(c, 0.0) for p in per_method.values()))
        names = list(per_method)
        lines += [f"## {phase}", "", "| part | " + " | ".join(METHOD_LABELS[n] for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for category in categories:
            lines.append(f"| {category} | " + " | ".join(f"{per_method[n].get(category, 0.0):.2f}" for n in names) + " |")
        lines.append("| **total** | " + " | ".join(f"**{sum(per_method[n].values()):.2f}**" for n in names) + " |")
        lines.append("")
    path = output_dir / f"profile_breakdown_N{visual_tokens}_T{text_len}.md"
    path.write_text("\n".join(lines))
    (output_dir / f"profile_breakdown_N{visual_tokens}_T{text_len}.json").write_text(json.dumps(breakdown, indent=2))
    written["breakdown"] = str(path)
    print("\n".join(lines))
    return written


# ----------------------------------------------------------------------------------------------------- accuracy

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = "what digit is this ?"


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """MemVP vs input-space + LoRA on real digits at equal budget.

    Same frozen base, same steps, batches, optimizer and schedule, comparable trainable parameters. Each method is
    trained at every learning rate of ``--lr``; the one with the best validation accuracy (a slice of the training
    images) is selected, and its held-out test accuracy is the result.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    from .local_models import FixedVocabTokenizer, tiny_llama_config
    from .tasks import digit_scan_tokens

    digits = load_digits()
    features = digit_scan_tokens(digits.images)
    targets = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(targets)), test_size=0.2, random_state=args.seed, stratify=digits.target
    )
    train_idx, val_idx = train_test_split(
        train_idx, test_size=0.15, random_state=args.seed, stratify=digits.target[train_idx]
    )
    if args.quick:
        val_idx, test_idx = val_idx[:64], test_idx[:64]
    tokenizer = FixedVocabTokenizer([*PROMPT.split(), *DIGIT_WORDS])
    prompt = tokenizer.encode(PROMPT, add_bos=True)

    def base_model() -> nn.Module:
        torch.manual_seed(args.seed)
        config = tiny_llama_config(
            len(tokenizer), args.acc_hidden_size, max_position_embeddings=64, tie_word_embeddings=False,
            # a frozen random lm_head with the default 0.02 init caps the answer probability (logits within +-2.5)
            initializer_range=0.1,
        )
        model = LlamaForCausalLM(config)
        model.requires_grad_(False)
        return model

    visual_dim = features.shape[2]
    steps = args.steps if args.steps is not None else (10 if args.quick else 1000)
    lrs = args.lr[:1] if args.quick else args.lr

    def build(name: str) -> Method:
        if name == "memvp":
            return MemVPMethod(base_model(), visual_dim, features.shape[1] + args.acc_extra_slots,
                               args.projector_hidden_dim)
        return LoRAMethod(base_model(), True, visual_dim, args.projector_hidden_dim, args.lora_r, args.lora_alpha,
                          args.lora_dropout, args.lora_targets)

    def batch_of(idx: Any) -> Batch:
        idx = torch.as_tensor(idx)
        rows = [prompt + [tokenizer.token_to_id[DIGIT_WORDS[int(y)]], tokenizer.eos_token_id] for y in targets[idx]]
        ids = torch.tensor(rows)
        labels = ids.clone()
        labels[:, : len(prompt)] = -100  # answer-only loss
        return Batch(ids, torch.ones_like(ids), labels, features[idx])

    def schedule(step: int) -> float:
        warm = max(1, steps // 20)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    @torch.no_grad()
    def accuracy(method: Method, indices: Any) -> float:
        method.train(False)
        correct = 0
        for chunk in range(0, len(indices), 256):
            part = indices[chunk : chunk + 256]
            batch = batch_of(part)
            batch.input_ids = batch.input_ids[:, : len(prompt)]
            batch.attention_mask = batch.attention_mask[:, : len(prompt)]
            out = method.model.generate(**method.inputs(batch), max_new_tokens=2, do_sample=False, pad_token_id=0,
                                        eos_token_id=tokenizer.eos_token_id)
            for row, y in zip(method.new_tokens(batch, out), targets[torch.as_tensor(part)]):
                correct += tokenizer.decode(row) == DIGIT_WORDS[int(y)]
        return correct / len(indices)

    runs = []
    for lr in lrs:
        for name in ("memvp", "input_lora"):
            method = build(name)
            params = method.parameters()
            optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            generator = torch.Generator().manual_seed(args.seed)  # identical batches for both methods
            order, cursor, losses = torch.randperm(len(train_idx), generator=generator), 0, []
            method.train(True)
            start = time.perf_counter()
            for _ in tqdm(range(steps), desc=f"{name} lr={lr:g}", unit="step", dynamic_ncols=True,
                          disable=args.no_progress, leave=False):
                if cursor + args.acc_batch_size > len(order):
                    order, cursor = torch.randperm(len(train_idx), generator=generator), 0
                idx = train_idx[order[cursor : cursor + args.acc_batch_size].numpy()]
                cursor += args.acc_batch_size
                method.train(True)
                loss = method.loss(batch_of(idx))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            train_time = time.perf_counter() - start
            val_accuracy = accuracy(method, val_idx)
            start = time.perf_counter()
            test_accuracy = accuracy(method, test_idx)
            eval_time = time.perf_counter() - start
            runs.append({
                "method": name,
                "label": METHOD_LABELS[name],
                "lr": lr,
                "val_accuracy": val_accuracy,
                "heldout_accuracy": test_accuracy,
                "trainable_params": method.trainable_parameters(),
                "train_time_s": round(train_time, 2),
                "ms_per_step": round(1e3 * train_time / steps, 2),
                "eval_time_s": round(eval_time, 3),
                "final_loss": float(np.mean(losses[-20:])),
                "losses": [round(v, 5) for v in losses],
            })
    selected = {}
    for name in ("memvp", "input_lora"):
        mine = [r for r in runs if r["method"] == name]
        best = max(mine, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
        best["selected"] = True
        selected[name] = {k: v for k, v in best.items() if k != "losses"}
    for run in runs:
        run.setdefault("selected", False)
    return {
        "meta": {
            "command": "python -m memvp_peft.bench " + " ".join(args.argv),
            "task": "scikit-learn load_digits (1,797 real 8x8 scans); 16 visual tokens per image (2x2 patches: 4 "
                    "pixels + (row, col)), visual_dim 6; prompt 'what digit is this ?', answer the digit word + "
                    "<eos>, answer-only loss; accuracy = exact greedy generate of the digit word",
            "split": f"stratified: {len(train_idx)} train / {len(val_idx)} validation (selects the lr) / "
                     f"{len(test_idx)} held-out test",
            "base": f"random frozen Llama, width {args.acc_hidden_size}, 2 layers, FFN {2 * args.acc_hidden_size} "
                    f"(seed {args.seed})",
            "steps": steps,
            "batch_size": args.acc_batch_size,
            "learning_rates": lrs,
            "optimizer": "AdamW(0.9, 0.95), weight decay 0.02, 5% linear warm-up then half-cosine, grad clip 1.0",
            "memvp": f"{features.shape[1] + args.acc_extra_slots} slots (16 visual + {args.acc_extra_slots} learned), "
                     f"projector hidden {args.projector_hidden_dim}, paper scales/dropout",
            "input_lora": f"same projector to width {args.acc_hidden_size}, 16 prepended input embeddings, LoRA r="
                          f"{args.lora_r} alpha {args.lora_alpha} dropout {args.lora_dropout} on {args.lora_targets}",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
        },
        "selected": selected,
        "runs": runs,
    }


def accuracy_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# memvp-bench accuracy at equal budget",
        "",
        f"Task: {meta['task']}. Split: {meta['split']}. Base: {meta['base']}. {meta['steps']} steps of batch "
        f"{meta['batch_size']} for every run, {meta['optimizer']}. MemVP: {meta['memvp']}. Input-space: "
        f"{meta['input_lora']}. {meta['processor']}, {meta['torch_threads']} thread(s), torch {meta['torch']}.",
        "",
        "Selected by validation accuracy (one lr per method):",
        "",
        "| method | trainable | lr | validation | held-out test | train time s | ms/step | test eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["selected"].values():
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['lr']:g} | {100 * r['val_accuracy']:.1f}% | "
            f"**{100 * r['heldout_accuracy']:.1f}%** | {r['train_time_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['eval_time_s']:.2f} |"
        )
    lines += ["", "All runs:", "", "| method | lr | validation | held-out test | final loss | train time s |",
              "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {100 * r['val_accuracy']:.1f}% | {100 * r['heldout_accuracy']:.1f}% | "
            f"{r['final_loss']:.4f} | {r['train_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"memvp": "tab:green", "input_lora": "tab:red"}
    for r in report["runs"]:
        losses = np.asarray(r["losses"])
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), smooth, color=colors[r["method"]],
                alpha=1.0 if r["selected"] else 0.25, lw=1.8 if r["selected"] else 1.0,
                label=f"{r['label']} lr={r['lr']:g}: {100 * r['heldout_accuracy']:.1f}% test, {r['train_time_s']:.0f} s"
                + (" (selected)" if r["selected"] else ""))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-only cross-entropy (moving average)")
    ax.set_title("digits: MemVP vs input-space + LoRA, equal steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="memvp-bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name_or_path", default=None, help="local HF causal-LM folder (default: built-in Llama)")
    parser.add_argument("--hidden_size", type=int, default=None, help="built-in model width (default 512)")
    parser.add_argument("--num_layers", type=int, default=None, help="built-in model depth (default 4)")
    parser.add_argument("--intermediate_size", type=int, default=None, help="built-in model FFN width (default 1376)")
    parser.add_argument("--vocab_size", type=int, default=None, help="built-in model vocabulary (default 2000)")
    parser.add_argument("--num_visual_tokens", "-N", type=int, nargs="+", default=None, help="default 64 256 576")
    parser.add_argument("--text_lengths", "-T", type=int, nargs="+", default=None, help="default 32 64 256")
    parser.add_argument("--batch_size", "-B", type=int, default=None, help="default 4")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per point (default 5)")
    parser.add_argument("--new_tokens", type=int, default=32, help="greedy tokens generated for the decode timing")
    parser.add_argument("--visual_dim", type=int, default=None, help="visual feature width (default 1024, CLIP-L)")
    parser.add_argument("--extra_slots", type=int, default=64, help="MemVP slots beyond N (authors: 256 -> 320)")
    parser.add_argument("--projector_hidden_dim", type=int, default=128)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--lora_target_modules", default="q_proj,v_proj")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="docs/benchmarks")
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny model, one point, one repeat (< 30 s)")
    parser.add_argument("--no_memory", action="store_true", help="skip the (untimed) peak-memory runs")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler op tables of MemVP vs text-only + LoRA at --profile_point")
    parser.add_argument("--profile_point", type=int, nargs=2, default=(256, 64), metavar=("N", "T"))
    acc = parser.add_argument_group("accuracy at equal budget (--accuracy)")
    acc.add_argument("--accuracy", action="store_true",
                     help="run the digits accuracy comparison (MemVP vs input-space + LoRA) instead of the sweep")
    acc.add_argument("--steps", type=int, default=None, help="training steps per method (default 1000; quick: 10)")
    acc.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
                     help="peak learning rates tried for both methods; validation accuracy picks one per method")
    acc.add_argument("--acc_batch_size", type=int, default=32)
    acc.add_argument("--acc_hidden_size", type=int, default=128)
    acc.add_argument("--acc_extra_slots", type=int, default=16, help="MemVP slots beyond the 16 visual tokens")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.lora_targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    quick = args.quick
    if args.num_visual_tokens is None:
        args.num_visual_tokens = [16] if quick else [64, 256, 576]
    if args.text_lengths is None:
        args.text_lengths = [16] if quick else [32, 64, 256]
    if args.batch_size is None:
        args.batch_size = 2 if quick else 4
    if args.repeats is None:
        args.repeats = 1 if quick else 5
    if args.visual_dim is None:
        args.visual_dim = 32 if quick else 1024
    if args.accuracy:
        args.threads = args.threads or 1  # tiny matrices: one thread beats two that wait on each other
    elif quick:
        args.threads = args.threads or 1
        args.extra_slots = min(args.extra_slots, 16)
        args.projector_hidden_dim = min(args.projector_hidden_dim, 32)
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter would break the progress bar
    if args.accuracy:
        report = run_accuracy(args)
        markdown = accuracy_markdown(report)
        paths = write_outputs(report, output_dir, "accuracy", markdown, plot_accuracy)
        print(markdown)
    else:
        start = time.perf_counter()
        report = run_sweep(args)
        report["meta"]["wall_time_s"] = round(time.perf_counter() - start, 1)
        markdown = markdown_report(report)
        paths = write_outputs(report, output_dir, "benchmark", markdown, plot_report)
        print(markdown)
        if args.profile:
            paths.update(profile_point(args, output_dir))
    print("wrote " + ", ".join(paths.values()))
    report["paths"] = paths
    return report


if __name__ == "__main__":
    main()
