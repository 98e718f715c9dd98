"""The speed and memory sweep: every (N, T) point, the methods interleaved, one result row per method and point.

All methods are built on deep copies of one frozen base in one process and run back to back within each repeat
(the first method rotating), so that load on a shared machine hits them alike. With several ``--layers`` depths the
whole sweep runs once per depth (one base at a time) and `depth_fit` separates per-layer from fixed costs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
from typing import Any, Optional

import torch
from torch import nn

from .base_model import build_base_model, describe_model, full_depth
from .depth_fit import fit_depths
from .device import device_name
from .machine import cpu_name, load_average, package_version
from .measure import median, peak_allocated_bytes, time_generate, time_prefill, time_train_step
from .long_context import build_memvp_method, layout_for
from .methods import ALL_METHODS, MEMVP_FORMS, METHOD_LABELS, LoRAMethod, Method, make_batch
from .ratios import TARGETS_BY_DEVICE, check_targets, compute_ratios


def _free(device: torch.device) -> None:
    """Give the previous depth's models back before the next depth is built (matters for 7B-class layers)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every method at every (N, T) point -- and at every depth of ``--layers`` -- and return the report
    with its results, meta, ratios, targets and (with two or more depths) the per-layer fit."""
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    depths = args.num_layers or [None]
    methods_wanted = [m for m in ALL_METHODS if m in args.methods]
    points = [(n, t) for n in args.num_visual_tokens for t in args.text_lengths]
    load_start = load_average()
    phases = 3
    per_point = len(methods_wanted) * (phases * (args.repeats + args.warmup) + (0 if args.no_memory else 2))
    progress = tqdm(total=len(depths) * len(points) * per_point, desc="memvp-bench", unit="call",
                    dynamic_ncols=True, disable=args.no_progress)
    results, infos = [], {}
    for depth in depths:
        base = build_base_model(args, depth)
        info = describe_model(base)
        infos[info["num_layers"]] = info
        results += _sweep_one_depth(args, base, info, methods_wanted, points, progress)
        del base
        _free(device)
    progress.close()
    info = infos[max(infos)]
    meta = {
        "command": "python -m memvp_peft.bench " + " ".join(args.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "peft": package_version("peft"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": load_average(),
        "model": info,
        "model_name_or_path": args.model_name_or_path or (
            f"random base of the {args.model_shape} shape" if args.model_shape else "built-in LlamaConfig (random init)"
        ),
        "model_shape": args.model_shape,
        "depths": sorted(infos),
        "full_depth": full_depth(args.model_shape),
        "device": args.device,
        "device_name": device_name(args.device),
        "cuda": torch.version.cuda,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "visual_dim": args.visual_dim,
        "projector_hidden_dim": args.projector_hidden_dim,
        "extra_slots": args.extra_slots,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                 "targets": args.lora_targets},
        "repeats": args.repeats,
        "time_cap_s": getattr(args, "time_cap_s", None),
        "layouts": {str(n): list(v) for n, v in (getattr(args, "layouts", None) or {}).items()},
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "attn_implementation": info.get("attn_implementation"),
        "timing": (
            "median of interleaved repeats (round-robin over the methods, first method rotated each repeat) after "
            + ("one warm-up call" if args.warmup == 1 else f"{args.warmup} warm-up calls") + "; train step = forward "
            "+ backward (optimizer excluded); prefill = one forward with use_cache=True, logits_to_keep=1; decode = "
            "(t_last - t_first) / (new_tokens - 1) from StoppingCriteria timestamps inside one greedy generate call"
            + ("; CUDA: every call starts on a synchronised device, wall = CUDA-event time, decode stamps are CUDA "
               "events recorded on the stream at every step" if args.device == "cuda" else "")
        ),
        "memory": (
            "peak bytes allocated by torch's CUDA allocator above the level before the call "
            "(torch.cuda.max_memory_allocated after reset_peak_memory_stats), in a separate untimed run"
            if args.device == "cuda" else
            "peak bytes allocated by torch's CPU allocator above the level before the call, from "
            "torch.profiler(profile_memory=True) allocation events, in a separate untimed run"
        ),
    }
    report = {"meta": meta, "results": results, "ratios": compute_ratios(results, infos, args)}
    report["depth_fit"] = fit_depths(results, meta["full_depth"])
    report["targets"] = check_targets(report["ratios"], targets=TARGETS_BY_DEVICE[args.device],
                                      full_depth_ratios=report["depth_fit"]["full_depth_ratios"])
    return report


def _sweep_one_depth(args: argparse.Namespace, base: nn.Module, info: dict[str, Any], methods_wanted: list[str],
                     points: list[tuple[int, int]], progress: Any) -> list[dict[str, Any]]:
    """Every (N, T) point on one base: the methods interleaved, one result row per method and point."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vocab = info["vocab_size"]
    # Each method owns a deep copy of the same frozen base (peft modifies the model in place).
    lora_methods: dict[str, Method] = {}
    for name in ("input_lora", "text_lora"):
        if name in methods_wanted:
            lora_methods[name] = LoRAMethod(
                copy.deepcopy(base), name == "input_lora", args.visual_dim, args.projector_hidden_dim, args.lora_r,
                args.lora_alpha, args.lora_dropout, args.lora_targets,
            )
    memvp_cache: dict[tuple[str, int], Method] = {}

    def method_for(name: str, visual_tokens: int) -> Method:
        if name not in MEMVP_FORMS:
            return lora_methods[name]
        if (name, visual_tokens) not in memvp_cache:
            for key in [k for k in memvp_cache if k[1] != visual_tokens]:  # one point's MemVP models alive at a time
                del memvp_cache[key]
            _free(device)
            memvp_cache[(name, visual_tokens)] = build_memvp_method(name, copy.deepcopy(base), args, visual_tokens)
        return memvp_cache[(name, visual_tokens)]

    results = []
    for point_index, (visual_tokens, text_len) in enumerate(points):
        images = layout_for(args, visual_tokens)[0]
        batch = make_batch(args.batch_size, text_len, visual_tokens, args.visual_dim, vocab, args.seed + point_index,
                           device, dtype, images=images)
        all_methods = [method_for(name, visual_tokens) for name in methods_wanted]
        # a method whose first training step runs past --time_cap_s or out of memory is reported with that status
        # and not measured further at this point (its row stays in the report)
        status, probe_ms = _probe(all_methods, batch, getattr(args, "time_cap_s", None))
        methods = [m for m in all_methods if m.name not in status]
        samples: dict[str, dict[str, list[float]]] = {
            m.name: {f"{k}{c}": [] for k in ("train", "prefill", "ttft", "decode") for c in ("", "_cpu")}
            for m in all_methods
        }

        def record(name: str, key: str, timing: dict[str, float]) -> None:
            samples[name][key].append(timing["wall"])
            samples[name][f"{key}_cpu"].append(timing["cpu"])

        kv_bytes: dict[str, int] = {}
        progress.set_postfix_str(f"layers={info['num_layers']} N={visual_tokens} T={text_len}")
        # warm-up (untimed): --warmup calls of every phase per method (CUDA: kernels, cuBLAS handles, allocator)
        for _ in range(args.warmup):
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
            shift = repeat % len(methods) if methods else 0  # every method may be over the cap
            order = methods[shift:] + methods[:shift]
            for method in order:
                record(method.name, "train", time_train_step(method, batch))
                progress.update(1)
            for method in order:
                timing, kv_bytes[method.name] = time_prefill(method, batch)
                record(method.name, "prefill", timing)
                progress.update(1)
            for method in order:
                ttft, decode = time_generate(method, batch, args.new_tokens)
                record(method.name, "ttft", ttft)
                record(method.name, "decode", decode)
                progress.update(1)
        peaks: dict[str, dict[str, Optional[int]]] = {m.name: {"train": None, "generate": None} for m in all_methods}
        if not args.no_memory:
            for method in methods:
                method.train(True)
                method.zero_grad()
                peaks[method.name]["train"] = peak_allocated_bytes(lambda: method.loss(batch).backward(), device)
                method.zero_grad()
                progress.update(1)
                method.train(False)
                with torch.no_grad():
                    peaks[method.name]["generate"] = peak_allocated_bytes(
                        lambda: method.generate(batch, args.new_tokens), device
                    )
                progress.update(1)
        for method in all_methods:
            s = samples[method.name]
            results.append({
                "N": visual_tokens,
                "T": text_len,
                "B": args.batch_size,
                "layers": info["num_layers"],
                "method": method.name,
                "label": METHOD_LABELS[method.name],
                "status": status.get(method.name),
                "probe_train_step_ms": probe_ms.get(method.name),
                "images_per_sample": images,
                "sequence_length": method.sequence_length(batch),
                "num_memory_slots": getattr(method, "num_slots", None),
                "trainable_params": method.trainable_parameters(),
                "train_step_ms": 1e3 * median(s["train"]),
                "prefill_ms": 1e3 * median(s["prefill"]),
                "ttft_ms": 1e3 * median(s["ttft"]),
                "decode_ms_per_token": 1e3 * median(s["decode"]),
                "train_step_cpu_ms": 1e3 * median(s["train_cpu"]),
                "prefill_cpu_ms": 1e3 * median(s["prefill_cpu"]),
                "decode_cpu_ms_per_token": 1e3 * median(s["decode_cpu"]),
                "train_step_min_ms": 1e3 * (min(s["train"]) if s["train"] else float("nan")),
                "prefill_min_ms": 1e3 * (min(s["prefill"]) if s["prefill"] else float("nan")),
                "decode_min_ms_per_token": 1e3 * (min(s["decode"]) if s["decode"] else float("nan")),
                "kv_cache_bytes": kv_bytes.get(method.name),
                "visual_state_bytes": method.visual_state_bytes(batch),
                "peak_train_bytes": peaks[method.name]["train"],
                "peak_generate_bytes": peaks[method.name]["generate"],
                "samples_ms": {k: [round(1e3 * v, 3) for v in vals] for k, vals in s.items()},
            })
            if method.name in status:  # not measured: no number rather than a NaN that reads like one
                results[-1].update({key: None for key, value in results[-1].items()
                                    if isinstance(value, float) and value != value})
    return results


def _probe(methods: list[Method], batch: Any, cap_s: Optional[float]) -> tuple[dict[str, str], dict[str, float]]:
    """With a time cap: one untimed training step per method first (beside the warm-up); which ran past the cap or
    out of memory (a status per method name), and how long the step took. Without a cap nothing runs."""
    status: dict[str, str] = {}
    probe_ms: dict[str, float] = {}
    if cap_s is None:
        return status, probe_ms
    for method in methods:
        try:
            wall = time_train_step(method, batch)["wall"]
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if isinstance(error, RuntimeError) and not _is_oom(error):
                raise
            method.zero_grad()
            status[method.name] = "out of memory"
            continue
        probe_ms[method.name] = 1e3 * wall
        if wall > cap_s:
            status[method.name] = f"over the {cap_s:g} s time cap (one training step: {wall:.1f} s)"
    gc.collect()
    return status, probe_ms


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
