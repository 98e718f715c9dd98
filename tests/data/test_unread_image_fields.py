"""An image the collator would not use is refused, never trained text-only: video fields, two image fields at once,
images embedded in typed content, a collator without an image processor, images under a name it does not read, text
that marks images the record does not give -- and a collator whose first training records carry no image warns."""

import warnings

import numpy as np
import pytest
from data_fixtures import collator, digits, image_dir, image_processor, tokenizer  # noqa: F401  (fixtures by name)

from memvp_peft.data import MemVPDataCollator


@pytest.mark.parametrize("field", ["video", "videos", "frames"])
def test_a_record_with_video_is_refused(collator, field):  # noqa: F811
    record = {field: [np.zeros((8, 8))], "question": "What digit?", "answer": "seven"}
    with pytest.raises(ValueError, match=rf"has \['{field}'\] but MemVPDataCollator does not read video"):
        collator([record])


def test_a_record_with_both_image_and_images_is_refused(collator):  # noqa: F811
    record = {"image": np.zeros((8, 8)), "images": [np.ones((8, 8))], "question": "What digit?", "answer": "seven"}
    with pytest.raises(ValueError, match=r"record 0: has images in several fields \['image', 'images'\]"):
        collator([record])


def test_a_record_with_raw_images_and_precomputed_pixel_values_is_refused(collator):  # noqa: F811
    record = {"image": np.zeros((8, 8)), "pixel_values": np.zeros((3, 32, 32), dtype=np.float32),
              "question": "What digit?", "answer": "seven"}
    with pytest.raises(ValueError, match=r"has images in several fields \['image', 'pixel_values'\]"):
        collator([record])


def test_an_image_carried_inside_typed_content_is_refused(collator):  # noqa: F811
    record = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": np.zeros((8, 8))}, {"type": "text", "text": "Digit?"}]},
        {"role": "assistant", "content": "seven"},
    ]}
    with pytest.raises(ValueError, match=r"message 0, content entry 0: the image entry carries the image itself"):
        collator([record])


def test_a_video_content_entry_is_refused(collator):  # noqa: F811
    record = {"messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]},
                           {"role": "assistant", "content": "a digit"}]}
    with pytest.raises(ValueError, match=r"content type 'video' is not read"):
        collator([record])


def test_a_collator_without_image_processor_refuses_raw_images(tokenizer):  # noqa: F811
    collator = MemVPDataCollator(tokenizer, None)
    with pytest.raises(ValueError, match=r"record 0, image 0: the record has an image but the collator has no "
                                         r"image_processor"):
        collator([{"images": [np.zeros((8, 8))], "question": "What digit?", "answer": "seven"}])


def test_a_record_with_the_image_field_still_collates(collator):  # noqa: F811
    batch = collator([{"image": np.zeros((8, 8)), "question": "What digit?", "answer": "seven"}])
    assert bool(batch["image_mask"].all())


# ------------------------------------------------------------------ images under a name the collator does not read
def _scan(digits, index=0):
    from PIL import Image

    images, _ = digits
    return Image.fromarray(np.rint(images[index] * (255.0 / 16.0)).astype(np.uint8), mode="L")


def test_an_image_in_a_field_the_collator_does_not_read_is_refused(collator, digits):  # noqa: F811
    record = {"img": _scan(digits), "question": "What digit?", "answer": "zero"}
    with pytest.raises(ValueError, match=r"record 0: \['img'\] hold images .* does not read.*--image_column"):
        collator([record])


def test_an_image_path_under_another_name_in_a_record_without_image_is_refused(collator):  # noqa: F811
    record = {"image_path": "scans/digit_0.png", "question": "What digit?", "answer": "zero"}
    with pytest.raises(ValueError, match=r"record 0: \['image_path'\] hold images \(or image file paths\)"):
        collator([record])


