"""`memvp-bench --ablations`: every variant trains and is scored on every digit task, the report holds accuracy over
the seeds and the costs, and the options it cannot run with are refused (no timing asserts)."""

import json

import pytest
import torch

from memvp_peft import bench
from memvp_peft.bench.ablations import ABLATION_TASKS, VARIANT_NAMES, VARIANTS, answer_correct


@pytest.mark.slow
def test_quick_ablations_run_every_variant_on_every_task_and_write_table_plot_and_json(tmp_path):
    report = bench.run(["--ablations", "--quick", "--output_dir", str(tmp_path), "--no_progress"])
    for name in ("ablations.json", "ablations.md", "ablations.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "ablations.json").read_text())
    ran = {(run["task"], run["variant"]) for run in data["runs"]}
    assert ran == {(task, name) for task in ABLATION_TASKS for name in VARIANT_NAMES}
    assert data["meta"]["seeds"] == [0] and data["meta"]["steps"] == 3
    for run in data["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["train_s_per_step"] > 0 and run["trainable_params"] > 0 and run["memory_slots"] > 0
    rows = {(row["task"], row["variant"]): row for row in data["summary"]}
    assert len(rows) == len(ran)
    for task in ABLATION_TASKS:
        default = rows[task, "default"]
        assert rows[task, "no_positions"]["trainable_params"] < default["trainable_params"]
        assert rows[task, "pooled_2x2"]["memory_slots"] < default["memory_slots"]
        assert 2 * rows[task, "first_half"]["read_flops_per_token"] == default["read_flops_per_token"]
    markdown = (tmp_path / "ablations.md").read_text()
    assert all(f"## {task}" in markdown for task in ABLATION_TASKS)
    assert report["paths"]["png"].endswith("ablations.png")


def test_an_answer_counts_only_when_every_labelled_token_is_the_argmax():
    labels = torch.tensor([[-100, -100, 5, 2], [-100, -100, 5, 2], [-100, -100, -100, -100]])
    logits = torch.full((3, 4, 8), -1.0)
    logits[:, 1, 5] = 1.0  # the position before the answer predicts the digit
    logits[0, 2, 2] = 1.0  # row 0 then predicts <eos>, row 1 another token
    logits[1, 2, 3] = 1.0
    assert answer_correct(logits, labels).tolist() == [True, False, False]


def test_half_layers_split_the_stack():
    by_name = {v.name: v for v in VARIANTS}
    assert by_name["first_half"].config_fields(2) == {"layers_to_transform": [0]}
    assert by_name["last_half"].config_fields(4) == {"layers_to_transform": [2, 3]}
    assert by_name["default"].config_fields(4) == {}


@pytest.mark.parametrize("argv, message", [
    (["--ablations", "--lr", "0.01", "0.03"], "one learning rate"),
    (["--ablations", "--accuracy"], "a mode of its own"),
    (["--seeds", "0", "1"], "belong to --ablations"),
    (["--ablations", "--seeds", "1", "1"], "distinct"),
])
def test_options_ablations_cannot_run_with_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_ablation_defaults_are_one_lr_three_seeds_and_one_thread():
    args = bench.parse_args(["--ablations"])
    assert len(args.lr) == 1 and args.seeds == [0, 1, 2] and args.threads == 1
    assert args.variants == list(VARIANT_NAMES) and args.ablation_tasks == list(ABLATION_TASKS)
    assert bench.parse_args(["--accuracy"]).lr == [3e-3, 1e-2, 3e-2]
