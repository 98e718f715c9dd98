"""The sweep's outputs: its markdown tables, its six-panel plot, and the JSON / markdown / PNG files of a report.

`write_outputs` takes the markdown and the plot function, so the accuracy mode writes its three files the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .depth_fit import depth_fit_markdown
from .methods import METHOD_LABELS, METHODS


def _mb(value: Optional[int]) -> str:
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
            f"{r['prefill_ms']:.1f}", f"{r['decode_ms_per_token']:.2f}", _mb(r["kv_cache_bytes"]),
            _mb(r["visual_state_bytes"]) if r["visual_state_bytes"] else "-", _mb(r["peak_train_bytes"]),
            _mb(r["peak_generate_bytes"]),
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


def write_outputs(report: dict[str, Any], output_dir: Path, stem: str, markdown: str,
                  plot: Optional[Callable[[dict, Path], None]]) -> dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` where matplotlib is installed); the written paths."""
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
