"""A record's images, from whatever form its source holds them in to the image columns of a batch, and a dataset's
image files, checked when it loads.

Every accepted form of an image -> one RGB ``PIL.Image`` (:func:`to_rgb_image`).  Records arrive with whatever their
source holds: a file path (LLaVA, JSONL), encoded bytes or an undecoded ``datasets.Image`` dict (HF datasets), a
numpy array in any value range (scikit-learn digits are floats 0..16), or a PIL image already.  The image processor
wants RGB PIL images, and a bad image should fail here, naming the file, rather than deep inside the processor -- so
all conversion and all decoding happens in :func:`to_rgb_image`.

Two kinds of image would go blank through Pillow's own ``convert("RGB")``, so they take another road:

* more than 8 bits per pixel (modes ``I;16*``, ``I``, ``F``: 16-bit PNGs and TIFFs, float images): Pillow clips
  their values to 0..255, so a full-range 16-bit image turns white and a 0..1 float image black.  Their pixels are
  read as the array they are and scaled by the array rules of :func:`to_rgb_image`, the same numbers either way.
* transparency (``RGBA``, ``LA``, ``PA``, a palette or colour key with transparency): ``convert("RGB")`` drops the
  alpha channel and shows whatever colour the transparent pixels happen to hold -- usually black, so a black drawing
  on a transparent canvas becomes a black square.  They are composited over white, as a viewer shows a drawing
  (RGBA arrays too).

A dataset's image files are checked when the dataset loads: inside ``image_folder``, an image, within a pixel limit.
The collator opens every image again during training; whatever it could trip over there -- a path that is not an
image, a truncated file, a decompression bomb (a small file declaring billions of pixels), a path such as
``../../etc/passwd`` leading out of the image folder -- would otherwise stop a run hours in, reported by its place
in some batch.  Every loader -- LLaVA JSON and JSONL, ScienceQA, the sources the ``datasets`` library reads (all in
:mod:`memvp_peft.tasks`) -- calls :func:`resolve_image_path` for every image or video path a dataset names (cheap,
no I/O, always): one rule, the path is relative to the dataset's folder and stays inside it unless
``allow_outside_image_folder``.  :func:`check_image_files` then runs once for the whole dataset, so that a bad
dataset is refused before anything is trained or written, naming the dataset line.  Cost: each distinct image is
opened once (a record naming an image again is not checked again).  With ``decode=True`` (the default) it is fully
decoded, which also catches truncated and corrupt data -- a few ms per photo, spread over up to 8 threads (Pillow
decodes without holding the GIL); ``decode=False`` reads only the header (format and size), about 100 times
cheaper, and leaves corrupt pixel data to the collator.

Records' images -> the ``pixel_values`` (or ``image_features``) and ``image_mask`` columns of a batch.  A batch may
mix rows with one image, several images and none (ScienceQA has text-only questions).  Every row still needs a
tensor of the same shape, so empty rows and empty slots are zeros and ``image_mask`` says which rows/slots really
hold an image -- the memory is switched off where it is False.  Layouts:

* no record gives a *list* of images (and ``num_images`` is None): ``(B, C, H, W)`` and ``(B,)``;
* otherwise ``(B, I, C, H, W)`` and ``(B, I)``, with ``I = num_images`` or the longest list in the batch.

(``image_features`` likewise, with ``(tokens, dim)`` per image.)  A record's images come from exactly one field
(:func:`image_field`): raw ones from ``image``/``images`` (:func:`record_images`, processed for the whole batch at once
by :func:`process_images`) or precomputed tensors (:func:`memvp_peft.data.collator.precomputed_images`, where
``(I, ...)`` counts as a list).
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "PRECOMPUTED_FIELDS",
    "RAW_IMAGE_FIELDS",
    "UNREAD_IMAGE_FIELDS",
    "ImageLike",
    "PathLike",
    "assemble_images",
    "blank_image_shape",
    "check_image_files",
    "image_field",
    "image_pixel_limit",
    "pillow_image_module",
    "process_images",
    "record_images",
    "resolve_image_path",
    "stray_image_fields",
    "to_rgb_image",
]

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


_CHUNK = 1024  # images submitted to the thread pool at a time: the first bad one stops the check within a chunk


def image_pixel_limit(max_image_pixels: Optional[int]) -> Optional[int]:
    """The limit to check against: `max_image_pixels`, or Pillow's own ``PIL.Image.MAX_IMAGE_PIXELS`` when None.

    Pillow's setting is the default because the collator decodes with Pillow: an image over it would make Pillow
    warn (or, over twice the limit, refuse) during training anyway.  ``PIL.Image.MAX_IMAGE_PIXELS = None`` (Pillow's
    way to switch its check off) switches this one off too.
    """
    if max_image_pixels is None:
        return pillow_image_module().MAX_IMAGE_PIXELS
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise ValueError(f"max_image_pixels must be a positive int or None, got {max_image_pixels!r}.")
    return max_image_pixels


def resolve_image_path(item: Any, image_folder: PathLike, allow_outside: bool, where: str, what: str = "image") -> str:
    """`item` (an image or video path from the dataset) resolved against `image_folder` (the folder the dataset's
    paths are relative to), normalised; refused if it leads outside.

    The check is on the path as written (``..`` segments and absolute paths), not on where symbolic links point:
    links inside the image folder were put there by whoever owns it, while the dataset file may come from anyone.
    `what` names the kind of path in errors ("image", "video").
    """
    if not isinstance(item, str) or not item:
        raise ValueError(f"{where}: {what!r} must be a file path (str), got {item!r}.")
    folder = os.path.abspath(os.fspath(image_folder))
    path = os.path.normpath(os.path.join(folder, item))  # an absolute `item` replaces the folder
    if not allow_outside and not _inside(path, folder):
        raise ValueError(
            f"{where}: {what} path {item!r} resolves to {path!r}, outside image_folder {folder!r} (the folder the "
            "dataset's paths are relative to). Paths must stay inside it; pass allow_outside_image_folder=True "
            "(--allow_outside_image_folder) to accept absolute paths and '..' elsewhere."
        )
    return path


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives (Windows)
        return False


def check_image_files(images: list[tuple[str, str]], decode: bool, max_pixels: Optional[int]) -> None:
    """Check each ``(path, where)``; the first failure in dataset order is a ValueError naming `where` and the file.

    Pillow's ``DecompressionBombWarning`` is silenced for the duration (this check says more, as an error); warning
    filters are process-wide, so it is set once here around all threads rather than in each.
    """
    seen: set[str] = set()
    unique = [(path, where) for path, where in images if not (path in seen or seen.add(path))]
    if not unique:
        return
    Image = pillow_image_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(unique) <= 8:
            for path, where in unique:
                _check_one(path, where, decode, max_pixels)
            return
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                # map() yields in order: the earliest bad line of the chunk is the one raised
                list(pool.map(lambda item: _check_one(item[0], item[1], decode, max_pixels), chunk))


def _check_one(path: str, where: str, decode: bool, max_pixels: Optional[int]) -> None:
    Image = pillow_image_module()
    if not os.path.isfile(path):
        raise ValueError(f"{where}: missing image file {path!r}.")
    size: Optional[tuple[int, int]] = None
    failure: Optional[str] = None
    try:
        with Image.open(path) as image:
            size = image.size
            if not _over(size, max_pixels) and decode:
                image.load()
    except Image.DecompressionBombError as exc:  # Pillow refuses at open: over twice its MAX_IMAGE_PIXELS
        raise ValueError(
            f"{where}: image {path!r} is over the pixel limit: Pillow will not open it ({exc}). A decompression "
            "bomb, or an image far larger than an encoder needs; to train on images this large, raise "
            "PIL.Image.MAX_IMAGE_PIXELS (the collator decodes with Pillow)."
        ) from exc
    except Exception as exc:  # UnidentifiedImageError, truncated data, OSError from a decoder...
        failure = f"{type(exc).__name__}: {exc}"
    if failure is not None:
        raise ValueError(f"{where}: {path!r} is not a readable image ({failure}).")
    if size is not None and _over(size, max_pixels):
        width, height = size
        raise ValueError(
            f"{where}: image {path!r} is {width}x{height} = {width * height:,} pixels, over the pixel limit of "
            f"{max_pixels:,} (a decompression bomb, or an image far larger than an encoder needs). The limit is "
            "max_image_pixels= of the loader, by default PIL.Image.MAX_IMAGE_PIXELS."
        )


def _over(size: tuple[int, int], max_pixels: Optional[int]) -> bool:
    return max_pixels is not None and size[0] * size[1] > max_pixels


#: The fields a record's images are read from: raw images (one, or a list) and precomputed tensors.
RAW_IMAGE_FIELDS = ("image", "images")
PRECOMPUTED_FIELDS = ("pixel_values", "image_features")
# Image-carrying fields of video: read (as `video.FRAME_FIELDS`) by a collator with `num_frames`, refused by one
# without -- a record holding one is never silently trained text-only. `videos` (several videos) is never read.
UNREAD_IMAGE_FIELDS = ("video", "videos", "frames")
#: What a path to an image file ends with (any case): a field of such paths that is not read is a lost image.
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def image_field(record: Mapping[str, Any], where: str, read_video: bool = False) -> Optional[str]:
    """The one field a record's images come from, or None for a text-only record.

    A record with images in two fields (``image`` and ``images``, or raw images and precomputed tensors) is refused:
    reading one would drop the other without a word.  Video fields are read only with ``read_video`` (a collator with
    ``num_frames``): ``video`` (a file or a list of frames) and ``frames``; otherwise they are refused.
    """
    video_fields = ("video", "frames") if read_video else ()
    unread = [key for key in UNREAD_IMAGE_FIELDS if key not in video_fields and record.get(key) is not None]
    if unread:
        # A column the collator would not read means a batch that trains text-only while the user believes it sees
        # the images: refuse instead.
        how = ("several videos per record are not read" if read_video else
               "set num_frames to read 'video' (a video file or a list of frames) or 'frames', sampled to that many")
        raise ValueError(
            f"{where}: has {unread} but MemVPDataCollator does not read video (video/videos/frames) as configured: "
            f"{how}; it reads images from 'image' or 'images' (paths, PIL images, arrays, bytes, datasets.Image "
            "values) and precomputed 'pixel_values'/'image_features' tensors. Drop the column, or give frames as "
            "'images'."
        )
    present = [key for key in RAW_IMAGE_FIELDS + video_fields + PRECOMPUTED_FIELDS if record.get(key) is not None]
    if len(present) > 1:
        raise ValueError(
            f"{where}: has images in several fields {present}; give them in one: 'image' or 'images' (one image or "
            "a list), or precomputed 'pixel_values' / 'image_features'."
        )
    stray = stray_image_fields(record, gives_images=bool(present))
    if stray:
        raise ValueError(
            f"{where}: {stray} hold images (or image file paths) that MemVPDataCollator does not read: it reads a "
            "record's images from 'image' or 'images' only (or precomputed 'pixel_values' / 'image_features'). Put "
            "them under 'image' (memvp-train: --image_column NAME), or drop the field."
        )
    if present == ["images"] and isinstance(record["images"], (str, os.PathLike)):
        raise ValueError(
            f"{where}: 'images' holds one path ({record['images']!r}) where a list is expected (TRL's layout; code "
            "that iterates it reads it character by character): give ['path'], or put one image under 'image'."
        )
    return present[0] if present else None


def stray_image_fields(record: Mapping[str, Any], gives_images: bool) -> list[str]:
    """The fields other than the ones read for images that still hold one: a PIL image or an undecoded
    ``datasets.Image`` value (``{"bytes": ...}``), or a list of them -- always an image lost -- and, in a record that
    gives no image otherwise (`gives_images` False), a path to an image file (or a list of paths), such as an
    ``image_path`` or ``img`` column: the image the text was written for, which would never reach the model."""
    Image = pillow_image_module()
    read = RAW_IMAGE_FIELDS + PRECOMPUTED_FIELDS + UNREAD_IMAGE_FIELDS

    def holds_image(value: Any) -> bool:
        return isinstance(value, Image.Image) or (isinstance(value, Mapping) and bool(value.get("bytes")))

    def names_image_file(value: Any) -> bool:
        return isinstance(value, str) and value.lower().endswith(IMAGE_FILE_SUFFIXES)

    stray = []
    for key, value in record.items():
        if key in read or value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        items = [item for item in items if item is not None]
        if not items:
            continue
        if any(holds_image(item) for item in items) or (not gives_images and all(map(names_image_file, items))):
            stray.append(key)
    return stray


def record_images(
    raw: Any,
    where: str,
    *,
    image_processor: Any,
    image_folder: Optional[PathLike],
    array_value_range: Optional[tuple[float, float]],
) -> tuple[list[Optional[Any]], bool]:
    """The raw images of a record's ``image``/``images`` field as RGB PIL images, and whether the field is a list
    (the multi-image layout).

    A ``None`` entry of a list stays in it, as ``None``: its slot stays empty (zeros, ``image_mask`` False) and the
    images after it keep theirs -- the k-th image is read in the k-th block of memory slots, with that block's
    position embeddings, whether or not an earlier one is missing.  A missing or unreadable image is a
    ``ValueError`` naming the record, the image's index in its list and the ``image_folder`` paths were resolved
    against.
    """
    if raw is None:
        return [], False
    is_list = isinstance(raw, (list, tuple))
    items = list(raw) if is_list else [raw]
    images = []
    for k, item in enumerate(items):
        if item is None:
            images.append(None)
            continue
        label = f"{where}, image {k}" if is_list else where
        if image_processor is None:
            raise ValueError(f"{label}: the record has an image but the collator has no image_processor.")
        try:
            images.append(to_rgb_image(item, image_folder, array_value_range))
        except FileNotFoundError as exc:
            folder = f" (image_folder={os.fspath(image_folder)!r})" if image_folder is not None else ""
            raise ValueError(f"{label}: missing image file: {exc}{folder}") from exc
        except ValueError as exc:
            raise ValueError(f"{label}: unreadable image: {exc}") from exc
    return images, is_list


def process_images(image_processor: Any, images: list[Any], image_input_name: str) -> torch.Tensor:
    """Run the image processor on all images of a batch at once; check it gave one fixed-size tensor per image.

    ``pixel_values`` must come back as ``(N, C, H, W)``; a featurizer producing ``image_features`` (the model input
    name) returns ``(N, tokens, dim)``.
    """
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor):
        pixel_values = torch.as_tensor(np.asarray(pixel_values))
    expected_dims = 4 if image_input_name == "pixel_values" else 3  # (N, C, H, W) or (N, tokens, dim)
    if pixel_values.dim() != expected_dims or pixel_values.shape[0] != len(images):
        raise ValueError(
            f"MemVPDataCollator: the image processor returned pixel_values of shape {tuple(pixel_values.shape)} "
            f"for {len(images)} images; expected ({len(images)}, C, H, W) (one fixed size for all images)."
        )
    return pixel_values


def blank_image_shape(image_processor: Any, image_input_name: str) -> tuple[torch.Size, torch.dtype]:
    """Shape and dtype of one processed image, found by processing a black image (for all-text-only batches)."""
    Image = pillow_image_module()
    dummy = process_images(image_processor, [Image.new("RGB", (64, 64))], image_input_name)
    return dummy.shape[1:], dummy.dtype


def assemble_images(
    per_record: list[list[Optional[torch.Tensor]]],
    any_list: bool,
    *,
    num_images: Optional[int],
    blank: Optional[tuple[torch.Size, torch.dtype]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The image tensor and ``image_mask`` of a batch (layouts in the module docstring) from each record's per-image
    tensors (processed images or precomputed ones); a ``None`` leaves its slot empty.

    ``blank`` is the per-image shape and dtype to use when no record of the batch has an image.  Per-image tensors of
    different shapes (precomputed ones can differ) are refused, naming the records.
    """
    batch_size = len(per_record)
    shaped = [(row, tensor) for row, tensors in enumerate(per_record) for tensor in tensors if tensor is not None]
    if shaped:
        first_row, first = shaped[0]
        for row, tensor in shaped:
            if tensor.shape != first.shape:
                raise ValueError(
                    f"MemVPDataCollator: the images of one batch must have one shape; record {first_row} gives "
                    f"{tuple(first.shape)} and record {row} gives {tuple(tensor.shape)}."
                )
        image_shape = first.shape
        dtype = functools.reduce(torch.promote_types, [tensor.dtype for _row, tensor in shaped])
    else:
        assert blank is not None
        image_shape, dtype = blank

    multi = num_images is not None or any_list
    slots = num_images if num_images is not None else max([len(t) for t in per_record] + [1])
    if multi:
        pixel_values = torch.zeros((batch_size, slots, *image_shape), dtype=dtype)
        image_mask = torch.zeros((batch_size, slots), dtype=torch.bool)
    else:
        pixel_values = torch.zeros((batch_size, *image_shape), dtype=dtype)
        image_mask = torch.zeros((batch_size,), dtype=torch.bool)
    for row, tensors in enumerate(per_record):
        for slot, tensor in enumerate(tensors):
            if tensor is None:
                continue
            if multi:
                pixel_values[row, slot] = tensor
                image_mask[row, slot] = True
            else:
                pixel_values[row] = tensor
                image_mask[row] = True
    return pixel_values, image_mask
