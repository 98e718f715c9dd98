"""A record whose images sit in a field the collator does not read is refused, never trained text-only."""

import numpy as np
import pytest
from data_fixtures import collator, image_processor, tokenizer  # noqa: F401  (fixtures are used by name)


@pytest.mark.parametrize("field", ["images", "pixel_values", "image_features", "video"])
def test_a_record_with_images_in_an_unread_field_is_refused(collator, field):  # noqa: F811
    record = {field: [np.zeros((8, 8))], "question": "What digit?", "answer": "seven"}
    with pytest.raises(ValueError, match=rf"has \['{field}'\] but MemVPDataCollator reads .* 'image' field only"):
        collator([record])


def test_a_record_with_the_image_field_still_collates(collator):  # noqa: F811
    batch = collator([{"image": np.zeros((8, 8)), "question": "What digit?", "answer": "seven"}])
    assert bool(batch["image_mask"].all())
