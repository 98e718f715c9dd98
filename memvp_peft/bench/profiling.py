"""`--profile`: torch.profiler op tables of MemVP vs text-only + LoRA at one point, and where the time goes.

Ops are attributed to parts of the step (memory branch, projector, LoRA, frozen base) by the tensor sizes they
touch, which is why those sizes must differ (a warning says when they do not).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import torch

from .base_model import build_base_model, describe_model
from .measure import quiet_native_stderr, time_prefill, time_train_step
from .methods import METHOD_LABELS, LoRAMethod, MemVPMethod, make_batch


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
