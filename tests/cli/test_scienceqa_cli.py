"""`--dataset scienceqa:DIR` in memvp-train and memvp-infer: which splits train and score, the authors' scoring
prompt, and every refusal -- each before a model is loaded."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.options import InferOptions, TrainOptions, parse_options
from memvp_peft.cli.scienceqa_eval import check_scienceqa_collator, prediction_rows, scienceqa_prompt, scores_path
from memvp_peft.cli.train import main as train_main
from memvp_peft.data import ANSWER_PHRASE, MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer
from memvp_peft.tasks.catalogue import load_task
from memvp_peft.tasks.scienceqa import load_scienceqa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tasks"))  # tests/tasks: the ScienceQA fixture
from scienceqa_fixture import fixture_tokenizer, problems, repository  # noqa: E402,F401  (fixtures, found by name)


def _load(dataset, **kwargs):
    return load_task(dataset, kwargs.pop("image_folder", None), kwargs.pop("eval_fraction", None), 0, **kwargs)


# ----------------------------------------------------------------------------------------------- memvp-train's task


def test_scienceqa_trains_on_its_train_split_and_holds_out_val(repository, problems):
    task = _load(f"scienceqa:{repository}")
    assert task.name == "scienceqa"
    assert [r["id"] for r in task.train] == [pid for pid, p in problems.items() if p["split"] == "train"]
    assert [r["id"] for r in task.eval] == [pid for pid, p in problems.items() if p["split"] == "val"]


def test_trainval_holds_out_test(repository, problems):
    task = _load(f"scienceqa:{repository}", train_split="trainval")
    assert {r["id"] for r in task.eval} == {pid for pid, p in problems.items() if p["split"] == "test"}
    assert len(task.train) == sum(p["split"] in ("train", "val") for p in problems.values())


def test_captions_reach_the_training_records_only_with_use_caption(repository):
    assert all("caption" not in r for r in _load(f"scienceqa:{repository}").train)
    captioned = _load(f"scienceqa:{repository}", use_caption=True)
    assert {r["caption"] for r in captioned.train if r["has_image"]} == {"A handwritten digit."}


def test_a_train_split_without_a_held_out_split_is_refused(repository):
    with pytest.raises(ValueError, match=r"train_split must be one of \['minitrain', 'train', 'trainval'\].*got 'test'"):
        _load(f"scienceqa:{repository}", train_split="test")


def test_a_held_out_split_sharing_problems_with_training_is_refused(repository):
    splits = json.loads((repository / "pid_splits.json").read_text())
    splits["val"].append(splits["train"][0])
    (repository / "pid_splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match=r"splits 'train' and 'val' .* share 1 problems"):
        _load(f"scienceqa:{repository}")


@pytest.mark.parametrize("option, kwargs", [
    ("--image_folder", {"image_folder": "images"}), ("--eval_fraction", {"eval_fraction": 0.1}),
    ("--dataset_split", {"split": "train"}), ("--dataset_config", {"config": "default"}),
])
def test_options_of_other_datasets_are_refused_for_scienceqa(repository, option, kwargs):
    with pytest.raises(ValueError, match=f"{option} do not apply to --dataset scienceqa:DIR"):
        _load(f"scienceqa:{repository}", **kwargs)


@pytest.mark.parametrize("option, kwargs", [("--train_split", {"train_split": "train"}),
                                            ("--use_caption", {"use_caption": True})])
def test_scienceqa_options_are_refused_for_other_datasets(option, kwargs):
    with pytest.raises(ValueError, match=f"{option} apply to --dataset scienceqa:DIR; dataset 'digits' is not"):
        _load("digits", **kwargs)


def test_memvp_train_reports_a_missing_scienceqa_folder_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--dataset", f"scienceqa:{tmp_path / 'nope'}", "--output_dir", str(out)]) == 2
    assert "is not a folder; expected the ScienceQA repository layout" in capsys.readouterr().err
    assert not out.exists()


def test_the_new_train_options_parse_from_flags_and_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("dataset: scienceqa:data\ntrain_split: trainval\nimage_normalization: imagenet\n")
    options = parse_options(TrainOptions, [str(tmp_path / "run.yaml"), "--use_caption"], "")
    assert (options.train_split, options.use_caption, options.image_normalization) == ("trainval", True, "imagenet")


def test_an_unknown_image_normalization_is_refused():
    with pytest.raises(ValueError, match=r"option 'image_normalization' must be one of \('encoder', 'imagenet'\)"):
        parse_options(TrainOptions, ["--image_normalization", "clip"], "")


def test_imagenet_normalization_is_refused_for_the_built_in_digit_patches(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--image_normalization", "imagenet", "--output_dir", str(out)]) == 2
    assert "the built-in digits run reads 2x2-pixel patches" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------- memvp-infer


def test_scoring_options_parse_with_their_defaults():
    options = parse_options(InferOptions, ["--dataset", "scienceqa:data"], "")
    assert (options.split, options.use_caption, options.max_new_tokens) == ("test", False, None)


def test_a_dataset_with_questions_of_ones_own_is_refused(repository, capsys):
    assert infer_main(["--dataset", f"scienceqa:{repository}", "--image", "digits:0"]) == 2
    assert "--dataset scores a whole benchmark; --image answer questions of your own" in capsys.readouterr().err


def test_a_dataset_that_is_not_scienceqa_is_refused(tmp_path, capsys):
    assert infer_main(["--dataset", str(tmp_path)]) == 2
    assert "memvp-infer --dataset scores ScienceQA: pass scienceqa:DIR" in capsys.readouterr().err


def test_an_unknown_split_is_refused_before_the_adapter_is_read(repository, tmp_path, capsys):
    assert infer_main(["--adapter", str(tmp_path / "none"), "--dataset", f"scienceqa:{repository}",
                       "--split", "dev"]) == 2
    assert "unknown split 'dev'" in capsys.readouterr().err


def test_an_output_file_named_scores_json_is_refused(repository, tmp_path, capsys):
    assert infer_main(["--dataset", f"scienceqa:{repository}", "--output_file", str(tmp_path / "scores.json")]) == 2
    assert "scores.json is where the scores go" in capsys.readouterr().err


def test_scores_json_goes_next_to_the_predictions(tmp_path):
    assert scores_path(str(tmp_path / "preds.jsonl")) == str(tmp_path / "scores.json")


# ----------------------------------------------------------------------------------------------- the scoring prompt


@pytest.fixture
def collator(problems):
    return MemVPDataCollator(fixture_tokenizer(problems), None, chat_template=False)


def test_the_scoring_prompt_is_the_authors_text_then_the_answer_is(repository, collator):
    record = next(r for r in load_scienceqa(repository, "train", use_caption=True) if r["hint"] and r["has_image"])
    options = " ".join(f"({letter}) {choice}" for letter, choice in zip("ABCD", record["choices"]))
    assert scienceqa_prompt(record, collator) == (
        f"Question: Which digit is shown?\nContext: Look at the image. A handwritten digit.\nOptions: {options}\n"
        "Response:The answer is")


def byte_level_tokenizer(texts):
    """A byte-level BPE tokenizer (BOS in front), which -- unlike the word-level ones -- gives every space a token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_the_recorded_prompt_is_exactly_what_the_model_was_prompted_with(repository):
    records = load_scienceqa(repository, "test", use_caption=True)
    collator = MemVPDataCollator(byte_level_tokenizer(["Question: Context: Options: Response:The answer is"]), None,
                                 chat_template=False)
    for record in records:
        ids = collator.prompts([{k: v for k, v in record.items() if k != "image"}], answer_prefix=ANSWER_PHRASE)
        assert collator.tokenizer(scienceqa_prompt(record, collator))["input_ids"] == ids["input_ids"][0].tolist()


