"""What every measurement is judged against: the matmul FLOPs each method and phase should cost, MemVP's paired
ratios to the baselines, the targets, and the per-layer fit that extrapolates to a real model's full depth.

FLOPs are the yardstick each measured ratio is set against. For MemVP / text-only the prediction is the physical
floor (text-only + the memory branch + the projector, with MemVP's shorter backward): a measured ratio above it is
overhead, one on it is not.

Ratios are taken per repeat (calls of one repeat ran back to back and shared the machine's load) and then the
median, which cancels most of the drift that other jobs on the machine cause. One row per depth and (N, T) point.
The targets at N=256, T=64 depend on the device: the CPU ones are this project's CPU targets; the GPU ones are set
against the paper's GPU numbers (0.28 vs 0.49 s per training batch, 1.88 vs 3.42 s inference, LLaMA-7B).

Per-layer times: a 7B-class model rarely fits three times (one copy per method) with its activations on one
accelerator, so the sweep builds K of its layers. A K-layer time is not a K/L-th of the full model's: the embeddings,
the LM head, the loss and -- in decoding -- the per-step Python work of `generate` are paid once, whatever the depth.
Measuring at two or more depths separates the two parts with a least-squares line ``time(depth) = fixed + depth *
per_layer`` per method, point and metric; a full-depth figure is then ``fixed + L * per_layer``, an extrapolation that
every report labels as one (the full model was not run). The same line is fitted to the peak memory and the KV cache.

`--long_context` (cost against memory size N) sets every measured ratio of each MemVP form beside its matmul-FLOP
prediction (`memory_form_flops`) and checks it: a speed-up must reach >= 0.9 of the predicted one, a cost ratio
(form / text-only) must stay <= the prediction / 0.9 -- both say "measured speed >= 0.9 of what FLOPs allow" -- and
has targets of its own at N = 2,304. A ratio against a method that was not measured (over the time cap, out of
memory) is reported as missing, with the reason.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Optional

from .methods import MEMVP_FORMS, METHOD_LABELS, METHODS, describe_layout, form_slots, layout_for


def forward_flops_per_token(info: dict[str, Any], context: float) -> float:
    """Matmul FLOPs of one token's forward through a Llama-shaped model attending to `context` earlier tokens."""
    d, layers, inter = info["hidden_size"], info["num_layers"], info["intermediate_size"] or 4 * info["hidden_size"]
    heads, kv = info["num_attention_heads"] or 1, info["num_key_value_heads"] or info["num_attention_heads"] or 1
    kv_width = d * kv // heads
    per_layer = 2 * (2 * d * d + 2 * d * kv_width + 3 * d * inter) + 4 * context * d
    return layers * per_layer


def _parts(info: dict[str, Any], args: argparse.Namespace, new_tokens: int) -> dict[str, Any]:
    """The pieces every method's FLOPs are made of (per sample): the body, the LM head, LoRA's training step..."""
    d, layers, vocab = info["hidden_size"], info["num_layers"], info["vocab_size"]
    heads = info["num_attention_heads"] or 1
    kv_width = d * (info["num_key_value_heads"] or heads) // heads
    head = 2 * d * vocab
    qkv = 2 * (d * d + 2 * d * kv_width)  # layer 0's q/k/v input gradients: never needed (embeddings are frozen)
    body = lambda tokens: tokens * forward_flops_per_token(info, tokens / 2)  # noqa: E731  (causal: mean context L/2)
    return {
        "d": d, "layers": layers, "head": head, "body": body,
        "lora_train": lambda tokens: 2 * (body(tokens) + tokens * head) - tokens * qkv,
        "decode_ctx": lambda length: forward_flops_per_token(info, length + new_tokens / 2) + head,
        "proj_fwd": lambda tokens: 2 * tokens * (args.visual_dim * args.projector_hidden_dim
                                                 + args.projector_hidden_dim * d),
        # + dW1, dW2 and d(hidden)
        "proj_train": lambda tokens: 2 * tokens * (2 * args.visual_dim * args.projector_hidden_dim
                                                   + 3 * args.projector_hidden_dim * d),
    }


