"""`MemVPDataCollator.check_records`: a whole dataset read as its batches will read it, before any training -- a record
a batch would refuse is refused here, named by its place in the dataset, and the most image slots a record fills is
what the memory must hold."""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from data_fixtures import collator, digits, image_dir, image_processor, tokenizer  # noqa: F401  (used by name)

from memvp_peft.data import MemVPDataCollator
from memvp_peft.data.conversations import ORIGIN_FIELD

datasets.disable_progress_bars()

Q = {"question": "What digit is shown in the image ?", "answer": "two"}


def _rows(digits, count: int = 6) -> list:  # noqa: F811
    images, _ = digits
    return [dict(Q, image=images[i]) for i in range(count)]


def test_a_record_a_batch_would_refuse_is_named_by_its_place_in_the_dataset(collator, digits):  # noqa: F811
    rows = _rows(digits)
    rows[4] = {"question": "What digit is shown in the image ?", "image": digits[0][4]}  # no answer
    with pytest.raises(ValueError, match=r"^record 4\b"):
        collator.check_records(rows)


def test_a_dataset_mixing_raw_images_and_precomputed_tensors_is_refused_though_no_batch_need_hold_both(
        collator, digits):  # noqa: F811
    rows = _rows(digits)
    rows[5] = dict(Q, pixel_values=torch.zeros(3, 32, 32))
    for index in range(len(rows)):  # one record at a time, every batch is fine
        collator(rows[index:index + 1])
    with pytest.raises(ValueError, match=r"mixes raw images \(record 0: 'image'\) with precomputed tensors "
                                         r"\(record 5: 'pixel_values'\)"):
        collator.check_records(rows)


def test_the_most_image_slots_of_a_record_and_its_name_come_back(collator, digits):  # noqa: F811
    images, _ = digits
    rows = _rows(digits) + [dict(Q, images=[images[0], images[1], images[2]], id="three"), dict(Q)]
    assert collator.check_records(rows) == (3, "record 6 (id='three')")
    assert collator.check_records([dict(Q), dict(Q)]) == (0, None)


def test_tiles_count_as_the_slots_they_fill(tokenizer, image_processor, digits):  # noqa: F811
    tiling = MemVPDataCollator(tokenizer, image_processor, image_grid=(2, 2))
    assert tiling.check_records(_rows(digits, 2)) == (5, "record 0")  # the overview and 2 x 2 tiles


def test_a_datasets_row_that_cannot_be_decoded_is_named_by_its_origin(collator, digits):  # noqa: F811
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    good = buffer.getvalue()
    rows = [{"image": {"bytes": good if i != 2 else good[:30], "path": None}, **Q, ORIGIN_FIELD: f"scans row {i}"}
            for i in range(4)]
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), ORIGIN_FIELD: datasets.Value("string")})
    dataset = datasets.Dataset.from_list(rows, features=features)
    with pytest.raises(ValueError, match=r"^scans row 2: the row cannot be read: "):
        collator.check_records(dataset)
