"""Where a record's images come from: `image` or `images` (one or a list; PIL, paths, bytes, numpy, `datasets.Image`
decoded or not) and precomputed `pixel_values` / `image_features` tensors, from real `datasets.Dataset` rows."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from data_fixtures import (  # noqa: F401  (fixtures are used by name)
    IMAGE_SIDE,
    collator,
    digits,
    image_dir,
    image_processor,
    tokenizer,
)

from memvp_peft.data import MemVPDataCollator

datasets.disable_progress_bars()

Q = {"question": "What digit ?", "answer": "two"}


@pytest.fixture(scope="module")
def reference(image_dir, image_processor):  # noqa: F811
    """The pixel values of digit_3.png as the processor makes them from the file."""
    from PIL import Image

    with Image.open(image_dir / "digit_3.png") as image:
        return image_processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]


def _image_dataset(image_dir, decode):  # noqa: F811
    path = str(image_dir / "digit_3.png")
    dataset = datasets.Dataset.from_dict({"image": [path], "images": [[path, path]], **{k: [v] for k, v in Q.items()}})
    return dataset.cast_column("image", datasets.Image(decode=decode)).cast_column(
        "images", datasets.Sequence(datasets.Image(decode=decode)))


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "undecoded"])
def test_a_datasets_image_column_is_read_from_image(collator, image_dir, reference, decode):
    row = _image_dataset(image_dir, decode).remove_columns("images")[0]
    batch = collator([row])
    assert batch["image_mask"].tolist() == [True] and torch.equal(batch["pixel_values"][0], reference)


@pytest.mark.parametrize("decode", [True, False], ids=["decoded", "undecoded"])
def test_a_datasets_images_list_is_read_from_images(collator, image_dir, reference, decode):
    row = _image_dataset(image_dir, decode).remove_columns("image")[0]
    batch = collator([row])
    assert batch["image_mask"].tolist() == [[True, True]] and torch.equal(batch["pixel_values"][0, 1], reference)


def test_one_image_under_images_gives_the_single_image_layout(collator, digits):
    images, _ = digits
    assert collator([dict(Q, images=images[0])])["pixel_values"].shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE)


def test_a_none_entry_leaves_its_slot_empty_and_the_next_image_keeps_its_own(collator, image_dir, reference):
    path = str(image_dir / "digit_3.png")
    batch = collator([dict(Q, images=[None, path]), dict(Q, images=[path, path])])
    assert batch["image_mask"].tolist() == [[False, True], [True, True]]
    assert not batch["pixel_values"][0, 0].any() and torch.equal(batch["pixel_values"][0, 1], reference)


def test_a_datasets_list_with_a_missing_image_keeps_the_slots(collator, image_dir, reference):
    dataset = datasets.Dataset.from_dict({"images": [[None, str(image_dir / "digit_3.png")]],
                                          **{k: [v] for k, v in Q.items()}})
    row = dataset.cast_column("images", datasets.Sequence(datasets.Image()))[0]
    batch = collator([row])
    assert batch["image_mask"].tolist() == [[False, True]] and torch.equal(batch["pixel_values"][0, 1], reference)


def test_a_none_entry_of_a_tiled_record_leaves_all_its_blocks_empty(tokenizer, image_processor, digits):  # noqa: F811
    scans, _ = digits
    grid = np.block([[scans[0], scans[1]], [scans[2], scans[3]]])
    tiling = MemVPDataCollator(tokenizer, image_processor, image_grid=(2, 2), array_value_range=(0, 16))
    assert tiling([dict(Q, images=[None, grid])])["image_mask"].tolist() == [[False] * 5 + [True] * 5]


def test_a_none_entry_counts_as_a_slot_against_num_images(tokenizer, image_processor, digits):  # noqa: F811
    collator = MemVPDataCollator(tokenizer, image_processor, num_images=1)
    with pytest.raises(ValueError, match=r"record 0: has 2 images but num_images=1 \(a None entry of a list keeps its slot\)"):
        collator([dict(Q, images=[None, digits[0][0]])])


@pytest.mark.parametrize("form", ["path", "bytes", "pil", "numpy"])
def test_every_image_form_in_images_gives_the_same_pixels(collator, image_dir, reference, form):
    from PIL import Image

    path = image_dir / "digit_3.png"
    value = {"path": str(path), "bytes": path.read_bytes(), "pil": Image.open(path),
             "numpy": np.asarray(Image.open(path))}[form]
    assert torch.equal(collator([dict(Q, images=[value])])["pixel_values"][0, 0], reference)


# ---------------------------------------------------------------------------------------------------------- precomputed
def test_precomputed_pixel_values_from_a_dataset_row_go_into_the_batch_as_they_are(collator, reference):
    row = datasets.Dataset.from_dict({"pixel_values": [reference.tolist()], **{k: [v] for k, v in Q.items()}})[0]
    assert isinstance(row["pixel_values"], list)  # nested lists, as a datasets row without a format gives them
    batch = collator([row])
    assert batch["image_mask"].tolist() == [True] and torch.equal(batch["pixel_values"][0], reference)


def test_several_precomputed_images_per_row_give_the_multi_image_layout(collator, reference):
    stacked = torch.stack([reference, torch.zeros_like(reference) + 0.5])
    batch = collator([dict(Q, pixel_values=stacked), dict(Q, pixel_values=reference.numpy())])
    assert batch["pixel_values"].shape == (2, 2, 3, IMAGE_SIDE, IMAGE_SIDE)
    assert batch["image_mask"].tolist() == [[True, True], [True, False]]
    assert torch.equal(batch["pixel_values"][1, 0], reference)


def test_precomputed_image_features_need_no_image_processor(tokenizer):  # noqa: F811
    features = torch.randn(2, 5, 16)  # two images of 5 tokens each
    collator = MemVPDataCollator(tokenizer, None, image_input_name="image_features")
    batch = collator([dict(Q, image_features=features), dict(Q, image_features=None)])
    assert torch.equal(batch["image_features"][0], features)
    assert batch["image_mask"].tolist() == [[True, True], [False, False]]


def test_a_text_only_batch_after_precomputed_ones_keeps_their_shape(tokenizer):  # noqa: F811
    collator = MemVPDataCollator(tokenizer, None, image_input_name="image_features")
    collator([dict(Q, image_features=torch.randn(5, 16))])
    batch = collator([Q])
    assert batch["image_features"].shape == (1, 5, 16) and batch["image_mask"].tolist() == [False]


def test_precomputed_features_in_a_pixel_values_collator_are_refused(collator):
    with pytest.raises(ValueError, match=r"record 0: has precomputed 'image_features' but this collator builds "
                                         r"'pixel_values'"):
        collator([dict(Q, image_features=torch.randn(5, 16))])


def test_a_batch_mixing_raw_images_and_precomputed_tensors_is_refused(collator, digits, reference):
    images, _ = digits
    with pytest.raises(ValueError, match=r"the batch mixes raw images \(record 0: 'image'\) with precomputed tensors "
                                         r"\(record 1: 'pixel_values'\)"):
        collator([dict(Q, image=images[0]), dict(Q, pixel_values=reference)])


def test_precomputed_tensors_of_different_shapes_are_refused(tokenizer):  # noqa: F811
    collator = MemVPDataCollator(tokenizer, None, image_input_name="image_features")
    with pytest.raises(ValueError, match=r"record 0 gives \(5, 16\) and record 1 gives \(4, 16\)"):
        collator([dict(Q, image_features=torch.randn(5, 16)), dict(Q, image_features=torch.randn(4, 16))])


@pytest.mark.parametrize("value, message", [
    (torch.randn(16), r"'image_features' has shape \(16,\)"),
    (torch.ones(5, 16, dtype=torch.long), r"must hold floating point values, got dtype torch.int64"),
    ([[1.0, 2.0], [3.0]], r"is not a rectangular array of numbers"),
])
def test_unusable_precomputed_tensors_are_refused(tokenizer, value, message):  # noqa: F811
    collator = MemVPDataCollator(tokenizer, None, image_input_name="image_features")
    with pytest.raises(ValueError, match=message):
        collator([dict(Q, image_features=value)])


def test_precomputed_features_of_a_dataset_train_the_memvp_projector_through_the_trainer(tmp_path, tokenizer):  # noqa: F811
    """The end-to-end point of reading `image_features`: before, such a column trained text-only (projector frozen
    in effect); now the Trainer's batches carry it and the projector's weights move."""
    from conftest import VISUAL_DIM, memvp_config, tiny_llama
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    rows = {"image_features": [torch.randn(5, VISUAL_DIM, generator=generator).tolist() for _ in range(4)],
            "messages": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What digit ?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "two"}]}]] * 4}
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), memvp_config())
    projector = model.base_model.memvp_memory["default"].projector[0].weight
    before = projector.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                             remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    collator = MemVPDataCollator(tokenizer, None, image_input_name="image_features")
    Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows), data_collator=collator).train()
    assert not torch.equal(before, projector.detach())
