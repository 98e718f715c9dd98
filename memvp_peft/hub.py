"""Model names as `from_pretrained` takes them: a local folder first, else a Hugging Face Hub repo id.

A Hub id is downloaded when the machine is online and read from the Hugging Face cache when it is not
(`HF_HUB_OFFLINE=1`, or no connection), exactly as transformers does -- this module adds no second way of finding
files. What it adds is the error: transformers answers a name it cannot resolve with an `OSError` about connecting
to huggingface.co, which does not say which of a run's several names (base, vision encoder, processor) failed nor
what to do. :func:`check_model_source` runs before anything loads, so that `memvp-train` can refuse a name before it
writes or trains anything; :func:`hub_errors` turns a failure during the load itself into the same kind of message.

A leaf module: it imports no other part of the package (``vision``, ``tuner``, ``tasks`` and ``cli`` use it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

__all__ = ["check_model_source", "hub_errors", "is_hub_id", "is_offline", "not_resolved_message", "resolvable_name"]

#: what a model name may be, for the errors
MODEL_SOURCE = (
    "a local Hugging Face model folder (config.json, the weights and the tokenizer files, as save_pretrained writes "
    "them) or a Hub model id such as 'org/name' (downloaded when online, read from the Hugging Face cache offline)"
)


def is_hub_id(name: str) -> bool:
    """True when `name` is no local path and has the form of a Hub repo id (`name` or `org/name`).

    Why the local check comes first: transformers reads an existing folder `org/name` relative to the working folder
    before it asks the Hub, and so must every check here, or the two would disagree about what a name means.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolvable_name(name: str) -> str:
    """`name` as it resolves from any working folder: a local folder (what `from_pretrained` reads first) as its
    absolute path, anything else -- a Hub id, a path that is not here -- unchanged.

    Why: a name is recorded (an adapter's vision encoder) to be resolved again later, possibly from another working
    folder, where a relative `models/clip` names another folder or nothing -- or, taking the form of a Hub id, a
    download of some other model."""
    if isinstance(name, str) and name and os.path.isdir(name):
        return os.path.abspath(name)
    return name


def is_offline() -> bool:
    """Whether downloads are switched off (`HF_HUB_OFFLINE=1`): huggingface_hub reads the variable once, at import,
    and transformers and datasets follow that value, so this reads the same one."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_folder() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def not_resolved_message(name: str, what: str, revision: Optional[str] = None, repo_type: str = "model",
                         cause: Optional[str] = None) -> str:
    """The error for a Hub id that cannot be used here: offline and not in the cache, or the Hub refused it."""
    at = f" at revision {revision!r}" if revision else ""
    kind = "dataset" if repo_type == "dataset" else "model"
    download = f"hf download {name}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    reason = f" ({cause})" if cause else ""
    if is_offline():
        return (f"{what} {name!r} is not a local folder, and as a Hub {kind} id{at} it is not in the Hugging Face "
                f"cache ({_cache_folder()}) while downloads are off (HF_HUB_OFFLINE=1){reason}: download it once "
                f"online (`{download}`), point HF_HOME or HF_HUB_CACHE at the cache that holds it, or pass a local "
                "folder.")
    return (f"{what} {name!r} is not a local folder, and as a Hub {kind} id{at} it could not be loaded{reason}: "
            f"check the id (and revision) and the connection; offline, a name must be in the Hugging Face cache "
            f"(`{download}` beforehand), or pass a local folder.")


def check_model_source(name: str, what: str = "model_name_or_path", revision: Optional[str] = None) -> None:
    """Refuse a model name that cannot load, before anything is loaded: `what` names where it came from (a flag, the
    adapter's record) so that the message says what to change.

    A local folder must hold a `config.json`; a Hub id needs nothing up front when online (the download tells), and
    its `config.json` in the cache when offline (checked without touching the network: `try_to_load_from_cache`).
    """
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ValueError(f"{what} {name!r} is a folder but not a Hugging Face model (no config.json); pass "
                             f"{MODEL_SOURCE}.")
        return
    if os.path.exists(name):
        raise ValueError(f"{what} {name!r} is a file, not a model folder; pass {MODEL_SOURCE}.")
    if not is_hub_id(name):
        raise ValueError(f"{what} {name!r} is not a local folder, nor a Hub id of the form 'org/name'; pass "
                         f"{MODEL_SOURCE}.")
    if is_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            raise ValueError(not_resolved_message(name, what, revision))


@contextlib.contextmanager
def hub_errors(name: str, what: str, revision: Optional[str] = None) -> Iterator[None]:
    """Turn what `from_pretrained` raises for a Hub id it cannot get (an `OSError`: no connection, unknown repo,
    revision or file, a gated repo) into a ValueError naming `what` and the id; a local folder's errors pass as they
    are. A repo with custom code and no `--trust_remote_code` gets the flag named."""
    try:
        yield
    except OSError as error:
        if os.path.exists(name) or not is_hub_id(name):
            raise
        raise ValueError(not_resolved_message(name, what, revision, cause=_first_line(error))) from error
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ValueError(f"{what} {name!r} needs its own code to load: pass --trust_remote_code (Python: "
                             f"trust_remote_code=True) if you trust it. ({_first_line(error)})") from error
        raise


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
