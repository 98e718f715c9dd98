"""The prepared GPU benchmark (memvp_peft/bench/gpu.sh + gpu_plan): its runs are the GPU targets' points, it keeps to
its budget, and the whole script runs end to end on CPU in --smoke mode."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from memvp_peft.bench import gpu_plan
from memvp_peft.bench.cli import parse_args

SCRIPT = Path(gpu_plan.__file__).with_name("gpu.sh")


def _parsed(flags):
    argv = gpu_plan.run_argv(flags, smoke=False)
    assert argv[argv.index("--device") + 1] == "cuda"
    argv[argv.index("--device") + 1] = "cpu"  # this machine has no GPU; every other flag is parsed as on the GPU
    return parse_args(argv)


def test_planned_runs_cover_the_gpu_target_points_in_bf16_sdpa_at_two_depths():
    runs = [_parsed(flags) for _, flags, _ in gpu_plan.PLAN]
    assert all((a.dtype, a.attn_implementation, a.num_layers, a.text_lengths) == ("bfloat16", "sdpa", [1, 2], [64])
               for a in runs)
    points = {(a.model_shape, a.batch_size, n) for a in runs for n in a.num_visual_tokens}
    assert {("llama-7b", 4, 256), ("llama-7b", 16, 256), ("llama-7b", 4, 2304), ("llama-7b", 16, 2304)} <= points
    assert {a.model_shape for a in runs} == {"llama-7b", "qwen2.5-7b", "llama-13b", "qwen2-vl-7b"}
    assert ("qwen2-vl-7b", 16, 391) in points  # a 640 x 480 image through Qwen2-VL's own processor
    assert all(a.warmup >= 2 and a.repeats >= 5 for a in runs)


def test_plan_fits_eight_minutes_on_one_h200_and_skips_what_its_budget_does_not_allow(tmp_path):
    assert gpu_plan.DEFAULT_BUDGET_S <= 8 * 60 - 60  # a minute left for start-up, nvidia-smi and the tarball
    assert all(limit <= gpu_plan.DEFAULT_BUDGET_S for _, _, limit in gpu_plan.PLAN)
    summary = gpu_plan.run_plan(tmp_path, smoke=True, budget_s=0)
    assert [run["status"].split(":")[0] for run in summary["runs"]] == ["skipped"] * len(gpu_plan.PLAN)
    assert "skipped" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_in_smoke_mode_and_packs_its_outputs(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--smoke", "--only", "llama-7b_B4"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    (run,) = summary["runs"]
    assert run["status"] == "ok" and run["point"] == {"N": 256, "T": 64, "layers": 2}
    assert {c["metric"] for c in run["targets"]} >= {"train_speedup_vs_input", "decode_memvp_over_input"}
    for name in ("benchmark.json", "benchmark.md", "benchmark.png"):
        assert (out / "llama-7b_B4" / name).is_file()
    with tarfile.open(f"{out}.tar.gz") as packed:
        assert "gpu/summary.md" in packed.getnames() and "gpu/llama-7b_B4/benchmark.json" in packed.getnames()
    assert "| target | measured | full depth (extrapolated) |" in (out / "summary.md").read_text()
