"""`--decode_compare`: MemVP's decode step before and after issue 16's read path, beside text-only + LoRA.

Issue 16 measured MemVP's decode step at 1.15x text-only (N = 256, T = 64, CPU) and asked for what is removable. A
profile of one decode step per layer (`decode_profile_*.txt`) shows the memory read as two batched GEMVs over the
(B, n, d) keys and values -- bandwidth-bound: 2 * B * n * d * 4 bytes per layer per token, the same kind of read
input-space's attention makes over its cached visual tokens -- plus small ops around them. The read path now
(`tuner/layer.py`) runs `bmm` directly on the batched memory, computes a decode step's `x K^T` on CPU as
`(K x^T)^T` (the one-row product streams K twice as fast with K on the left), fuses the scale and the residual add
into the second product (`baddbmm(result, scores, V, alpha=s)`) and skips the dropout module in eval; keys and
values are cast to the compute dtype once per call (`MemoryState.for_input`, cached for every decode step of a
`generate()`).

To measure before and after *side by side in one process* -- the only comparison this shared machine allows -- the
pre-issue-16 forward of `FFNMemoryLayer` is kept here, verbatim, as `forward_before_issue16`, and bound to the layers
of a second MemVP copy of the same base. Three methods run interleaved (the first rotating), decode per token is
the median over repeats, and each ratio the median of per-repeat ratios. Both paths are checked to give the same
logits before anything is timed.
"""

from __future__ import annotations

import argparse
import copy
import time
import types
from pathlib import Path
from typing import Any

import torch

from .base_model import build_base_model, describe_model
from .device import device_name
from .machine import cpu_name, load_average
from .measure import median, quiet_native_stderr, time_generate
from .methods import LoRAMethod, MemVPMethod, Method, make_batch
from .ratios import paired_ratio


