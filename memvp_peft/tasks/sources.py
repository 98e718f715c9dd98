"""`--dataset` sources the `datasets` library reads: save_to_disk folders, parquet/arrow files, data folders, Hub ids.

Each source becomes one `datasets.Dataset` -- one split -- whose rows go to the collator as they are: the columns
the collator reads (`image`, `images`, `conversations`, `messages`, `question`/`answer`, precomputed tensors) are
its to interpret, and a `datasets.Image` column arrives decoded (PIL), as `datasets` gives it. What this module
checks is what only the source can get wrong, each a ValueError naming the source and the flag to change: a split
that is not there (with the splits that are), a configuration that is not there (with those that are), a split
without rows, a glob that matches nothing, a Hub id that cannot be had -- and images that would never reach the
model: a `datasets.Image` column under another name than `image`/`images` (`--image_column NAME` reads it instead).

Image and video paths given as strings (an `image`/`images`/`video`/`frames` column of str) follow the loaders' one
rule (`memvp_peft.data.images.resolve_image_path`): relative to the dataset's folder (the data files' folder, the
save_to_disk folder, the data folder, the Hub snapshot), never outside it unless `--allow_outside_image_folder`, each
image file checked as it loads; the column is replaced by the resolved paths. A `datasets.Image` column embeds its
bytes and needs no rule.

How a Hub id resolves (read from datasets 5.2 / huggingface_hub 2.4): online, `datasets.load_dataset(ID)` downloads
the repo's data files into the hub cache (`HF_HUB_CACHE/datasets--org--name/snapshots/<commit>/`) and prepares
Arrow files in its own cache (`HF_DATASETS_CACHE`). Offline (`HF_HUB_OFFLINE=1`, or no connection), `load_dataset`
reads only that prepared Arrow cache -- not the hub cache: a dataset fetched with `hf download ID --repo-type
dataset` (or `snapshot_download`) is refused with "Couldn't reach ... on the Hub". So offline this module falls back
to the hub cache's snapshot of the default branch (`snapshot_download(local_files_only=True)`: the commit in
`refs/main`) and loads that folder, which `datasets` reads as a data folder (file names give the splits, a README's
`configs:` the configurations).

Each row gets the place it came from (`memvp_origin`: "org/name [train] row 17") so that what the collator finds in
it names that row, not its place in a shuffled batch.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Any, Optional

from ..hub import is_hub_id, is_offline, not_resolved_message
from ..data.conversations import ORIGIN_FIELD
from ..data.images import RAW_IMAGE_FIELDS, check_image_files, image_pixel_limit, resolve_image_path

__all__ = ["TABLE_SUFFIXES", "load_source", "source_kind"]

#: data files read as a table of records (a glob of them too); `.arrow` is the format save_to_disk writes
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
DEFAULT_SPLIT = "train"
_GLOB_CHARACTERS = ("*", "?", "[")


def source_kind(dataset: str) -> Optional[str]:
    """'files' (parquet/arrow files or a glob of them), 'saved' (a save_to_disk folder), 'folder' (a folder of data
    files), 'hub' (a Hub dataset id), or None when `dataset` is none of these."""
    if any(char in dataset for char in _GLOB_CHARACTERS) or os.path.splitext(dataset)[1] in TABLE_SUFFIXES:
        return "files"
    if os.path.isdir(dataset):
        saved = any(os.path.isfile(os.path.join(dataset, name)) for name in ("dataset_dict.json", "state.json"))
        return "saved" if saved else "folder"
    if not os.path.exists(dataset) and is_hub_id(dataset):
        return "hub"
    return None


def load_source(dataset: str, split: Optional[str] = None, config: Optional[str] = None, *,
                image_column: Optional[str] = None, allow_outside_image_folder: bool = False,
                decode_images: bool = True) -> Any:
    """The rows of `dataset` (see `source_kind`) in `split` (default 'train') of `config`, as a `datasets.Dataset`
    with a `memvp_origin` column; refusals are ValueErrors naming the source.

    `image_column` names the column to read the images from (renamed `image`); path strings are resolved and their
    files checked (`decode_images` as the loaders' `decode_images`), see the module docstring."""
    kind = source_kind(dataset)
    if kind is None:
        raise ValueError(f"dataset {dataset!r} is not a source memvp-train reads; see load_task.")
    datasets = _datasets_module()
    label = f"dataset {dataset!r}"
    folder: Optional[str] = dataset
    if kind == "saved":
        if config is not None:
            raise ValueError(f"{label} is a save_to_disk folder: it has no configurations, drop --dataset_config.")
        rows, split = _saved_split(datasets, dataset, split, label)
    elif kind == "files":
        if config is not None:
            raise ValueError(f"{label} is data files: they have no configurations, drop --dataset_config.")
        builder, files = _data_files(dataset, label)
        folder = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in files])
        split = split or DEFAULT_SPLIT
        rows = _load(lambda: datasets.load_dataset(builder, data_files=files, split=split), label, split, config)
    elif kind == "folder":
        split = split or DEFAULT_SPLIT
        rows = _load(lambda: datasets.load_dataset(dataset, config, split=split), label, split, config)
    else:
        split = split or DEFAULT_SPLIT
        rows = _load_hub(datasets, dataset, split, config, label)
        folder = None  # found when a column needs it: the hub cache's snapshot of the repo (_cached_snapshot)
    if len(rows) == 0:
        raise ValueError(f"{label}: split {split!r} holds no records.")
    if ORIGIN_FIELD not in rows.column_names:
        rows = rows.add_column(ORIGIN_FIELD, [f"{dataset} [{split}] row {i}" for i in range(len(rows))])
    rows = _image_columns(datasets, rows, label, image_column)
    return _resolve_path_columns(datasets, rows, label, folder if kind != "hub" else dataset, kind == "hub",
                                 allow_outside_image_folder, decode_images)


