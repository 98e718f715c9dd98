"""ScienceQA scoring: the paper's columns, the authors' rule for reading a prediction."""

from __future__ import annotations

import pytest

from memvp_peft.tasks.scienceqa import format_scores_table, predicted_letter, scienceqa_scores


def problem(subject, grade, hint, image, answer=0):
    return {"subject": subject, "grade": grade, "has_hint": bool(hint), "has_image": image, "answer": answer,
            "choices": ["a", "b", "c"]}


def test_the_prediction_is_the_first_capital_letter_of_the_generated_text():
    assert predicted_letter(" B.", 3) == "B"
    assert predicted_letter("the answer: C or A", 3) == "C"


def test_a_letter_beyond_the_choices_or_no_letter_is_wrong():
    assert predicted_letter(" D", 3) == ""
    assert predicted_letter(" 42", 3) == ""


def test_each_column_scores_its_own_problems():
    records = [
        problem("natural science", "grade2", "", True),     # IMG, G1-6
        problem("social science", "grade8", "a hint", False),  # TXT, G7-12
        problem("language science", "grade5", "", False),   # NO, G1-6
        problem("natural science", "grade11", "a hint", True),  # TXT, IMG, G7-12
    ]
    scores = scienceqa_scores(records, ["A", "A", "B", "B"])
    assert scores == {"NAT": 50.0, "SOC": 100.0, "LAN": 0.0, "TXT": 50.0, "IMG": 50.0, "NO": 0.0,
                      "G1-6": 50.0, "G7-12": 50.0, "Avg": 50.0}


def test_a_column_without_problems_is_none_not_zero():
    scores = scienceqa_scores([problem("natural science", "grade3", "", True)], ["A"])
    assert scores["SOC"] is None and scores["G7-12"] is None and scores["Avg"] == 100.0
    assert "| - |" in format_scores_table(scores).replace("| - | - |", "| - |")


def test_scores_round_to_two_decimals():
    records = [problem("natural science", "grade1", "", False)] * 3
    assert scienceqa_scores(records, ["A", "B", "B"])["Avg"] == 33.33


def test_predictions_and_problems_must_pair_up():
    with pytest.raises(ValueError, match="2 problems but 1 predictions"):
        scienceqa_scores([problem("natural science", "grade1", "", False)] * 2, ["A"])
