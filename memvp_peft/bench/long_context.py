"""`memvp-bench --long_context`: cost against memory size N (issue 15), where MemVP's signature shows.

Input-space prompting pays for every visual token in every layer, quadratically in attention, and its KV cache grows
with N; MemVP's memory costs `4 * n * d` FLOPs per text token and layer and never touches the cache. The sweep runs N
up to 4,096 at one text length: one 16x16 image (256), one 24x24 image (576), the 2x2 tiles of a high-resolution
image (4 x 576 = 2,304; LLaVA-NeXT's overview would add 576 more) and a 16-frame video (16 x 256 = 4,096).

Five methods: MemVP, MemVP pooled 2x2 (`pool_kernel=2`: N/4 slots), the ADEM-VL form (`MemVPConfig.adem_vl`:
multiscale slots, the `silu(x) silu(K)^T` read, 10% of each token's scores dropped), input-space + LoRA and
text-only + LoRA. The MemVP forms are built through the real `MemVPConfig` options (`memvp_form`), and video layouts
set `num_frames`. A layout is ``P`` (one image of P tokens), ``tiles:IxP`` or ``frames:IxP`` (I images of P tokens).

Every measured ratio is set beside its matmul-FLOP prediction (`flops.memory_form_flops`) and checked: a speed-up
must reach >= 0.9 of the predicted one, a cost ratio (form / text-only) must stay <= the prediction / 0.9 -- both
say "measured speed >= 0.9 of what FLOPs allow". Methods whose first training step exceeds ``--time_cap_s`` (or that
run out of memory) are reported with that status instead of being left out.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional

from torch import nn

from ..tuner.config import MemVPConfig
from .cost_model import flop_model
from .methods import MEMVP_FORMS, METHOD_LABELS, MemVPMethod
from .ratios import paired_ratio

DEFAULT_LAYOUTS = ("256", "576", "tiles:4x576", "frames:16x256")
QUICK_LAYOUTS = ("16", "frames:4x16")
#: the point of the issue's targets (width 512, CPU, N = 2,304, T = 64); a sweep without it is judged at its largest N
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
_RATIOS = (
    ("train_speedup_vs_input", "input_lora", "form", "train", "train", "speedup"),
    ("prefill_speedup_vs_input", "input_lora", "form", "prefill", "prefill", "speedup"),
    ("decode_speedup_vs_input", "input_lora", "form", "decode", "decode", "speedup"),
    ("train_over_text", "form", "text_lora", "train", "train", "cost"),
    ("prefill_over_text", "form", "text_lora", "prefill", "prefill", "cost"),
    ("decode_over_text", "form", "text_lora", "decode", "decode", "cost"),
    ("peak_train_over_input", "form", "input_lora", "peak_train_bytes", None, "cost"),
    ("kv_cache_over_input", "form", "input_lora", "kv_cache_bytes", None, "cost"),
)


def parse_layout(spec: str) -> tuple[int, int, str]:
    """``"576"`` -> (1, 576, "image"), ``"tiles:4x576"`` -> (4, 576, "tiles"), ``"frames:16x256"`` -> (16, 256,
    "frames"): images per sample, visual tokens per image, and what the images are."""
    kind, _, shape = spec.rpartition(":")
    parts = shape.lower().split("x")
    ok = kind in ("", "tiles", "frames") and all(p.isdigit() and int(p) > 0 for p in parts)
    if not ok or len(parts) not in (1, 2) or (kind and len(parts) != 2) or (not kind and len(parts) != 1):
        raise ValueError(f"a layout is P, tiles:IxP or frames:IxP (I images of P visual tokens), got {spec!r}")
    if not kind:
        return 1, int(parts[0]), "image"
    return int(parts[0]), int(parts[1]), kind


def describe_layout(layout: tuple[int, int, str]) -> str:
    images, tokens, kind = layout
    return f"1 image of {tokens}" if kind == "image" else f"{images} {kind} of {tokens}"


def layout_for(args: argparse.Namespace, visual_tokens: int) -> tuple[int, int, str]:
    """The layout of the point with `visual_tokens` (one image of N tokens outside ``--long_context``)."""
    return getattr(args, "layouts", None) and args.layouts.get(visual_tokens) or (1, visual_tokens, "image")


def memvp_form(name: str, layout: tuple[int, int, str]) -> tuple[Callable[..., MemVPConfig], dict[str, Any]]:
    """How `name`'s `MemVPConfig` is made for `layout`: the constructor (the ADEM-VL preset for ``memvp_adem``) and
    the options, all real `MemVPConfig` fields -- ``pool_kernel=2``; ADEM-VL's multiscale slots of each image's grid
    plus its 2x2 pool (their [256, 64] for a 16x16 grid); ``num_frames`` for a video."""
    images, tokens, kind = layout
    options: dict[str, Any] = {"num_frames": images} if kind == "frames" else {}
    if name == "memvp":
        return MemVPConfig, options
    if name == "memvp_pooled":
        return MemVPConfig, {**options, "pool_kernel": 2}
    if name == "memvp_adem":
        # ADEM-VL's memory on precomputed features: its CLS input token and CLIP adapters need an encoder's pixels
        return MemVPConfig.adem_vl, {**options, "multiscale_tokens": [tokens, tokens // 4], "cls_token": False,
                                     "vision_adapter_dim": 0}
    raise ValueError(f"{name!r} is no MemVP memory form; known: {', '.join(MEMVP_FORMS)}")


def form_slots(name: str, layout: tuple[int, int, str], args: argparse.Namespace) -> tuple[int, int]:
    """(memory slots, tokens the projector runs on) of form `name`: `MemVPConfig.memory_tokens` of the layout (the
    visual slots after compression, which is also what the projector sees) + ``--extra_slots`` learned slots."""
    make_config, options = memvp_form(name, layout)
    probe = make_config(visual_dim=args.visual_dim, num_memory_slots=1, task_type="CAUSAL_LM", **options)
    visual = probe.memory_tokens(layout[1], layout[0])
    return visual + args.extra_slots, visual


def build_memvp_method(name: str, base: nn.Module, args: argparse.Namespace, visual_tokens: int) -> MemVPMethod:
    """Form `name` of MemVP on `base` (consumed: peft modifies it in place) for the point with `visual_tokens`."""
    layout = layout_for(args, visual_tokens)
    make_config, options = memvp_form(name, layout)
    slots, _ = form_slots(name, layout, args)
    return MemVPMethod(base, args.visual_dim, slots, args.projector_hidden_dim, name=name, make_config=make_config,
                       options=options)


def _measured(row: Optional[dict[str, Any]]) -> bool:
    return bool(row) and not row.get("status")


def long_context_ratios(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace,
                        ) -> list[dict[str, Any]]:
    """Per N and MemVP form: every ratio of `_RATIOS` (paired per-repeat medians for times), its FLOP prediction,
    and whether measured speed reaches `FLOP_EFFICIENCY` of the prediction. A ratio against a method that was not
    measured (over the cap, out of memory) is None with the reason."""
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
            for key, num, den, field, phase, kind in _RATIOS:
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
    """The issue's targets at N = `TARGET_N` (the largest N where the sweep has no 2,304): met, not met, or not
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
