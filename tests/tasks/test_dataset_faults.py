"""Dataset files a careful user can get wrong, refused when the dataset loads and named by the dataset line.

Every image a LLaVA JSON or JSONL file names is checked by the loader (the file decodes as an image, its size is
within the pixel limit, its path stays inside ``image_folder``), so a bad file fails before training starts, with
the dataset file and line (or entry and id) -- not hours in, as "record 1", the position in some batch.  Errors the
collator still finds (the structure of a conversation) name the same dataset line.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import pytest
from data_fixtures import collator, digits, image_dir, image_processor, tokenizer  # noqa: F401  (fixtures by name)

from memvp_peft.cli.train import main as train_main
from memvp_peft.data import MemVPDataCollator
from memvp_peft.tasks import load_jsonl, load_llava_json
from memvp_peft.tasks.catalogue import load_task

QA = {"question": "What digit is shown in the image ?", "answer": "four"}


def _conversation(answer: str = "four") -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\nWhat digit is shown in the image ?"}, {"from": "gpt", "value": answer}]


def _write_jsonl(folder, rows, name="data.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _write_llava(folder, records, name="llava.json"):
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def _png_declaring(path, width: int, height: int) -> None:
    """A 60-byte PNG whose header declares `width` x `height` pixels: what a decompression bomb looks like to PIL."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------ unreadable images
def test_non_image_file_is_refused_at_load_with_its_jsonl_line(tmp_path, image_dir):
    path = _write_jsonl(tmp_path, [{"image": "digit_0.png", **QA}, {"image": "broken.png", **QA}])
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2: .*broken\.png.* is not a readable image"):
        load_jsonl(path, image_dir)


def test_non_image_file_is_refused_at_load_with_its_llava_entry_and_id(tmp_path, image_dir):
    path = _write_llava(tmp_path, [{"id": "a", "image": "digit_0.png", "conversations": _conversation()},
                                   {"id": "b", "image": "broken.png", "conversations": _conversation()}])
    with pytest.raises(ValueError, match=r"llava\.json: entry 1 \(id='b'\): .*broken\.png.* is not a readable image"):
        load_llava_json(path, image_dir)