def test_a_path_like_field_beside_the_image_it_names_is_left_alone(collator, digits):  # noqa: F811
    record = {"image": _scan(digits), "file_name": "digit_0.png", "question": "What digit?", "answer": "zero"}
    assert collator([record])["image_mask"].tolist() == [True]


def test_a_bare_path_under_images_is_refused_not_read_character_by_character(collator, image_dir):  # noqa: F811
    record = {"images": str(image_dir / "digit_0.png"), "question": "What digit?", "answer": "zero"}
    with pytest.raises(ValueError, match=r"'images' holds one path .* where a list is expected"):
        collator([record])


# ------------------------------------------------------------------- marks in the text against the images given
_MARKED = {
    "simple": {"question": "<image>\nWhat digit?", "answer": "zero"},
    "multiple choice": {"question": "<image>\nWhat digit?", "choices": ["zero", "one"], "answer": 0},
    "LLaVA": {"conversations": [{"from": "human", "value": "<image>\nWhat digit?"}, {"from": "gpt", "value": "zero"}]},
    "messages": {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit?"}]},
                              {"role": "assistant", "content": "zero"}]},
    "prompt/completion": {"prompt": [{"role": "user", "content": "<image>What digit?"}],
                          "completion": [{"role": "assistant", "content": "zero"}]},
    "the_cauldron": {"texts": [{"user": "<image>What digit?", "assistant": "zero"}]},
}


@pytest.mark.parametrize("layout", list(_MARKED))
def test_text_that_marks_an_image_the_record_does_not_give_is_refused_in_every_layout(layout, collator):  # noqa: F811
    with pytest.raises(ValueError, match=r"record 0: its text marks 1 images .* gives 0.*--image_column"):
        collator([_MARKED[layout]])


@pytest.mark.parametrize("layout", list(_MARKED))
def test_two_marks_for_one_image_are_refused_in_every_layout(layout, collator, digits):  # noqa: F811
    import json

    twice = json.loads(json.dumps(_MARKED[layout]).replace("<image>", "<image><image>").replace(
        '{"type": "image"}', '{"type": "image"}, {"type": "image"}'))
    with pytest.raises(ValueError, match=r"record 0: its text marks 2 images .* but the record gives 1"):
        collator([{**twice, "images": [_scan(digits)]}])


@pytest.mark.parametrize("layout", list(_MARKED))
def test_one_mark_for_one_image_collates_in_every_layout(layout, collator, digits):  # noqa: F811
    assert collator([{**_MARKED[layout], "images": [_scan(digits)]}])["image_mask"].tolist() == [[True]]


