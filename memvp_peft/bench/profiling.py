"""Where the time goes: torch.profiler op tables of MemVP vs text-only + LoRA (``--profile``), and MemVP's decode
step beside text-only + LoRA's, measured in one process (``--decode_compare``).

``--profile`` attributes ops to parts of the step (memory branch, projector, LoRA, frozen base) by the tensor sizes
they touch, which is why those sizes must differ (a warning says when they do not).

``--decode_compare`` looks at the one phase where MemVP pays per generated token: its memory read, two batched GEMVs
over the (B, n, d) keys and values per layer -- bandwidth-bound: 2 * B * n * d * 4 bytes per layer per token, the
same kind of read input-space's attention makes over its cached visual tokens. The two methods run interleaved (the
first rotating), decode per token is the median over repeats and the ratio the median of per-repeat ratios. The
read's products are also timed alone on a cold cache (`time_read_forms`): `x K^T` both ways round -- the reason the
tuner computes a CPU decode step's `x K^T` as `(K x^T)^T` -- and the fused `baddbmm` read; on CPU one profiled
generate per method (`decode_profile_*.txt`) shows the small ops around them.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from .cost_model import paired_ratio
from .measure import (
    cpu_name, device_name, load_average, median, quiet_native_stderr, synchronize, time_generate, time_prefill,
    time_train_step,
)
from .methods import METHOD_LABELS, LoRAMethod, MemVPMethod, Method, build_base_model, describe_model, make_batch


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

    base = build_base_model(args, max(args.num_layers) if args.num_layers else None)  # the deepest depth asked for
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
                with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
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


def time_read_forms(batch: int, slots: int, width: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Microseconds (median) of one decode step's memory products at (batch, slots, width), each on a cold cache
    (a 64 MB buffer is touched before every call, as a layer's own weights evict K and V between two reads):
    `x K^T` as `bmm(x, K^T)` and as `bmm(K, x^T)^T` (the form the tuner's read takes for a decode step on CPU),
    and the fused `h V` read."""
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
    x, keys, values, scores, result = (make(batch, 1, width), make(batch, slots, width), make(batch, slots, width),
                                       make(batch, 1, slots), make(batch, 1, width))
    flush = torch.zeros(16 * 2**20, device=device)
    forms = {
        "x K^T as bmm(x, K^T)": lambda: torch.bmm(x, keys.transpose(1, 2)),
        "x K^T as bmm(K, x^T)^T": lambda: torch.bmm(keys, x.transpose(1, 2)).transpose(1, 2),
        "result + s h V as baddbmm": lambda: torch.baddbmm(result, scores, values, alpha=0.1),
    }
    samples: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(repeats):
        for name, form in forms.items():
            flush.add_(1.0)
            synchronize(device)
            start = time.perf_counter()
            form()
            synchronize(device)
            samples[name].append(1e6 * (time.perf_counter() - start))
    return {name: median(values) for name, values in samples.items()}


