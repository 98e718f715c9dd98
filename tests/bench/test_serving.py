"""`memvp-bench --serving`: its options (anywhere) and, where vLLM and the serving plugin are installed (the serving
environment of CI), a smoke run of the whole sweep on the quick base."""

from __future__ import annotations

import json

import pytest

from memvp_peft.bench.cli import parse_args
from memvp_peft.bench.serving import TARGET_POINT, check_serving_targets


def _refusal(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_serving_defaults_are_576_visual_tokens_64_text_tokens_at_concurrency_1_8_32():
    args = parse_args(["--serving"])
    assert (args.num_visual_tokens, args.text_lengths, args.new_tokens) == ([576], [64], 32)
    assert (args.concurrency, args.repeats) == ([1, 8, 32], 3)


def test_serving_refuses_what_it_would_not_measure(capsys):
    assert "drop --accuracy" in _refusal(capsys, ["--serving", "--accuracy"])
    assert "drop --model_shape" in _refusal(capsys, ["--serving", "--model_shape", "llama-7b"])
    assert "one value" in _refusal(capsys, ["--serving", "-N", "64", "256"])
    assert "concurrency >= 1" in _refusal(capsys, ["--serving", "--concurrency", "0"])
    assert "belongs to --serving" in _refusal(capsys, ["--concurrency", "8"])


def test_serving_targets_are_judged_at_576_tokens_and_concurrency_8_only():
    point = {"N": TARGET_POINT[0], "concurrency": TARGET_POINT[1], "throughput_memvp_over_input": 3.2,
             "ttft_input_over_memvp": 4.0, "throughput_text_over_memvp": 1.1}
    targets = check_serving_targets([point, {**point, "concurrency": 1, "ttft_input_over_memvp": 9.0}])
    assert targets["measured"]
    assert [check["met"] for check in targets["checks"]] == [True, False, True]
    assert not check_serving_targets([{**point, "N": 64}])["measured"]


@pytest.mark.slow
def test_quick_serving_sweep_serves_every_method_and_writes_its_table_and_plot(tmp_path):
    pytest.importorskip("vllm", reason="the serving environment (pip install 'memvp-peft[vllm]') runs this")
    from memvp_peft.bench.cli import run

    report = run(["--serving", "--quick", "--no_progress", "--output_dir", str(tmp_path)])
    rows = {(r["method"], r["concurrency"]): r for r in report["results"]}
    assert set(rows) == {(m, c) for m in ("memvp", "input_space", "text_only") for c in (1, 2)}
    n, t = report["meta"]["N"], report["meta"]["T"]
    assert rows[("memvp", 1)]["prompt_tokens"] == rows[("text_only", 1)]["prompt_tokens"] == t
    assert rows[("input_space", 1)]["prompt_tokens"] == n + t
    assert rows[("input_space", 1)]["kv_cache_bytes_per_request"] > rows[("memvp", 1)]["kv_cache_bytes_per_request"]
    assert rows[("memvp", 1)]["memory_bank_bytes_per_request"] > 0
    assert all(r["requests_per_s"] > 0 and r["ttft_ms"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "serving.json").read_text())["ratios"]
    assert "| MemVP |" in (tmp_path / "serving.md").read_text()
    assert (tmp_path / "serving.png").stat().st_size > 0
