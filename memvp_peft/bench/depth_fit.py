"""Per-layer times from two or more depths, and the full-depth figures they extrapolate to -- said to be extrapolated.

A 7B-class model rarely fits three times (one copy per method) with its activations on one accelerator, so the
sweep builds K of its layers. A K-layer time is not a K/L-th of the full model's: the embeddings, the LM head, the
loss and -- in decoding -- the per-step Python work of `generate` are paid once, whatever the depth. Measuring at two
or more depths separates the two parts with a least-squares line ``time(depth) = fixed + depth * per_layer`` per
method, point and metric; a full-depth figure is then ``fixed + L * per_layer``, an extrapolation that every report
labels as one (the full model was not run). The same line is fitted to the peak memory and the KV cache.
"""

from __future__ import annotations

from typing import Any, Optional

from .methods import METHOD_LABELS, METHODS
from .ratios import RATIO_DEFS

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
