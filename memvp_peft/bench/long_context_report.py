"""`--long_context`'s outputs: the cost-vs-N table, the ratios beside their FLOP predictions, the targets, the plot.

Rows of methods that were not measured at a point (over the time cap, out of memory) are printed with their status,
and the plot marks them, so a reader sees where input-space prompting stopped instead of a shorter table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .long_context import FLOP_EFFICIENCY, describe_layout
from .methods import ALL_METHODS, METHOD_LABELS
from .report import target_line


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(value: Optional[int]) -> str:
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
            f"{_num(r['prefill_ms'])} | {_num(r['decode_ms_per_token'], 2)} | {_mib(r['kv_cache_bytes'])} | "
            f"{_mib(r['peak_train_bytes'])} | {_mib(r['peak_generate_bytes'])} |"
        )
    lines += [
        "",
        "Ratios per MemVP form: measured (wall clock / process CPU time; times: median of the per-repeat ratios) "
        "[matmul-FLOP prediction, `flops.memory_form_flops`] and the check: speed-ups must reach >= "
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
