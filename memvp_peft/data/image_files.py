"""A dataset's image files, checked when the dataset loads: inside ``image_folder``, an image, within a pixel limit.

The collator opens every image again during training; whatever it could trip over there -- a path that is not an
image, a truncated file, a decompression bomb (a small file declaring billions of pixels), a path such as
``../../etc/passwd`` leading out of the image folder -- would otherwise stop a run hours in, reported by its place
in some batch.  Every loader -- LLaVA JSON and JSONL (:mod:`.formats`), ScienceQA (:mod:`.scienceqa`), the sources
the ``datasets`` library reads (:mod:`.sources`) -- calls :func:`resolve_image_path` for every image or video path
a dataset names (cheap, no I/O, always): one rule, the path is relative to the dataset's folder and stays inside it
unless ``allow_outside_image_folder``.  :func:`check_image_files` then runs once for the whole dataset, so that a bad
dataset is refused before anything is trained or written, naming the dataset line.

Cost: each distinct image is opened once (a record naming an image again is not checked again).  With
``decode=True`` (the default) it is fully decoded, which also catches truncated and corrupt data -- a few ms per
photo, spread over up to 8 threads (Pillow decodes without holding the GIL); ``decode=False`` reads only the header
(format and size), about 100 times cheaper, and leaves corrupt pixel data to the collator.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from .images import PathLike, pillow_image_module

__all__ = ["check_image_files", "image_pixel_limit", "resolve_image_path"]

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
