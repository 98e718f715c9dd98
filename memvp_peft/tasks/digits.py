"""The built-in `digits` task's images as visual tokens, for the embedded model that has no vision encoder.

`digits` is scikit-learn's 1,797 real 8x8 scans of handwritten digits, posed as visual question answering
("What digit is shown ?" -> "7"). With the embedded model it needs no vision encoder: each image becomes 16 visual
tokens, one per 2x2-pixel patch (the patch's 4 pixels plus its row/column), which play the role of CLIP patch
features -- `DigitPatchFeaturizer` for the collator (any image), `digit_scan_tokens` for the raw scans (the benchmark
and the example). Both go through `digit_patch_tokens`, so the tokens are the same either way.

Polarity: the scans are light ink on a dark background (ink high), while a digit drawn or photographed on paper is
dark on light. The model only ever learns one polarity, so -- as any digit reader does -- `digit_patch_tokens` brings
every image to the scans' polarity first (`ink_high`): an image whose border (the background) is clearly brighter
than the image on average is inverted. No scikit-learn scan is inverted by this rule (their border is darker than
their mean by 0.18 or more of full scale; inverted, brighter by as much), nor any digits-grid overview.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "DIGIT_PATCH_DIM",
    "DIGIT_PATCH_TOKENS",
    "DIGIT_QUESTION",
    "DigitPatchFeaturizer",
    "digit_patch_tokens",
    "digit_scan_tokens",
    "ink_high",
]

DIGIT_QUESTION = "What digit is shown ?"
DIGIT_PATCH_DIM = 6
DIGIT_PATCH_TOKENS = 16


#: How much brighter than the image's mean its border must be for `ink_high` to invert it: a flat image (a blank
#: frame, compression noise) has no polarity and is left as it is.
POLARITY_MARGIN = 0.05


def ink_high(image: np.ndarray) -> np.ndarray:
    """A grey image in [0, 1] in the scans' polarity, light ink on a dark background: inverted when the median of its
    border pixels (the background) is brighter than the whole image's mean by more than `POLARITY_MARGIN`, i.e. when
    it is drawn dark on light."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    return 1.0 - image if np.median(border) > image.mean() + POLARITY_MARGIN else image


def digit_patch_tokens(image: np.ndarray) -> np.ndarray:
    """(8, 8) grey image in [0, 1] -> (16, 6): each 2x2 patch's pixels (in the scans' polarity, `ink_high`) followed
    by its (row, column) in [0, 1]."""
    patches = ink_high(image).reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(16, 4)
    rows, cols = np.divmod(np.arange(16), 4)
    position = np.stack([rows, cols], axis=1) / 3.0
    return np.concatenate([patches, position], axis=1).astype(np.float32)


def digit_scan_tokens(scans: np.ndarray) -> torch.Tensor:
    """scikit-learn digit scans `(M, 8, 8)` with pixels in 0..16 -> visual tokens `(M, 16, 6)`.

    The patch position is part of each token (like a vision encoder's positional embedding), so the projector alone
    can tell where a stroke is; MemVP's per-slot position embeddings p_k/p_v add their own on top.
    """
    return torch.from_numpy(np.stack([digit_patch_tokens(scan.astype(np.float32) / 16.0) for scan in scans]))


class DigitPatchFeaturizer:
    """An image-processor-shaped callable returning `image_features` (B, 16, 6) for any image (resized to 8x8; a
    digit drawn dark on light is read like a scan, light on dark: `ink_high`)."""

    def __call__(self, images: list, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        from PIL import Image

        tokens = []
        for image in images:
            grey = image.convert("L").resize((8, 8), Image.BILINEAR)
            tokens.append(digit_patch_tokens(np.asarray(grey, dtype=np.float32) / 255.0))
        return {"pixel_values": torch.from_numpy(np.stack(tokens))}
