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


def _gradient_16_bit():
    """A full-range 16-bit grey gradient, 0 .. 65535 left to right."""
    return np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))


@pytest.mark.parametrize("source", ["pil", "png file"])
def test_a_16_bit_image_is_scaled_like_its_array_not_clipped_white(source, tmp_path):
    from PIL import Image

    gradient = _gradient_16_bit()
    image = Image.fromarray(gradient)  # mode I;16
    if source == "png file":
        image.save(tmp_path / "gradient.png")
        image = str(tmp_path / "gradient.png")
    converted = np.asarray(to_rgb_image(image))
    np.testing.assert_array_equal(converted, np.asarray(to_rgb_image(gradient)))
    assert converted.min() == 0 and converted.max() == 255


def test_a_32_bit_integer_image_is_scaled_like_its_array():
    from PIL import Image

    gradient = _gradient_16_bit().astype(np.int32) * 4
    converted = np.asarray(to_rgb_image(Image.fromarray(gradient, mode="I")))
    np.testing.assert_array_equal(converted, np.asarray(to_rgb_image(gradient)))


def test_a_float_image_in_0_1_is_scaled_like_its_array_not_left_black():
    from PIL import Image

    ramp = np.tile(np.linspace(0.0, 1.0, 16, dtype=np.float32), (4, 1))
    converted = np.asarray(to_rgb_image(Image.fromarray(ramp, mode="F")))
    np.testing.assert_array_equal(converted, np.asarray(to_rgb_image(ramp)))
    assert converted.max() == 255


def _drawing():
    """A black stroke on a fully transparent canvas (whose hidden colour is black, as drawing programs leave it)."""
    canvas = np.zeros((8, 8, 4), dtype=np.uint8)
    canvas[2:6, 3:5] = (0, 0, 0, 255)
    return canvas


def test_a_drawing_on_a_transparent_canvas_is_composited_over_white():
    from PIL import Image

    converted = np.asarray(to_rgb_image(Image.fromarray(_drawing(), mode="RGBA")))
    assert (converted[2:6, 3:5] == 0).all()
    assert (converted[:2] == 255).all() and (converted[:, :3] == 255).all()


def test_half_transparent_pixels_blend_with_white():
    from PIL import Image

    black_at_three_alphas = np.array([[[0, 0], [0, 255], [0, 128]]], dtype=np.uint8)  # (1, 3, grey + alpha)
    grey = np.asarray(to_rgb_image(Image.fromarray(black_at_three_alphas, mode="LA")))
    assert grey[0, :, 0].tolist() == [255, 0, 127]


def test_an_rgba_array_is_composited_over_white_like_the_pil_image():
    from PIL import Image

    from_array = np.asarray(to_rgb_image(_drawing()))
    assert (from_array[:2] == 255).all() and (from_array[2:6, 3:5] == 0).all()
    np.testing.assert_array_equal(from_array, np.asarray(to_rgb_image(Image.fromarray(_drawing(), mode="RGBA"))))


@pytest.mark.parametrize("value", [None, 7, {"label": 1}], ids=["None", "int", "dict"])
def test_what_is_no_image_is_refused_by_its_type_without_offering_none(value):
    """The refusal lists what an image may be; None is not one of them (a record's missing image is the caller's)."""
    with pytest.raises(ValueError, match=rf"got {type(value).__name__}$") as caught:
        to_rgb_image(value)
    assert "None" not in str(caught.value).rsplit("got", 1)[0]
