"""`python -m memvp_peft.cli.token_budget`: tokens per step of the authors' 512-padding and of our per-batch padding."""

from __future__ import annotations

import pathlib
import sys

import pytest

from memvp_peft.cli.token_budget import main, token_budget
from memvp_peft.data.multiple_choice import multiple_choice_prompt, multiple_choice_target

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tasks"))  # tests/tasks: the ScienceQA fixture
from scienceqa_fixture import fixture_tokenizer, scienceqa_problems, write_repository_layout  # noqa: E402

SHORT = {"question": "Which is a country?", "choices": ["France", "apple"], "answer": 0, "hint": ""}
LONG = {"question": "Which digit is shown?", "choices": ["zero", "one", "two", "three"], "answer": 2,
        "hint": "Look at the image."}


@pytest.fixture(scope="module")
def problems():
    return scienceqa_problems(num_image=12, num_text=8)


def row_length(tokenizer, record) -> int:
    """BOS + prompt + target + EOS, as the authors tokenize a row."""
    text = multiple_choice_prompt(record["question"], record["choices"], record["hint"])
    return len(tokenizer(text + multiple_choice_target(record["answer"], record["choices"]))["input_ids"]) + 1


def test_one_step_counts_each_way_by_hand(problems):
    tokenizer = fixture_tokenizer(problems)
    budget = token_budget([SHORT, LONG], tokenizer, batch_size=2)
    longest = max(row_length(tokenizer, SHORT), row_length(tokenizer, LONG))
    assert budget["steps"] == 1
    assert budget["authors_loader"]["mean"] == 2 * 512
    assert budget["ours"]["mean"] == budget["authors_forward"]["mean"] == 2 * longest
    assert budget["real"]["mean"] == row_length(tokenizer, SHORT) + row_length(tokenizer, LONG)


def test_the_authors_cut_computes_on_as_many_tokens_as_per_batch_padding(problems, tmp_path):
    from memvp_peft.tasks.scienceqa import load_scienceqa

    records = load_scienceqa(write_repository_layout(tmp_path / "sqa", problems), "train")
    budget = token_budget(records, fixture_tokenizer(problems), batch_size=3)
    assert budget["steps"] == -(-len(records) // 3)
    assert budget["authors_forward"] == budget["ours"]
    assert budget["real"]["mean"] <= budget["ours"]["mean"] < budget["authors_loader"]["mean"]


def test_the_command_prints_the_table(problems, tmp_path, capsys):
    folder = write_repository_layout(tmp_path / "sqa", problems)
    fixture_tokenizer(problems).save_pretrained(tmp_path / "tokenizer")
    assert main(["--dataset", f"scienceqa:{folder}", "--tokenizer", str(tmp_path / "tokenizer"), "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "| authors' loader (every row padded to 512) |" in out and "| MemVPDataCollator" in out


def test_a_missing_folder_is_one_error_line(tmp_path, capsys):
    assert main(["--dataset", f"scienceqa:{tmp_path / 'nope'}", "--tokenizer", str(tmp_path)]) == 2
    assert "error: ScienceQA:" in capsys.readouterr().err
