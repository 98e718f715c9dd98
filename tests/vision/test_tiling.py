"""AnyRes-style tiling of high-resolution pixel_values: the overview first, then the tiles row by row."""

from __future__ import annotations

import pytest
import torch

from memvp_peft.vision.tiling import blocks_per_image, encoder_image_size, tile_pixel_values


def quadrants(size: int = 4) -> torch.Tensor:
    """(1, 3, 2*size, 2*size): quadrant values 1 (top left), 2 (top right), 3 (bottom left), 4 (bottom right)."""
    image = torch.empty(1, 3, 2 * size, 2 * size)
    for index, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        image[..., r * size:(r + 1) * size, c * size:(c + 1) * size] = index + 1.0
    return image


def test_tiles_follow_the_overview_row_by_row():
    tiles = tile_pixel_values(quadrants(), [2, 2], 4)
    assert tiles.shape == (1, 5, 3, 4, 4)
    assert [tiles[0, k].unique().tolist() for k in range(1, 5)] == [[1.0], [2.0], [3.0], [4.0]]


def test_overview_is_the_whole_image_downscaled():
    overview = tile_pixel_values(quadrants(), [2, 2], 4)[0, 0, 0]
    assert overview[0, 0] < overview[0, -1] < overview[-1, -1]  # top left dark ... bottom right bright
    torch.testing.assert_close(overview.mean(), torch.tensor(2.5))


def test_a_rectangular_grid_tiles_rows_then_columns():
    image = torch.arange(6.0).reshape(1, 1, 2, 3).repeat_interleave(2, 2).repeat_interleave(2, 3).expand(1, 3, 4, 6)
    tiles = tile_pixel_values(image, [2, 3], 2)
    assert tiles.shape == (1, 7, 3, 2, 2)
    assert [tiles[0, k, 0, 0, 0].item() for k in range(1, 7)] == [0, 1, 2, 3, 4, 5]


def test_several_images_per_sample_are_tiled_each():
    images = torch.stack([quadrants()[0], quadrants()[0] * 10], dim=0)[None]  # (1, 2, 3, 8, 8)
    tiles = tile_pixel_values(images, [2, 2], 4)
    assert tiles.shape == (1, 10, 3, 4, 4)
    assert tiles[0, 6].unique().tolist() == [10.0] and tiles[0, 9].unique().tolist() == [40.0]


def test_encoder_sized_pixel_values_are_taken_as_tiles():
    tiles = torch.randn(2, 5, 3, 4, 4)
    assert tile_pixel_values(tiles, [2, 2], 4) is tiles


def test_another_size_is_refused_with_the_sizes_accepted():
    with pytest.raises(ValueError, match="tiles `pixel_values` of 8x8 pixels .* got 6x6"):
        tile_pixel_values(torch.randn(1, 3, 6, 6), [2, 2], 4)


def test_blocks_per_image_counts_the_overview():
    assert (blocks_per_image(None), blocks_per_image([2, 2]), blocks_per_image([3, 3])) == (1, 5, 10)


def test_encoder_image_size_reads_the_tower_config():
    from memvp_peft.demo_models import tiny_clip

    assert encoder_image_size(tiny_clip(image_size=32)) == 32