def test_prediction_rows_hold_id_prompt_prediction_and_answer_letter(repository, collator):
    records = load_scienceqa(repository, "test")[:2]
    rows = prediction_rows(records, ["B", ""], collator)
    assert [sorted(row) for row in rows] == [["answer", "id", "prediction", "prompt"]] * 2
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    assert [row["answer"] for row in rows] == ["ABCDE"[r["answer"]] for r in records]
    assert [row["prediction"] for row in rows] == ["B", ""]


def test_scoring_refuses_rows_rendered_with_a_chat_template():
    tokenizer = build_word_tokenizer(["user assistant Question Response The answer is A B"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' ' }}{% endfor %}"
    chat = MemVPDataCollator(tokenizer, None)
    assert chat.uses_chat_template
    with pytest.raises(ValueError, match="scored with the authors' plain QCM-A prompt"):
        check_scienceqa_collator(chat, "causal")


def test_scoring_refuses_an_encoder_decoder_base(collator):
    with pytest.raises(ValueError, match="this adapter's base is encoder-decoder"):
        check_scienceqa_collator(collator, "seq2seq")


def test_a_text_only_problem_is_prompted_with_the_memory_off(repository, collator):
    from memvp_peft.demo_models import clip_image_processor

    with_images = MemVPDataCollator(collator.tokenizer, clip_image_processor(), chat_template=False)
    records = load_scienceqa(repository, "test")
    batch = with_images.prompts(records, answer_prefix=ANSWER_PHRASE)
    assert batch["image_mask"].tolist() == [r["has_image"] for r in records]
    assert torch.count_nonzero(batch["pixel_values"][~batch["image_mask"]]) == 0
