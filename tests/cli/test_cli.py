"""memvp-train / memvp-infer: parsing, datasets, bad inputs, and short real runs on local tiny checkpoints."""

import json
import warnings

import numpy as np
import pytest
import torch

from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.options import InferOptions, TrainOptions, load_yaml_options, parse_options
from memvp_peft.cli.train import main as train_main
from memvp_peft.demo_models import build_word_tokenizer, tiny_clip, tiny_llama
from memvp_peft.tasks.catalogue import load_task

NAMES = [str(d) for d in range(10)]


# ---------------------------------------------------------------------------------------------------- parsing


def test_flags_override_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 0.002\nlora_rank: 8\nbf16: true\ndataset: digits\n")
    options = parse_options(TrainOptions, [str(tmp_path / "run.yaml"), "--learning_rate", "0.005"], "")
    assert options.learning_rate == 0.005 and options.lora_rank == 8 and options.bf16 is True


def test_defaults_follow_the_authors_recipe():
    options = parse_options(TrainOptions, [], "")
    assert (options.weight_decay, options.adam_beta2, options.num_train_epochs) == (0.02, 0.95, 20.0)
    assert options.projector_hidden_dim == 128 and options.memory_scale == 0.1 and options.visual_scale == 0.01


def test_yaml_typo_gets_a_suggestion(tmp_path):
    (tmp_path / "run.yaml").write_text("learnig_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option 'learnig_rate'. Did you mean 'learning_rate'"):
        load_yaml_options(str(tmp_path / "run.yaml"), TrainOptions)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    (tmp_path / "run.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_yaml_options(str(tmp_path / "run.yaml"), TrainOptions)


def test_yaml_values_get_the_option_types(tmp_path):
    """YAML 1.1 reads `2e-3` as a string and a single `image:` as a string; both become what the flag would give."""
    (tmp_path / "run.yaml").write_text("learning_rate: 2e-3\nmax_steps: '40'\nnum_train_epochs: 3\n")
    options = parse_options(TrainOptions, [str(tmp_path / "run.yaml")], "")
    assert options.learning_rate == 0.002 and options.max_steps == 40 and options.num_train_epochs == 3.0
    (tmp_path / "infer.yaml").write_text("image: a.png\n")
    assert parse_options(InferOptions, [str(tmp_path / "infer.yaml")], "").image == ["a.png"]


@pytest.mark.parametrize(
    "line, expected",
    [("learning_rate: fast", "float"), ("bf16: yes please", "bool"), ("max_steps: 2.5", "int"), ("seed: [1]", "int")],
)
def test_yaml_value_of_the_wrong_type_is_rejected(tmp_path, line, expected):
    (tmp_path / "run.yaml").write_text(line + "\n")
    with pytest.raises(ValueError, match=f"option '{line.split(':')[0]}' must be {expected}"):
        load_yaml_options(str(tmp_path / "run.yaml"), TrainOptions)


@pytest.mark.parametrize("main", [train_main, infer_main], ids=["memvp-train", "memvp-infer"])
def test_help_lists_every_option_with_its_real_default(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if main is train_main:
        assert "--per_device_train_batch_size" in text and "(default: 32)" in text and "+ 25%" in text
    else:
        assert "--batch_size" in text and "(default: 16)" in text
    assert "(default: None)" not in text


def test_cli_reports_errors_without_a_traceback(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("per_device_train_batch_sise: 4\n")
    assert train_main([str(tmp_path / "run.yaml")]) == 2
    assert "Did you mean 'per_device_train_batch_size'" in capsys.readouterr().err


def test_unknown_dataset_name(capsys):
    """Neither a path that exists nor a Hub id ('imagenet' would be one: tests/cli/test_hub_ids.py)."""
    assert train_main(["--dataset", "no/such/dataset", "--output_dir", "/tmp/never"]) == 2
    assert "unknown dataset 'no/such/dataset'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--lora_rank", "-1", ">= 0"), ("--per_device_train_batch_size", "0", "> 0"), ("--learning_rate", "-1e-3", "> 0"),
     ("--warmup_ratio", "2", "[0, 1)"), ("--max_new_tokens", "0", "> 0"), ("--save_steps", "-5", ">= 0")],
)
def test_out_of_range_train_option_is_one_error_line_before_any_work(flag, value, expected, tmp_path, capsys):
    out = tmp_path / "never"
    assert train_main(["--quick", f"{flag}={value}", "--output_dir", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"option '{flag[2:]}' must be" in error and expected in error and f"got {float(value):g}" in error
    assert not out.exists()  # rejected before a model was built or a folder written


@pytest.mark.parametrize("flag", ["--batch_size", "--max_new_tokens"])
def test_out_of_range_infer_option_is_rejected(flag, capsys):
    assert infer_main([flag, "0", "--image", "digits:0"]) == 2
    assert f"option '{flag[2:]}' must be > 0, got 0" in capsys.readouterr().err


def test_infer_options_take_several_images():
    options = parse_options(InferOptions, ["--image", "a.png", "b.png", "--batch_size", "2"], "")
    assert options.image == ["a.png", "b.png"] and options.batch_size == 2


# ---------------------------------------------------------------------------------------------------- datasets


def _write_digit_pngs(folder, count=12):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"d{i}.png"
        Image.fromarray((digits.images[i] * 15).astype(np.uint8)).save(folder / name)
        rows.append({"image": name, "question": "What digit is shown ?", "answer": str(digits.target[i])})
    return rows


def test_digits_task_is_stratified_and_held_out():
    task = load_task("digits", None, 0.2, seed=0)
    assert len(task.train) + len(task.eval) == 1797 and len(task.eval) == 360
    assert not {r["id"] for r in task.train} & {r["id"] for r in task.eval}
    assert {r["answer"] for r in task.eval} == set(NAMES)


def test_jsonl_and_llava_json_tasks(tmp_path):
    rows = _write_digit_pngs(tmp_path / "img")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(tmp_path / "data.jsonl"), str(tmp_path / "img"), 0.25, seed=0)
    assert len(task.train) == 9 and len(task.eval) == 3
    llava = [{"image": r["image"], "conversations": [{"from": "human", "value": "<image>\n" + r["question"]},
                                                      {"from": "gpt", "value": r["answer"]}]} for r in rows]
    (tmp_path / "data.json").write_text(json.dumps(llava))
    assert len(load_task(str(tmp_path / "data.json"), str(tmp_path / "img"), 0.25, seed=0).eval) == 3


def test_missing_image_in_dataset_is_named(tmp_path):
    rows = _write_digit_pngs(tmp_path / "img", count=4)
    rows[2]["image"] = "gone.png"
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="gone.png"):
        load_task(str(tmp_path / "data.jsonl"), str(tmp_path / "img"), 0.25, seed=0)


