"""What is shown next to an answer: memvp-infer's printed lines and answers file (the image as the question named it,
the question in whatever layout it came), and memvp-train's sample answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memvp_peft.cli.infer import main as infer_main
from memvp_peft.cli.train import main as train_main
from memvp_peft.demo_models import build_word_tokenizer, tiny_clip, tiny_llama

QUESTION = "What digit is shown ?"
SHORT = ["--max_steps", "2", "--max_eval_samples", "4"]


@pytest.fixture(scope="module")
def digits_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert train_main([*SHORT, "--output_dir", str(out)]) == 0
    return out


def _answers(adapter, tmp_path, capsys, lines: list[dict]) -> tuple[list[dict], list[str]]:
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    capsys.readouterr()
    code = infer_main(["--adapter", str(adapter), "--input_file", str(tmp_path / "q.jsonl"),
                       "--output_file", str(tmp_path / "a.jsonl")])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    return rows, printed.out.strip().splitlines()


def test_a_prompt_line_is_answered_and_written_with_its_question(digits_adapter, tmp_path, capsys):
    rows, printed = _answers(digits_adapter, tmp_path, capsys, [{"image": "digits:3", "prompt": QUESTION}])
    assert rows[0]["question"] == QUESTION and printed == [f"digits:3: {QUESTION} -> {rows[0]['answer']}"]


def test_a_text_only_line_writes_a_null_image(digits_adapter, tmp_path, capsys):
    rows, printed = _answers(digits_adapter, tmp_path, capsys, [{"question": QUESTION}])
    assert rows[0]["image"] is None and printed[0].startswith(f"(no image): {QUESTION} -> ")


def test_a_digits_image_in_the_input_file_is_answered_like_the_image_flag(digits_adapter, tmp_path, capsys):
    lines = [{"image": f"digits:{index}", "question": QUESTION} for index in (3, 8, 21)]
    rows, _ = _answers(digits_adapter, tmp_path, capsys, lines)
    assert infer_main(["--adapter", str(digits_adapter), "--image", "digits:3", "digits:8", "digits:21",
                       "--output_file", str(tmp_path / "flag.jsonl")]) == 0
    by_flag = [json.loads(line) for line in (tmp_path / "flag.jsonl").read_text().splitlines()]
    assert rows == by_flag and [row["image"] for row in rows] == ["digits:3", "digits:8", "digits:21"]


def test_a_digits_index_out_of_range_in_the_input_file_names_its_line(digits_adapter, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "digits:1797", "question": QUESTION}) + "\n")
    assert infer_main(["--adapter", str(digits_adapter), "--input_file", str(tmp_path / "q.jsonl")]) == 2
    assert "q.jsonl: line 1: 'digits:1797': expected digits:INDEX with 0 <= INDEX < 1797" in capsys.readouterr().err


@pytest.mark.slow
def test_a_video_line_shows_its_frames(tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    out = tmp_path / "run"
    assert train_main(["--dataset", "digits-sequence", *SHORT, "--output_dir", str(out)]) == 0
    scans = load_digits().images
    frames = []
    for index in range(8):
        Image.fromarray((scans[index] * 15).astype(np.uint8)).save(tmp_path / f"f{index}.png")
        frames.append(str(tmp_path / f"f{index}.png"))
    rows, printed = _answers(out, tmp_path, capsys, [{"frames": frames, "question": "Which digit comes third ?"}])
    assert rows[0]["image"] is None and rows[0]["video"] == frames
    assert printed[0].startswith(f"{frames[0]}, {frames[1]}, ") and not printed[0].startswith("None")


@pytest.mark.slow
def test_the_training_summary_shows_the_question_of_a_llava_record(tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    (tmp_path / "img").mkdir()
    records = []
    for index in range(16):
        Image.fromarray((digits.images[index] * 15).astype(np.uint8)).save(tmp_path / "img" / f"d{index}.png")
        records.append({"image": f"d{index}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": str(digits.target[index])}]})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    tokenizer = build_word_tokenizer([f"Question: {QUESTION}\nAnswer:"], [str(d) for d in range(10)])
    tiny_llama(tokenizer, hidden_size=64).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    tiny_clip(hidden_size=32).save_pretrained(tmp_path / "clip")
    capsys.readouterr()
    assert train_main(["--model_name_or_path", str(tmp_path / "llama"), "--vision_model_name_or_path",
                       str(tmp_path / "clip"), "--dataset", str(tmp_path / "llava.json"),
                       "--image_folder", str(tmp_path / "img"), *SHORT,
                       "--eval_fraction", "0.25", "--output_dir", str(tmp_path / "run")]) == 0
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Q: ")]
    assert samples and all(line.startswith(f"Q: {QUESTION}  ->  A: ") for line in samples)
