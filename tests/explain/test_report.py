"""The read maps' page: real pictures of a tiny untrained model's answers on real digit scans, a page that is
well-formed HTML, links only pictures that exist beside it by relative paths, and escapes what users wrote."""

from __future__ import annotations

import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from peft import get_peft_model
from sklearn.datasets import load_digits

from memvp_peft import MemVPConfig
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer, tiny_llama
from memvp_peft.explain import explain_records
from memvp_peft.explain.pictures import save_answer_maps
from memvp_peft.explain.report import write_report
from memvp_peft.tasks.digits import DigitPatchFeaturizer, GRID_CELLS, grid_question

VOID = {"meta", "img", "br", "hr", "link", "input"}


class PageChecker(HTMLParser):
    """Collects the unclosed / mismatched tags, the image sources and the text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.stack, self.problems, self.sources, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(tag)

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def explained():
    torch.manual_seed(0)
    questions = [grid_question(cell) for cell in GRID_CELLS[(2, 2)]] + ["What digit is shown <b>here</b> ?"]
    tokenizer = build_word_tokenizer([f"Question: {q}\nAnswer:" for q in questions], [str(d) for d in range(10)])
    model = get_peft_model(tiny_llama(tokenizer, hidden_size=32), MemVPConfig(
        visual_dim=6, num_memory_slots=100, image_grid=[2, 2], projector_hidden_dim=16, memory_dropout=0.0)).eval()
    collator = MemVPDataCollator(tokenizer, DigitPatchFeaturizer(), image_input_name="image_features",
                                 array_value_range=(0.0, 16.0), image_grid=(2, 2))
    scans = load_digits().images
    records = [{"image": np.block([[scans[0], scans[1]], [scans[2], scans[3]]]), "question": questions[1]},
               {"image": np.block([[scans[4], scans[5]], [scans[6], scans[7]]]), "question": questions[-1]}]
    return explain_records(model, collator, records, ["7", "3 <i>"], tokenizer)


def test_the_page_is_well_formed_and_links_existing_pictures(tmp_path, explained):
    entries = []
    for index, item in enumerate(explained):
        pictures = save_answer_maps(str(tmp_path), f"answer{index}", item)
        entries.append({"source": f"digits grid {index}", "question": item.record["question"], "answer": item.answer,
                        "log_prob": item.reads.answer_log_prob, "pictures": pictures})
    page = write_report(str(tmp_path), entries)
    checker = PageChecker()
    checker.feed(open(page, encoding="utf-8").read())
    checker.close()
    assert checker.problems == [] and checker.stack == []
    assert len(checker.sources) == sum(2 + len(item.token_texts) for item in explained)
    for source in checker.sources:
        assert not os.path.isabs(source) and "://" not in source
        assert os.path.getsize(tmp_path / source) > 1000
    text = "".join(checker.text)
    assert "What digit is shown <b>here</b> ?" in text and "3 <i>" in text  # escaped, shown as written


def test_a_picture_a_page_names_must_exist(tmp_path, explained):
    entry = {"source": "x", "question": "q", "answer": "a",
             "pictures": {"image": "none.png", "mean": "none.png", "tokens": []}}
    with pytest.raises(ValueError, match="not in"):
        write_report(str(tmp_path), [entry])
    assert not (tmp_path / "index.html").exists()


def test_each_answer_token_gets_its_map_on_the_whole_grid_image(explained):
    item = explained[0]
    assert len(item.reads.tokens) == len(item.token_texts) >= 1
    assert item.reads.slot_weights().shape == (len(item.token_texts), 100)
    assert [image.size for image in item.images] == [(16, 16)]
    assert sum(region is not None for region in item.layout.regions) == 5 * 16
