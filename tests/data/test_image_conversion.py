"""Tests of memvp_peft.data.to_rgb_image: every accepted form of an image -> one RGB PIL image, one behaviour each."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import digits, image_dir  # noqa: F401  (fixtures are used by name)

from memvp_peft.data import to_rgb_image


@pytest.fixture
def digit_scan(digits):
    """An 8x8 float64 scikit-learn digit, pixels in 0..16."""
    images, _ = digits
    return images[0]


@pytest.fixture
def digit_png(image_dir):
    """The PNG file of digit 3 and its pixels as read from the path."""
    path = image_dir / "digit_3.png"
    return path, np.asarray(to_rgb_image(str(path)))


def test_a_grey_float_array_becomes_an_rgb_uint8_image_of_the_same_size(digit_scan):
    converted = np.asarray(to_rgb_image(digit_scan))
    assert converted.shape == (8, 8, 3) and converted.dtype == np.uint8


def test_an_array_of_unknown_range_is_stretched_to_full_scale(digit_scan):
    assert np.asarray(to_rgb_image(digit_scan)).max() == 255


def test_a_grey_array_gives_three_equal_channels(digit_scan):
    converted = np.asarray(to_rgb_image(digit_scan))
    assert (converted[..., 0] == converted[..., 1]).all()


def test_array_value_range_scales_linearly_from_that_range(digit_scan):
    fixed = np.asarray(to_rgb_image(digit_scan, array_value_range=(0, 16)))
    np.testing.assert_array_equal(fixed[..., 0], np.rint(digit_scan / 16 * 255).astype(np.uint8))


def test_an_all_zero_array_stays_black():
    assert np.asarray(to_rgb_image(np.zeros((4, 4)))).max() == 0


def test_a_channels_first_array_is_moved_to_channels_last():
    chw = np.asarray(to_rgb_image(np.random.default_rng(0).random((3, 5, 6))))
    assert chw.shape == (5, 6, 3)


def test_encoded_bytes_decode_to_the_pixels_of_the_file(digit_png):
    path, from_file = digit_png
    np.testing.assert_array_equal(np.asarray(to_rgb_image(path.read_bytes())), from_file)


def test_an_undecoded_datasets_image_dict_with_bytes_is_decoded(digit_png):
    path, from_file = digit_png
    np.testing.assert_array_equal(np.asarray(to_rgb_image({"bytes": path.read_bytes(), "path": None})), from_file)


def test_a_datasets_image_dict_with_only_a_path_resolves_it_against_image_folder(digit_png, image_dir):
    _, from_file = digit_png
    converted = to_rgb_image({"bytes": None, "path": "digit_3.png"}, image_dir)
    np.testing.assert_array_equal(np.asarray(converted), from_file)


def test_undecodable_bytes_are_a_value_error():
    with pytest.raises(ValueError, match="cannot decode"):
        to_rgb_image(b"garbage")


def test_a_missing_file_is_file_not_found(image_dir):
    with pytest.raises(FileNotFoundError):
        to_rgb_image("nope.png", image_dir)


def test_an_array_with_nan_is_a_value_error():
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_image(np.full((4, 4), np.nan))


def test_an_array_of_unsupported_shape_is_a_value_error_naming_the_shape():
    with pytest.raises(ValueError, match="shape"):
        to_rgb_image(np.zeros((2, 4, 4, 4)))