def test_truncated_image_is_refused_when_images_are_decoded(tmp_path, image_dir):
    whole = (image_dir / "digit_3.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    path = _write_jsonl(tmp_path, [{"image": "cut.png", **QA}])
    with pytest.raises(ValueError, match=r"line 1: .*cut\.png.* is not a readable image"):
        load_jsonl(path, tmp_path)


def test_decode_images_false_checks_only_the_header(tmp_path, image_dir):
    whole = (image_dir / "digit_3.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.png").write_text("not an image")
    assert len(load_jsonl(_write_jsonl(tmp_path, [{"image": "cut.png", **QA}]), tmp_path, decode_images=False)) == 1
    with pytest.raises(ValueError, match=r"text\.png.* is not a readable image"):
        load_jsonl(_write_jsonl(tmp_path, [{"image": "text.png", **QA}]), tmp_path, decode_images=False)


# ------------------------------------------------------------------------------------------- decompression bombs
def test_decompression_bomb_is_a_value_error_naming_the_file_and_the_limit(tmp_path):
    _png_declaring(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels: PIL itself raises over 2x its limit
    path = _write_jsonl(tmp_path, [{"image": "bomb.png", **QA}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither PIL's DecompressionBombWarning nor its error gets through
        with pytest.raises(ValueError, match=r"line 1: .*bomb\.png.* over the pixel limit.*10000000000 pixels") as caught:
            load_jsonl(path, tmp_path)
    assert "MAX_IMAGE_PIXELS" in str(caught.value)


def test_image_between_the_limit_and_pils_hard_limit_is_refused_without_a_warning(tmp_path):
    from PIL import Image

    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)  # PIL only warns here, and would decode ~130 MB
    _png_declaring(tmp_path / "big.png", side, side)
    path = _write_jsonl(tmp_path, [{"image": "big.png", **QA}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=rf"big\.png.* {side}x{side} .*pixel limit of {Image.MAX_IMAGE_PIXELS:,}"):
            load_jsonl(path, tmp_path)


def test_max_image_pixels_lowers_the_limit(tmp_path, image_dir):
    path = _write_jsonl(tmp_path, [{"image": "digit_0.png", **QA}])  # an 8x8 digit: 64 pixels
    assert len(load_jsonl(path, image_dir, max_image_pixels=64)) == 1
    with pytest.raises(ValueError, match=r"digit_0\.png.* 8x8 = 64 pixels, over the pixel limit of 63"):
        load_jsonl(path, image_dir, max_image_pixels=63)


# ---------------------------------------------------------------------------------------- paths and image_folder
def test_dotdot_path_escaping_image_folder_is_refused(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    path = _write_jsonl(tmp_path, [{"image": "../../etc/passwd", **QA}])
    with pytest.raises(ValueError, match=r"line 1: image path '\.\./\.\./etc/passwd' .*outside image_folder"):
        load_jsonl(path, images)


def test_dotdot_escape_is_refused_even_when_images_are_not_checked(tmp_path, image_dir):
    path = _write_llava(tmp_path, [{"id": "x", "image": f"../{image_dir.name}/digit_0.png",
                                    "conversations": _conversation()}])
    with pytest.raises(ValueError, match=r"entry 0 \(id='x'\): .*outside image_folder"):
        load_llava_json(path, tmp_path / "elsewhere", check_images=False)


def test_absolute_path_outside_image_folder_is_refused_by_default(tmp_path, image_dir):
    (tmp_path / "images").mkdir()
    path = _write_jsonl(tmp_path, [{"image": str(image_dir / "digit_0.png"), **QA}])
    with pytest.raises(ValueError, match=r"line 1: .*digit_0\.png.* outside image_folder.*allow_outside_image_folder"):
        load_jsonl(path, tmp_path / "images")


def test_absolute_path_outside_image_folder_is_accepted_with_the_option(tmp_path, image_dir):
    (tmp_path / "images").mkdir()
    path = _write_jsonl(tmp_path, [{"image": str(image_dir / "digit_0.png"), **QA}])
    records = load_jsonl(path, tmp_path / "images", allow_outside_image_folder=True)
    assert records[0]["image"] == str(image_dir / "digit_0.png")


def test_absolute_path_inside_image_folder_is_accepted(tmp_path, image_dir):
    path = _write_jsonl(tmp_path, [{"image": str(image_dir / "digit_0.png"), **QA}])
    assert load_jsonl(path, image_dir)[0]["image"] == str(image_dir / "digit_0.png")


def test_image_folder_defaults_to_the_dataset_files_folder(tmp_path, image_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths must not depend on the working directory
    path = _write_jsonl(image_dir, [{"image": "digit_0.png", **QA}], name="here.jsonl")
    assert load_jsonl(path)[0]["image"] == str(image_dir / "digit_0.png")


def test_load_task_passes_allow_outside_image_folder(tmp_path, image_dir):
    (tmp_path / "images").mkdir()
    rows = [{"image": str(image_dir / f"digit_{i}.png"), **QA} for i in range(4)]
    path = str(_write_jsonl(tmp_path, rows))
    with pytest.raises(ValueError, match="outside image_folder"):
        load_task(path, str(tmp_path / "images"), 0.25, seed=0)
    task = load_task(path, str(tmp_path / "images"), 0.25, seed=0, allow_outside_image_folder=True)
    assert len(task.train) == 3


def test_a_list_of_images_resolves_against_the_dataset_folder_not_the_working_directory(tmp_path, image_dir,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write_jsonl(image_dir, [{"images": ["digit_0.png", "digit_1.png"], **QA}], name="two.jsonl")
    assert load_jsonl(path)[0]["images"] == [str(image_dir / "digit_0.png"), str(image_dir / "digit_1.png")]


def test_a_list_of_images_leading_outside_the_folder_is_refused_naming_the_image(tmp_path, image_dir):
    path = _write_jsonl(tmp_path, [{"images": ["digit_0.png", "../../etc/passwd"], **QA}])
    with pytest.raises(ValueError, match=r"line 1, image 1: image path '\.\./\.\./etc/passwd' .*outside"):
        load_jsonl(path, image_dir)


@pytest.mark.parametrize("field", ["video", "frames"])  # both are read as a video file when they hold a path
def test_a_video_path_resolves_against_the_dataset_folder_not_the_working_directory(field, tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    path = _write_jsonl(tmp_path / "data", [{field: "clips/a.mp4", **QA}])
    assert load_jsonl(path)[0][field] == str(tmp_path / "data" / "clips" / "a.mp4")


@pytest.mark.parametrize("video", ["../elsewhere.mp4", "/tmp/elsewhere.mp4"])
def test_a_video_path_leading_outside_the_folder_is_refused_unless_allowed(video, tmp_path):
    path = _write_jsonl(tmp_path, [{"video": video, **QA}])
    with pytest.raises(ValueError, match=r"line 1: video path .*elsewhere\.mp4.* outside image_folder"):
        load_jsonl(path)
    assert load_jsonl(path, allow_outside_image_folder=True)[0]["video"].endswith("elsewhere.mp4")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A local vision encoder, so that the runs below get as far as their dataset whatever is checked first."""
    from memvp_peft.demo_models import tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    tiny_clip(hidden_size=32).save_pretrained(folder)
    return folder


def test_train_refuses_an_escaping_dataset_before_writing_anything(tmp_path, clip_dir, capsys):
    path = _write_jsonl(tmp_path, [{"image": "../../etc/passwd", **QA}] * 4)
    out = tmp_path / "run"
    argv = ["--dataset", str(path), "--image_folder", str(tmp_path), "--vision_model_name_or_path", str(clip_dir),
            "--output_dir", str(out)]
    assert train_main(argv) == 2
    assert "line 1: image path '../../etc/passwd'" in capsys.readouterr().err
    assert not out.exists()


def test_train_passes_allow_outside_image_folder_to_the_dataset(tmp_path, image_dir, clip_dir, capsys):
    path = _write_jsonl(tmp_path, [{"image": str(image_dir / "digit_0.png"), **QA}])
    (tmp_path / "images").mkdir()
    argv = ["--dataset", str(path), "--image_folder", str(tmp_path / "images"),
            "--vision_model_name_or_path", str(clip_dir), "--output_dir", str(tmp_path / "run")]
    assert train_main(argv) == 2
    assert "outside image_folder" in capsys.readouterr().err
    assert train_main(argv + ["--allow_outside_image_folder"]) == 2  # the image passes; one record is too few
    assert "too few to hold out" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- malformed JSON
def test_a_jsonl_line_nested_too_deeply_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(QA) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2: JSON nested too deeply to read"):
        load_jsonl(path)


def test_a_json_file_nested_too_deeply_names_its_deepest_line(tmp_path):
    path = tmp_path / "llava.json"
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text("[\n" + json.dumps({"conversations": _conversation()}) + ",\n" + deep + "\n]")
    with pytest.raises(ValueError, match=r"llava\.json: line 3: JSON nested too deeply to read"):
        load_llava_json(path)


def test_malformed_jsonl_line_reports_line_and_column(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(QA) + "\n\n" + '  {"question": "q", "answer": "a",}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: line 3, column 35: invalid JSON: Expecting property name"):
        load_jsonl(path)


def test_malformed_json_lines_in_a_llava_file_report_line_and_column(tmp_path):
    path = tmp_path / "llava.json"
    good = json.dumps({"conversations": _conversation()})
    path.write_text(good + "\n" + good + "\n" + '{"conversations": [}\n')
    with pytest.raises(ValueError, match=r"llava\.json: line 3, column 20: invalid JSON: Expecting value"):
        load_llava_json(path)


def test_malformed_pretty_printed_llava_json_reports_line_and_column(tmp_path):
    path = tmp_path / "llava.json"
    path.write_text('[\n  {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},\n'
                    '  {"conversations": [}\n]\n')
    with pytest.raises(ValueError, match=r"llava\.json: line 3, column 22: invalid JSON: Expecting value"):
        load_llava_json(path)


def test_non_utf8_jsonl_line_is_named(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(QA).encode() + b"\n" + b'{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2: not UTF-8 text"):
        load_jsonl(path)


# ------------------------------------------------------------------------------- collator errors name the line
def test_bad_llava_record_is_named_by_its_entry_in_the_collator(tmp_path, image_dir, collator):
    path = _write_llava(tmp_path, [{"id": "a", "image": "digit_0.png", "conversations": _conversation()},
                                   {"id": "b", "image": "digit_1.png", "conversations": _conversation(" ")}])
    records = load_llava_json(path, image_dir)
    with pytest.raises(ValueError, match=r"llava\.json: entry 1 \(id='b'\): empty answer"):
        collator(records[::-1])  # first in the batch: the error names its place in the file, not in the batch


def test_unreadable_image_found_by_the_collator_is_named_by_its_jsonl_line(tmp_path, image_dir, collator):
    whole = (image_dir / "digit_3.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    path = _write_jsonl(tmp_path, [{"image": "cut.png", **QA}])
    records = load_jsonl(path, tmp_path, decode_images=False)
    with pytest.raises(ValueError, match=r"data\.jsonl: line 1: unreadable image"):
        collator(records)


def test_seq2seq_batch_names_the_dataset_line(tmp_path, image_dir, tokenizer, image_processor):
    path = _write_llava(tmp_path, [{"id": "q", "image": "digit_0.png", "conversations": _conversation()[:1]}])
    records = load_llava_json(path, image_dir)
    seq2seq = MemVPDataCollator(tokenizer, image_processor, max_length=64, seq2seq=True)
    with pytest.raises(ValueError, match=r"llava\.json: entry 0 \(id='q'\): conversation must alternate"):
        seq2seq(records)


def test_infer_refuses_question_images_outside_image_folder_unless_allowed(tmp_path, image_dir, capsys):
    from memvp_peft.cli.infer import main as infer_main

    questions = _write_jsonl(tmp_path, [{"image": str(image_dir / "digit_0.png"), "question": "q"}], name="q.jsonl")
    argv = ["--adapter", str(tmp_path / "no_adapter"), "--input_file", str(questions)]
    assert infer_main(argv) == 2  # the questions are read before any model: the adapter's absence comes later
    assert "q.jsonl: line 1: image path" in capsys.readouterr().err
    assert infer_main(argv + ["--allow_outside_image_folder"]) == 2
    error = capsys.readouterr().err
    assert "outside image_folder" not in error and "no_adapter" in error


@pytest.mark.parametrize("limit", [0, -5, 1.5, True])
def test_max_image_pixels_that_is_not_a_positive_int_is_refused(tmp_path, limit):
    path = _write_jsonl(tmp_path, [QA])
    with pytest.raises(ValueError, match=r"max_image_pixels must be a positive int or None"):
        load_jsonl(path, max_image_pixels=limit)