# the columns the collator reads images from (`video` / `frames` with num_frames; refused by it without)
_IMAGE_READING_COLUMNS = RAW_IMAGE_FIELDS + ("video", "frames")
# string columns holding paths: resolved under the path rule; image files are checked, video files are the collator's
_PATH_COLUMNS = ("image", "images", "video", "frames")


def _element(datasets: Any, feature: Any) -> Any:
    """The feature of one item of a list column, else the feature itself."""
    lists = tuple(kind for kind in (getattr(datasets, "List", None), getattr(datasets, "LargeList", None),
                                    getattr(datasets, "Sequence", None)) if isinstance(kind, type))
    return feature.feature if lists and isinstance(feature, lists) else feature


def _image_columns(datasets: Any, rows: Any, label: str, image_column: Optional[str]) -> Any:
    """`image_column` renamed `image`; a `datasets.Image` column the collator would not read refused."""
    if image_column is not None and image_column not in RAW_IMAGE_FIELDS:
        if image_column not in rows.column_names:
            raise ValueError(f"{label} has no column {image_column!r} (--image_column); its columns are "
                             f"{sorted(rows.column_names)}.")
        taken = [name for name in RAW_IMAGE_FIELDS if name in rows.column_names]
        if taken:
            raise ValueError(f"{label} has both {taken} and --image_column {image_column!r}: a record's images come "
                             "from one field.")
        rows = rows.rename_column(image_column, "image")
    unread = [name for name, feature in rows.features.items()
              if isinstance(_element(datasets, feature), datasets.Image) and name not in _IMAGE_READING_COLUMNS]
    if unread:
        read = [name for name in RAW_IMAGE_FIELDS if name in rows.column_names]
        how = (f"drop {unread} from the dataset (its images come from {read})" if read else
               f"pass --image_column {unread[0]} to train on them")
        raise ValueError(
            f"{label}: column {unread[0]!r} holds images (datasets.Image) but MemVPDataCollator reads a record's "
            f"images from 'image' or 'images' only, so they would never reach the model: {how}."
        )
    return rows


def _resolve_path_columns(datasets: Any, rows: Any, label: str, folder: Optional[str], hub: bool,
                          allow_outside: bool, decode: bool) -> Any:
    """Each string column of `_PATH_COLUMNS` replaced by its paths resolved against the dataset's `folder` (for a
    Hub id, `folder` is the id and the folder is its hub-cache snapshot); the image files checked."""
    columns = [name for name in _PATH_COLUMNS if name in rows.column_names and _is_string(
        datasets, _element(datasets, rows.features[name]))]
    if not columns:
        return rows
    if "images" in columns and _is_string(datasets, rows.features["images"]):
        raise ValueError(f"{label}: column 'images' holds one path per row where a list is expected (TRL's layout; "
                         "code that iterates it reads each path character by character): store lists of paths, or "
                         "name the column 'image'.")
    if hub:
        name, folder = folder, _cached_snapshot(folder or "")
        if folder is None:
            raise ValueError(f"{label} gives image paths as strings ({columns}) but its files are not on this "
                             f"machine (no hub-cache snapshot of {name!r}) to resolve them against: download the "
                             "repository (hf download ID --repo-type dataset), or store the images as datasets.Image.")
    assert folder is not None
    folder = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    origins = rows[ORIGIN_FIELD]
    pending: list[tuple[str, str]] = []
    for name in columns:
        # a video column: one file per row (a str), or a list of frames (images); image columns: images
        if name in ("video", "frames"):
            what = "video" if _is_string(datasets, rows.features[name]) else "frame"
        else:
            what = "image"

        def one(value: Any, where: str) -> Any:
            if value is None:
                return None
            path = resolve_image_path(value, folder, allow_outside, where, what)
            if what != "video":
                pending.append((path, where))
            return path

        resolved = []
        for where, value in zip(origins, rows[name]):
            if isinstance(value, list):
                resolved.append([one(item, f"{where}, {what} {k}") for k, item in enumerate(value)])
            else:
                resolved.append(one(value, where))
        rows = rows.remove_columns(name).add_column(name, resolved, feature=rows.features[name])
    check_image_files(pending, decode, image_pixel_limit(None))
    return rows


