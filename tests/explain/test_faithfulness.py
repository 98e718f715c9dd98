"""The read maps are faithful on a small adapter trained on the real digits: excluding the most-read slots first
lowers the answer's probability faster than excluding random ones or the least-read ones (a lower deletion AUC), and
putting them back first raises it faster (a higher insertion AUC)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memvp_peft.cli.infer import load_for_inference
from memvp_peft.cli.options import InferOptions
from memvp_peft.cli.train import main as train_main
from memvp_peft.explain import explain_records
from memvp_peft.explain.faithfulness import area_under, curve_points, record_curves
from memvp_peft.tasks.catalogue import load_task


def test_curve_points_run_from_none_to_all_once_each():
    assert curve_points(16, 5) == [0, 4, 8, 12, 16]
    assert curve_points(3, 11) == [0, 1, 2, 3]


def test_the_area_is_over_the_fraction_of_slots():
    assert area_under([0, 8, 16], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert area_under([0, 4, 16], [1.0, 1.0, 1.0]) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faithful") / "adapter"
    assert train_main(["--max_steps", "200", "--max_eval_samples", "16", "--seed", "0",
                       "--output_dir", str(folder)]) == 0
    return str(folder)


@pytest.mark.slow
def test_deleting_the_most_read_slots_hurts_the_answer_most(trained):
    model, tokenizer, collator, kind = load_for_inference(InferOptions(adapter=trained))
    records = load_task("digits", None, None, 0).eval[:12]
    answers = [record["answer"] for record in records]
    rng = np.random.default_rng(0)
    aucs = {}
    for record, item in zip(records, explain_records(model, collator, records, answers, tokenizer)):
        row = collator([record])
        image_slots = np.flatnonzero(item.layout.image_slots())
        curves = record_curves(model, row, {"read map": item.reads.slot_weights().mean(axis=0)}, image_slots,
                               item.layout.num_slots, 6, rng, random_draws=2)
        for name, kinds in curves.items():
            for kind_ in ("deletion", "insertion"):
                aucs.setdefault((name, kind_), []).append(area_under(kinds["points"], kinds[kind_]))
    mean = {key: float(np.mean(values)) for key, values in aucs.items()}
    assert mean["read map", "deletion"] < mean["random", "deletion"] < mean["least read", "deletion"]
    assert mean["read map", "insertion"] > mean["random", "insertion"] > mean["least read", "insertion"]
    assert torch.is_grad_enabled()  # the curves ran without gradients and left them on