def memory_form_flops(info: dict[str, Any], text_len: int, slots: int, projector_tokens: int,
                      args: argparse.Namespace, new_tokens: int) -> dict[str, float]:
    """Matmul FLOPs per sample of a MemVP memory form: `slots` memory slots read by every FFN, a projector run on
    `projector_tokens` visual tokens (N for MemVP; N/4 after `pool_kernel=2`, which pools *before* the projector;
    1.25 N for ADEM-VL's multiscale slots, which concatenates the grid and its pool before it).

    ADEM-VL's read, `silu(x) silu(K)^T` with the lowest scores dropped, has the same two matmuls as MemVP's
    `act(x K^T) V` (the SiLUs and the drop's selection are elementwise / selection work, not matmuls), so only the
    slot count and the projector's token count tell the forms apart here.
    """
    p = _parts(info, args, new_tokens)
    d, layers, body, head = p["d"], p["layers"], p["body"], p["head"]
    mem_fwd = 4 * slots * d * layers
    mem_bwd = 8 * slots * d * (layers - 1) + 6 * slots * d
    return {
        "train": body(text_len) * (1 + (layers - 1) / layers) + 2 * text_len * head
        + text_len * (mem_fwd + mem_bwd) + p["proj_train"](projector_tokens),
        "prefill": body(text_len) + head + text_len * mem_fwd + p["proj_fwd"](projector_tokens),
        "decode": p["decode_ctx"](text_len) + mem_fwd,
    }


def flop_model(info: dict[str, Any], visual_tokens: int, text_len: int, slots: int, args: argparse.Namespace,
               new_tokens: int, forms: Optional[dict[str, tuple[int, int]]] = None) -> dict[str, dict[str, float]]:
    """Matmul FLOPs per sample of every method and phase (LoRA's own FLOPs, < 0.5%, are ignored).

    Forward of a token: `forward_flops_per_token` (+ the LM head: on every position in training, on the last one in
    prefill). Backward of the frozen base computes input gradients only (~1x the forward of each layer it passes).
    How far back it must go differs: LoRA on q/v of layer 0 (and input-space's projector under layer 0) need every
    layer's backward, while MemVP's first trainable tensors are the keys/values read *inside* layer 0's FFN, so
    layer 0's attention and FFN get no backward at all. MemVP's memory branch act(x K^T) V costs 4*n*d per token per
    layer forward and 8*n*d backward (dX, d(scores), dK, dV; 6*n*d in layer 0, which needs no dX). Its projector
    runs on N visual tokens, as input-space's does.

    `forms` adds MemVP's other memory forms: method name -> (slots, projector tokens), see `memory_form_flops`.
    """
    p = _parts(info, args, new_tokens)
    t_all, v_all = text_len, text_len + visual_tokens
    body, head, lora_train, decode_ctx = p["body"], p["head"], p["lora_train"], p["decode_ctx"]
    model = {
        "text_lora": {"train": lora_train(t_all), "prefill": body(t_all) + head, "decode": decode_ctx(t_all)},
        "memvp": memory_form_flops(info, text_len, slots, visual_tokens, args, new_tokens),
        "input_lora": {"train": lora_train(v_all) + p["proj_train"](visual_tokens),
                       "prefill": body(v_all) + head + p["proj_fwd"](visual_tokens), "decode": decode_ctx(v_all)},
    }
    for name, (slots_of_form, projector_tokens) in (forms or {}).items():
        model[name] = memory_form_flops(info, text_len, slots_of_form, projector_tokens, args, new_tokens)
    return model


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
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


def compute_ratios(results: list[dict[str, Any]], infos: dict[Any, dict[str, Any]], args: argparse.Namespace,
                   ) -> list[dict]:
    """MemVP vs the baselines per depth and (N, T) (paired per-repeat ratios, wall and CPU time), and the ratios that
    matmul FLOPs predict -- for MemVP / text-only that is the physical floor. `infos` maps each depth (a row's
    ``layers``) to the shape of the base measured at that depth (one shape is accepted too)."""
    if "hidden_size" in infos:  # one model description for every row
        infos = {r.get("layers"): infos for r in results}
    by_key = {(r.get("layers"), r["N"], r["T"], r["method"]): r for r in results}
    ratios = []
    for layers, n_vis, t_len in sorted({(r.get("layers"), r["N"], r["T"]) for r in results},
                                       key=lambda k: (k[0] or 0, k[1], k[2])):
        rows = {m: by_key.get((layers, n_vis, t_len, m)) for m in METHODS}
        info = infos.get(layers, {})
        row: dict[str, Any] = {"N": n_vis, "T": t_len, "layers": layers}
        for key, num, den, sample in RATIO_DEFS:
            if rows[num] and rows[den]:
                a, b = rows[num]["samples_ms"], rows[den]["samples_ms"]
                row[key] = paired_ratio(a[sample], b[sample])
                row[f"cpu_{key}"] = paired_ratio(a[f"{sample}_cpu"], b[f"{sample}_cpu"])
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
GPU_TARGETS = (
    ("train_speedup_vs_input", ">=", 2.0, "MemVP training step >= 2x faster than input-space + LoRA"),
    ("train_memvp_over_text", "<=", 1.05, "MemVP training step <= 1.05x the text-only step"),
    ("prefill_speedup_vs_input", ">=", 4.5, "MemVP prefill >= 4.5x faster than input-space + LoRA"),
    ("decode_memvp_over_input", "<=", 1.0, "MemVP decode per token no slower than input-space + LoRA"),
)
TARGETS_BY_DEVICE = {"cpu": TARGETS, "cuda": GPU_TARGETS}


