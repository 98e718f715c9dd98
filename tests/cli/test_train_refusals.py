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


@pytest.mark.parametrize("flag, stopped", [
    ("--visual_scale", "the loss of that step, or its gradient, is not finite"),
    ("--learning_rate", "after that step the parameter base_model.memvp_memory"),
])
def test_a_run_whose_loss_or_weights_stop_being_finite_stops_naming_the_step_and_keeps_the_previous_run(
        flag, stopped, run_dir, capsys):
    """1e38 is a finite float32 each flag takes; the forward (a scale) or the first step (a rate) overflows it. Such
    a run trained an all-NaN adapter, saved it over the previous run, exited 0 and reported final_loss 0.0."""
    before = _snapshot(run_dir)
    capsys.readouterr()
    code = train_main([*FAST, flag, "1e38", "--overwrite_output_dir", "--seed", "7", "--output_dir", str(run_dir)])
    error = capsys.readouterr().err
    assert code == 2, error[-3000:]
    assert "memvp-train: error: training stopped at step " in error and stopped in error
    after = {path: digest for path, digest in _snapshot(run_dir).items() if not path.startswith(".memvp-new-run")}
    assert after == before  # the previous run's adapter, metrics.json and checkpoints, byte-identical


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


# ------------------------------------------------------------------------------------------- every record, up front
# Each of these used to be found at the first batch that held it -- after --overwrite_output_dir had removed the
# previous run. Every record is now read as its batch will read it before anything is written.

