"""Tests of memvp_peft.tasks.files: LLaVA JSON and simple JSONL files -> records, and those records collated."""

from __future__ import annotations

import json

import pytest
import torch
from data_fixtures import (  # noqa: F401  (fixtures are used by name)
    answer_ids,
    collator,
    digits,
    image_dir,
    image_processor,
    supervised_ids,
    tokenizer,
)

from memvp_peft.data import IGNORE_INDEX, MemVPDataCollator, build_prompt
from memvp_peft.tasks import load_jsonl, load_llava_json


# ---------------------------------------------------------------------------------------------------------- LLaVA
def _write_llava(tmp_path, records):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def test_llava_json_single_turn(tmp_path, image_dir, collator, tokenizer):
    path = _write_llava(
        tmp_path,
        [
            {"id": "a", "image": "digit_4.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat digit is shown in the image ?"},
                               {"from": "gpt", "value": "four"}]},
            {"id": "b", "conversations": [{"from": "human", "value": "What color is the sky ?"},
                                          {"from": "gpt", "value": "blue ."}]},
        ],
    )
    records = load_llava_json(path, image_dir)
    assert records[0]["image"] == str(image_dir / "digit_4.png") and records[1]["image"] is None
    batch = collator(records)
    assert batch["image_mask"].tolist() == [True, False]
    # "<image>" is gone: the row is exactly the plain prompt (no "<", "image", ">" tokens).
    expected = tokenizer(build_prompt("What digit is shown in the image ?", "four"))["input_ids"]
    expected += [tokenizer.eos_token_id]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert int(batch["attention_mask"][0].sum()) == len(expected)
    assert tokenizer.unk_token_id not in batch["input_ids"][0].tolist()
    assert supervised_ids(batch, 0) == answer_ids(tokenizer, "four")

    # Unresolved LLaVA records (relative path) work when the collator is given the image folder.
    raw = json.loads(path.read_text())
    via_folder = MemVPDataCollator(tokenizer, collator.image_processor, image_folder=image_dir)(raw)
    assert torch.equal(via_folder["pixel_values"], batch["pixel_values"])


def test_llava_json_multi_turn(tmp_path, image_dir, collator, tokenizer):
    path = _write_llava(
        tmp_path,
        [{"id": "mt", "image": "digit_7.png",
          "conversations": [{"from": "human", "value": "<image>\nWhat digit is shown in the image ?"},
                            {"from": "gpt", "value": "seven"},
                            {"from": "human", "value": "Is the digit odd or even ?"},
                            {"from": "gpt", "value": "It is odd ."}]}],
    )
    batch = collator(load_llava_json(path, image_dir))
    first = answer_ids(tokenizer, "seven")
    second = answer_ids(tokenizer, "It is odd .")
    assert supervised_ids(batch, 0) == first + second  # loss on every gpt turn
    # Both human turns use the template and are unsupervised.
    turn1 = tokenizer(build_prompt("What digit is shown in the image ?", "seven"))["input_ids"] + [2]
    turn2 = tokenizer(build_prompt("Is the digit odd or even ?", "It is odd ."), add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == turn1 + turn2 + [tokenizer.eos_token_id]
    labels = batch["labels"][0].tolist()
    n1 = len(tokenizer(build_prompt("What digit is shown in the image ?"))["input_ids"])
    assert labels[:n1] == [IGNORE_INDEX] * n1
    start2 = len(turn1)
    n2 = len(tokenizer(build_prompt("Is the digit odd or even ?"), add_special_tokens=False)["input_ids"])
    assert labels[start2 : start2 + n2] == [IGNORE_INDEX] * n2


def test_load_llava_json_errors(tmp_path, image_dir):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": [}]')
    with pytest.raises(ValueError, match=r"bad\.json: line 1, column 21: invalid JSON: Expecting value"):
        load_llava_json(bad, image_dir)
    missing = _write_llava(tmp_path, [{"image": "digit_0.png", "conversations": [{"from": "human", "value": "q"},
                                                                                 {"from": "gpt", "value": "a"}]},
                                      {"image": "nope.png", "conversations": [{"from": "human", "value": "q"},
                                                                              {"from": "gpt", "value": "a"}]}])
    with pytest.raises(ValueError, match=r"llava\.json: entry 1: missing image file .*nope\.png"):
        load_llava_json(missing, image_dir)
    assert len(load_llava_json(missing, image_dir, check_images=False)) == 2
    no_conv = _write_llava(tmp_path, [{"image": "digit_0.png"}])
    with pytest.raises(ValueError, match=r"entry 0: LLaVA record has no 'conversations'"):
        load_llava_json(no_conv, image_dir)


# ---------------------------------------------------------------------------------------------------------- JSONL
def test_load_jsonl(tmp_path, image_dir, collator, tokenizer):
    path = tmp_path / "data.jsonl"
    lines = [
        {"image": "digit_5.png", "question": "What digit is shown ?", "answer": "five"},
        {"image": None, "question": "What color is the sky ?", "answer": "blue ."},
        {"image": ["digit_1.png", "digit_2.png"], "prompt": "Which image shows the larger digit ?",
         "answer": "The second one .", "source": "synthetic"},
    ]
    path.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    records = load_jsonl(path, image_dir)
    assert [r["answer"] for r in records] == ["five", "blue .", "The second one ."]
    assert records[0]["image"] == str(image_dir / "digit_5.png")
    assert records[2]["image"] == [str(image_dir / "digit_1.png"), str(image_dir / "digit_2.png")]
    assert records[2]["source"] == "synthetic"
    batch = collator(records)
    assert batch["image_mask"].tolist() == [[True, False], [False, False], [True, True]]
    assert supervised_ids(batch, 0) == answer_ids(tokenizer, "five")


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"image": "digit_0.png", "question": "q", "answer": "a"', r"line 3, column 56: invalid JSON: Expecting ',' delimiter"),
        ('["not", "an", "object"]', r"line 3: expected a JSON object"),
        ('{"image": "digit_0.png", "answer": "a"}', r"line 3: missing 'question'"),
        ('{"image": "digit_0.png", "question": "q", "answer": "  "}', r"line 3: missing or empty 'answer'"),
        ('{"image": "missing.png", "question": "q", "answer": "a"}', r"line 3: missing image file .*missing\.png"),
    ],
)
def test_load_jsonl_errors(tmp_path, image_dir, bad_line, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"image": "digit_0.png", "question": "q", "answer": "a"})
    path.write_text(good + "\n" + good + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl: " + message):
        load_jsonl(path, image_dir)


def test_the_file_loaders_keep_their_documented_names_in_memvp_peft_data():
    import memvp_peft.data
    import memvp_peft.tasks

    assert memvp_peft.data.load_jsonl is memvp_peft.tasks.load_jsonl
    assert memvp_peft.data.load_llava_json is memvp_peft.tasks.load_llava_json
