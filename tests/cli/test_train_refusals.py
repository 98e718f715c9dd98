"""memvp-train refuses a bad call before it writes anything: the previous run's folder stays byte-identical.

Each refusal test runs against a copy of a real previous run (adapter, base_model/, checkpoints, metrics) and hashes
every file before and after the refused call. The runs use the fastest options (`--quick --max_steps 2`).
"""

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from memvp_peft.cli.train import main as train_main

FAST = ["--quick", "--max_steps", "2"]


def _snapshot(folder):
    """{relative path: sha256} of every file under `folder`, plus every folder (so a new empty folder counts)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("previous") / "run"
    assert train_main([*FAST, "--save_steps", "1", "--output_dir", str(out)]) == 0
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir() and (out / "base_model").is_dir()
    return out


@pytest.fixture
def run_dir(previous_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(previous_run, copy)
    return copy


def _refused(argv, folder, capsys) -> str:
    """Run memvp-train on `folder`; assert exit 2 and an untouched folder; return the error text. Another seed than
    the previous run's: a rewritten embedded base would then differ (the same seed rewrites the same bytes)."""
    before = _snapshot(folder)
    capsys.readouterr()
    code = train_main([*argv, "--seed", "7", "--output_dir", str(folder)])
    error = capsys.readouterr().err
    assert code == 2, error
    assert _snapshot(folder) == before
    return error


def _refused_fresh(argv, tmp_path, capsys) -> str:
    """Run memvp-train into a new folder; assert exit 2 and that nothing was created; return the error text."""
    out = tmp_path / "never"
    capsys.readouterr()
    code = train_main([*argv, "--output_dir", str(out)])
    error = capsys.readouterr().err
    assert code == 2, error
    assert not out.exists()
    return error


# ------------------------------------------------------------------------------------------- flags and typos


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]], ids=["plain", "overwrite"])
def test_an_abbreviated_flag_is_refused_with_the_full_name(overwrite, run_dir, capsys):
    """`--lr` is not taken as `--lr_scheduler_type` (argparse's prefix matching): it is an unknown option."""
    error = _refused([*FAST, "--lr", "0.01", *overwrite], run_dir, capsys)
    assert "unknown option '--lr'" in error and "Did you mean '--learning_rate'" in error


def test_a_misspelt_flag_gets_a_did_you_mean(tmp_path, capsys):
    error = _refused_fresh([*FAST, "--learnig_rate=0.1"], tmp_path, capsys)
    assert "unknown option '--learnig_rate'. Did you mean '--learning_rate'?" in error


def test_a_misspelt_negated_flag_gets_a_did_you_mean(tmp_path, capsys):
    error = _refused_fresh([*FAST, "--no-bf61"], tmp_path, capsys)
    assert "Did you mean '--no-bf16'?" in error


@pytest.mark.parametrize("flag", ["--local_rank=1", "--local-rank=1"])
def test_the_deepspeed_launchers_local_rank_flag_is_accepted(flag):
    """`deepspeed -m memvp_peft.train ...` appends --local_rank=N (docs/training.md names that launcher)."""
    from memvp_peft.cli.options import TrainOptions, parse_options

    assert parse_options(TrainOptions, ["--quick", flag], "").quick is True


@pytest.mark.parametrize("overwrite", [[], ["--overwrite_output_dir"]], ids=["plain", "overwrite"])
def test_an_unknown_lora_target_is_refused_before_the_folder_is_touched(overwrite, run_dir, capsys):
    error = _refused([*FAST, "--lora_rank", "4", "--lora_target", "nope", *overwrite], run_dir, capsys)
    if overwrite:
        assert "nope" in error


# ------------------------------------------------------------------------------------------- output_dir


def test_a_folder_holding_a_run_is_refused_without_overwrite_output_dir(run_dir, capsys):
    error = _refused(FAST, run_dir, capsys)
    assert "already holds" in error and "--overwrite_output_dir" in error