QUESTION = "What digit is shown ?"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIP (16 patch tokens per 32x32 image) and its image processor, saved as an encoder folder."""
    from memvp_peft.demo_models import clip_image_processor, tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    tiny_clip(hidden_size=32).save_pretrained(folder)
    clip_image_processor(32).save_pretrained(folder)
    return str(folder)


def _digit_png(index: int) -> bytes:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    buffer = io.BytesIO()
    Image.fromarray((load_digits().images[index] * 15).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header declares side x side pixels (over twice Pillow's limit): Pillow refuses it when it opens."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _saved_dataset(folder, rows: list, features=None) -> str:
    """`rows` as a datasets.save_to_disk folder (what --dataset reads as a datasets source)."""
    import datasets

    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return str(folder)


def _digit_rows(count: int, **replace) -> list:
    """`count` rows of a digit image ({bytes, path}, as datasets.Image stores it), the question and the answer; row 5
    gets the fields in `replace` instead."""
    rows = [{"image": {"bytes": _digit_png(i), "path": None}, "question": QUESTION, "answer": str(i % 10)}
            for i in range(count)]
    rows[5] = {**rows[5], **replace}
    return rows


def _image_features(answer_type: str = "string"):
    import datasets

    return datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                              "answer": datasets.Value(answer_type)})


def _refused_replacing(argv, run_dir, capsys, clip_folder) -> str:
    """`_refused` for a run through the tiny CLIP that would replace the previous run."""
    return _refused([*FAST, "--vision_model_name_or_path", clip_folder, "--overwrite_output_dir", *argv], run_dir,
                    capsys)


def test_a_datasets_source_of_another_schema_is_refused_before_the_previous_run_is_removed(
        run_dir, tmp_path, capsys, clip_folder):
    import datasets

    rows = [{"image": {"bytes": _digit_png(i), "path": None}, "caption": "a digit", "label": i % 10}
            for i in range(20)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    dataset = _saved_dataset(tmp_path / "captions", rows, features)
    error = _refused_replacing(["--dataset", dataset], run_dir, capsys, clip_folder)
    assert "captions [train] row" in error and "question" in error


def test_an_image_column_of_ints_is_refused_before_the_previous_run_is_removed(run_dir, tmp_path, capsys, clip_folder):
    rows = [{"image": i, "question": QUESTION, "answer": str(i % 10)} for i in range(20)]
    error = _refused_replacing(["--dataset", _saved_dataset(tmp_path / "ints", rows)], run_dir, capsys, clip_folder)
    assert "ints [train] row" in error and "got int" in error


def test_a_float_answer_is_refused_before_the_previous_run_is_removed(run_dir, tmp_path, capsys, clip_folder):
    rows = [{**row, "answer": float(i)} for i, row in enumerate(_digit_rows(20))]
    rows[5]["answer"] = 2.5
    dataset = _saved_dataset(tmp_path / "floats", rows, _image_features("float64"))
    error = _refused_replacing(["--dataset", dataset], run_dir, capsys, clip_folder)
    assert "floats [train] row" in error and "'answer' is a float" in error


def test_a_decompression_bomb_in_a_datasets_source_is_refused_before_the_previous_run_is_removed(
        run_dir, tmp_path, capsys, clip_folder):
    rows = _digit_rows(20, image={"bytes": _bomb_png(), "path": None})
    dataset = _saved_dataset(tmp_path / "bomb", rows, _image_features())
    error = _refused_replacing(["--dataset", dataset], run_dir, capsys, clip_folder)
    assert "bomb [train] row 5" in error and "DecompressionBombError" in error


def test_corrupt_scienceqa_images_are_refused_before_the_previous_run_is_removed(run_dir, tmp_path, capsys,
                                                                                  clip_folder):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "data"))
    from scienceqa_fixture import scienceqa_problems, write_repository_layout

    folder = write_repository_layout(tmp_path / "scienceqa", scienceqa_problems(num_image=12, num_text=6))
    damaged = sorted((folder / "images" / "train").glob("*/image.png"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:40])  # a PNG cut off in its pixel data
    error = _refused_replacing(["--dataset", f"scienceqa:{folder}"], run_dir, capsys, clip_folder)
    assert str(damaged) in error


def test_a_missing_video_is_refused_before_the_previous_run_is_removed(run_dir, tmp_path, capsys, clip_folder):
    rows = [{"frames": [{"bytes": _digit_png(i), "path": None}, {"bytes": _digit_png(i + 1), "path": None}],
             "question": QUESTION, "answer": str(i % 10)} for i in range(20)]
    rows = [{"video": None, **row} for row in rows]
    rows[5] = {"video": "clips/missing.mp4", "frames": None, "question": QUESTION, "answer": "5"}
    dataset = _saved_dataset(tmp_path / "videos", rows)
    error = _refused_replacing(["--dataset", dataset, "--num_frames", "2"], run_dir, capsys, clip_folder)
    assert "videos [train] row 5" in error and "missing video file" in error


@contextlib.contextmanager
def _read_only(folders):
    """The folders made read-only for this process: immutable for root (whom permissions do not stop), else mode
    0o555. Skips where neither is possible."""
    import os

    if os.geteuid() != 0:
        for folder in folders:
            folder.chmod(0o555)
        try:
            yield
        finally:
            for folder in folders:
                folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *map(str, folders)]).returncode != 0:
        pytest.skip("no way to make a folder read-only for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, folders)], check=True)


def test_a_partly_filled_read_only_feature_cache_is_refused_before_the_previous_run_is_removed(
        run_dir, tmp_path, capsys, clip_folder):
    cache = tmp_path / "cache"
    assert train_main(["--max_steps", "1", "--per_device_train_batch_size", "2", "--max_eval_samples", "1",
                       "--vision_model_name_or_path", clip_folder, "--cache_image_features", str(cache),
                       "--output_dir", str(tmp_path / "filling")]) == 0  # encodes the first batch's 2 images
    folders = [cache, *[path for path in cache.iterdir() if path.is_dir()]]
    with _read_only(folders):
        error = _refused_replacing(["--cache_image_features", str(cache)], run_dir, capsys, clip_folder)
    assert "--cache_image_features" in error and "cannot be written" in error


def test_deepspeed_without_a_launcher_is_refused_before_the_previous_run_is_removed(run_dir, capsys, monkeypatch):
    import importlib.util

    from memvp_peft.distributed import LAUNCHER_VARIABLES

    if importlib.util.find_spec("mpi4py") is not None:
        pytest.skip("with mpi4py DeepSpeed starts a single process on its own")
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "integrations" / "deepspeed" / "zero2.json")
    error = _refused([*FAST, "--overwrite_output_dir", "--deepspeed", config], run_dir, capsys)
    assert "needs a launcher" in error and "torchrun --nproc_per_node 1" in error


def _rows_with_three_images_in_row_5(count: int = 20) -> list:
    image = {"bytes": _digit_png(3), "path": None}
    rows = [{"images": [{"bytes": _digit_png(i), "path": None}], "question": QUESTION, "answer": str(i % 10)}
            for i in range(count)]
    rows[5]["images"] = [image, image, image]
    return rows


def test_a_record_with_more_images_than_the_memory_slots_is_refused_naming_it_and_the_option(
        run_dir, tmp_path, capsys, clip_folder):
    """3 images x 16 tokens = 48 visual tokens do not fit 32 slots: the model would refuse the batch holding it."""
    dataset = _saved_dataset(tmp_path / "three", _rows_with_three_images_in_row_5())
    error = _refused_replacing(["--dataset", dataset, "--num_memory_slots", "32"], run_dir, capsys, clip_folder)
    assert "--num_memory_slots 32 is too small" in error and "three [train] row 5" in error
    assert "gives 3 image(s), which fill 48 memory slots" in error


@pytest.mark.slow
def test_without_num_memory_slots_the_memory_is_sized_for_the_record_with_the_most_images(tmp_path, clip_folder):
    dataset = _saved_dataset(tmp_path / "three", _rows_with_three_images_in_row_5())
    out = tmp_path / "run"
    assert train_main([*FAST, "--dataset", dataset, "--vision_model_name_or_path", clip_folder,
                       "--output_dir", str(out)]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["num_memory_slots"] == 64  # 48 tokens + 16


def test_resuming_from_inside_an_unfinished_replacing_run_is_refused(run_dir, capsys):
    checkpoint = run_dir / ".memvp-new-run" / "checkpoint-1"
    shutil.copytree(run_dir / "checkpoint-1", checkpoint)
    error = _refused([*FAST, "--resume_from_checkpoint", str(checkpoint)], run_dir, capsys)
    assert "inside .memvp-new-run" in error and "move the checkpoint out" in error


@pytest.mark.slow
def test_a_replacing_run_killed_while_training_leaves_the_previous_run(run_dir):
    """The replacing run trains in output_dir/.memvp-new-run; the previous run's files are switched out only once it
    has trained and saved."""
    import time

    before = _snapshot(run_dir)
    started = time.time()

    def new_checkpoint() -> bool:  # the replacing run has trained a step and saved it, wherever it writes
        return any(path.stat().st_mtime > started for path in run_dir.rglob("trainer_state.json"))

    process = subprocess.Popen([sys.executable, "-m", "memvp_peft.cli.train", "--max_steps", "100000",
                                "--save_steps", "1", "--seed", "7", "--overwrite_output_dir",
                                "--output_dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not new_checkpoint() and time.time() < started + 240:
            assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read()[-2000:]}"
            time.sleep(0.5)
        assert new_checkpoint(), "no checkpoint within 4 minutes"
    finally:
        process.kill()
        process.wait()
    after = {path: digest for path, digest in _snapshot(run_dir).items() if not path.startswith(".memvp-new-run")}
    assert after == before
