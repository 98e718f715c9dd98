"""`python -m memvp_peft.cli.seeds`: one memvp-train configuration over several seeds, and the spread of its accuracy."""

import json

import pytest

from memvp_peft.cli.seeds import main as seeds_main

SHORT = ["--max_steps", "2", "--max_eval_samples", "4"]


@pytest.mark.slow
def test_each_seed_trains_into_its_folder_and_seeds_json_holds_the_spread(tmp_path, capsys):
    out = tmp_path / "runs"
    assert seeds_main(["--seeds", "0", "1", *SHORT, "--output_dir", str(out)]) == 0
    summary = json.loads((out / "seeds.json").read_text())
    per_seed = {seed: json.loads((out / f"seed-{seed}" / "metrics.json").read_text()) for seed in ("0", "1")}
    assert {seed: metrics["options"]["seed"] for seed, metrics in per_seed.items()} == {"0": 0, "1": 1}
    accuracies = [per_seed[seed]["heldout_accuracy"] for seed in ("0", "1")]
    assert [summary["seeds"][seed]["heldout_accuracy"] for seed in ("0", "1")] == accuracies
    assert summary["heldout_accuracy"] == {"mean": sum(accuracies) / 2, "min": min(accuracies), "max": max(accuracies)}
    assert summary["cpu"] and summary["command"].startswith("python -m memvp_peft.cli.seeds --seeds 0 1")
    assert "held-out accuracy over seeds 0, 1 (4 samples each):" in capsys.readouterr().out


def test_without_output_dir_the_runs_go_beside_memvp_trains_default_folder(tmp_path, monkeypatch):
    from memvp_peft.cli.seeds import seed_runs

    monkeypatch.chdir(tmp_path)
    folder, runs = seed_runs(["--dataset", "digits-grid"])
    assert folder == "outputs/memvp-digits-grid-seeds"
    assert [run.output_dir for run in runs] == [f"{folder}/seed-{seed}" for seed in (0, 1, 2)]


@pytest.mark.parametrize("argv, message", [
    (["--seed", "5"], "--seeds sets each run's seed: drop --seed"),
    (["--seeds", "0", "0"], "names a seed twice"),
])
def test_a_seed_given_twice_is_refused_before_anything_trains(argv, message, tmp_path, capsys):
    assert seeds_main([*argv, "--output_dir", str(tmp_path / "runs")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_a_seed_in_the_yaml_file_is_refused(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("seed: 7\n")
    assert seeds_main([str(tmp_path / "run.yaml"), "--output_dir", str(tmp_path / "runs")]) == 2
    assert "the YAML file's 'seed'" in capsys.readouterr().err


def test_a_folder_holding_runs_is_refused_without_overwrite(tmp_path, capsys):
    (tmp_path / "runs" / "seed-0").mkdir(parents=True)
    assert seeds_main(["--output_dir", str(tmp_path / "runs")]) == 2
    assert "is not empty: pass --overwrite_output_dir" in capsys.readouterr().err