FLOP_PREDICTION = {
    "train_speedup_vs_input": "flops_train_speedup_vs_input",
    "train_memvp_over_text": "floor_train_over_text",
    "prefill_speedup_vs_input": "flops_prefill_speedup_vs_input",
    "prefill_memvp_over_text": "floor_prefill_over_text",
}


def check_targets(ratios: list[dict[str, Any]], point: tuple[int, int] = (256, 64), targets: tuple = TARGETS,
                  full_depth_ratios: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """The targets at `point` (N=256, T=64 by default) on the deepest base measured: met or not, wall and CPU time,
    with the FLOP prediction beside each -- and, where a per-layer fit extrapolated to the full depth
    (`fit_depths`), that extrapolated ratio too (shown beside, never judged: it was not measured)."""
    extrapolated = next((r for r in full_depth_ratios or [] if (r["N"], r["T"]) == point), {})
    at_point = [r for r in ratios if (r["N"], r["T"]) == point]
    if not at_point:
        return {"point": None, "checks": []}
    row = max(at_point, key=lambda r: r.get("layers") or 0)
    checks = []
    for key, op, bound, text in targets:
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
            "full_depth_extrapolated": round(extrapolated[key], 3) if key in extrapolated else None,
        })
    return {"point": {"N": point[0], "T": point[1], "layers": row.get("layers")}, "checks": checks}


#: what is fitted: time per call (wall, and the process's CPU time: the steadier one on a busy CPU, the host's share
#: on a GPU) and bytes, each linear in the depth
FITTED = ("train_step_ms", "prefill_ms", "decode_ms_per_token", "train_step_cpu_ms", "prefill_cpu_ms",
          "decode_cpu_ms_per_token", "peak_train_bytes", "peak_generate_bytes", "kv_cache_bytes")
#: the sample key of `RATIO_DEFS` -> the result field that holds its median
SAMPLE_FIELD = {"train": "train_step_ms", "prefill": "prefill_ms", "decode": "decode_ms_per_token"}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of `ys` over `xs` (two points: the line through them)."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"a line needs at least two distinct x values, got {xs}")
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def fit_depths(results: list[dict[str, Any]], full_depth: Optional[int]) -> dict[str, Any]:
    """Per-layer and fixed parts of every fitted metric per (N, T, method), their full-depth extrapolation (when the
    model has a full depth) and the ratios at full depth. Empty ``fits`` with fewer than two depths."""
    depths = sorted({r["layers"] for r in results if r.get("layers") is not None})
    out: dict[str, Any] = {"depths": depths, "full_depth": full_depth, "fits": [], "full_depth_ratios": []}
    if len(depths) < 2:
        return out
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["N"], row["T"], row["method"]), []).append(row)
    by_point: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for (n_vis, t_len, method), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                METHODS.index(kv[0][2]))):
        fit: dict[str, Any] = {"N": n_vis, "T": t_len, "method": method, "label": METHOD_LABELS[method],
                               "depths": sorted(r["layers"] for r in rows), "per_layer": {}, "fixed": {},
                               "at_full_depth": {}}
        for field in FITTED:
            points = [(r["layers"], r[field]) for r in rows if r.get(field) is not None]
            if len({x for x, _ in points}) < 2:
                continue
            slope, intercept = fit_line([float(x) for x, _ in points], [float(y) for _, y in points])
            fit["per_layer"][field], fit["fixed"][field] = slope, intercept
            if full_depth:
                fit["at_full_depth"][field] = intercept + slope * full_depth
        out["fits"].append(fit)
        by_point.setdefault((n_vis, t_len), {})[method] = fit
    if full_depth:
        for (n_vis, t_len), fits in sorted(by_point.items()):
            row: dict[str, Any] = {"N": n_vis, "T": t_len, "layers": full_depth, "extrapolated": True}
            for key, num, den, sample in RATIO_DEFS:
                field = SAMPLE_FIELD[sample]
                a = fits.get(num, {}).get("at_full_depth", {}).get(field)
                b = fits.get(den, {}).get("at_full_depth", {}).get(field)
                if a is not None and b:
                    row[key] = a / b
            out["full_depth_ratios"].append(row)
    return out


#: the point of the long-context targets (width 512, CPU, N = 2,304, T = 64); a sweep without it is judged at its
#: largest N
TARGET_N = 2304
#: measured speed must reach this fraction of what the FLOP model allows
FLOP_EFFICIENCY = 0.9

LONG_CONTEXT_TARGETS = (
    ("memvp", "train_speedup_vs_input", ">=", 20.0, "MemVP training step >= 20x faster than input-space + LoRA"),
    ("memvp_pooled", "train_over_text", "<=", 1.35, "MemVP pooled 2x2 training step <= 1.35x the text-only step"),
    ("memvp", "peak_train_over_input", "<=", 0.15, "MemVP peak training memory <= 0.15x input-space + LoRA"),
)