# ------------------------------------------------------------------ a training epoch whose batches carry no image
def test_a_collator_warns_once_when_its_first_training_records_carry_no_image(collator):  # noqa: F811
    from memvp_peft.data.collator import TEXT_ONLY_WARNING_RECORDS

    batch = [{"question": "What digit?", "answer": "zero"}] * 8
    with pytest.warns(UserWarning, match=rf"the first {TEXT_ONLY_WARNING_RECORDS} training records carried no image"):
        for _ in range(TEXT_ONLY_WARNING_RECORDS // 8):
            collator(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collator(batch)  # said once


def test_a_collator_that_has_seen_an_image_stays_quiet_on_text_only_batches(collator, digits):  # noqa: F811
    from memvp_peft.data.collator import TEXT_ONLY_WARNING_RECORDS

    collator([{"image": _scan(digits), "question": "What digit?", "answer": "zero"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(TEXT_ONLY_WARNING_RECORDS // 8 + 1):
            collator([{"question": "What digit?", "answer": "zero"}] * 8)


def test_a_collator_without_image_processor_never_warns_about_text_only_batches(tokenizer):  # noqa: F811
    from memvp_peft.data.collator import TEXT_ONLY_WARNING_RECORDS

    text_only = MemVPDataCollator(tokenizer, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(TEXT_ONLY_WARNING_RECORDS // 8 + 1):
            text_only([{"question": "What digit?", "answer": "zero"}] * 8)


# ------------------------------------------------------------------------------- refused when the dataset loads
def _jsonl(folder, rows, name="data.jsonl"):
    import json

    path = folder / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_jsonl_image_path_field_is_refused_when_the_file_loads(tmp_path, image_dir):  # noqa: F811
    from memvp_peft.tasks import load_jsonl

    path = _jsonl(tmp_path, [{"image_path": "digit_0.png", "question": "What digit?", "answer": "zero"}])
    with pytest.raises(ValueError, match=r"data\.jsonl: line 1: \['image_path'\] hold images .*--image_column"):
        load_jsonl(path, image_dir)


def test_image_column_reads_the_images_of_another_field(tmp_path, image_dir, collator):  # noqa: F811
    from memvp_peft.tasks import load_jsonl

    path = _jsonl(tmp_path, [{"image_path": "digit_0.png", "question": "What digit?", "answer": "zero"}])
    records = load_jsonl(path, image_dir, image_column="image_path")
    assert records[0]["image"] == str(image_dir / "digit_0.png") and "image_path" not in records[0]
    assert collator(records)["image_mask"].tolist() == [True]


@pytest.mark.parametrize("field", [None, "Image"], ids=["no image field", "capitalised Image"])
def test_a_llava_image_marker_without_the_image_field_is_refused_when_the_file_loads(field, tmp_path,
                                                                                     image_dir):  # noqa: F811
    import json

    from memvp_peft.tasks import load_llava_json

    record = {"id": "a", "conversations": [{"from": "human", "value": "<image>\nWhat digit?"},
                                           {"from": "gpt", "value": "zero"}]}
    if field:
        record[field] = "digit_0.png"
    (tmp_path / "llava.json").write_text(json.dumps([record]))
    with pytest.raises(ValueError, match=r"llava\.json: entry 0 \(id='a'\): .*--image_column"):
        load_llava_json(tmp_path / "llava.json", image_dir)


def test_a_jsonl_question_marking_an_image_it_lacks_is_refused_when_the_file_loads(tmp_path):
    from memvp_peft.tasks import load_jsonl

    path = _jsonl(tmp_path, [{"question": "<image>\nWhat digit?", "answer": "zero"}])
    with pytest.raises(ValueError, match=r"data\.jsonl: line 1: its text marks 1 images .* gives 0"):
        load_jsonl(path)


def test_a_typed_image_column_under_another_name_is_refused_when_the_source_loads(tmp_path):
    from data_fixtures import digit_scans

    from memvp_peft.tasks.catalogue import load_task

    digit_scans(5, "What digit?", str).rename_column("image", "img").to_parquet(str(tmp_path / "rows.parquet"))
    with pytest.raises(ValueError, match=r"column 'img' holds images \(datasets.Image\) .* --image_column img"):
        load_task(str(tmp_path / "rows.parquet"), None, 0.2, seed=0)


def test_image_column_trains_on_a_typed_image_column_of_another_name(tmp_path, collator):  # noqa: F811
    from data_fixtures import digit_scans

    from memvp_peft.tasks.catalogue import load_task

    digit_scans(5, "What digit?", str).rename_column("image", "img").to_parquet(str(tmp_path / "rows.parquet"))
    task = load_task(str(tmp_path / "rows.parquet"), None, 0.2, seed=0, image_column="img")
    assert collator([task.train[0], task.train[1]])["image_mask"].tolist() == [True, True]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_training_records_without_any_image_are_refused_when_the_task_loads(suffix, tmp_path):
    import datasets

    from memvp_peft.tasks.catalogue import load_task

    rows = [{"question": "What digit?", "answer": "zero", "img_file": None}] * 5
    if suffix == "jsonl":
        path = _jsonl(tmp_path, rows)
    else:
        path = tmp_path / "rows.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"no training record gives an image .* --image_column \(the records' fields: "
                                         r"\['answer', .*'img_file', 'question'\]\)"):
        load_task(str(path), None, 0.2, seed=0)
