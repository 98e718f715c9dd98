"""memvp-infer refuses what it cannot do well with one `memvp-infer: error: ...` line and exit 2, before any work.

The adapter here is built the way memvp-train leaves one (a base folder, an adapter recording it, a memvp_cli.json
for the digit patches) but without training, so every case runs in a few seconds; the answers are meaningless, only
the refusals and the files matter.
"""

import json
import os
import shutil

import pytest
from peft import get_peft_model

from memvp_peft import MemVPConfig
from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.model_loading import write_run_manifest
from memvp_peft.tasks.digits import DIGIT_PATCH_DIM
from memvp_peft.demo_models import build_word_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """An adapter folder as memvp-train writes it: the adapter, base_model/ (recorded by absolute path) and
    memvp_cli.json."""
    folder = tmp_path_factory.mktemp("run")
    tokenizer = build_word_tokenizer(["Question: What digit is shown ?\nAnswer:"], [str(d) for d in range(10)])
    model = tiny_llama(tokenizer, hidden_size=32)
    base = folder / "base_model"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    model.name_or_path = str(base)
    get_peft_model(model, MemVPConfig(visual_dim=DIGIT_PATCH_DIM, num_memory_slots=20, projector_hidden_dim=8)
                   ).save_pretrained(folder)
    write_run_manifest(str(folder), {"featurizer": "digit_patches", "vision_model_name_or_path": None,
                                     "array_value_range": [0, 16], "kind": "causal"})
    return folder


@pytest.fixture
def adapter(trained_folder, tmp_path):
    """A private copy of the adapter (its base stays shared), free to be broken by one test."""
    copy = tmp_path / "adapter"
    shutil.copytree(trained_folder, copy, ignore=shutil.ignore_patterns("base_model"))
    return copy


def _error(capsys) -> str:
    """The single `memvp-infer: error:` line; no traceback and no answer was printed."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("memvp-infer: error:")]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "->" not in captured.out  # nothing was answered
    return lines[0]


def _edit_config(adapter, change) -> None:
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_adapter_answers_and_writes_the_output_file(adapter, tmp_path, capsys):
    """The fixture is a working adapter: the refusals below are about the broken part only."""
    target = tmp_path / "a.jsonl"
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", "--output_file", str(target)]) == 0
    assert [json.loads(line)["image"] for line in target.read_text().splitlines()] == ["digits:0"]


def test_an_adapter_holding_nan_is_refused_instead_of_answering(adapter, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter / "adapter_model.safetensors")
    weights["base_model.memvp_memory.value_pos"].fill_(float("nan"))
    save_file(weights, adapter / "adapter_model.safetensors")
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    assert "value_pos holds 640 NaN value(s)" in _error(capsys)


def test_a_model_computing_nan_is_refused_instead_of_answering_an_empty_string(adapter, capsys):
    """Finite weights and a finite visual_scale that overflows float32 in the first product: the scores are NaN."""
    _edit_config(adapter, lambda data: data.update(visual_scale=1e38))
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", "digits:1"]) == 2
    assert "the model computed NaN/inf next-token scores for 2 question(s) (index 0, 1)" in _error(capsys)


@pytest.mark.parametrize("text", ["{garbage", "[1, 2]", "null", '"MEMVP"', ""],
                         ids=["garbage", "list", "null", "string", "empty"])
def test_adapter_config_that_is_not_a_json_object_is_one_error_naming_the_file(adapter, text, capsys):
    (adapter / "adapter_config.json").write_text(text)
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    assert str(adapter / "adapter_config.json") in _error(capsys)


def test_adapter_config_without_peft_type_is_one_error_naming_the_file(adapter, capsys):
    _edit_config(adapter, lambda data: data.pop("peft_type"))
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    error = _error(capsys)
    assert str(adapter / "adapter_config.json") in error and "peft_type" in error


def test_adapter_config_of_another_method_is_one_error_naming_it(adapter, capsys):
    _edit_config(adapter, lambda data: data.update(peft_type="LORA"))
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    error = _error(capsys)
    assert str(adapter / "adapter_config.json") in error and "'LORA'" in error and "MEMVP" in error


def test_adapter_config_with_a_value_of_the_wrong_type_is_one_error_naming_the_file(adapter, capsys):
    _edit_config(adapter, lambda data: data.update(num_memory_slots="many"))
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    assert str(adapter / "adapter_config.json") in _error(capsys)


@pytest.mark.parametrize(
    "text",
    ["{garbage", "[1]", "null", '{"featurizer": 3}', '{"array_value_range": 5}', '{"array_value_range": [0, "x"]}',
     '{"vision_model_name_or_path": ["a"]}', '{"kind": "diffusion"}'],
    ids=["garbage", "list", "null", "featurizer-int", "range-int", "range-str", "vision-list", "kind"],
)
def test_broken_cli_record_is_one_error_naming_the_file(adapter, text, capsys):
    (adapter / "memvp_cli.json").write_text(text)
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    assert str(adapter / "memvp_cli.json") in _error(capsys)


def test_output_file_in_a_missing_folder_is_refused_before_any_work(adapter, tmp_path, capsys):
    target = tmp_path / "no" / "such" / "answers.jsonl"
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", "--output_file", str(target)]) == 2
    error = _error(capsys)
    assert str(tmp_path / "no" / "such") in error and "does not exist" in error
    assert not (tmp_path / "no").exists()


def test_output_file_that_is_a_folder_is_refused_before_any_work(adapter, tmp_path, capsys):
    (tmp_path / "answers").mkdir()
    target = tmp_path / "answers"
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", "--output_file", str(target)]) == 2
    assert "is a folder" in _error(capsys)
    assert os.listdir(tmp_path / "answers") == []


def test_output_file_that_is_the_input_file_is_refused(adapter, tmp_path, capsys):
    """Answering a question file into itself would replace the user's questions with the answers."""
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": None, "question": "What digit is shown ?"}) + "\n")
    before = questions.read_text()
    assert infer_main(["--adapter", str(adapter), "--input_file", str(questions), "--output_file", str(questions)]) == 2
    assert "is also the --input_file" in _error(capsys)
    assert questions.read_text() == before