# (ratio key, numerator, denominator, sample key or result field, FLOP phase or None, kind)
# kind "speedup": the MemVP form in the denominator (higher is better); "cost": the form in the numerator
_LONG_CONTEXT_RATIOS = (
    ("train_speedup_vs_input", "input_lora", "form", "train", "train", "speedup"),
    ("prefill_speedup_vs_input", "input_lora", "form", "prefill", "prefill", "speedup"),
    ("decode_speedup_vs_input", "input_lora", "form", "decode", "decode", "speedup"),
    ("train_over_text", "form", "text_lora", "train", "train", "cost"),
    ("prefill_over_text", "form", "text_lora", "prefill", "prefill", "cost"),
    ("decode_over_text", "form", "text_lora", "decode", "decode", "cost"),
    ("peak_train_over_input", "form", "input_lora", "peak_train_bytes", None, "cost"),
    ("kv_cache_over_input", "form", "input_lora", "kv_cache_bytes", None, "cost"),
)


def _measured(row: Optional[dict[str, Any]]) -> bool:
    return bool(row) and not row.get("status")


def long_context_ratios(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
                        ) -> list[dict[str, Any]]:
    """Per N and MemVP form: every ratio of `_LONG_CONTEXT_RATIOS` (paired per-repeat medians for times), its FLOP
    prediction, and whether measured speed reaches `FLOP_EFFICIENCY` of the prediction. A ratio against a method that
    was not measured (over the cap, out of memory) is None with the reason."""
    out = []
    for n_vis, t_len in sorted({(r["N"], r["T"]) for r in results}):
        rows = {r["method"]: r for r in results if (r["N"], r["T"]) == (n_vis, t_len)}
        layout = layout_for(args, n_vis)
        forms = {m: form_slots(m, layout, args) for m in MEMVP_FORMS if m in rows}
        memvp_slots = forms.get("memvp", (n_vis + args.extra_slots, n_vis))[0]
        flops = flop_model(info, n_vis, t_len, memvp_slots, args, args.new_tokens, forms=forms)
        for form in forms:
            entry: dict[str, Any] = {"N": n_vis, "T": t_len, "layout": describe_layout(layout), "form": form,
                                     "slots": forms[form][0], "ratios": {}}
            for key, num, den, field, phase, kind in _LONG_CONTEXT_RATIOS:
                num, den = (form if num == "form" else num), (form if den == "form" else den)
                a, b = rows.get(num), rows.get(den)
                item: dict[str, Any] = {"kind": kind, "value": None, "predicted": None, "check": None}
                if not (_measured(a) and _measured(b)):
                    missing = next(r for r in (a, b) if not _measured(r)) if a and b else None
                    item["why"] = (f"{METHOD_LABELS[missing['method']]}: {missing['status']}" if missing
                                   else "not run")
                elif phase is None:
                    if a[field] is not None and b[field]:
                        item["value"] = a[field] / b[field]
                else:
                    item["value"] = paired_ratio(a["samples_ms"][field], b["samples_ms"][field])
                    item["cpu_value"] = paired_ratio(a["samples_ms"][f"{field}_cpu"], b["samples_ms"][f"{field}_cpu"])
                if phase is not None and num in flops and den in flops:
                    item["predicted"] = flops[num][phase] / flops[den][phase]
                    if item["value"] is not None:
                        speed = item["value"] / item["predicted"] if kind == "speedup" else \
                            item["predicted"] / item["value"]
                        item["speed_vs_prediction"] = speed
                        item["check"] = speed >= FLOP_EFFICIENCY
                entry["ratios"][key] = item
            out.append(entry)
    return out


def check_long_context_targets(ratios: list[dict[str, Any]]) -> dict[str, Any]:
    """The long-context targets at N = `TARGET_N` (the largest N where the sweep has no 2,304): met, not met, or not
    measured (the baseline was over the cap or out of memory), with the FLOP prediction beside each."""
    sizes = sorted({r["N"] for r in ratios})
    if not sizes:
        return {"point": None, "checks": []}
    point = TARGET_N if TARGET_N in sizes else sizes[-1]
    checks = []
    for form, key, op, bound, text in LONG_CONTEXT_TARGETS:
        entry = next((r for r in ratios if r["N"] == point and r["form"] == form), None)
        if entry is None:
            continue
        item = entry["ratios"][key]
        value = item["value"]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        checks.append({"target": text, "form": form, "metric": key, "bound": f"{op} {bound}", "met": met,
                       "value": value, "cpu_value": item.get("cpu_value"), "predicted": item["predicted"],
                       "why": item.get("why")})
    return {"point": {"N": point, "T": ratios[0]["T"]}, "checks": checks}