def test_a_non_empty_folder_of_other_files_is_refused_too(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    error = _refused(FAST, folder, capsys)
    assert "not empty" in error and "--overwrite_output_dir" in error


def test_an_output_dir_that_is_a_file_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "results.txt"
    path.write_text("precious")
    code = train_main([*FAST, "--output_dir", str(path)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "is a file" in error
    assert path.read_text() == "precious"


def test_an_output_dir_below_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "results.txt").write_text("precious")
    code = train_main([*FAST, "--output_dir", str(tmp_path / "results.txt" / "run")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "cannot be created" in error and "is a file" in error


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_run_and_removes_its_checkpoints(run_dir):
    assert train_main([*FAST, "--overwrite_output_dir", "--output_dir", str(run_dir)]) == 0
    assert not list(run_dir.glob("checkpoint-*"))  # the old run's checkpoints are not mixed with the new run
    assert json.loads((run_dir / "metrics.json").read_text())["options"]["overwrite_output_dir"] is True


@pytest.mark.slow
def test_resuming_from_a_checkpoint_of_the_same_folder_needs_no_overwrite(run_dir):
    argv = ["--quick", "--max_steps", "3", "--output_dir", str(run_dir),
            "--resume_from_checkpoint", str(run_dir / "checkpoint-2")]
    assert train_main(argv) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["global_steps"] == 3
    assert (run_dir / "checkpoint-2").is_dir()


def test_overwrite_while_resuming_from_a_checkpoint_inside_is_refused(run_dir, capsys):
    error = _refused([*FAST, "--overwrite_output_dir", "--resume_from_checkpoint", str(run_dir / "checkpoint-2")],
                     run_dir, capsys)
    assert "resume_from_checkpoint" in error


def test_a_missing_resume_checkpoint_is_refused_before_writing(tmp_path, capsys):
    error = _refused_fresh([*FAST, "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")], tmp_path, capsys)
    assert "checkpoint-9" in error


# ------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "flag, value",
    [("--visual_scale", "inf"), ("--memory_scale", "1e300"), ("--learning_rate", "inf"), ("--weight_decay", "inf"),
     ("--memory_dropout", "nan"), ("--visual_scale", "nan")],
)
def test_a_non_finite_setting_is_refused(flag, value, tmp_path, capsys):
    error = _refused_fresh([*FAST, flag, value], tmp_path, capsys)
    assert f"option '{flag[2:]}' must be a finite number" in error


def test_a_non_finite_yaml_value_is_refused(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("visual_scale: .inf\n")
    error = _refused_fresh([str(tmp_path / "run.yaml"), *FAST], tmp_path, capsys)
    assert "option 'visual_scale' must be a finite number" in error


def test_an_infinite_yaml_integer_is_one_error_line(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("max_steps: .inf\n")
    error = _refused_fresh([str(tmp_path / "run.yaml")], tmp_path, capsys)
    assert "option 'max_steps' must be int" in error


def test_zero_memory_slots_is_refused_not_replaced_by_the_default(tmp_path, capsys):
    error = _refused_fresh([*FAST, "--num_memory_slots", "0"], tmp_path, capsys)
    assert "option 'num_memory_slots' must be > 0" in error


def test_load_in_4bit_with_the_embedded_base_is_refused(tmp_path, capsys):
    error = _refused_fresh([*FAST, "--load_in_4bit"], tmp_path, capsys)
    assert "--load_in_4bit" in error and "--model_name_or_path" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 mixed precision is valid with a GPU")
def test_fp16_without_a_gpu_is_refused(tmp_path, capsys):
    error = _refused_fresh([*FAST, "--fp16"], tmp_path, capsys)
    assert "--fp16" in error and "GPU" in error


@pytest.mark.parametrize("flag", [["--revision", "main"], ["--trust_remote_code"]])
def test_hub_options_with_the_embedded_base_are_refused(flag, tmp_path, capsys):
    error = _refused_fresh([*FAST, *flag], tmp_path, capsys)
    assert "--revision and --trust_remote_code apply to a base loaded from --model_name_or_path" in error


def test_a_dataset_whose_images_never_reach_the_model_is_refused_before_anything_is_written(tmp_path, capsys):
    """Every record names its scan as `image_path`, which the collator does not read; then no record has an image at
    all: both are refused before the output folder exists, never trained on text alone."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = []
    for i in range(10):
        Image.fromarray((digits.images[i] * 15).astype("uint8")).save(tmp_path / f"scan_{i}.png")
        rows.append({"image_path": f"scan_{i}.png", "question": "What digit is shown ?",
                     "answer": str(digits.target[i])})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [*FAST, "--dataset", str(tmp_path / "data.jsonl")]
    error = _refused_fresh(argv, tmp_path, capsys)
    assert "['image_path'] hold images" in error and "--image_column" in error
    for row in rows:
        row.pop("image_path")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    error = _refused_fresh(argv, tmp_path, capsys)
    assert "no training record gives an image" in error


# ------------------------------------------------------------------------------------------- what a run prints


@pytest.fixture(scope="module")
def quick_run_output(tmp_path_factory):
    """(stdout + stderr, warnings) of one short run that logs every step (captured by hand: capsys is per test)."""
    out = tmp_path_factory.mktemp("printed") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        warnings.simplefilter("always")
        assert train_main([*FAST, "--logging_steps", "1", "--output_dir", str(out)]) == 0
    return stdout.getvalue() + stderr.getvalue(), caught


def test_each_training_step_is_logged_once(quick_run_output):
    text, _ = quick_run_output
    assert [line.split()[1] for line in text.splitlines() if line.startswith("step ")] == ["1/2", "2/2"]
    assert "'loss'" not in text  # the Trainer's own dict of the same step is not printed as well


def test_a_run_raises_no_future_warning(quick_run_output):
    _, caught = quick_run_output
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def test_memvp_infer_raises_no_future_warning(previous_run, capsys):
    from memvp_peft.cli.infer import main as infer_main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert infer_main(["--adapter", str(previous_run), "--image", "digits:0"]) == 0
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


@pytest.mark.slow
def test_help_prints_no_future_warning():
    done = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-m", "memvp_peft.cli.train", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "FutureWarning" not in done.stderr


# ------------------------------------------------------------------------------------------- docs


def test_training_md_lists_every_option_with_its_real_default():
    """docs/training.md's table says what `memvp-train --help` says (its `lora_target` default once differed)."""
    import dataclasses
    import pathlib
    import re

    from memvp_peft.cli.options import TrainOptions

    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", page, flags=re.M))
    expected = {f.name: f'"{f.default}"' if isinstance(f.default, str) else str(f.default)
                for f in dataclasses.fields(TrainOptions)}
    assert {name: table.get(name) for name in expected} == expected
