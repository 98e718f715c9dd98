"""examples/scienceqa_llama7b.yaml holds the paper's LLaMA-7B settings, and its DeepSpeed JSON keeps them: under
DeepSpeed the Trainer's warm-up + cosine schedule runs (a "scheduler" section would replace it with DeepSpeed's)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

from memvp_peft.cli.options import TrainOptions, parse_options
from memvp_peft.cli.train import default_learning_rate
from process_launch import free_port, launcher_env  # tests/ is on sys.path (tests/conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "scienceqa_llama7b.yaml"
ZERO2 = ROOT / "examples" / "scienceqa_zero2.json"


def test_the_recipe_has_the_papers_llama_7b_settings():
    options = parse_options(TrainOptions, [str(RECIPE)], "")
    assert options.per_device_train_batch_size * options.gradient_accumulation_steps * 8 == 32
    assert (options.num_train_epochs, options.warmup_ratio, options.lr_scheduler_type) == (20, 0.1, "cosine")
    assert options.learning_rate == pytest.approx(9e-3 * 32 / 256)
    assert (options.adam_beta2, options.weight_decay, options.max_length, options.seed) == (0.95, 0.02, 512, 0)
    assert (options.num_memory_slots, options.vision_adapter_dim) == (320, 12)
    assert (options.image_normalization, options.use_caption, options.train_split) == ("imagenet", False, "train")
    assert options.dataset.startswith("scienceqa:") and options.bf16
    assert options.vision_model_name_or_path == "openai/clip-vit-large-patch14"
    assert (ROOT / options.deepspeed).resolve() == ZERO2


def test_the_recipes_deepspeed_config_leaves_the_schedule_to_the_trainer():
    config = json.loads(ZERO2.read_text())
    assert "scheduler" not in config and config["zero_optimization"]["stage"] == 2


def test_the_default_learning_rate_scales_with_every_process_of_a_launch(monkeypatch):
    options = parse_options(TrainOptions, ["--model_name_or_path", "org/llm", "--per_device_train_batch_size", "4"], "")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert default_learning_rate(options) == pytest.approx(1.125e-3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert default_learning_rate(options) == pytest.approx(1.125e-3 / 8)


@pytest.mark.slow
def test_under_the_recipes_deepspeed_config_the_rate_warms_up_then_follows_a_cosine(tmp_path, deepspeed_ops):
    """One process is enough: which scheduler runs is decided by the JSON, not by the number of ranks (~15 s)."""
    out, steps, warmup, peak = tmp_path / "run", 20, 2, 0.01
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
               str(free_port()), "-m", "memvp_peft.train", "--deepspeed", str(ZERO2), "--max_steps", str(steps),
               "--warmup_ratio", "0.1", "--learning_rate", str(peak), "--logging_steps", "1", "--save_steps",
               str(steps), "--per_device_train_batch_size", "4", "--max_eval_samples", "8", "--output_dir", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    history = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["log_history"]
    rates = {entry["step"]: entry["learning_rate"] for entry in history if "learning_rate" in entry}
    # HF's warm-up + cosine (the rate logged at a step is the one after it); DeepSpeed's WarmupDecayLR, which
    # integrations/deepspeed/zero2.json names, would decay linearly
    cosine = {step: peak * (step / warmup if step < warmup
                            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))
              for step in range(1, steps + 1)}
    assert sorted(rates) == list(range(1, steps + 1))
    assert rates == pytest.approx(cosine)
