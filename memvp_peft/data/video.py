"""Video for the memory: a video file or a list of frames, sampled uniformly to `num_frames` frames, each frame then
an image of the multi-image layout (its own block of memory slots).

In input space a video is the costliest visual context there is (16 frames x 256 patches = 4,096 tokens in every
layer); in MemVP's memory it costs `4 * n * d` FLOPs per text token and layer and the sequence does not grow.

Sampling: with more frames than `num_frames`, the video is cut into `num_frames` equal segments and the middle frame
of each is taken (the usual uniform sampling of video-language models); with at most `num_frames` frames, every frame
is kept, in order, and the remaining slots stay empty (`image_mask` False) -- no frame is invented.

A video file's frames are counted by decoding them, not read from its container's header, which may state none or
a wrong number (`read_video_frames`). Video files are decoded with PyAV (`pip install memvp-peft[video]`: FFmpeg's
libraries in a wheel), imported only when a file is read.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from .images import PathLike, to_rgb_image

__all__ = ["FRAME_FIELDS", "read_video_frames", "record_frames", "sample_frame_indices"]

#: the record fields a collator with `num_frames` reads a video from: a file path or a list of frames (`video`), a
#: list of frames (`frames`)
FRAME_FIELDS = ("video", "frames")


def sample_frame_indices(total: int, num_frames: int) -> list[int]:
    """Indices of the frames to keep out of `total`: all of them when `total <= num_frames`, else the middle frame of
    each of `num_frames` equal segments."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if total <= num_frames:
        return list(range(total))
    return [int((index + 0.5) * total / num_frames) for index in range(num_frames)]


def _pyav():
    try:
        import av
    except ImportError as exc:
        raise ImportError(
            "reading a video file needs PyAV: `pip install memvp-peft[video]` (or `pip install av`); a list of "
            "frames (images) needs nothing else."
        ) from exc
    return av


def _decode(av: Any, path: str, wanted: set[int]) -> tuple[list[Any], int]:
    """Decode every frame of the file's first video stream: the frames whose index is in `wanted` as RGB PIL images
    (in order), and how many frames the stream really holds."""
    kept, total = [], 0
    with av.open(path) as container:
        if not container.streams.video:
            return [], 0
        for total, frame in enumerate(container.decode(container.streams.video[0]), start=1):
            if total - 1 in wanted:
                kept.append(frame.to_image().convert("RGB"))
    return kept, total


def read_video_frames(path: PathLike, num_frames: int) -> list[Any]:
    """The sampled frames of a video file as RGB PIL images (`sample_frame_indices` of its decoded frames).

    The frames are counted by decoding them, never taken from the container's header: a header that states too few
    frames would otherwise give the first frames instead of frames spread over the whole video, and one that states
    none (Matroska) says nothing. The stated count only guesses which frames to keep on the one pass that counts;
    when the count decoded differs, a second pass keeps the right ones. A file PyAV cannot open or that holds no
    video frames is a ValueError naming it.
    """
    av = _pyav()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path!r}")
    try:
        with av.open(path) as container:
            stated = int(container.streams.video[0].frames or 0) if container.streams.video else 0
        guess = sample_frame_indices(stated, num_frames) if stated else []
        frames, total = _decode(av, path, set(guess))
        if total and total != stated:
            frames, _ = _decode(av, path, set(sample_frame_indices(total, num_frames)))
    except (av.error.FFmpegError, OSError) as exc:  # not a container FFmpeg reads, a damaged stream
        raise ValueError(f"cannot decode video file {path!r}: {type(exc).__name__}: {exc}") from exc
    if not total:
        raise ValueError(f"video file {path!r} holds no video frames")
    return frames


def record_frames(
    raw: Any,
    where: str,
    num_frames: int,
    *,
    image_folder: Optional[PathLike],
    array_value_range: Optional[tuple[float, float]],
) -> list[Any]:
    """A record's video as `num_frames` (or fewer) RGB PIL frames: a video file path (relative ones resolved against
    `image_folder`), or a list of frames in any image form `to_rgb_image` reads, sampled the same way."""
    if isinstance(raw, (str, os.PathLike)):
        path = os.fspath(raw)
        if image_folder is not None and not os.path.isabs(path):
            path = os.path.join(os.fspath(image_folder), path)
        try:
            return read_video_frames(path, num_frames)
        except FileNotFoundError as exc:
            raise ValueError(f"{where}: missing video file: {exc}") from exc
        except ValueError as exc:
            raise ValueError(f"{where}: unreadable video: {exc}") from exc
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(
            f"{where}: a video must be a video file path or a non-empty list of frames (images), got "
            f"{type(raw).__name__ if not isinstance(raw, (list, tuple)) else 'an empty list'}."
        )
    frames = []
    for index in sample_frame_indices(len(raw), num_frames):
        try:
            frames.append(to_rgb_image(raw[index], image_folder, array_value_range))
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"{where}, frame {index}: unreadable frame: {exc}") from exc
    return frames
