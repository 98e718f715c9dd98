"""Every accepted form of an image -> one RGB ``PIL.Image``.

Records arrive with whatever their source holds: a file path (LLaVA, JSONL), encoded bytes or an undecoded
``datasets.Image`` dict (HF datasets), a numpy array in any value range (scikit-learn digits are floats 0..16), or a
PIL image already.  The image processor wants RGB PIL images, and a bad image should fail here, naming the file,
rather than deep inside the processor -- so all conversion and all decoding happens in :func:`to_rgb_image`.

Two kinds of image would go blank through Pillow's own ``convert("RGB")``, so they take another road:

* more than 8 bits per pixel (modes ``I;16*``, ``I``, ``F``: 16-bit PNGs and TIFFs, float images): Pillow clips
  their values to 0..255, so a full-range 16-bit image turns white and a 0..1 float image black.  Their pixels are
  read as the array they are and scaled by the array rules of :func:`to_rgb_image`, the same numbers either way.
* transparency (``RGBA``, ``LA``, ``PA``, a palette or colour key with transparency): ``convert("RGB")`` drops the
  alpha channel and shows whatever colour the transparent pixels happen to hold -- usually black, so a black drawing
  on a transparent canvas becomes a black square.  They are composited over white, as a viewer shows a drawing
  (RGBA arrays too).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["ImageLike", "PathLike", "pillow_image_module", "to_rgb_image"]

ImageLike = Any  # PIL.Image.Image | np.ndarray | str | os.PathLike | None
PathLike = Union[str, "os.PathLike[str]"]


def pillow_image_module() -> ModuleType:
    """The ``PIL.Image`` module, or an ImportError that says which package to install."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a transformers image dependency
        raise ImportError("memvp_peft.data needs Pillow to load images: `pip install pillow`.") from exc
    return Image


def _array_to_uint8(array: np.ndarray, value_range: Optional[tuple[float, float]]) -> np.ndarray:
    """Map an array of pixel values to uint8 0..255 (see :func:`to_rgb_image` for the rules)."""
    if array.dtype == np.uint8 and value_range is None:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if not (np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"image array has non-numeric dtype {array.dtype}")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("image array contains NaN or inf")
    if value_range is not None:
        low, high = float(value_range[0]), float(value_range[1])
        if high <= low:
            raise ValueError(f"array_value_range must be (low, high) with high > low, got {value_range}")
        scaled = (values - low) / (high - low)
    elif np.issubdtype(array.dtype, np.floating) and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values  # the usual 0..1 float convention
    elif values.min() >= 0.0 and values.max() <= 255.0 and np.issubdtype(array.dtype, np.integer):
        return values.astype(np.uint8)
    else:
        # Unknown range (e.g. scikit-learn digits: floats 0..16): stretch this image's min..max to 0..255.
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 4)`` -> uint8 ``(H, W, 3)``: the colour composited over a white background by its alpha."""
    colour, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255.0
    return np.rint(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _pil_to_rgb(image: PILImage.Image, value_range: Optional[tuple[float, float]]) -> PILImage.Image:
    """A PIL image of any mode -> RGB without losing it: high bit depths through the array rules, transparency over
    white (see the module docstring), everything else by Pillow's own conversion."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(image), value_range)
    if image.has_transparency_data:
        Image = pillow_image_module()
        return Image.fromarray(_over_white(np.asarray(image.convert("RGBA"))), mode="RGB")
    return image.convert("RGB")


def _array_to_rgb(image: np.ndarray, value_range: Optional[tuple[float, float]]) -> PILImage.Image:
    """A numpy image (layouts and value rules in :func:`to_rgb_image`) -> RGB ``PIL.Image``."""
    Image = pillow_image_module()
    array = image
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first -> channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        if min(array.shape) == 0:
            raise ValueError(f"image array is empty, shape {image.shape}")
        gray = _array_to_uint8(array, value_range)
        return Image.fromarray(np.ascontiguousarray(np.stack([gray] * 3, axis=-1)), mode="RGB")
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if min(array.shape[:2]) == 0:
            raise ValueError(f"image array is empty, shape {image.shape}")
        scaled = _array_to_uint8(array, value_range)  # alpha in the colour's units, scaled with it
        rgb = _over_white(scaled) if scaled.shape[-1] == 4 else scaled
        return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    raise ValueError(
        f"image array must be (H, W), (H, W, C) or (C, H, W) with C in 1/3/4, got shape {image.shape}"
    )


def _opened_to_rgb(opened: PILImage.Image, value_range: Optional[tuple[float, float]]) -> PILImage.Image:
    """An image read from a file or bytes, as RGB that outlives closing the file (an RGB file is copied)."""
    converted = _pil_to_rgb(opened, value_range)
    return converted.copy() if converted is opened else converted


def to_rgb_image(
    image: ImageLike,
    image_folder: Optional[PathLike] = None,
    array_value_range: Optional[tuple[float, float]] = None,
) -> PILImage.Image:
    """Return ``image`` as an RGB ``PIL.Image``.

    * ``PIL.Image``: converted to RGB (grayscale and palette images become 3-channel).  Modes of more than 8 bits
      (``I;16``, ``I``, ``F``) are scaled like the numpy array of their pixels (below, ``array_value_range``
      included); an image with transparency (``RGBA``, ``LA``, ``PA``, a transparent palette) is composited over
      white.  The same holds for the images of files and bytes.
    * ``str`` / ``os.PathLike``: opened with PIL; a relative path is resolved against ``image_folder``.  The file is
      decoded right away so that a corrupt file fails here, with a clear message, and not deep in the processor.
    * ``bytes`` (encoded PNG/JPEG...) or a ``{"bytes": ..., "path": ...}`` dict (an undecoded HF ``datasets.Image``).
    * ``np.ndarray``: ``(H, W)`` grayscale, ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in 1/3/4.  Values are mapped to
      uint8 0..255: uint8 is kept; bool becomes 0/255; with ``array_value_range=(low, high)`` values are scaled
      linearly from that range; otherwise floats within 0..1 are multiplied by 255, integers within 0..255 are kept,
      and anything else (e.g. scikit-learn digits, floats 0..16; a 16-bit image) is stretched from the image's own
      min..max.  A 4-channel array is RGBA, its alpha in the colour's units, composited over white.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything that cannot be read as an image.
    """
    Image = pillow_image_module()
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, array_value_range)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if image_folder is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_folder), path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return _opened_to_rgb(opened, array_value_range)
        except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, ...
            raise ValueError(f"cannot read image file {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):
        # The undecoded form of a HF `datasets.Image` column: {"bytes": b"...", "path": "..."}.
        if image.get("bytes"):
            image = bytes(image["bytes"])
        elif image.get("path"):
            return to_rgb_image(image["path"], image_folder, array_value_range)
        else:
            raise ValueError("image dict has neither 'bytes' nor 'path'")
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as opened:
                opened.load()
                return _opened_to_rgb(opened, array_value_range)
        except Exception as exc:
            raise ValueError(f"cannot decode image bytes: {type(exc).__name__}: {exc}") from exc
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, array_value_range)
    raise ValueError(
        "image must be a PIL.Image, a numpy array, a file path, encoded bytes or a {'bytes', 'path'} dict (an "
        f"undecoded datasets.Image), got {type(image).__name__}"
    )
