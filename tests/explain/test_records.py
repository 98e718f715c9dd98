"""Records through a real (tiny) CLIP encoder: the slots of `pixel_values` land where the image processor and the
tiling put the image -- the centre crop of a wide image, and the padded canvas of a tiled one."""

from __future__ import annotations

import pytest
from PIL import Image
from peft import get_peft_model

from memvp_peft import MemVPConfig
from memvp_peft.data import MemVPDataCollator
from memvp_peft.demo_models import build_word_tokenizer, clip_image_processor, tiny_clip, tiny_llama
from memvp_peft.explain import explain_records


def explained(grid):
    tokenizer = build_word_tokenizer(["Question: what digit ?\nAnswer: seven"])
    config = MemVPConfig(visual_dim=32, num_memory_slots=90, vision_encoder=tiny_clip(hidden_size=32),
                         image_grid=grid, memory_dropout=0.0)
    model = get_peft_model(tiny_llama(tokenizer, hidden_size=64), config).eval()
    collator = MemVPDataCollator(tokenizer, clip_image_processor(32), image_grid=grid)
    record = {"image": Image.new("RGB", (60, 40), "white"), "question": "what digit ?"}
    (item,) = explain_records(model, collator, [record], ["seven"], tokenizer)
    return item


def test_a_wide_image_is_read_on_its_centre_crop():
    item = explained(None)
    regions = [region for region in item.layout.regions if region is not None]
    assert len(regions) == 16  # the tiny CLIP's 4x4 patches; the other 74 slots are learned memory
    assert min(r.left for r in regions) == pytest.approx(10 / 60) and max(r.right for r in regions) == pytest.approx(50 / 60)
    assert item.reads.slot_weights().shape == (len(item.token_texts), 90)


def test_a_tiled_wide_image_is_read_on_its_padded_canvas():
    item = explained([2, 2])
    regions = [region for region in item.layout.regions if region is not None]
    # overview + 4 tiles of 4x4 patches on a 60x60 canvas (10 rows of padding above and below the image): each tile's
    # outer row of patches (7.5 canvas rows) lies wholly on the padding and reads no image
    assert len(regions) == 5 * 16 - 4 * 4
    first = item.layout.regions[0]  # the overview's top-left patch: 15 canvas rows, the first 10 of them padding
    assert first.block == "overview" and first.bottom == pytest.approx(5 / 40) and first.inside == pytest.approx(1 / 3)