def _profile_generate(method: Method, batch: Any, new_tokens: int, path: Path) -> None:
    """One greedy generate under torch.profiler: its op table (by input shape) for where a decode step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        time_generate(method, batch, new_tokens)
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30)
    path.write_text(f"{method.name}: one greedy generate of {new_tokens} tokens (prefill + {new_tokens - 1} decode "
                    f"steps)\n{table}\n")


def run_decode_compare(args: argparse.Namespace) -> dict[str, Any]:
    """Decode per token of MemVP and text-only + LoRA, interleaved; the memory read's products timed alone; the
    report (on CPU also one profiled generate per method, written beside it)."""
    from tqdm.auto import tqdm

    base = build_base_model(args, max(args.num_layers) if args.num_layers else None)
    info = describe_model(base)
    visual_tokens, text_len = args.profile_point
    slots = visual_tokens + args.extra_slots
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch = make_batch(args.batch_size, text_len, visual_tokens, args.visual_dim, info["vocab_size"], args.seed,
                       device, dtype)
    memvp = MemVPMethod(copy.deepcopy(base), args.visual_dim, slots, args.projector_hidden_dim)
    text = LoRAMethod(copy.deepcopy(base), False, args.visual_dim, args.projector_hidden_dim, args.lora_r,
                      args.lora_alpha, args.lora_dropout, args.lora_targets)
    methods: list[Method] = [memvp, text]
    samples: dict[str, dict[str, list[float]]] = {m.name: {"decode": [], "decode_cpu": []} for m in methods}
    progress = tqdm(total=len(methods) * (args.repeats + args.warmup), desc="decode-compare", unit="call",
                    disable=args.no_progress)
    load_start = load_average()
    for repeat in range(-args.warmup, args.repeats):
        order = methods[repeat % len(methods):] + methods[: repeat % len(methods)]
        for method in order:
            _, decode = time_generate(method, batch, args.new_tokens)
            if repeat >= 0:
                samples[method.name]["decode"].append(decode["wall"])
                samples[method.name]["decode_cpu"].append(decode["cpu"])
            progress.update(1)
    progress.close()
    read_forms = time_read_forms(args.batch_size, slots, info["hidden_size"], max(15, 3 * args.repeats), device)
    output_dir = Path(args.output_dir)
    if device.type == "cpu":
        for method in methods:
            _profile_generate(method, batch, args.new_tokens, output_dir / f"decode_profile_{method.name}.txt")
    rows = [{"method": m.name, "label": METHOD_LABELS[m.name],
             "decode_ms_per_token": 1e3 * median(samples[m.name]["decode"]),
             "decode_cpu_ms_per_token": 1e3 * median(samples[m.name]["decode_cpu"]),
             "samples_ms": {k: [round(1e3 * v, 4) for v in vals] for k, vals in samples[m.name].items()}}
            for m in methods]
    ratios = {"memvp_over_text": paired_ratio(samples["memvp"]["decode"], samples["text_lora"]["decode"]),
              "cpu_memvp_over_text": paired_ratio(samples["memvp"]["decode_cpu"], samples["text_lora"]["decode_cpu"])}
    return {
        "meta": {"command": "python -m memvp_peft.bench " + " ".join(args.argv), "N": visual_tokens, "T": text_len,
                 "B": args.batch_size, "slots": slots, "new_tokens": args.new_tokens, "repeats": args.repeats,
                 "model": info, "device": args.device, "device_name": device_name(args.device),
                 "dtype": args.dtype, "processor": cpu_name(), "torch_threads": torch.get_num_threads(),
                 "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": load_average()},
        "results": rows,
        "ratios": ratios,
        "read_forms_us": read_forms,
    }


def decode_compare_markdown(report: dict[str, Any]) -> str:
    """The decode comparison as markdown: per-method medians, the paired ratio (wall / CPU time) and the memory
    read's products."""
    meta, ratios = report["meta"], report["ratios"]
    model = meta["model"]
    lines = [
        "# MemVP decode step beside text-only + LoRA",
        "",
        f"N={meta['N']}, T={meta['T']}, B={meta['B']}, {meta['slots']} memory slots, {meta['new_tokens']} new tokens; "
        f"width {model['hidden_size']}, {model['num_layers']} layers, {meta['dtype']}, "
        f"{meta['device_name'] if meta['device'] == 'cuda' else meta['processor']}, {meta['torch_threads']} "
        f"threads; median of {meta['repeats']} interleaved repeats.",
        "",
        "| method | decode ms/token (wall) | decode ms/token (CPU) |",
        "|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['label']} | {row['decode_ms_per_token']:.3f} | {row['decode_cpu_ms_per_token']:.3f} |")
    lines += ["", "| ratio (median of per-repeat ratios) | wall | CPU |", "|---|---|---|",
              f"| MemVP / text-only | {ratios['memvp_over_text']:.3f} | {ratios['cpu_memvp_over_text']:.3f} |"]
    forms = report.get("read_forms_us") or {}
    if forms:
        width, slots = meta["model"]["hidden_size"], meta["slots"]
        megabytes = meta["B"] * slots * width * 4 / 1e6
        lines += ["", f"One decode step's memory products, ({meta['B']}, {slots}, {width}) fp32 = {megabytes:.1f} MB per "
                      "operand, cold cache, median microseconds:", "", "| product | us | GB/s of the memory operand |",
                  "|---|---|---|"]
        for name, micros in forms.items():
            lines.append(f"| `{name}` | {micros:.0f} | {megabytes * 1e3 / micros:.1f} |")
    return "\n".join(lines) + "\n"
