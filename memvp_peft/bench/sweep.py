"""The speed and memory sweep: every point, the methods interleaved, one result row per method and point -- and the
markdown tables and plots that report it.

All methods are built on deep copies of one frozen base in one process and run back to back within each repeat
(the first method rotating), so that load on a shared machine hits them alike. With several ``--layers`` depths the
whole sweep runs once per depth (one base at a time) and `cost_model.fit_depths` separates per-layer from fixed
costs.

The default sweep is the N x T grid of MemVP, input-space + LoRA and text-only + LoRA. ``--long_context`` sweeps the
memory size N instead, where MemVP's signature shows: input-space prompting pays for every visual token in every
layer, quadratically in attention, and its KV cache grows with N; MemVP's memory costs `4 * n * d` FLOPs per text
token and layer and never touches the cache. It runs N up to 4,096 at one text length: one 16x16 image (256), one
24x24 image (576), the 2x2 tiles of a high-resolution image (4 x 576 = 2,304; LLaVA-NeXT's overview would add 576
more) and a 16-frame video (16 x 256 = 4,096), for MemVP, its pooled and ADEM-VL forms (`methods.memvp_form`),
input-space and text-only. Methods whose first training step exceeds ``--time_cap_s`` (or that run out of memory)
are reported with that status instead of being left out: their rows are printed with it and the plot marks them, so
a reader sees where input-space prompting stopped instead of a shorter table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import platform
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .cost_model import FLOP_EFFICIENCY, RATIO_DEFS, TARGETS_BY_DEVICE, check_targets, compute_ratios, fit_depths
from .measure import (
    cpu_name, device_name, load_average, median, package_version, peak_allocated_bytes, time_generate, time_prefill,
    time_train_step,
)
from .methods import (
    ALL_METHODS, MEMVP_FORMS, METHOD_LABELS, METHODS, Batch, LoRAMethod, Method, build_base_model, build_memvp_method,
    describe_layout, describe_model, full_depth, layout_for, make_batch,
)


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
    meta = _sweep_meta(args, infos, load_start)
    report = {"meta": meta, "results": results, "ratios": compute_ratios(results, infos, args)}
    report["depth_fit"] = fit_depths(results, meta["full_depth"])
    report["targets"] = check_targets(report["ratios"], targets=TARGETS_BY_DEVICE[args.device],
                                      full_depth_ratios=report["depth_fit"]["full_depth_ratios"])
    return report


def _sweep_meta(args: argparse.Namespace, infos: dict[int, dict[str, Any]], load_start: Optional[list[float]],
                ) -> dict[str, Any]:
    """What the sweep ran on and how it measured (the report's ``meta``): a timing means little without the machine,
    its load, the model and the exact method of measurement beside it. The model described is the deepest one."""
    info = infos[max(infos)]
    return {
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
        "image_size": list(args.image_size) if getattr(args, "image_size", None) else None,
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


def _sweep_one_depth(args: argparse.Namespace, base: nn.Module, info: dict[str, Any], methods_wanted: list[str],
                     points: list[tuple[int, int]], progress: Any) -> list[dict[str, Any]]:
    """Every (N, T) point on one base: the methods interleaved, one result row per method and point."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    method_for = _methods_on(base, args, methods_wanted)
    results = []
    for point_index, (visual_tokens, text_len) in enumerate(points):
        images = layout_for(args, visual_tokens)[0]
        batch = make_batch(args.batch_size, text_len, visual_tokens, args.visual_dim, info["vocab_size"],
                           args.seed + point_index, device, dtype, images=images)
        all_methods = [method_for(name, visual_tokens) for name in methods_wanted]
        # a method whose first training step runs past --time_cap_s or out of memory is reported with that status
        # and not measured further at this point (its row stays in the report)
        status, probe_ms = _probe(all_methods, batch, getattr(args, "time_cap_s", None))
        methods = [m for m in all_methods if m.name not in status]
        progress.set_postfix_str(f"layers={info['num_layers']} N={visual_tokens} T={text_len}")
        kv_bytes = _warm_up(methods, batch, args, progress)
        samples = _interleaved_repeats(all_methods, methods, batch, args, progress, kv_bytes)
        peaks = _peak_memory(all_methods, methods, batch, args, progress)
        for method in all_methods:
            results.append(_result_row(method, batch, args, info, images, samples[method.name],
                                       kv_bytes.get(method.name), peaks[method.name], status.get(method.name),
                                       probe_ms.get(method.name)))
    return results


def _methods_on(base: nn.Module, args: argparse.Namespace, methods_wanted: list[str],
                ) -> Callable[[str, int], Method]:
    """The method of a name at a point with N visual tokens, each on its own deep copy of the same frozen base (peft
    modifies the model in place).

    The two LoRA methods do not depend on N and are built once for the whole depth. A MemVP form's slots do, so it is
    built per N -- and only one point's MemVP models are alive at a time, which matters for 7B-class layers."""
    device = torch.device(args.device)
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

    return method_for


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


def _free(device: torch.device) -> None:
    """Give the previous depth's models back before the next depth is built (matters for 7B-class layers)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warm_up(methods: list[Method], batch: Batch, args: argparse.Namespace, progress: Any) -> dict[str, int]:
    """``--warmup`` untimed calls of every phase per method, so that no timed call pays a first call's costs (CUDA:
    kernels, cuBLAS handles, the allocator's pool); the KV-cache bytes each prefill built, by method name."""
    kv_bytes: dict[str, int] = {}
    for _ in range(args.warmup):
        for method in methods:
            time_train_step(method, batch)
            progress.update(1)
            _, kv_bytes[method.name] = time_prefill(method, batch)
            progress.update(1)
            time_generate(method, batch, args.new_tokens)
            progress.update(1)
    return kv_bytes


def _interleaved_repeats(all_methods: list[Method], methods: list[Method], batch: Batch, args: argparse.Namespace,
                         progress: Any, kv_bytes: dict[str, int]) -> dict[str, dict[str, list[float]]]:
    """The timed calls: per repeat, every method's training step, then every prefill, then every generate, in the
    order A, B, C, B, C, A, C, A, B, ... (the first method rotates so that no method always runs right after the same
    other one, and the calls of one repeat share the machine's load). Wall and CPU seconds per method name and phase
    (``train``, ``prefill``, ``ttft``, ``decode`` and each with ``_cpu``); empty lists for a method over the cap.
    `kv_bytes` is updated with each prefill's KV-cache bytes."""
    samples: dict[str, dict[str, list[float]]] = {
        m.name: {f"{k}{c}": [] for k in ("train", "prefill", "ttft", "decode") for c in ("", "_cpu")}
        for m in all_methods
    }

    def record(name: str, key: str, timing: dict[str, float]) -> None:
        samples[name][key].append(timing["wall"])
        samples[name][f"{key}_cpu"].append(timing["cpu"])

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
    return samples


def _peak_memory(all_methods: list[Method], methods: list[Method], batch: Batch, args: argparse.Namespace,
                 progress: Any) -> dict[str, dict[str, Optional[int]]]:
    """Peak allocator bytes of a training step and of a generate call per method name, each in its own untimed run
    (the memory probe slows the call it watches); None where ``--no_memory`` skipped it or the method was over the
    cap."""
    device = torch.device(args.device)
    peaks: dict[str, dict[str, Optional[int]]] = {m.name: {"train": None, "generate": None} for m in all_methods}
    if args.no_memory:
        return peaks
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
    return peaks


def _result_row(method: Method, batch: Batch, args: argparse.Namespace, info: dict[str, Any], images: int,
                s: dict[str, list[float]], kv_bytes: Optional[int], peaks: dict[str, Optional[int]],
                status: Optional[str], probe_ms: Optional[float]) -> dict[str, Any]:
    """One method's row at one point: medians (and minima) in ms, sizes in bytes, every sample kept. A method that
    was not measured (over the cap, out of memory) has None instead of a NaN that would read like a number."""
    visual_tokens, text_len = batch.visual_tokens, batch.input_ids.shape[1]
    row = {
        "N": visual_tokens,
        "T": text_len,
        "B": args.batch_size,
        "layers": info["num_layers"],
        "method": method.name,
        "label": METHOD_LABELS[method.name],
        "status": status,
        "probe_train_step_ms": probe_ms,
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
        "kv_cache_bytes": kv_bytes,
        "visual_state_bytes": method.visual_state_bytes(batch),
        "peak_train_bytes": peaks["train"],
        "peak_generate_bytes": peaks["generate"],
        "samples_ms": {k: [round(1e3 * v, 3) for v in vals] for k, vals in s.items()},
    }
    if status is not None:  # not measured: no number rather than a NaN that reads like one
        row.update({key: None for key, value in row.items() if isinstance(value, float) and value != value})
    return row


def _mib_or_na(value: Optional[int]) -> str:
    """Bytes as MiB with one decimal, 'n/a' for a memory run that was skipped."""
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _table_row(several: bool, layers: Any, cells: Sequence[Any]) -> str:
    """One markdown table row, `| a | b | ... |`: the sweep's two tables lead with a `layers` cell only when the sweep
    ran at several depths."""
    return "".join(f"| {cell} " for cell in ([layers] if several else []) + list(cells)) + "|"


def target_line(check: dict[str, Any], measured: str, *, predicted_key: str = "predicted",
                cpu_label: str = "CPU time", value_spec: str = "", note_spec: str = "",
                more: Sequence[str] = ()) -> str:
    """One line of a report's targets, worded the same in the sweep's and `--long_context`'s reports:
    `- met: <target> (<measured> <value>; <cpu_label> <cpu_value>; matmul FLOPs predict <check[predicted_key]>;
    <more>...; target <bound>)`, `NOT met` when missed, a note left out where its value is None.

    The two reports differ only in their words and digits: `measured` names the value ("wall clock"), `value_spec`
    / `note_spec` are format specs for the value and for the CPU-time and FLOP notes ("" prints them as stored)."""
    notes = [f"{measured} {format(check['value'], value_spec)}"]
    if check.get("cpu_value") is not None:
        notes.append(f"{cpu_label} {format(check['cpu_value'], note_spec)}")
    if check.get(predicted_key) is not None:
        notes.append(f"matmul FLOPs predict {format(check[predicted_key], note_spec)}")
    inside = "; ".join([*notes, *more, f"target {check['bound']}"])
    return f"- {'met' if check['met'] else 'NOT met'}: {check['target']} ({inside})"


def _image_line(meta: dict[str, Any]) -> list[str]:
    """For a VLM-shaped base: where N came from (its own image processor on an image of this size)."""
    if not meta.get("image_size"):
        return []
    width, height = meta["image_size"]
    return [f"Images: {width} x {height}, which {meta['model_shape']}'s own image processor turns into N visual "
            "tokens per image: an input-space sample is N + T tokens long, MemVP's T (the 'seq len' column)."]


def markdown_report(report: dict[str, Any]) -> str:
    """The sweep as markdown: the setup, one row per (N, T, method), the ratios with their predictions, the targets."""
    meta = report["meta"]
    model = meta["model"]
    depths = meta.get("depths") or [model["num_layers"]]
    several = len(depths) > 1  # a "layers" column only when the sweep ran at several depths
    layers_text = (f"{' and '.join(map(str, depths))} layers (one sweep per depth)" if several
                   else f"{model['num_layers']} layers")
    if meta.get("full_depth"):
        layers_text += f" of its {meta['full_depth']}"
    device = meta.get("device", "cpu")
    on = f"{meta.get('device_name')} (CUDA {meta.get('cuda')}); host: " if device == "cuda" else ""
    lines = [
        "# memvp-bench results",
        "",
        f"Model: {meta['model_name_or_path']} ({model['model_type']}, width {model['hidden_size']}, "
        f"{model['num_attention_heads']} heads / {model['num_key_value_heads']} KV heads, {layers_text}, FFN "
        f"{model['intermediate_size']}, vocab {model['vocab_size']}, {model['parameters'] / 1e6:.1f}M params, "
        f"{meta['dtype']}, attention {meta.get('attn_implementation')}). Batch {meta['batch_size']}, visual_dim "
        f"{meta['visual_dim']}, {meta['new_tokens']} new tokens, median of {meta['repeats']} interleaved repeats.",
        f"Machine: {on}{meta['processor']}, {meta['cpu_count']} CPUs, torch {meta['torch']} "
        f"({meta['torch_threads']} threads), transformers {meta['transformers']}, peft {meta['peft']}.",
        *_image_line(meta),
        f"Timing: {meta['timing']}.",
        f"Memory: {meta['memory']}.",
        "",
        _table_row(several, "layers", ["N", "T", "method", "seq len", "trainable", "train step ms", "prefill ms",
                                       "decode ms/token", "KV cache MB", "MemVP K/V MB", "peak train MB",
                                       "peak generate MB"]),
        ("|---" if several else "") + "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(_table_row(several, r.get("layers"), [
            r["N"], r["T"], r["label"], r["sequence_length"], f"{r['trainable_params']:,}", f"{r['train_step_ms']:.1f}",
            f"{r['prefill_ms']:.1f}", f"{r['decode_ms_per_token']:.2f}", _mib_or_na(r["kv_cache_bytes"]),
            _mib_or_na(r["visual_state_bytes"]) if r["visual_state_bytes"] else "-", _mib_or_na(r["peak_train_bytes"]),
            _mib_or_na(r["peak_generate_bytes"]),
        ]))
    lines += [
        "",
        "Ratios, each the median over the repeats of the per-repeat ratio (calls of one repeat ran back to back). "
        "speed-up = input-space time / MemVP time; 'MemVP/x' = MemVP time / x time. Each cell: wall clock / CPU "
        "time of the process [prediction from matmul FLOPs, `flop_model`; for MemVP/text that is the physical "
        "floor: text-only + the memory branch + the projector, with MemVP's shorter backward].",
        "",
        _table_row(several, "layers", ["N", "T", "train speed-up vs input", "train MemVP/text",
                                       "prefill speed-up vs input", "prefill MemVP/text", "decode MemVP/input",
                                       "decode MemVP/text"]),
        ("|---" if several else "") + "|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict[str, Any], key: str, predicted: Optional[str] = None) -> str:
        if key not in row:
            return "-"
        text = f"{row[key]:.2f} / {row.get('cpu_' + key, float('nan')):.2f}"
        if predicted and predicted in row:
            text += f" [{row[predicted]:.2f}]"
        return text

    for row in report["ratios"]:
        lines.append(_table_row(several, row.get("layers"), [
            row["N"], row["T"], cell(row, "train_speedup_vs_input", "flops_train_speedup_vs_input"),
            cell(row, "train_memvp_over_text", "floor_train_over_text"),
            cell(row, "prefill_speedup_vs_input", "flops_prefill_speedup_vs_input"),
            cell(row, "prefill_memvp_over_text", "floor_prefill_over_text"),
            cell(row, "decode_memvp_over_input"), cell(row, "decode_memvp_over_text"),
        ]))
    lines += depth_fit_markdown(report.get("depth_fit") or {})
    targets = report.get("targets", {})
    if targets.get("checks"):
        point = targets["point"]
        where = f" ({point['layers']} layers measured, {device} targets)" if point.get("layers") else ""
        lines += ["", f"Targets at N={point['N']}, T={point['T']}{where}:", ""]
        for check in targets["checks"]:
            more = ([f"extrapolated to {meta.get('full_depth')} layers: {check['full_depth_extrapolated']}"]
                    if check.get("full_depth_extrapolated") is not None else [])
            lines.append(target_line(check, "wall clock", predicted_key="flops_predicted",
                                     cpu_label=f"{'host ' if device == 'cuda' else ''}CPU time", more=more))
    return "\n".join(lines) + "\n"


def depth_fit_markdown(fit: dict[str, Any]) -> list[str]:
    """The per-layer table (and the full-depth extrapolation, labelled as such) as markdown lines; none without a
    fit."""
    if not fit.get("fits"):
        return []
    full = fit.get("full_depth")
    depths = ", ".join(map(str, fit["depths"]))
    lines = [
        "",
        f"Per-layer times: a least-squares line `time = fixed + layers * per_layer` through the medians at "
        f"{depths} layers (fixed = embeddings, LM head, loss, generate's per-step work)."
        + (f" **Full depth ({full} layers) is an extrapolation** `fixed + {full} * per_layer`: the full model was "
           "not run." if full else ""),
        "",
        "| N | T | method | train ms/layer | train fixed ms | prefill ms/layer | prefill fixed ms "
        "| decode ms/token/layer | decode fixed ms | peak train MB/layer |"
        + (f" train ms @{full} | prefill ms @{full} | decode ms @{full} | peak train MB @{full} |" if full else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if full else ""),
    ]

    def num(value: Optional[float], scale: float = 1.0, digits: int = 2) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    mb = 1 / 2**20
    for row in fit["fits"]:
        per, fixed, at = row["per_layer"], row["fixed"], row["at_full_depth"]
        line = (f"| {row['N']} | {row['T']} | {row['label']} | {num(per.get('train_step_ms'))} | "
                f"{num(fixed.get('train_step_ms'))} | {num(per.get('prefill_ms'))} | {num(fixed.get('prefill_ms'))} | "
                f"{num(per.get('decode_ms_per_token'), digits=3)} | {num(fixed.get('decode_ms_per_token'))} | "
                f"{num(per.get('peak_train_bytes'), mb, 1)} |")
        if full:
            line += (f" {num(at.get('train_step_ms'), digits=1)} | {num(at.get('prefill_ms'), digits=1)} | "
                     f"{num(at.get('decode_ms_per_token'))} | {num(at.get('peak_train_bytes'), mb, 0)} |")
        lines.append(line)
    if fit.get("full_depth_ratios"):
        lines += ["", f"Ratios at full depth ({full} layers), **extrapolated** from the per-layer fit (ratios of the "
                      "extrapolated medians, not paired per repeat):", "",
                  "| N | T | train speed-up vs input | train MemVP/text | prefill speed-up vs input "
                  "| prefill MemVP/text | decode MemVP/input | decode MemVP/text |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in fit["full_depth_ratios"]:
            cells = [num(row.get(key)) for key, *_ in RATIO_DEFS]
            order = [0, 3, 1, 4, 2, 5]  # RATIO_DEFS order -> the column order of the measured ratio table
            lines.append(f"| {row['N']} | {row['T']} | " + " | ".join(cells[i] for i in order) + " |")
    return lines


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Five panels of per-method bars over the (N, T) points (log scale) and one panel of the ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    several = len({r.get("layers") for r in results}) > 1
    key_of = lambda r: (r.get("layers") or 0, r["N"], r["T"])  # noqa: E731
    points = sorted({key_of(r) for r in results})
    labels = [(f"L={k}\n" if several else "") + f"N={n}\nT={t}" for k, n, t in points]
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
                row = next((r for r in results if key_of(r) == point and r["method"] == method), None)
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
    ax.set_xticklabels([(f"L={r.get('layers')}\n" if several else "") + f"N={r['N']}\nT={r['T']}" for r in ratios],
                       fontsize=7)
    ax.set_yscale("log")
    ax.set_title("ratios")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(
        f"MemVP vs input-space + LoRA vs text-only + LoRA -- width {meta['model']['hidden_size']}, "
        f"{'/'.join(map(str, meta.get('depths') or [meta['model']['num_layers']]))} layers, B={meta['batch_size']}, "
        f"{meta['dtype']}, "
        + (f"{meta.get('device_name')}" if meta.get("device") == "cuda" else
           f"{meta['processor']}, {meta['torch_threads']} threads")
        + f", torch {meta['torch']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib_or_dash(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ratio_cell(item: dict[str, Any]) -> str:
    """'measured / CPU-time [FLOPs predict] ok' -- or why it is missing."""
    if item["value"] is None:
        return f"n/a ({item['why']})" if item.get("why") else "-"
    text = f"{item['value']:.2f}"
    if item.get("cpu_value") is not None:
        text += f" / {item['cpu_value']:.2f}"
    if item["predicted"] is not None:
        text += f" [{item['predicted']:.2f}] {'ok' if item['check'] else 'BELOW 0.9'}"
    return text


def long_context_markdown(report: dict[str, Any]) -> str:
    """The sweep over N as markdown: setup, one row per (N, method), the ratios per MemVP form, the targets."""
    meta, model = report["meta"], report["meta"]["model"]
    lines = [
        "# memvp-bench --long_context results",
        "",
        f"Model: {meta['model_name_or_path']} (width {model['hidden_size']}, {model['num_layers']} layers, FFN "
        f"{model['intermediate_size']}, vocab {model['vocab_size']}, {meta['dtype']}, attention "
        f"{meta.get('attn_implementation')}). Batch {meta['batch_size']}, visual_dim {meta['visual_dim']}, "
        f"{meta['new_tokens']} new tokens, MemVP slots = memory_tokens + {meta['extra_slots']}, median of "
        f"{meta['repeats']} interleaved repeats, time cap {meta.get('time_cap_s')} s per training step.",
        f"Machine: {meta['processor']}, {meta['cpu_count']} CPUs, torch {meta['torch']} ({meta['torch_threads']} "
        f"threads); load average {meta.get('loadavg_start')} at the start, {meta.get('loadavg_end')} at the end; "
        f"wall time {meta.get('wall_time_s')} s.",
        f"Command: `{meta['command']}`",
        "",
        "| N | layout | method | slots / seq len | train step ms | prefill ms | decode ms/token | KV cache MB "
        "| peak train MB | peak generate MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    layouts = {int(n): tuple(v) for n, v in meta.get("layouts", {}).items()}
    order = {m: i for i, m in enumerate(ALL_METHODS)}
    for r in sorted(report["results"], key=lambda r: (r["N"], r["T"], order[r["method"]])):
        size = r["num_memory_slots"] if r["num_memory_slots"] is not None else r["sequence_length"]
        layout = describe_layout(layouts.get(r["N"], (1, r["N"], "image")))
        if r.get("status"):
            lines.append(f"| {r['N']:,} | {layout} | {r['label']} | {size:,} | **{r['status']}** | | | | | |")
            continue
        lines.append(
            f"| {r['N']:,} | {layout} | {r['label']} | {size:,} | {_num(r['train_step_ms'])} | "
            f"{_num(r['prefill_ms'])} | {_num(r['decode_ms_per_token'], 2)} | {_mib_or_dash(r['kv_cache_bytes'])} | "
            f"{_mib_or_dash(r['peak_train_bytes'])} | {_mib_or_dash(r['peak_generate_bytes'])} |"
        )
    lines += [
        "",
        "Ratios per MemVP form: measured (wall clock / process CPU time; times: median of the per-repeat ratios) "
        "[matmul-FLOP prediction, `cost_model.memory_form_flops`] and the check: speed-ups must reach >= "
        f"{FLOP_EFFICIENCY} of the predicted speed-up, cost ratios (form / text-only) must stay <= the prediction / "
        f"{FLOP_EFFICIENCY} (both: measured speed >= {FLOP_EFFICIENCY} of what FLOPs allow). Memory ratios have no "
        "FLOP prediction.",
        "",
        "| N | form | slots | train speed-up vs input | prefill speed-up vs input | decode speed-up vs input "
        "| train / text | prefill / text | decode / text | peak train / input | KV cache / input |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    block = report.get("long_context", {})
    keys = ("train_speedup_vs_input", "prefill_speedup_vs_input", "decode_speedup_vs_input", "train_over_text",
            "prefill_over_text", "decode_over_text", "peak_train_over_input", "kv_cache_over_input")
    for entry in block.get("ratios", []):
        cells = " | ".join(_ratio_cell(entry["ratios"][k]) for k in keys)
        lines.append(f"| {entry['N']:,} | {METHOD_LABELS[entry['form']]} | {entry['slots']:,} | {cells} |")
    targets = block.get("targets", {})
    if targets.get("checks"):
        point = targets["point"]
        lines += ["", f"Targets at N={point['N']:,}, T={point['T']} (width {model['hidden_size']}, "
                      f"{meta.get('device', 'cpu')}):", ""]
        for check in targets["checks"]:
            if check["met"] is None:
                lines.append(f"- not measured: {check['target']} ({check['why']}; target {check['bound']})")
                continue
            lines.append(target_line(check, "measured", value_spec=".3f", note_spec=".2f"))
    return "\n".join(lines) + "\n"


def plot_long_context(report: dict[str, Any], path: Path) -> None:
    """Cost against N, one line per method (log-log): training step, prefill, decode per token, KV cache, peak
    training memory, and the training step relative to text-only. Over-cap / out-of-memory points are crosses at
    the bottom of their panel, labelled, so the missing input-space numbers show as missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in results)]
    colors = {"memvp": "tab:green", "memvp_pooled": "tab:olive", "memvp_adem": "tab:cyan", "input_lora": "tab:red",
              "text_lora": "tab:gray"}
    panels = [("train_step_ms", "training step (fwd+bwd), ms", 1.0), ("prefill_ms", "prefill, ms", 1.0),
              ("decode_ms_per_token", "decode per token, ms", 1.0), ("kv_cache_bytes", "KV cache, MiB", 2.0**-20),
              ("peak_train_bytes", "peak training memory, MiB", 2.0**-20)]
    text_train = {r["N"]: r["train_step_ms"] for r in results if r["method"] == "text_lora"}
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, (key, title, scale) in zip(axes.flat, panels + [("relative", "training step / text-only", 1.0)]):
        measured = False
        for method in methods:
            rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["N"])
            def value(r: dict[str, Any]) -> Optional[float]:
                if key == "relative":
                    base = text_train.get(r["N"])
                    return r["train_step_ms"] / base if r["train_step_ms"] is not None and base else None
                return None if r.get(key) is None else r[key] * scale
            good = [(r["N"], value(r)) for r in rows if not r.get("status") and value(r)]
            measured = measured or bool(good)
            if good:
                ax.plot(*zip(*good), marker="o", label=METHOD_LABELS[method], color=colors[method])
            for r in rows:
                if r.get("status"):
                    ax.plot([r["N"]], [0.02], marker="x", markersize=10, color=colors[method],
                            transform=ax.get_xaxis_transform())
                    ax.annotate("over cap" if "cap" in r["status"] else "OOM", (r["N"], 0.05),
                                xycoords=("data", "axes fraction"), fontsize=7, color=colors[method], ha="center")
        ax.set_xscale("log")
        sizes = sorted({r["N"] for r in results})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if measured:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("memory size N (visual tokens)")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"cost vs N at T={results[0]['T']} -- width {meta['model']['hidden_size']}, "
                 f"{meta['model']['num_layers']} layers, B={meta['batch_size']}, {meta['dtype']}, "
                 f"{meta['processor']}, {meta['torch_threads']} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
