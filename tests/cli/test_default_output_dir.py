"""memvp-train's folder without --output_dir: named after the run, so documented runs never refuse each other's."""

import os

import pytest

from memvp_peft.cli.options import InferOptions, TrainOptions, parse_options


def _folder(*flags):
    return parse_options(TrainOptions, list(flags), "").output_dir


def test_the_embedded_default_writes_where_memvp_infer_reads_by_default():
    assert _folder() == os.path.join("outputs", "memvp-digits") == InferOptions().adapter


@pytest.mark.parametrize("flags, folder", [
    (["--quick"], "memvp-digits-quick"),
    (["--model_name_or_path", "./t5", "--quick"], "memvp-digits-t5-quick"),
    (["--dataset", "data/llava_instruct.json", "--model_name_or_path", "./llama",
      "--vision_model_name_or_path", "./clip-vit-l14"], "memvp-llava_instruct-llama-clip-vit-l14"),
    (["--vision_model_name_or_path", "./clip"], "memvp-digits-clip"),
    (["--dataset", "digits-grid"], "memvp-digits-grid"),
    (["--dataset", "scienceqa:data/scienceqa", "--model_name_or_path", "meta-llama/Llama-3.2-1B"],
     "memvp-scienceqa-Llama-3.2-1B"),
    (["--dataset", "org/vqa-dataset", "--model_name_or_path", "models/llama/"], "memvp-vqa-dataset-llama"),
    (["--dataset", "data/*.parquet"], "memvp-data"),
])
def test_the_default_folder_is_named_after_dataset_base_encoder_and_quick(flags, folder):
    assert _folder(*flags) == os.path.join("outputs", folder)


def test_runs_of_other_datasets_or_bases_get_other_folders():
    """The documented sequence that refused itself: the embedded default, a T5 run and a LLaVA run."""
    folders = {_folder(), _folder("--quick"), _folder("--model_name_or_path", "./t5", "--quick"),
               _folder("--dataset", "data/llava_instruct.json", "--model_name_or_path", "./llama",
                       "--vision_model_name_or_path", "./clip-vit-l14")}
    assert len(folders) == 4


def test_an_output_dir_given_is_kept(tmp_path):
    assert _folder("--quick", "--output_dir", str(tmp_path / "mine")) == str(tmp_path / "mine")
    (tmp_path / "run.yaml").write_text(f"output_dir: {tmp_path / 'from-yaml'}\ndataset: digits-grid\n")
    assert _folder(str(tmp_path / "run.yaml")) == str(tmp_path / "from-yaml")
