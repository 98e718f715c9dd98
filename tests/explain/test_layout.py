"""A slot's weight lands on exactly the region of the image its visual token came from, in every layout: a synthetic
map whose only non-zero slot is known lights that region and nothing else, and keeps its weight."""

from __future__ import annotations

import numpy as np
import pytest

from memvp_peft import MemVPConfig
from memvp_peft.explain import ImageGeometry, box_share, image_maps, slot_layout


def lit(config, geometries, tokens, slot, size, frames=False):
    """The pixels (of image maps of `size`) lit by a weight of 1 on `slot` alone, per image."""
    layout = slot_layout(config, geometries, tokens, frames=frames)
    weights = np.zeros(layout.num_slots)
    weights[slot] = 1.0
    maps = image_maps(weights, layout, [size] * len(geometries))
    assert sum(m.sum() for m in maps) == pytest.approx(1.0)  # the weight is kept
    return [m > 0 for m in maps], layout


def region(size, rows, cols):
    mask = np.zeros(size, dtype=bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_a_patch_of_the_grid_lights_its_own_cell():
    config = MemVPConfig(visual_dim=6, num_memory_slots=20)
    (mask,), layout = lit(config, [ImageGeometry(8, 8)], 16, 6, (8, 8))  # row 1, column 2 of the 4x4 grid
    assert np.array_equal(mask, region((8, 8), (2, 4), (4, 6)))
    assert layout.regions[16:] == [None] * 4  # the learned slots read no image


def test_a_cls_token_covers_the_whole_image_and_shifts_the_patches():
    config = MemVPConfig(visual_dim=6, num_memory_slots=20, vision_feature_select_strategy="full")
    (whole,), _ = lit(config, [ImageGeometry(8, 8)], 17, 0, (8, 8))
    (cell,), _ = lit(config, [ImageGeometry(8, 8)], 17, 1 + 6, (8, 8))
    assert whole.all() and np.array_equal(cell, region((8, 8), (2, 4), (4, 6)))


def test_a_tile_patch_lights_its_part_of_that_tile():
    config = MemVPConfig(visual_dim=6, num_memory_slots=100, image_grid=[2, 2])
    # block 2 = tile (0, 1), the top right; its token 0 = its top-left patch
    (mask,), layout = lit(config, [ImageGeometry(16, 16)], 16, 2 * 16, (16, 16))
    assert np.array_equal(mask, region((16, 16), (0, 2), (8, 10)))
    assert layout.regions[32].block == "tile 0,1"
    (overview,), _ = lit(config, [ImageGeometry(16, 16)], 16, 15, (16, 16))  # the overview's bottom-right patch
    assert np.array_equal(overview, region((16, 16), (12, 16), (12, 16)))
    assert box_share(np.eye(100)[2 * 16 + 5], layout, 0, (0.0, 0.5, 0.5, 1.0)) == pytest.approx(1.0)


def test_a_tile_patch_on_the_canvas_padding_reads_no_image():
    config = MemVPConfig(visual_dim=6, num_memory_slots=100, image_grid=[2, 2])
    layout = slot_layout(config, [ImageGeometry(12, 16)], 16)  # padded to a 16x16 canvas, 2 columns each side
    assert layout.regions[16] is None  # tile (0, 0), token 0: the canvas's left padding
    assert layout.regions[17].left == 0.0 and layout.regions[17].inside == 1.0  # token 1: the image's first columns
    half = slot_layout(config, [ImageGeometry(13, 16)], 16).regions[16]  # 1 column of padding, then the image
    assert half.left == 0.0 and half.right == pytest.approx(1 / 13) and half.inside == pytest.approx(0.5)


def test_a_frame_patch_lights_only_that_frame():
    config = MemVPConfig(visual_dim=6, num_memory_slots=160, num_frames=8)
    masks, layout = lit(config, [ImageGeometry(8, 8)] * 8, 16, 3 * 16 + 15, (8, 8), frames=True)
    assert np.array_equal(masks[3], region((8, 8), (6, 8), (6, 8)))
    assert not any(mask.any() for index, mask in enumerate(masks) if index != 3)
    assert layout.regions[3 * 16].block == "frame 3: image"


def test_a_pooled_slot_lights_its_pooled_cell():
    config = MemVPConfig(visual_dim=6, num_memory_slots=8, pool_kernel=2)
    (mask,), layout = lit(config, [ImageGeometry(8, 8)], 16, 3, (8, 8))
    assert np.array_equal(mask, region((8, 8), (4, 8), (4, 8)))
    assert sum(r is not None for r in layout.regions) == 4


def test_adaptive_pooling_cells_overlap_as_adaptive_pooling_does():
    config = MemVPConfig(visual_dim=6, num_memory_slots=9, pool_tokens=9)
    (mask,), _ = lit(config, [ImageGeometry(8, 8)], 16, 4, (8, 8))  # the centre of 3x3 cells over 4x4 patches
    assert np.array_equal(mask, region((8, 8), (2, 6), (2, 6)))


def test_multiscale_slots_light_their_own_scale():
    config = MemVPConfig(visual_dim=6, num_memory_slots=20, multiscale_tokens=[16, 4])
    (fine,), _ = lit(config, [ImageGeometry(8, 8)], 16, 0, (8, 8))
    (coarse,), _ = lit(config, [ImageGeometry(8, 8)], 16, 16 + 1, (8, 8))
    assert np.array_equal(fine, region((8, 8), (0, 2), (0, 2)))
    assert np.array_equal(coarse, region((8, 8), (0, 4), (4, 8)))


def test_the_second_image_of_a_row_gets_the_second_block():
    config = MemVPConfig(visual_dim=6, num_memory_slots=40)
    masks, _ = lit(config, [ImageGeometry(8, 8), ImageGeometry(8, 8)], 16, 16, (8, 8))
    assert not masks[0].any() and np.array_equal(masks[1], region((8, 8), (0, 2), (0, 2)))
    assert slot_layout(config, [None, ImageGeometry(8, 8)], 16).regions[:16] == [None] * 16  # an empty image slot


def test_a_center_cropped_wide_image_maps_to_its_middle_square():
    config = MemVPConfig(visual_dim=6, num_memory_slots=16)
    (mask,), _ = lit(config, [ImageGeometry(16, 8, "crop")], 16, 0, (8, 16))
    assert np.array_equal(mask, region((8, 16), (0, 2), (4, 6)))


def test_a_block_that_is_no_grid_is_refused():
    with pytest.raises(ValueError, match="no g x g"):
        slot_layout(MemVPConfig(visual_dim=6, num_memory_slots=20), [ImageGeometry(8, 8)], 15)
