"""ScienceQA end to end, the two commands of docs/scienceqa.md on a fixture: `memvp-train --dataset scienceqa:DIR`
trains a tiny local base (a random frozen Llama + a random frozen CLIP, MemVP with the authors' image
normalisation), then `memvp-infer ... --dataset scienceqa:DIR --split test --output_file preds.jsonl` scores it.

The fixture's image problems ask "Which digit is shown?" about a real scikit-learn digit with four choices; the
choices are the block of four digits holding the answer (`digit_choices(shuffled=False)`), so a base that cannot
read option texts can still learn the letter from the image -- chance is about 30%. The scores are recomputed here
from preds.jsonl and problems.json, independently of `memvp_peft.tasks.scienceqa`'s scoring.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import sys

import pytest

from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.train import main as train_main
from memvp_peft.demo_models import tiny_clip

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tasks"))  # tests/tasks: the ScienceQA fixture
from scienceqa_fixture import (  # noqa: E402
    scienceqa_problems,
    write_fixture_base,
    write_hub_layout,
    write_repository_layout,
)

pytestmark = pytest.mark.slow


def run(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scienceqa")
    problems = scienceqa_problems(num_image=600, num_text=24, shuffled=False)
    write_repository_layout(root / "scienceqa", problems)
    write_hub_layout(root / "hub", problems)
    write_fixture_base(root / "base", problems)
    tiny_clip(hidden_size=32).save_pretrained(root / "clip")
    code, _, err = run(train_main, [
        "--model_name_or_path", str(root / "base"), "--vision_model_name_or_path", str(root / "clip"),
        "--dataset", f"scienceqa:{root / 'scienceqa'}", "--image_normalization", "imagenet",
        "--max_steps", "200", "--learning_rate", "3e-2", "--per_device_train_batch_size", "32", "--threads", "1",
        "--seed", "0", "--output_dir", str(root / "run")])
    assert code == 0, err[-3000:]
    code, out, err = run(infer_main, ["--adapter", str(root / "run"), "--dataset", f"scienceqa:{root / 'scienceqa'}",
                                      "--split", "test", "--output_file", str(root / "preds.jsonl")])
    assert code == 0, err[-3000:]
    (root / "infer_stdout.txt").write_text(out)
    (root / "infer_stderr.txt").write_text(err)
    return root


def predictions(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recomputed_scores(rows: list[dict], problems: dict) -> dict:
    """The paper's columns from the prediction lines and problems.json, written out here on their own."""
    columns = {
        "NAT": lambda p: p["subject"] == "natural science", "SOC": lambda p: p["subject"] == "social science",
        "LAN": lambda p: p["subject"] == "language science", "TXT": lambda p: bool(p["hint"]),
        "IMG": lambda p: bool(p["image"]), "NO": lambda p: not p["hint"] and not p["image"],
        "G1-6": lambda p: int(p["grade"].removeprefix("grade")) <= 6,
        "G7-12": lambda p: int(p["grade"].removeprefix("grade")) >= 7, "Avg": lambda p: True,
    }
    scores = {}
    for column, belongs in columns.items():
        hits = [row["prediction"] == "ABCDE"[problems[row["id"]]["answer"]] for row in rows
                if belongs(problems[row["id"]])]
        scores[column] = round(100 * sum(hits) / len(hits), 2)
    return scores


def test_scores_json_equals_the_categories_recomputed_from_the_predictions(run_folder):
    problems = json.loads((run_folder / "scienceqa" / "problems.json").read_text())
    scores = json.loads((run_folder / "scores.json").read_text())
    assert scores == recomputed_scores(predictions(run_folder / "preds.jsonl"), problems)


def test_image_questions_are_answered_well_above_chance(run_folder):
    problems = json.loads((run_folder / "scienceqa" / "problems.json").read_text())
    rows = [row for row in predictions(run_folder / "preds.jsonl") if problems[row["id"]]["image"]]
    accuracy = sum(row["prediction"] == row["answer"] for row in rows) / len(rows)
    assert len(rows) == 200 and accuracy >= 0.75, accuracy  # chance: 1/4 (1/2 for the 8s and 9s)


def test_preds_hold_one_line_per_test_problem_with_the_prompt_the_tokenizer_got(run_folder):
    problems = json.loads((run_folder / "scienceqa" / "problems.json").read_text())
    test_ids = json.loads((run_folder / "scienceqa" / "pid_splits.json").read_text())["test"]
    rows = predictions(run_folder / "preds.jsonl")
    assert [row["id"] for row in rows] == test_ids
    for row in rows:
        problem = problems[row["id"]]
        options = " ".join(f"({'ABCDE'[i]}) {choice}" for i, choice in enumerate(problem["choices"]))
        assert row["prompt"] == (f"Question: {problem['question']}\nContext: {problem['hint'] or 'N/A'}\n"
                                 f"Options: {options}\nResponse:The answer is")
        assert row["answer"] == "ABCDE"[problem["answer"]] and row["prediction"] in ("", "A", "B", "C", "D")


def test_memvp_infer_prints_the_table_and_a_progress_bar(run_folder):
    scores = json.loads((run_folder / "scores.json").read_text())
    out = (run_folder / "infer_stdout.txt").read_text()
    assert "| NAT | SOC | LAN | TXT | IMG | NO | G1-6 | G7-12 | Avg |" in out
    assert f"| {scores['NAT']:.2f} | {scores['SOC']:.2f} |" in out and f"| {scores['Avg']:.2f} |" in out
    assert "answering" in (run_folder / "infer_stderr.txt").read_text()


def test_the_run_records_how_it_fed_the_adapter_and_reports_the_held_out_split(run_folder):
    record = json.loads((run_folder / "run" / "memvp_cli.json").read_text())
    assert record["image_normalization"] == "imagenet" and record["chat_template"] is False
    metrics = json.loads((run_folder / "run" / "metrics.json").read_text())
    assert metrics["eval_samples"] == 208  # ScienceQA's val split, not a cut of train
    assert metrics["reloaded_heldout_accuracy"] == metrics["heldout_accuracy"] == metrics["scienceqa_scores"]["Avg"] / 100


def test_the_hub_layout_scores_the_same_predictions(run_folder):
    (run_folder / "hub_scores").mkdir()  # its own folder: scores.json goes next to the predictions
    code, _, err = run(infer_main, ["--adapter", str(run_folder / "run"), "--dataset", f"scienceqa:{run_folder / 'hub'}",
                                    "--output_file", str(run_folder / "hub_scores" / "preds.jsonl")])
    assert code == 0, err[-3000:]
    ours = predictions(run_folder / "hub_scores" / "preds.jsonl")
    theirs = predictions(run_folder / "preds.jsonl")
    assert [(r["prompt"], r["prediction"]) for r in ours] == [(r["prompt"], r["prediction"]) for r in theirs]
