"""`memvp-bench --long_context`: cost against memory size N for MemVP, its pooled and ADEM-VL forms,
input-space + LoRA and text-only; every ratio beside its FLOP prediction; capped rows reported, not omitted."""

import copy
import json

import pytest
import torch

from memvp_peft import bench
from memvp_peft.bench.cost_model import flop_model, memory_form_flops
from memvp_peft.bench.methods import (
    ALL_METHODS, build_base_model, build_memvp_method, form_slots, make_batch, parse_layout,
)
from memvp_peft.bench.sweep import _probe


def _quick_args(*extra):
    return bench.parse_args(["--long_context", "--quick", "--no_progress", *extra])


def test_layouts_name_images_and_tokens_per_image():
    assert parse_layout("576") == (1, 576, "image")
    assert parse_layout("tiles:4x576") == (4, 576, "tiles")
    assert parse_layout("frames:16x256") == (16, 256, "frames")
    for bad in ("4x576", "frames:16", "video:2x4", "0", "tiles:2x0"):
        with pytest.raises(ValueError, match="tiles:IxP or frames:IxP"):
            parse_layout(bad)


def test_default_sweep_reaches_4096_at_t64_with_all_five_methods():
    args = bench.parse_args(["--long_context"])
    assert args.num_visual_tokens == [256, 576, 2304, 4096] and args.text_lengths == [64]
    assert args.layouts[2304] == (4, 576, "tiles") and args.layouts[4096] == (16, 256, "frames")
    assert args.methods == list(ALL_METHODS) and args.time_cap_s == 60.0


@pytest.mark.parametrize("argv, message", [
    (["--long_context", "-N", "256"], "not -N"),
    (["--layouts", "256"], "belong to --long_context"),
    (["--long_context", "--layouts", "256", "frames:1x256"], "same memory size"),
])
def test_long_context_refuses_options_it_would_ignore(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_memvp_forms_are_built_through_the_real_config_options():
    args = _quick_args()
    base = build_base_model(args)
    made = {name: build_memvp_method(name, copy.deepcopy(base), args, 64) for name in ("memvp", "memvp_pooled",
                                                                                      "memvp_adem")}
    configs = {name: m.model.peft_config["default"] for name, m in made.items()}
    assert all(c.num_frames == 4 for c in configs.values())  # frames:4x16
    assert configs["memvp"].pool_kernel == 1 and configs["memvp"].memory_read == "memvp"
    assert configs["memvp_pooled"].pool_kernel == 2
    adem = configs["memvp_adem"]
    assert (adem.memory_read, adem.drop_ratio, adem.multiscale_tokens) == ("adem", 0.1, [16, 4])
    # slots: the compressed visual tokens (4 frames x 16, x 4 / 4 pooled, x (16 + 4) multiscale) + --extra_slots
    assert {n: m.num_slots for n, m in made.items()} == {"memvp": 64 + 16, "memvp_pooled": 16 + 16,
                                                          "memvp_adem": 80 + 16}
    batch = make_batch(2, 8, 64, args.visual_dim, 256, 0, images=4)
    for method in made.values():
        assert method.loss(batch).isfinite()


def test_flop_model_gives_each_memory_form_its_slots_and_projector_tokens():
    args = _quick_args()
    info = {"hidden_size": 64, "num_layers": 2, "intermediate_size": 172, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 256}
    forms = {"memvp_pooled": form_slots("memvp_pooled", (4, 16, "frames"), args)}
    model = flop_model(info, 64, 16, 80, args, 32, forms=forms)
    assert model["memvp"] == memory_form_flops(info, 16, 80, 64, args, 32)
    assert model["memvp_pooled"] == memory_form_flops(info, 16, 32, 16, args, 32)
    for phase in ("train", "prefill", "decode"):  # a quarter of the slots and of the projector's tokens
        assert model["memvp_pooled"][phase] < model["memvp"][phase]
    for phase in ("prefill", "decode"):  # (training: MemVP skips layer 0's backward, text-only + LoRA does not)
        assert model["text_lora"][phase] < model["memvp_pooled"][phase]


def test_a_method_over_the_time_cap_is_reported_not_measured():
    args = _quick_args()
    base = build_base_model(args)
    method = build_memvp_method("memvp", base, args, 16)
    batch = make_batch(2, 8, 16, args.visual_dim, 256, 0)
    status, probe_ms = _probe([method], batch, cap_s=0.0)
    assert status["memvp"].startswith("over the 0 s time cap (one training step:")
    assert probe_ms["memvp"] > 0
    assert _probe([method], batch, cap_s=None) == ({}, {})


@pytest.mark.slow
def test_quick_long_context_sweep_writes_table_ratios_targets_and_plot(tmp_path):
    report = bench.run(["--long_context", "--quick", "--no_progress", "--output_dir", str(tmp_path)])
    for name in ("long_context.json", "long_context.md", "long_context.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "long_context.json").read_text())
    assert {(r["N"], r["method"]) for r in data["results"]} == {(n, m) for n in (16, 64) for m in ALL_METHODS}
    rows = {(r["N"], r["method"]): r for r in data["results"]}
    assert rows[(64, "input_lora")]["sequence_length"] == 64 + 16 and rows[(64, "memvp")]["sequence_length"] == 16
    assert rows[(64, "memvp")]["kv_cache_bytes"] == rows[(64, "text_lora")]["kv_cache_bytes"]
    ratios = report["long_context"]["ratios"]
    assert {(r["N"], r["form"]) for r in ratios} == {(n, f) for n in (16, 64)
                                                      for f in ("memvp", "memvp_pooled", "memvp_adem")}
    for entry in ratios:
        for key in ("train_speedup_vs_input", "train_over_text", "decode_over_text"):
            item = entry["ratios"][key]
            assert item["value"] > 0 and item["predicted"] > 0 and isinstance(item["check"], bool)
    checks = report["long_context"]["targets"]["checks"]
    assert [c["metric"] for c in checks] == ["train_speedup_vs_input", "train_over_text", "peak_train_over_input"]
    assert all(isinstance(c["met"], bool) for c in checks)
    markdown = (tmp_path / "long_context.md").read_text()
    assert "MemVP pooled 2x2" in markdown and "ADEM-VL form" in markdown and "Targets at N=64" in markdown


@pytest.mark.slow
def test_capped_rows_stay_in_the_report_with_their_status(tmp_path):
    report = bench.run(["--long_context", "--quick", "--no_progress", "--no_memory", "--layouts", "16",
                        "--methods", "memvp", "input_lora", "--time_cap_s", "0", "--output_dir", str(tmp_path)])
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"memvp", "input_lora"}
    for row in rows.values():
        assert row["status"].startswith("over the 0 s time cap") and row["train_step_ms"] is None
    item = report["long_context"]["ratios"][0]["ratios"]["train_speedup_vs_input"]
    assert item["value"] is None and "over the 0 s time cap" in item["why"]
    assert "**over the 0 s time cap" in (tmp_path / "long_context.md").read_text()
    assert torch.isfinite(torch.tensor(rows["memvp"]["probe_train_step_ms"]))