def _is_string(datasets: Any, feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _datasets_module() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ValueError("this --dataset is read with the `datasets` library, which is not installed: "
                         "pip install 'memvp-peft[datasets]' (or pip install datasets).") from error
    return datasets


def _saved_split(datasets: Any, folder: str, split: Optional[str], label: str) -> tuple[Any, str]:
    """The split of a `save_to_disk` folder: a DatasetDict's `split` (default 'train'), or the one Dataset.

    A DatasetDict's splits are read from its `dataset_dict.json` and only the one asked for is opened; a split saved
    without rows has no data file (`state.json`), which `load_from_disk` answers with an IndexError (datasets 5.2),
    so it is refused here as the empty split it is."""
    listing = os.path.join(folder, "dataset_dict.json")
    if os.path.isfile(listing):
        with open(listing, encoding="utf-8") as handle:
            splits = json.load(handle).get("splits", [])
        split = split or DEFAULT_SPLIT
        if split not in splits:
            raise ValueError(f"{label} has no split {split!r} (--dataset_split); its splits are {sorted(splits)}.")
        _refuse_empty_saved(os.path.join(folder, split), label, split)
        return datasets.load_from_disk(os.path.join(folder, split)), split
    _refuse_empty_saved(folder, label, split or DEFAULT_SPLIT)
    saved = datasets.load_from_disk(folder)
    own = str(saved.split) if saved.split is not None else None
    if split is not None and split != own:
        raise ValueError(f"{label} is a save_to_disk Dataset: one split ({own or 'unnamed'}), so --dataset_split "
                         f"{split!r} names none of it; drop --dataset_split (it applies to a saved DatasetDict).")
    return saved, own or DEFAULT_SPLIT


def _refuse_empty_saved(folder: str, label: str, split: str) -> None:
    state = os.path.join(folder, "state.json")
    if os.path.isfile(state):
        with open(state, encoding="utf-8") as handle:
            if not json.load(handle).get("_data_files", [None]):
                raise ValueError(f"{label}: split {split!r} holds no records.")


def _data_files(dataset: str, label: str) -> tuple[str, list[str]]:
    """(datasets builder, files) for a parquet/arrow file or a glob of them: one format, at least one file."""
    pattern = any(char in dataset for char in _GLOB_CHARACTERS)
    files = [path for path in (sorted(glob.glob(dataset)) if pattern else [dataset]) if os.path.isfile(path)]
    if not files:
        raise ValueError(f"{label} {'matches no file' if pattern else 'does not exist'}.")
    suffixes = {os.path.splitext(path)[1] for path in files}
    unknown = sorted(suffixes - set(TABLE_SUFFIXES))
    if unknown or len(suffixes) > 1:
        raise ValueError(f"{label} matches files of the kinds {sorted(suffixes)}: a glob must match only .parquet or "
                         "only .arrow files.")
    return TABLE_SUFFIXES[suffixes.pop()], files


def _load(call: Any, label: str, split: str, config: Optional[str]) -> Any:
    """Run `datasets.load_dataset` and turn the errors a user can fix into ours, with the flag to change."""
    try:
        return call()
    except ValueError as error:
        text = str(error)
        listed = re.search(r"(\[[^\]]*\])", text)
        available = f"; it has {listed.group(1)}" if listed else f" ({text})"
        if text.startswith("Unknown split"):
            raise ValueError(f"{label} has no split {split!r} (--dataset_split){available}.") from error
        if "BuilderConfig" in text and "not found" in text:
            raise ValueError(f"{label} has no configuration {config!r} (--dataset_config){available}.") from error
        if "Config name is missing" in text:
            raise ValueError(f"{label} has several configurations: pick one with --dataset_config{available}.") \
                from error
        if "corresponds to no data" in text:
            raise ValueError(f"{label}: split {split!r} holds no records.") from error
        raise ValueError(f"{label} could not be read by datasets: {text}") from error


def _load_hub(datasets: Any, name: str, split: str, config: Optional[str], label: str) -> Any:
    """A Hub dataset id: `load_dataset` (online; or offline from its prepared cache), else offline the hub cache's
    snapshot of the repo (files fetched by `hf download`), else an error that says which."""
    from datasets.exceptions import DatasetNotFoundError

    try:
        return _load(lambda: datasets.load_dataset(name, config, split=split), label, split, config)
    except DatasetNotFoundError as error:  # the Hub answered: no such (accessible) dataset, revision or gated
        raise ValueError(not_resolved_message(name, "dataset", repo_type="dataset", cause=str(error))) from error
    except (ConnectionError, FileNotFoundError) as error:  # offline or unreachable, and not in datasets' own cache
        unreachable = error
    snapshot = _cached_snapshot(name)
    if snapshot is None:
        cause = None if is_offline() else f"{type(unreachable).__name__}: {unreachable}"
        raise ValueError(not_resolved_message(name, "dataset", repo_type="dataset", cause=cause)) from unreachable
    return _load(lambda: datasets.load_dataset(snapshot, config, split=split), label, split, config)


def _cached_snapshot(name: str) -> Optional[str]:
    """The hub cache's folder of the dataset repo `name` at its default branch, or None when it is not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        return None