def forward_before_issue16(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`FFNMemoryLayer.forward` as it was before issue 16 (the yardstick of `--decode_compare`; not used otherwise)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters:
        return result
    xb = self._batched(x)
    for name, keys, values in self._memories(xb):
        scores = self.memvp_activation[name](torch.matmul(xb, keys.transpose(-1, -2)))
        read = torch.matmul(self.memvp_dropout[name](scores), values) * self.memvp_scale[name]
        result = result + read.reshape(result.shape).to(result.dtype)
    return result


def _with_read_before_issue16(method: MemVPMethod) -> MemVPMethod:
    """`method` with the pre-issue-16 read bound to each of its FFN memory layers (its own instances only)."""
    from ..tuner.layer import FFNMemoryLayer

    layers = [m for m in method.model.modules() if isinstance(m, FFNMemoryLayer)]
    if not layers:
        raise ValueError("--decode_compare needs a base whose FFNs MemVP wraps whole (a GLU FFN such as Llama's)")
    for layer in layers:
        layer.forward = types.MethodType(forward_before_issue16, layer)
    method.name = "memvp_before"
    return method


LABELS = {"memvp": "MemVP (read path now)", "memvp_before": "MemVP (read path before issue 16)",
          "text_lora": "text only + LoRA"}


def time_read_forms(batch: int, slots: int, width: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Microseconds (median) of one decode step's memory products at (batch, slots, width), each on a cold cache
    (a 64 MB buffer is touched before every call, as a layer's own weights evict K and V between two reads):
    `x K^T` as `bmm(x, K^T)` (before) and as `bmm(K, x^T)^T` (now, on CPU), and the fused `h V` read."""
    from .device import synchronize

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
    """Decode per token of MemVP now, MemVP before issue 16 and text-only + LoRA, interleaved; the report."""
    from tqdm.auto import tqdm

    base = build_base_model(args, max(args.num_layers) if args.num_layers else None)
    info = describe_model(base)
    visual_tokens, text_len = args.profile_point
    slots = visual_tokens + args.extra_slots
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batch = make_batch(args.batch_size, text_len, visual_tokens, args.visual_dim, info["vocab_size"], args.seed,
                       device, dtype)
    now = MemVPMethod(copy.deepcopy(base), args.visual_dim, slots, args.projector_hidden_dim)
    before = _with_read_before_issue16(MemVPMethod(copy.deepcopy(base), args.visual_dim, slots,
                                                   args.projector_hidden_dim))
    before.model.load_state_dict(now.model.state_dict())  # the same adapter weights in both
    text = LoRAMethod(copy.deepcopy(base), False, args.visual_dim, args.projector_hidden_dim, args.lora_r,
                      args.lora_alpha, args.lora_dropout, args.lora_targets)
    methods: list[Method] = [now, before, text]
    with torch.no_grad():
        now.train(False)
        before.train(False)
        a, b = now.model(**now.inputs(batch)).logits, before.model(**before.inputs(batch)).logits
    logit_diff = float((a - b).abs().max())
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise RuntimeError(f"the two MemVP read paths disagree (max |logit difference| {logit_diff:.3g})")
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
        for method in (now, text):
            _profile_generate(method, batch, args.new_tokens, output_dir / f"decode_profile_{method.name}.txt")
    rows = [{"method": m.name, "label": LABELS[m.name],
             "decode_ms_per_token": 1e3 * median(samples[m.name]["decode"]),
             "decode_cpu_ms_per_token": 1e3 * median(samples[m.name]["decode_cpu"]),
             "samples_ms": {k: [round(1e3 * v, 4) for v in vals] for k, vals in samples[m.name].items()}}
            for m in methods]
    ratios = {}
    for key, num, den in (("now_over_text", "memvp", "text_lora"), ("before_over_text", "memvp_before", "text_lora"),
                          ("now_over_before", "memvp", "memvp_before")):
        ratios[key] = paired_ratio(samples[num]["decode"], samples[den]["decode"])
        ratios[f"cpu_{key}"] = paired_ratio(samples[num]["decode_cpu"], samples[den]["decode_cpu"])
    return {
        "meta": {"command": "python -m memvp_peft.bench " + " ".join(args.argv), "N": visual_tokens, "T": text_len,
                 "B": args.batch_size, "slots": slots, "new_tokens": args.new_tokens, "repeats": args.repeats,
                 "model": info, "device": args.device, "device_name": device_name(args.device),
                 "dtype": args.dtype, "processor": cpu_name(), "torch_threads": torch.get_num_threads(),
                 "torch": torch.__version__, "loadavg_start": load_start, "loadavg_end": load_average(),
                 "max_abs_logit_difference_before_vs_now": logit_diff},
        "results": rows,
        "ratios": ratios,
        "read_forms_us": read_forms,
    }


def decode_compare_markdown(report: dict[str, Any]) -> str:
    """The decode comparison as markdown: per-method medians and the paired ratios (wall / CPU time)."""
    meta, ratios = report["meta"], report["ratios"]
    model = meta["model"]
    lines = [
        "# MemVP decode step: read path before and after issue 16",
        "",
        f"N={meta['N']}, T={meta['T']}, B={meta['B']}, {meta['slots']} memory slots, {meta['new_tokens']} new tokens; "
        f"width {model['hidden_size']}, {model['num_layers']} layers, {meta['dtype']}, "
        f"{meta['device_name'] if meta['device'] == 'cuda' else meta['processor']}, {meta['torch_threads']} "
        f"threads; median of {meta['repeats']} interleaved repeats. The two read paths' logits differ by at most "
        f"{meta['max_abs_logit_difference_before_vs_now']:.2g}.",
        "",
        "| method | decode ms/token (wall) | decode ms/token (CPU) |",
        "|---|---|---|",
    ]
    for row in report["results"]:
        lines.append(f"| {row['label']} | {row['decode_ms_per_token']:.3f} | {row['decode_cpu_ms_per_token']:.3f} |")
    lines += ["", "| ratio (median of per-repeat ratios) | wall | CPU |", "|---|---|---|"]
    for key, text in (("before_over_text", "MemVP before / text-only"), ("now_over_text", "MemVP now / text-only"),
                      ("now_over_before", "MemVP now / MemVP before")):
        lines.append(f"| {text} | {ratios[key]:.3f} | {ratios['cpu_' + key]:.3f} |")
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
