"""The built-in digits task's featurizer (`memvp_peft.tasks.digits`) reads a digit in either polarity: real
scikit-learn scans (light ink on dark) and digits drawn dark on light give the same visual tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from memvp_peft.tasks.digits import DigitPatchFeaturizer, digit_patch_tokens, digit_scan_tokens


@pytest.fixture(scope="module")
def scans():
    from sklearn.datasets import load_digits

    return load_digits().images  # (1797, 8, 8), ink high, 0..16


def _grey(pixels: np.ndarray, size: int = 8) -> Image.Image:
    return Image.fromarray(np.rint(pixels * 255).astype(np.uint8), mode="L").resize((size, size), Image.NEAREST)


@pytest.mark.parametrize("size", [8, 64])
def test_a_digit_drawn_dark_on_light_gives_the_tokens_of_the_scan(scans, size):
    light_on_dark = [_grey(scan / 16.0, size) for scan in scans[:20]]
    dark_on_light = [_grey(1.0 - scan / 16.0, size) for scan in scans[:20]]
    featurize = DigitPatchFeaturizer()
    expected = featurize(light_on_dark)["pixel_values"]
    torch.testing.assert_close(featurize(dark_on_light)["pixel_values"], expected, atol=1.5 / 255, rtol=0)
    if size == 8:
        torch.testing.assert_close(expected, digit_scan_tokens(scans[:20]), atol=1 / 255, rtol=0)


def test_no_scan_is_inverted(scans):
    pixels = np.stack([digit_patch_tokens(scan / 16.0)[:, :4] for scan in scans])
    patches = (scans / 16.0).reshape(-1, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 16, 4)
    np.testing.assert_allclose(pixels, patches, atol=1e-6)


def test_a_flat_grey_image_is_not_inverted():
    flat = np.full((8, 8), 0.5)
    flat[3:5, 3:5] = 0.48  # compression noise on a blank frame: the border a shade brighter than the mean
    np.testing.assert_allclose(digit_patch_tokens(flat)[:, :4].mean(), flat.mean(), atol=1e-6)