def test_empty_answer_is_rejected_at_training(tmp_path, capsys):
    rows = _write_digit_pngs(tmp_path / "img", count=8)
    rows[0]["answer"] = " "
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    clip_dir = tmp_path / "clip"
    tiny_clip(hidden_size=32).save_pretrained(clip_dir)
    code = train_main(["--dataset", str(tmp_path / "data.jsonl"), "--vision_model_name_or_path", str(clip_dir),
                       "--image_folder", str(tmp_path / "img"),
                       "--output_dir", str(tmp_path / "out"), "--quick", "--eval_fraction", "0.25", "--seed", "3"])
    assert code == 2 and "missing or empty 'answer'" in capsys.readouterr().err


def test_real_images_without_an_encoder_are_rejected(tmp_path, capsys):
    rows = _write_digit_pngs(tmp_path / "img", count=8)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert train_main(["--dataset", str(tmp_path / "data.jsonl"), "--image_folder", str(tmp_path / "img"),
                       "--output_dir", str(tmp_path / "o")]) == 2
    assert "--vision_model_name_or_path" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_embedded_default_quick_run_then_infer(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--quick", "--output_dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_steps"] == 20 and metrics["eval_samples"] == 48
    assert metrics["reloaded_heldout_accuracy"] == metrics["heldout_accuracy"]
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert infer_main(["--adapter", str(out), "--image", "digits:0", "digits:7", "--output_file",
                       str(tmp_path / "a.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == ["digits:0", "digits:7"] and all(r["answer"] for r in rows)


def test_infer_errors(tmp_path, capsys):
    assert infer_main(["--adapter", str(tmp_path), "--image", "digits:0"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert infer_main(["--adapter", str(tmp_path)]) == 2
    assert "nothing to answer" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm")
    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], NAMES)
    tiny_llama(tokenizer, hidden_size=64).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_local_llm_plus_clip_on_jsonl_then_infer_and_wrong_base(tmp_path, local_llm, monkeypatch, capsys):
    rows = _write_digit_pngs(tmp_path / "img", count=16)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tiny_clip(hidden_size=32).save_pretrained(tmp_path / "clip")
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # a relative --image_folder, as in docs/training.md, is applied once
    code = train_main(["--model_name_or_path", str(local_llm), "--vision_model_name_or_path", str(tmp_path / "clip"),
                       "--dataset", str(tmp_path / "data.jsonl"), "--image_folder", "img",
                       "--output_dir", str(out), "--max_steps", "3",
                       "--per_device_train_batch_size", "4", "--lora_rank", "4", "--eval_fraction", "0.25"])
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["eval_samples"] == 4
    capsys.readouterr()
    assert infer_main(["--adapter", str(out), "--image", str(tmp_path / "img" / "d0.png")]) == 0
    assert "d0.png" in capsys.readouterr().out
    other = tmp_path / "other"
    tokenizer = build_word_tokenizer(["x"], NAMES)
    tiny_llama(tokenizer, hidden_size=96).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert infer_main(["--adapter", str(out), "--model_name_or_path", str(other), "--image", "digits:1"]) == 2
    assert "does not fit the base" in capsys.readouterr().err
    (tmp_path / "clip").rename(tmp_path / "clip-moved")  # the recorded encoder folder is gone: a clear error
    assert infer_main(["--adapter", str(out), "--image", "digits:1"]) == 2
    assert "attach_vision_encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_llava_checkpoint_trains_on_digits_pixels(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], NAMES)
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tokenizer) + 1, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        image_token_id=len(tokenizer)))
    vlm.save_pretrained(tmp_path / "llava")
    tokenizer.save_pretrained(tmp_path / "llava")
    rows = _write_digit_pngs(tmp_path / "img", count=12)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    code = train_main(["--model_name_or_path", str(tmp_path / "llava"), "--dataset", str(tmp_path / "data.jsonl"),
                       "--image_folder", str(tmp_path / "img"),
                       "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_train_batch_size", "4",
                       "--eval_fraction", "0.25"])
    assert code == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_seq2seq_t5_on_digits_reports_accuracy_then_infer(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], NAMES)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32,
        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    out = tmp_path / "run"
    assert train_main(["--model_name_or_path", str(tmp_path / "t5"), "--output_dir", str(out), "--quick"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0 and metrics["options"]["model_name_or_path"] == str(tmp_path / "t5")
    capsys.readouterr()
    assert infer_main(["--adapter", str(out), "--image", "digits:3", "digits:4"]) == 0  # questions without answers
    assert capsys.readouterr().out.count("digits:") == 2


@pytest.mark.slow
def test_resumed_run_reports_the_losses_of_the_whole_run(tmp_path):
    """metrics.json and loss_curve.png cover steps 1..N after --resume_from_checkpoint, not just the resumed part."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    common = ["--quick", "--max_steps", "8", "--logging_steps", "1"]
    assert train_main([*common, "--output_dir", str(first), "--save_steps", "4"]) == 0
    assert train_main([*common, "--output_dir", str(resumed),
                       "--resume_from_checkpoint", str(first / "checkpoint-4")]) == 0
    history = json.loads((resumed / "metrics.json").read_text())["loss_history"]
    assert history["steps"] == list(range(1, 9))
    assert history["loss"][:4] == json.loads((first / "metrics.json").read_text())["loss_history"]["loss"][:4]


@pytest.mark.slow
def test_infer_reads_a_question_file_without_answers_from_another_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train_main(["--quick", "--output_dir", str(out)]) == 0
    rows = _write_digit_pngs(tmp_path / "img", count=3)
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"image": r["image"], "question": r["question"]}) for r in rows))
    monkeypatch.chdir(tmp_path)  # the recorded base path must not depend on the working directory
    capsys.readouterr()
    assert infer_main(["--adapter", str(out), "--input_file", str(tmp_path / "q.jsonl"),
                       "--image_folder", "img"]) == 0  # relative, applied once
    assert capsys.readouterr().out.count("What digit is shown ?") == 3


@pytest.mark.slow
def test_an_encoder_folder_given_relative_is_used_by_memvp_infer_from_another_folder(tmp_path, monkeypatch, capsys):
    """`--vision_model_name_or_path clip` is recorded by its absolute path (adapter_config.json and memvp_cli.json):
    from a folder holding another `clip`, memvp-infer still uses the encoder the adapter was trained with."""
    tiny_clip(hidden_size=32).save_pretrained(tmp_path / "clip")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert train_main(["--quick", "--max_steps", "2", "--vision_model_name_or_path", "clip",
                       "--output_dir", str(out)]) == 0
    assert json.loads((out / "memvp_cli.json").read_text())["vision_model_name_or_path"] == str(tmp_path / "clip")
    assert json.loads((out / "adapter_config.json").read_text())["vision_encoder"] == str(tmp_path / "clip")
    tiny_clip(hidden_size=32, seed=1).save_pretrained(tmp_path / "elsewhere" / "clip")
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert infer_main(["--adapter", str(out), "--image", "digits:0"]) == 0
    assert "digits:0" in capsys.readouterr().out
    assert not [w for w in caught if "weights sha256" in str(w.message)]
