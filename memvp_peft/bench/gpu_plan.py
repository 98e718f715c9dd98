"""The prepared GPU benchmark (`memvp_peft/bench/gpu.sh`): the GPU targets' points on one CUDA device, in a budget.

    python -m memvp_peft.bench.gpu_plan --output_dir outputs/memvp-bench-gpu     # what gpu.sh runs
    python -m memvp_peft.bench.gpu_plan --smoke --output_dir /tmp/plan           # the same plan on CPU, tiny

Each run is one `memvp-bench` process (CUDA, bf16, SDPA, random bases of the real models' shapes at 1 and 2 layers,
so that per-layer times and a labelled full-depth extrapolation come out), in order of importance: LLaMA-7B at
N = 256 and 2,304 with T = 64 for B = 4 and B = 16, then Qwen2.5-7B (grouped-query attention, 152k vocabulary) and
LLaMA-13B at the main point. Every run has its own time limit and the plan a total budget (default 420 s: the whole
script must finish in under 8 minutes on one H200, with room for start-up): a run that would start after the budget
is skipped and says so, a run past its limit is stopped and says so, and the summary is written whatever happened.

Outputs: one folder per run (benchmark.json / .md / .png) and `summary.md` + `summary.json` with each run's status,
wall time and its targets (measured at the deepest depth run, with the full-depth extrapolation beside).
`--smoke` swaps each run's model and device for the CPU quick model so the plan itself is testable anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

#: (name, memvp-bench flags, time limit in seconds), most important first
GPU_COMMON = ["--device", "cuda", "--dtype", "bfloat16", "--attn_implementation", "sdpa", "--layers", "1", "2",
              "--repeats", "5", "--warmup", "2", "--no_progress"]
PLAN: list[tuple[str, list[str], int]] = [
    ("llama-7b_B4", ["--model_shape", "llama-7b", "-B", "4", "-N", "256", "2304", "-T", "64"], 120),
    ("llama-7b_B16", ["--model_shape", "llama-7b", "-B", "16", "-N", "256", "2304", "-T", "64"], 150),
    ("qwen2.5-7b_B16", ["--model_shape", "qwen2.5-7b", "-B", "16", "-N", "256", "-T", "64"], 90),
    ("llama-13b_B16", ["--model_shape", "llama-13b", "-B", "16", "-N", "256", "-T", "64"], 90),
    # N from Qwen2-VL's own image processor on a 640 x 480 image (391 tokens), not from -N
    ("qwen2-vl-7b_B16", ["--model_shape", "qwen2-vl-7b", "-B", "16", "-T", "64"], 90),
]
#: --smoke: the CPU quick model (width 64) at the main target point, so the summary's target table is exercised too
SMOKE = ["--quick", "--layers", "1", "2", "--repeats", "1", "--no_progress", "-N", "256", "-T", "64"]
DEFAULT_BUDGET_S = 420


def run_argv(flags: list[str], smoke: bool) -> list[str]:
    """The memvp-bench flags of one planned run (`smoke`: the CPU quick model at the run's batch size instead)."""
    if not smoke:
        return [*GPU_COMMON, *flags]
    batch = flags[flags.index("-B") + 1]
    return [*SMOKE, "-B", batch]


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    return (report.get("targets") or {}).get("checks") or []


def summary_markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Every run's status and targets as one markdown page (the measured value, the extrapolated one beside)."""
    lines = ["# memvp-bench on a GPU: the GPU targets' points", "",
             f"Device: {meta.get('device_name')}; torch {meta.get('torch')}; plan budget {meta['budget_s']} s, "
             f"took {meta['wall_s']:.0f} s. Each run: `python -m memvp_peft.bench <flags>` (flags below).", ""]
    for run in runs:
        lines += [f"## {run['name']}: {run['status']} ({run['wall_s']:.0f} s)", "", f"`{' '.join(run['argv'])}`", ""]
        checks = run.get("targets") or []
        if checks:
            point = run.get("point") or {}
            lines += [f"Targets at N={point.get('N')}, T={point.get('T')}, measured with {point.get('layers')} "
                      "layers; full depth is extrapolated from the per-layer fit:", "",
                      "| target | measured | full depth (extrapolated) | met (measured) |", "|---|---|---|---|"]
            for check in checks:
                full = check.get("full_depth_extrapolated")
                lines.append(f"| {check['target']} ({check['bound']}) | {check['value']} | "
                             f"{'-' if full is None else full} | {'yes' if check['met'] else 'no'} |")
            lines.append("")
        if run.get("error"):
            lines += ["```", run["error"][-2000:], "```", ""]
    return "\n".join(lines) + "\n"


def run_plan(output_dir: Path, smoke: bool, budget_s: float, only: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the plan's memvp-bench processes one after another within `budget_s`; write and return the summary."""
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    runs = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, flags, limit in PLAN:
        if only and name not in only:
            continue
        argv = run_argv(flags, smoke)
        run: dict[str, Any] = {"name": name, "argv": argv, "wall_s": 0.0}
        left = budget_s - (time.monotonic() - start)
        if left < min(limit, 30):
            run["status"] = f"skipped: {left:.0f} s of the {budget_s:.0f} s budget left"
            runs.append(run)
            continue
        folder = output_dir / name
        begun = time.monotonic()
        command = [sys.executable, "-m", "memvp_peft.bench", *argv, "--output_dir", str(folder)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=min(limit, left), env=env)
            run["status"] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            if done.returncode != 0:
                run["error"] = done.stderr
        except subprocess.TimeoutExpired:
            run["status"] = f"stopped at its {min(limit, left):.0f} s limit"
        run["wall_s"] = time.monotonic() - begun
        report_path = folder / "benchmark.json"
        if run["status"] == "ok" and report_path.is_file():
            report = json.loads(report_path.read_text())
            run["targets"], run["point"] = _targets(report), (report.get("targets") or {}).get("point")
            run["device_name"], run["torch"] = report["meta"].get("device_name"), report["meta"].get("torch")
        runs.append(run)
    measured = next((r for r in runs if r.get("device_name")), {})
    meta = {"budget_s": budget_s, "wall_s": time.monotonic() - start, "smoke": smoke,
            "device_name": measured.get("device_name"), "torch": measured.get("torch")}
    summary = {"meta": meta, "runs": runs}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "summary.md").write_text(summary_markdown(runs, meta))
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m memvp_peft.bench.gpu_plan`: run the plan, print the summary; exit 1 when a run did not finish."""
    parser = argparse.ArgumentParser(prog="python -m memvp_peft.bench.gpu_plan", allow_abbrev=False,
                                     description="the prepared GPU benchmark plan (see memvp_peft/bench/gpu.sh)")
    parser.add_argument("--output_dir", default="outputs/memvp-bench-gpu")
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"total seconds for all runs (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--smoke", action="store_true", help="the same plan on CPU with the tiny quick model")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in PLAN], default=None)
    args = parser.parse_args(argv)
    summary = run_plan(Path(args.output_dir), args.smoke, args.budget_s, args.only)
    print((Path(args.output_dir) / "summary.md").read_text())
    return 0 if all(run["status"] == "ok" for run in summary["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