def test_missing_base_from_the_flag_says_what_to_pass_instead(adapter, tmp_path, capsys):
    nope = tmp_path / "nope"
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", "--model_name_or_path", str(nope)]) == 2
    error = _error(capsys)
    assert repr(str(nope)) in error and "local folder" in error
    assert "Hub" in error and "save_pretrained" in error  # how to get a Hub model into a folder


def test_missing_recorded_base_says_to_pass_the_flag(adapter, capsys):
    _edit_config(adapter, lambda data: data.update(base_model_name_or_path="/moved/away/base_model"))
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0"]) == 2
    error = _error(capsys)
    assert "'/moved/away/base_model'" in error and "the adapter records" in error and "--model_name_or_path" in error


def test_base_folder_without_a_model_config_is_refused(adapter, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", "--model_name_or_path",
                       str(tmp_path / "empty")]) == 2
    assert "no config.json" in _error(capsys)


@pytest.mark.parametrize("spec", ["digits:-1", "digits:1797", "digits:two"])
def test_digit_index_out_of_range_is_refused_with_the_valid_range(adapter, spec, capsys):
    assert infer_main(["--adapter", str(adapter), "--image", "digits:0", spec]) == 2
    error = _error(capsys)
    assert repr(spec) in error and "0 <= INDEX < 1797" in error


@pytest.mark.parametrize("text", ["", "\n  \n\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_input_file_is_an_error(adapter, tmp_path, text, capsys):
    (tmp_path / "q.jsonl").write_text(text)
    assert infer_main(["--adapter", str(adapter), "--input_file", str(tmp_path / "q.jsonl")]) == 2
    assert "no questions" in _error(capsys)


def test_input_file_lines_need_no_answer(adapter, tmp_path, capsys):
    """docs/inference.md: `--input_file` lines need an image and a question; an answer is not required."""
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": None, "question": "What digit is shown ?"}) + "\n")
    assert infer_main(["--adapter", str(adapter), "--input_file", str(tmp_path / "q.jsonl")]) == 0
    assert capsys.readouterr().out.count("->") == 1


def test_moved_run_folder_points_at_the_base_saved_beside_the_adapter(trained_folder, tmp_path, capsys):
    """memvp-train records the embedded base by absolute path; after the run folder moves, the error names the copy
    of the base that moved with it."""
    moved = tmp_path / "moved"
    shutil.copytree(trained_folder, moved)
    _edit_config(moved, lambda data: data.update(base_model_name_or_path=str(tmp_path / "old-place" / "base_model")))
    assert infer_main(["--adapter", str(moved), "--image", "digits:0"]) == 2
    assert f"--model_name_or_path {moved / 'base_model'}" in _error(capsys)
    assert infer_main(["--adapter", str(moved), "--image", "digits:0", "--model_name_or_path",
                       str(moved / "base_model")]) == 0
