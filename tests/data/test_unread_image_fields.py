"""An image the collator would not use is refused, never trained text-only: video fields, two image fields at once,
images embedded in typed content, a collator without an image processor."""

import numpy as np
import pytest
from data_fixtures import collator, image_processor, tokenizer  # noqa: F401  (fixtures are used by name)

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
