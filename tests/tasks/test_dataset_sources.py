"""`--dataset` sources the `datasets` library reads (memvp_peft.tasks.sources through load_task): save_to_disk folders,
parquet and arrow files and globs, data folders with configurations -- and the refusals: unknown split or
configuration (with the ones that exist), an empty split, a glob matching nothing, options that do not apply.

The Hub-id source needs an offline cache in a fresh process: tests/cli/test_hub_ids.py.
"""

from __future__ import annotations

import glob
import shutil

import datasets
import pytest
from data_fixtures import digit_scans, image_processor, tokenizer  # noqa: F401  (fixtures are used by name)

from memvp_peft.data import MemVPDataCollator
from memvp_peft.data.conversations import ORIGIN_FIELD
from memvp_peft.tasks.catalogue import load_task

QUESTION = "What digit is shown in the image ?"
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep the Arrow files `load_dataset` prepares out of the user's cache: datasets reads its cache folder from
    `datasets.config` on every call (the HF_DATASETS_CACHE variable only once, at import)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))


def _rows(count: int = 10, answer=None) -> datasets.Dataset:
    """Digit scans as Hub datasets store them, answered by the digit's name (or `answer` on every row)."""
    return digit_scans(count, QUESTION, lambda digit: NAMES[digit] if answer is None else answer)


def _task(dataset, **kwargs):
    return load_task(str(dataset), None, 0.2, seed=0, **kwargs)


def test_a_save_to_disk_dataset_folder_is_split_into_train_and_held_out(tmp_path):
    _rows(10).save_to_disk(tmp_path / "saved")
    task = _task(tmp_path / "saved")
    assert (len(task.train), len(task.eval)) == (8, 2)
    held_out = {row[ORIGIN_FIELD] for row in task.held_out(5)}
    assert len(held_out) == 2 and not held_out & {row[ORIGIN_FIELD] for row in task.train}


def test_a_saved_dataset_dict_trains_on_train_unless_dataset_split_says_otherwise(tmp_path):
    datasets.DatasetDict({"train": _rows(10), "validation": _rows(5)}).save_to_disk(tmp_path / "saved")
    assert len(_task(tmp_path / "saved").train) == 8
    assert len(_task(tmp_path / "saved", split="validation").train) == 4


def test_an_unknown_split_of_a_saved_dataset_dict_lists_the_splits(tmp_path):
    datasets.DatasetDict({"train": _rows(4), "test": _rows(4)}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"has no split 'validation' \(--dataset_split\); its splits are "
                                         r"\['test', 'train'\]"):
        _task(tmp_path / "saved", split="validation")


def test_a_parquet_file_and_a_glob_of_them_load(tmp_path):
    _rows(10).to_parquet(str(tmp_path / "part-0.parquet"))
    _rows(5).to_parquet(str(tmp_path / "part-1.parquet"))
    assert len(_task(tmp_path / "part-0.parquet").train) == 8
    task = _task(tmp_path / "part-*.parquet")
    assert len(task.train) + len(task.eval) == 15


def test_the_arrow_file_save_to_disk_writes_loads(tmp_path):
    _rows(10).save_to_disk(tmp_path / "saved")
    (arrow,) = glob.glob(str(tmp_path / "saved" / "*.arrow"))
    assert len(_task(arrow).train) == 8


def test_a_glob_matching_no_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"dataset '.*nothing-\*\.parquet' matches no file"):
        _task(tmp_path / "nothing-*.parquet")


def test_a_missing_parquet_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"dataset '.*gone\.parquet' does not exist"):
        _task(tmp_path / "gone.parquet")


def test_a_split_a_file_does_not_have_is_refused_with_the_ones_it_has(tmp_path):
    _rows(4).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(ValueError, match=r"has no split 'test' \(--dataset_split\); it has \['train'\]"):
        _task(tmp_path / "rows.parquet", split="test")


def test_an_empty_split_is_refused(tmp_path):
    _rows(2).select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"split 'train' holds no records"):
        _task(tmp_path / "empty.parquet")


