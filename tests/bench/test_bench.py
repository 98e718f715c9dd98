"""`python -m memvp_peft.bench --quick` writes sane JSON / markdown / PNG for all three methods (no timing asserts)."""

import json
import math

import pytest

from memvp_peft import bench

FIELDS = (
    "train_step_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_ms_per_token",
    "kv_cache_bytes",
    "peak_train_bytes",
    "peak_generate_bytes",
    "trainable_params",
)


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_sweep_writes_json_markdown_and_png(tmp_path):
    report = bench.run(["--quick", "--output_dir", str(tmp_path), "--no_progress"])

    for name in ("benchmark.json", "benchmark.md", "benchmark.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["results"] == json.loads(json.dumps(report["results"]))
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == set(bench.METHODS)
    for method, row in rows.items():
        for field in FIELDS:
            assert _positive(row[field]), (method, field, row[field])
        assert row["N"] == 16 and row["T"] == 16 and row["B"] == 2
        assert len(row["samples_ms"]["train"]) == 1  # --quick: one repeat

    memvp, inp, text = rows["memvp"], rows["input_lora"], rows["text_lora"]
    # The structural facts the benchmark exists to show (sizes, not timings):
    assert memvp["sequence_length"] == text["sequence_length"] == 16
    assert inp["sequence_length"] == 32  # N visual tokens prepended
    assert memvp["kv_cache_bytes"] == text["kv_cache_bytes"] < inp["kv_cache_bytes"]
    assert inp["kv_cache_bytes"] == 2 * text["kv_cache_bytes"]  # cache grows with N + T
    assert memvp["num_memory_slots"] == 16 + 16 and memvp["visual_state_bytes"] > 0
    assert inp["trainable_params"] > text["trainable_params"]  # projector + the same LoRA
    assert data["meta"]["torch"] and data["meta"]["model"]["hidden_size"] == 64

    ratios = data["ratios"][0]
    for key in ("train_speedup_vs_input", "prefill_speedup_vs_input", "decode_memvp_over_input",
                "train_memvp_over_text", "cpu_train_memvp_over_text", "floor_train_over_text",
                "floor_prefill_over_text", "flops_train_speedup_vs_input"):
        assert _positive(ratios[key]), key
    assert ratios["flops_train_speedup_vs_input"] > 1.0 and ratios["floor_prefill_over_text"] > 1.0
    for method, row in rows.items():
        assert set(row["samples_ms"]) >= {"train", "train_cpu", "prefill", "decode", "decode_cpu"}
    checks = data["targets"]["checks"]  # the target point (N=256, T=64) is not part of --quick
    assert checks == []

    markdown = (tmp_path / "benchmark.md").read_text()
    for method in bench.METHODS:
        assert bench.METHOD_LABELS[method] in markdown
    assert "| N | T | method |" in markdown


@pytest.mark.slow
def test_quick_accuracy_writes_reports(tmp_path):
    report = bench.run(["--accuracy", "--quick", "--output_dir", str(tmp_path), "--no_progress"])
    for name in ("accuracy.json", "accuracy.md", "accuracy.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(data["selected"]) == {"memvp", "input_lora"}
    for row in data["runs"]:
        assert 0.0 <= row["heldout_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert row["trainable_params"] > 0 and row["train_time_s"] >= 0
    # comparable budgets: trainable parameters within 25% of each other
    memvp, inp = data["selected"]["memvp"]["trainable_params"], data["selected"]["input_lora"]["trainable_params"]
    assert abs(memvp - inp) / max(memvp, inp) < 0.25
    assert report["paths"]["markdown"].endswith("accuracy.md")


def test_cache_nbytes_and_flop_model():
    import torch

    assert bench.cache_nbytes(None) == 0
    assert bench.cache_nbytes(((torch.zeros(2, 3), torch.zeros(4)),)) == 10 * 4
    args = bench.parse_args([])
    info = dict(hidden_size=512, num_layers=4, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                vocab_size=2000)
    flops = bench.flop_model(info, 256, 64, 320, args, 32)
    # input-space processes N + T tokens, MemVP T tokens plus the memory branch: MemVP is cheaper, text cheapest
    for phase in ("train", "prefill"):
        assert flops["text_lora"][phase] < flops["memvp"][phase] < flops["input_lora"][phase]
    # at width 512 with N=256, T=64 the token ratio is 5; MemVP's extra work keeps the predicted speed-up below it
    assert 4.0 < flops["input_lora"]["train"] / flops["memvp"]["train"] < 5.0
    assert flops["memvp"]["decode"] > flops["text_lora"]["decode"]


def test_peak_allocated_bytes_sees_a_new_tensor():
    import torch

    peak = bench.peak_allocated_bytes(lambda: torch.ones(1024, 1024).sum())
    assert peak >= 4 * 1024 * 1024


def test_module_entry_point_and_console_script_target():
    """`python -m memvp_peft.bench` runs the package's __main__; pyproject's `memvp_peft.bench:main` is that main."""
    import subprocess
    import sys

    from memvp_peft.bench import cli

    assert bench.main is cli.main
    done = subprocess.run([sys.executable, "-m", "memvp_peft.bench", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: memvp-bench")
    assert cli.DESCRIPTION in done.stdout and "--accuracy" in done.stdout


def test_console_script_main_returns_nothing_so_a_finished_run_exits_0(monkeypatch):
    """setuptools' console-script wrapper does `sys.exit(main())`: a returned report would print and exit 1."""
    from memvp_peft.bench import cli

    ran = []
    monkeypatch.setattr(cli, "run", lambda argv=None: ran.append(argv) or {"paths": {}})
    assert cli.main(["--quick"]) is None
    assert ran == [["--quick"]]
