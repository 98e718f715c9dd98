"""memvp-train on the digit-layout tasks (digits-grid: tiles, digits-sequence: frames) and the long-context flags:
real short runs on the embedded base; memvp-infer rebuilds the tiling collator from the adapter folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.long_context import embedded_corpus
from memvp_peft.cli.train import build_embedded_base
from memvp_peft.cli.train import main as train_main


def run(tmp_path, *flags):
    out = tmp_path / "run"
    assert train_main(["--output_dir", str(out), *flags]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_a_short_digits_grid_run_reads_the_asked_tile_well_above_chance(tmp_path):
    out, metrics = run(tmp_path, "--dataset", "digits-grid", "--max_steps", "700", "--visual_scale", "0.1",
                       "--max_eval_samples", "100")
    assert metrics["heldout_accuracy"] >= 0.5  # chance: 10%; measured 72% here; the full run: 97% (long_context.md)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["image_grid"], config["num_memory_slots"]) == ([2, 2], 100)  # 5 blocks x 16 patches + 25%


def test_a_short_digits_sequence_run_reads_the_asked_frame_well_above_chance(tmp_path):
    out, metrics = run(tmp_path, "--dataset", "digits-sequence", "--max_steps", "700", "--visual_scale", "0.1",
                       "--max_eval_samples", "100")
    assert metrics["heldout_accuracy"] >= 0.3  # chance: 10%; measured 45% here; the full run: 90.5%
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["num_frames"], config["num_memory_slots"]) == (8, 160)  # 8 frames x 16 patches + 25%


def test_memvp_infer_tiles_an_image_file_like_training(tmp_path, capsys):
    from sklearn.datasets import load_digits

    out, _ = run(tmp_path, "--dataset", "digits-grid", "--quick")
    assert json.loads((out / "memvp_cli.json").read_text())["image_grid"] == [2, 2]
    scans = load_digits().images
    grid = np.block([[scans[0], scans[1]], [scans[2], scans[3]]]) * (255 / 16)
    Image.fromarray(grid.astype(np.uint8), mode="L").save(tmp_path / "grid.png")
    capsys.readouterr()
    assert infer_main(["--adapter", str(out), "--image", str(tmp_path / "grid.png"),
                       "--question", "What digit is at the top right ?"]) == 0
    assert "grid.png: What digit is at the top right ? ->" in capsys.readouterr().out


def test_adem_and_compression_flags_reach_the_adapter_config(tmp_path):
    out, _ = run(tmp_path, "--dataset", "digits-sequence", "--quick", "--memory_read", "adem",
                 "--multiscale_tokens", "16,4", "--drop_ratio", "0.1", "--memory_dropout", "0")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["memory_read"], config["multiscale_tokens"], config["drop_ratio"]) == ("adem", [16, 4], 0.1)
    assert config["num_memory_slots"] == 200  # 8 frames x (16 + 4) + 25%


def test_pooling_shrinks_the_default_memory(tmp_path):
    out, _ = run(tmp_path, "--dataset", "digits-grid", "--quick", "--pool_kernel", "2")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["pool_kernel"], config["num_memory_slots"]) == (2, 36)  # 5 blocks x 4 pooled + 16


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "digits-grid", "--image_grid", "3x3"], "laid out with image_grid=(2, 2)"),
    (["--dataset", "digits-sequence", "--num_frames", "4"], "laid out with num_frames=8"),
    (["--image_grid", "2x2", "--num_frames", "4"], "--image_grid and --num_frames were both given"),
    (["--image_grid", "two"], "image_grid must be"),
])
def test_a_layout_that_cannot_be_read_is_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    assert train_main(["--output_dir", str(tmp_path / "run"), "--quick", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_embedded_tokenizer_knows_the_task_words_and_digits_keeps_its_own():
    _, tokenizer = build_embedded_base(0, embedded_corpus("digits-grid"))
    assert tokenizer.unk_token_id not in tokenizer("What digit is at the bottom right ?")["input_ids"]
    assert embedded_corpus("digits") == []  # the default run's vocabulary (and its 97.2%) is untouched