def test_an_empty_split_of_a_saved_dataset_dict_is_refused(tmp_path):
    datasets.DatasetDict({"train": _rows(4), "test": _rows(2).select([])}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"split 'test' holds no records"):
        _task(tmp_path / "saved", split="test")


@pytest.fixture
def two_configs(tmp_path):
    """A data folder laid out like a Hub dataset repo with two configurations (README `configs:`)."""
    folder = tmp_path / "repo"
    for name, count in (("small", 5), ("large", 10)):
        (folder / name).mkdir(parents=True)
        _rows(count).to_parquet(str(folder / name / "train.parquet"))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: small\n  data_files: small/*.parquet\n"
                                      "- config_name: large\n  data_files: large/*.parquet\n---\n")
    return folder


def test_dataset_config_picks_a_configuration_of_a_data_folder(two_configs):
    assert len(_task(two_configs, config="large").train) == 8
    assert len(_task(two_configs, config="small").train) == 4


def test_an_unknown_configuration_lists_the_ones_there_are(two_configs):
    with pytest.raises(ValueError, match=r"has no configuration 'medium' \(--dataset_config\); it has "
                                         r"\['small', 'large'\]"):
        _task(two_configs, config="medium")


def test_several_configurations_and_none_chosen_asks_for_dataset_config(two_configs):
    with pytest.raises(ValueError, match=r"several configurations: pick one with --dataset_config; it has "
                                         r"\['small', 'large'\]"):
        _task(two_configs)


def test_dataset_config_for_a_source_without_configurations_is_refused(tmp_path):
    _rows(4).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(ValueError, match="they have no configurations, drop --dataset_config"):
        _task(tmp_path / "rows.parquet", config="default")


@pytest.mark.parametrize("dataset", ["digits", "rows.jsonl"])
def test_dataset_split_for_digits_or_a_json_file_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"--dataset_split choose the rows of a datasets source .* drop them"):
        _task(dataset, split="test")


def test_image_folder_for_a_datasets_source_is_refused(tmp_path):
    _rows(4).to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(ValueError, match="--image_folder resolves the image paths of a .json/.jsonl dataset"):
        load_task(str(tmp_path / "rows.parquet"), str(tmp_path), 0.2, seed=0)


def test_an_image_column_reaches_the_collator_decoded(tmp_path, tokenizer, image_processor):
    _rows(10).to_parquet(str(tmp_path / "rows.parquet"))
    task = _task(tmp_path / "rows.parquet")
    rows = [task.train[i] for i in range(3)]
    assert all(type(row["image"]).__module__.startswith("PIL.") for row in rows)
    batch = MemVPDataCollator(tokenizer, image_processor, max_length=64)(rows)
    assert batch["pixel_values"].shape[0] == 3 and batch["image_mask"].tolist() == [True] * 3


def test_a_bad_row_is_named_by_its_source_split_and_row(tmp_path, tokenizer, image_processor):
    _rows(10, answer=" ").to_parquet(str(tmp_path / "rows.parquet"))
    task = _task(tmp_path / "rows.parquet")
    row = task.train[0]
    with pytest.raises(ValueError, match=rf"rows\.parquet \[train\] row {row[ORIGIN_FIELD].rsplit(' ', 1)[1]}"):
        MemVPDataCollator(tokenizer, image_processor, max_length=64)([row])


# ------------------------------------------------------------------------ image paths as strings: the one path rule
@pytest.fixture
def scans_on_disk(tmp_path):
    """Digit scans as PNG files in tmp_path/data/scans, next to where the tests put their parquet files."""
    (tmp_path / "data" / "scans").mkdir(parents=True)
    for i, row in enumerate(_rows(4)):
        row["image"].save(tmp_path / "data" / "scans" / f"{i}.png")
    return tmp_path / "data"


def _path_rows(images):
    return datasets.Dataset.from_list([{"image": image, "question": QUESTION, "answer": "zero"} for image in images])


def test_string_image_paths_resolve_against_the_dataset_folder(scans_on_disk, tmp_path, monkeypatch, tokenizer,
                                                               image_processor):
    _path_rows([f"scans/{i}.png" for i in range(4)] + [None]).to_parquet(str(scans_on_disk / "rows.parquet"))
    monkeypatch.chdir(tmp_path)  # not the dataset's folder: paths must not depend on the working directory
    task = _task(scans_on_disk / "rows.parquet")
    rows = [task.train[i] for i in range(len(task.train))]
    assert {row["image"] for row in rows} - {None} <= {str(scans_on_disk / "scans" / f"{i}.png") for i in range(4)}
    assert MemVPDataCollator(tokenizer, image_processor, max_length=64)(rows[:2])["pixel_values"].shape[0] == 2


def test_a_list_column_of_image_paths_resolves_against_the_dataset_folder(scans_on_disk):
    rows = datasets.Dataset.from_list([{"images": [f"scans/{i}.png", f"scans/{i + 1}.png"], "question": QUESTION,
                                        "answer": "zero"} for i in range(3)])
    rows.save_to_disk(scans_on_disk / "saved")
    shutil.copytree(scans_on_disk / "scans", scans_on_disk / "saved" / "scans")  # the saved folder's own images
    task = _task(scans_on_disk / "saved")
    assert task.train[0]["images"][0].startswith(str(scans_on_disk / "saved" / "scans" / ""))


@pytest.mark.parametrize("escape", ["../../etc/passwd", "/etc/passwd"])
def test_a_string_image_path_leading_outside_the_dataset_folder_is_refused(escape, scans_on_disk):
    _path_rows(["scans/0.png", escape, "scans/1.png"]).to_parquet(str(scans_on_disk / "rows.parquet"))
    with pytest.raises(ValueError, match=r"rows\.parquet \[train\] row 1: image path .* outside image_folder .*"
                                         r"--allow_outside_image_folder"):
        _task(scans_on_disk / "rows.parquet")


def test_allow_outside_image_folder_accepts_a_string_path_elsewhere(scans_on_disk, tmp_path):
    elsewhere = tmp_path / "elsewhere.png"
    _rows(1)[0]["image"].save(elsewhere)
    _path_rows(["scans/0.png", str(elsewhere), "scans/1.png"]).to_parquet(str(scans_on_disk / "rows.parquet"))
    task = _task(scans_on_disk / "rows.parquet", allow_outside_image_folder=True)
    assert str(elsewhere) in {task.train[i]["image"] for i in range(len(task.train))} | {task.eval[0]["image"]}


def test_a_missing_image_file_of_a_string_path_is_refused_when_the_source_loads(scans_on_disk):
    _path_rows(["scans/0.png", "scans/gone.png"]).to_parquet(str(scans_on_disk / "rows.parquet"))
    with pytest.raises(ValueError, match=r"rows\.parquet \[train\] row 1: missing image file .*gone\.png"):
        _task(scans_on_disk / "rows.parquet")


def test_a_bare_path_per_row_in_an_images_column_is_refused(scans_on_disk):
    datasets.Dataset.from_list([{"images": f"scans/{i}.png", "question": QUESTION, "answer": "zero"}
                                for i in range(3)]).to_parquet(str(scans_on_disk / "rows.parquet"))
    with pytest.raises(ValueError, match=r"column 'images' holds one path per row where a list is expected"):
        _task(scans_on_disk / "rows.parquet")


@pytest.mark.parametrize("column", ["video", "frames"])  # a path in either is a video file, decoded by the collator
def test_a_video_path_column_resolves_against_the_dataset_folder(column, scans_on_disk):
    datasets.Dataset.from_list([{column: f"clips/{i}.mp4", "question": QUESTION, "answer": "zero"}
                                for i in range(3)]).to_parquet(str(scans_on_disk / "rows.parquet"))
    task = _task(scans_on_disk / "rows.parquet")
    assert task.train[0][column].startswith(str(scans_on_disk / "clips" / ""))
