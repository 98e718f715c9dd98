"""Per-layer times from several depths: exact on lines, labelled as an extrapolation at full depth, and in the sweep."""

import json

import pytest

from memvp_peft import bench
from memvp_peft.bench.cost_model import GPU_TARGETS, TARGETS_BY_DEVICE, check_targets, fit_depths, fit_line
from memvp_peft.bench.sweep import depth_fit_markdown


def _row(method, layers, train, prefill, decode, n=256, t=64):
    return {"N": n, "T": t, "method": method, "layers": layers, "train_step_ms": train, "prefill_ms": prefill,
            "decode_ms_per_token": decode, "peak_train_bytes": 2**20 * layers, "peak_generate_bytes": None,
            "kv_cache_bytes": 1000 * layers}


def _lines(fixed, per_layer, method):
    """Rows of `method` at 1 and 2 layers whose times lie on `fixed + layers * per_layer` (train, prefill, decode)."""
    return [_row(method, k, *(f + k * p for f, p in zip(fixed, per_layer))) for k in (1, 2)]


def test_fit_line_recovers_slope_and_intercept_and_needs_two_depths():
    assert fit_line([1, 2, 4], [12, 14, 18]) == pytest.approx((2.0, 10.0))
    with pytest.raises(ValueError, match="two distinct"):
        fit_line([2, 2], [1, 1])


def test_full_depth_is_fixed_plus_depth_times_per_layer_and_ratios_follow():
    results = (_lines((10, 4, 2), (5, 2, 0.5), "memvp") + _lines((30, 20, 2), (25, 10, 0.6), "input_lora")
               + _lines((10, 4, 2), (4.5, 1.8, 0.45), "text_lora"))
    fit = fit_depths(results, full_depth=32)
    memvp = next(f for f in fit["fits"] if f["method"] == "memvp")
    assert memvp["per_layer"]["train_step_ms"] == pytest.approx(5)
    assert memvp["fixed"]["train_step_ms"] == pytest.approx(10)
    assert memvp["at_full_depth"]["train_step_ms"] == pytest.approx(10 + 32 * 5)
    assert memvp["per_layer"]["kv_cache_bytes"] == pytest.approx(1000)
    (ratios,) = fit["full_depth_ratios"]
    assert ratios["extrapolated"] and ratios["layers"] == 32
    assert ratios["train_speedup_vs_input"] == pytest.approx((30 + 32 * 25) / (10 + 32 * 5))
    assert ratios["decode_memvp_over_text"] == pytest.approx((2 + 32 * 0.5) / (2 + 32 * 0.45))
    text = "\n".join(depth_fit_markdown(fit))
    assert "Full depth (32 layers) is an extrapolation" in text and "**extrapolated**" in text


def test_one_depth_gives_no_fit_and_no_extrapolation():
    fit = fit_depths(_lines((1, 1, 1), (1, 1, 1), "memvp")[:1], full_depth=32)
    assert fit["fits"] == [] and fit["full_depth_ratios"] == [] and depth_fit_markdown(fit) == []


def test_targets_are_judged_on_the_deepest_measured_depth_with_the_extrapolation_beside():
    ratios = [{"N": 256, "T": 64, "layers": 1, "train_speedup_vs_input": 1.5},
              {"N": 256, "T": 64, "layers": 2, "train_speedup_vs_input": 2.5}]
    extrapolated = [{"N": 256, "T": 64, "layers": 32, "train_speedup_vs_input": 3.1}]
    checks = check_targets(ratios, targets=GPU_TARGETS, full_depth_ratios=extrapolated)
    assert checks["point"]["layers"] == 2
    (train,) = checks["checks"]
    assert train["value"] == 2.5 and train["met"] and train["bound"] == ">= 2.0"
    assert train["full_depth_extrapolated"] == 3.1
    assert {key: bound for key, _, bound, _ in TARGETS_BY_DEVICE["cuda"]} == {
        "train_speedup_vs_input": 2.0, "train_memvp_over_text": 1.05, "prefill_speedup_vs_input": 4.5,
        "decode_memvp_over_input": 1.0}


@pytest.mark.slow
def test_quick_sweep_at_two_depths_reports_rows_ratios_and_per_layer_fits(tmp_path):
    report = bench.run(["--quick", "--layers", "1", "2", "--output_dir", str(tmp_path), "--no_progress"])
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert sorted({r["layers"] for r in data["results"]}) == [1, 2] and data["meta"]["depths"] == [1, 2]
    assert {r["layers"] for r in data["ratios"]} == {1, 2}
    fits = {f["method"]: f for f in report["depth_fit"]["fits"]}
    assert set(fits) == set(bench.METHODS)
    # the KV cache is exactly linear in depth: 2 (K, V) x B=2 x 2 KV heads x tokens x head dim 32 x 4 bytes per layer
    assert fits["text_lora"]["per_layer"]["kv_cache_bytes"] == pytest.approx(2 * 2 * 2 * 16 * 32 * 4)
    assert fits["input_lora"]["per_layer"]["kv_cache_bytes"] == pytest.approx(2 * 2 * 2 * 32 * 32 * 4)
    assert fits["text_lora"]["fixed"]["kv_cache_bytes"] == pytest.approx(0, abs=1e-6)
    assert report["depth_fit"]["full_depth"] is None and report["depth_fit"]["full_depth_ratios"] == []
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "| layers | N | T | method |" in markdown and "Per-layer times" in markdown
