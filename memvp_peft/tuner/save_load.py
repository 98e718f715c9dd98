"""MemVP's rules for adapter files: what may be saved, what must be loaded, and a whole-folder, rank-0-only save.

The rules live where peft asks each tuner for them, so importing memvp_peft changes nothing for other peft users:

* saving -- `MemVPModel._get_adapter_state_dict` calls `refuse_partitioned_tensors` before peft writes the weights
  or the config (only its model card, README.md, is written by then): a DeepSpeed ZeRO-3 rank holding 0-element
  partitions must never replace a good adapter with empty tensors;
* loading -- `MemVPModel._remap_adapter_state_dict_for_load` insists on every adapter tensor with the right shape
  (peft only warns about missing keys; for MemVP a missing projector would silently stay random).

`PeftModel.save_pretrained` writes its files in place, one after the other (peft does so for every tuner): the
weights file is truncated and rewritten, then `adapter_config.json`. Left alone, a kill in between leaves new weights
next to the old config (or half a file). Two ways keep a MemVP adapter folder whole:

* **peft's own save, undone unless finished** (every `PeftModel.save_pretrained` of a MemVP adapter, nothing to opt
  into): peft asks the tuner for the adapter's tensors right before it writes them (`MemVPModel.
  _get_adapter_state_dict`), and that is where `begin_in_place_save` sets the old adapter aside in an undo journal
  `.memvp-undo-*` inside the folder -- a copy of the old `adapter_config.json` and the old weights file itself,
  renamed in, so peft's truncating write lands in a new file. `MemVPConfig.save_pretrained`, which peft calls last,
  switches the new config in with one rename and then drops the journal (`finish_in_place_save`): that is the moment
  the new adapter wins. Until then, a load or the next save rolls the old files back first (`recover_adapter_folder`,
  run by `MemVPConfig.from_pretrained` before peft reads the weights). The config in the folder is never written in
  place, so peft's own first read of it (its `peft_type`) always finds whole JSON.
* **Staged whole-folder saves**, where a crash must never cost the previous adapter and the folder holds more than
  the adapter -- memvp-train, the Trainer recipe: `save_adapter(model, folder)` saves the complete adapter into a
  staging folder *next to* the target (same filesystem), checks it, and then switches the whole folder at once;
  `atomic_saves` makes one PeftModel *instance* save that way, so the HF `Trainer` (which calls
  `model.save_pretrained`) does too.

How the switch is made, and why:

* **Folder swap** (the usual way): the user's other files in the target (`base_model/`, `checkpoint-N/`,
  `metrics.json`, ...) are hard-linked into the staged folder, then one `renameat2(RENAME_EXCHANGE)` swaps the two
  folders; files another process wrote into the old folder meanwhile (a DDP rank's `rng_state_1.pth`) are moved
  over, and the old folder (now at the staging path) is removed. At every instant the path is a real folder holding
  exactly the old or exactly the new adapter, so a kill at any moment leaves a folder that even plain
  `PeftModel.from_pretrained` loads whole, with no recovery step. (A load running *while* a save swaps can still
  read the config before the swap and the weights after it: peft opens them one by one, by path.) A symlinked
  adapter folder swapped with `os.replace` would give the same atomicity on any POSIX system, but `mv folder
  elsewhere` would then move only the link, and the `Trainer`'s checkpoint rotation (`shutil.rmtree`) refuses
  symlinks; a real folder keeps working with every tool.
* **Journal** (where no swap is possible: not Linux, a filesystem without RENAME_EXCHANGE such as NFS, a target that
  is a mount point, a parent folder we may not write, or a process working inside the target, which a swap would
  leave in a deleted folder): the staged files go into `<target>/.memvp-saving-*`, which is renamed to
  `.memvp-ready-*` (the marker: "complete, roll forward") and then moved in file by file. A half-done move is finished
  by the next save and before a load (`check_adapter_folder`, and `MemVPConfig.from_pretrained`, which
  `PeftModel.from_pretrained` calls before it reads any weights).

Leftovers of killed saves (`.<name>.memvp-saving-*` beside the target, `.memvp-saving-*` inside it) are removed on
the next save and before a load, and undo journals are rolled back, unless their name says they belong to a save
still running on this machine. Every step of a recovery is a rename that is safe to repeat: a recovery killed half-way
is finished by the next one.
`check_adapter_folder` names the file when an adapter is incomplete; `adapter_model.bin`
(`safe_serialization=False`) is accepted and read with `torch.load(weights_only=True)`, as peft loads it.

The model card (`README.md`) says what the adapter is, how to load it, and what it was trained on. peft's
`PeftModel.save_pretrained` writes a generic card (`library_name: peft`, the base model, the peft version) before the
weights; a reader of that card -- on the Hub or in a folder -- learns neither that the adapter needs memvp-peft nor
which vision encoder its memory was trained to read. `MemVPConfig.save_pretrained`, which peft calls last for every
save, adds one MemVP section (`write_model_card`), and `memvp-train` adds the data and the held-out figures it knows.
The section sits between two HTML comments, so a later save replaces it instead of appending a second one, and
whatever the user wrote elsewhere in the card is kept. The card is written through a temporary file and one rename
(`replace_file`): a kill mid-write leaves the previous card, never half of one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import types
import zlib
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch
from huggingface_hub import ModelCard, ModelCardData

WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"
MODEL_CARD = "README.md"
ADAPTER_FILES = (WEIGHTS_NAME, BIN_WEIGHTS_NAME, CONFIG_NAME)  # a new save drops the old ones it does not rewrite
STAGING_PREFIX = ".memvp-saving-"
READY_PREFIX = ".memvp-ready-"
UNDO_PREFIX = ".memvp-undo-"
MANIFEST = ".memvp-manifest.json"
APPLYING_GRACE_S = 60.0  # a journal another machine touched more recently than this may still be being applied
_HOST = format(zlib.crc32(socket.gethostname().encode()), "08x")


def refuse_partitioned_tensors(state_dict: Mapping[str, torch.Tensor], where: str = "the adapter") -> None:
    """Raise a ValueError when a tensor about to be saved is a partition: 0 elements (an unconsolidated ZeRO-3
    partition) or an FSDP2 `DTensor` (each rank holds a shard; writing it fails deep inside safetensors)."""
    from torch.distributed.tensor import DTensor

    sharded = [key for key, value in state_dict.items() if isinstance(value, DTensor)]
    if sharded:
        raise ValueError(
            f"MemVP refused to save {where}: tensors {sharded[:5]} are FSDP2-sharded DTensors. Gather the trainable "
            "tensors on every rank (`tensor.full_tensor()`) and save on rank 0 with `state_dict=` "
            "(integrations/train_fsdp.py shows how)."
        )
    empty = [key for key, value in state_dict.items() if isinstance(value, torch.Tensor) and value.numel() == 0]
    if empty:
        raise ValueError(
            f"MemVP refused to save {where}: tensors {empty[:5]} have 0 elements. These are unconsolidated DeepSpeed "
            "ZeRO-3 partitions: save from global rank 0 with the gathered state dict (trainer.save_model does this "
            "when TrainingArguments reports the right world size; on CPU pass use_cpu=True)."
        )


def check_adapter_file_complete(path: str) -> None:
    """Raise a ValueError if a saved adapter file is unreadable or holds empty (partitioned) tensors.

    `.bin` files are read as peft reads them, with `torch.load(weights_only=True)`: a file that would need arbitrary
    unpickling is refused, never executed."""
    if path.endswith(".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # zipfile, pickle and torch raise their own error types
            raise ValueError(
                f"MemVP adapter file {path} is truncated or not a torch file that loads with weights_only=True: "
                f"{error}"
            ) from error
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"MemVP adapter file {path} does not hold a name -> tensor mapping.")
        empty = [key for key, value in state.items() if value.numel() == 0]
    else:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                empty = [key for key in handle.keys() if handle.get_slice(key).get_shape().count(0)]
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"MemVP adapter file {path} is truncated or not a safetensors file: {error}") from error
    if empty:
        raise ValueError(f"MemVP adapter file {path} holds 0-element tensors {empty[:5]} (unconsolidated ZeRO-3 save).")


def adapter_weights_file(folder: str) -> Optional[str]:
    """The weights file peft loads from `folder`: adapter_model.safetensors, else adapter_model.bin, else None."""
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def check_adapter_folder(folder: str) -> None:
    """Finish or clean up an interrupted save of `folder`, then check that it holds a complete adapter (config +
    readable weights) before anything loads it."""
    folder = os.fspath(folder)
    if os.path.isdir(folder):
        recover_adapter_folder(folder)
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(f"{folder} is not an adapter folder (no {CONFIG_NAME}).")
    check_adapter_weights(folder)


def check_adapter_weights(folder: str) -> None:
    """The adapter weights in `folder` are there and whole (a config read from a folder is checked this way before
    anything is injected for it, `guards.check_source_folder`)."""
    weights = adapter_weights_file(folder)
    if weights is None:
        raise ValueError(
            f"MemVP adapter folder {folder} has no {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME} (was the save interrupted?)."
        )
    check_adapter_file_complete(weights)


def global_rank() -> int:
    """This process's rank in the initialised `torch.distributed` process group; 0 without one.

    The launcher's `RANK` variable alone is not trusted: left over in a shell, it made a single process skip its
    save, and a run then reloaded (and reported on) the previous adapter. Every multi-process training this project
    supports (torchrun / DeepSpeed / accelerate through the Trainer) has initialised the group before it saves."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# ------------------------------------------------------------------------------------------- leftovers and recovery


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would send CTRL_C_EVENT on Windows: assume the owner may be running
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process its parent has not reaped yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _owner() -> str:
    return f"{_HOST}-{os.getpid()}-"


def _may_be_running(tail: str, path: str, saving: bool, journal: bool) -> bool:
    """Whether the leftover named `<prefix><tail>` may belong to a save still in progress (then it is left alone).

    Names carry `<host hash>-<pid>-`: on this machine a live pid decides. A save is the only writer of its folder
    (global rank 0), so at save time another machine's leftover is stale; at load time another machine's staging folder
    is kept, and its journal is applied only once untouched for APPLYING_GRACE_S (applying one takes milliseconds)."""
    host, _, rest = tail.partition("-")
    pid = rest.partition("-")[0]
    if not pid.isdigit():
        return False  # not ours, or from a version without owners in the names
    if host == _HOST:
        return int(pid) != os.getpid() and _process_alive(int(pid))
    if saving:
        return False
    if not journal:
        return True
    try:
        return time.time() - os.stat(path).st_mtime < APPLYING_GRACE_S
    except OSError:
        return False


def _is_obsolete(relative: str, manifest_dirs: set) -> bool:
    """An old adapter file in a folder the new save writes, which the new save did not write."""
    return os.path.basename(relative) in ADAPTER_FILES and os.path.dirname(relative) in manifest_dirs


def _journal_manifest(journal: str) -> Optional[list]:
    """The files a journal (`.memvp-ready-*` or `.memvp-undo-*`) lists, or None -- and the journal removed -- when it
    has no manifest: the manifest is written before the journal gets its name and removed only once the journal has
    been applied (or by the user), so a journal without one has nothing left to do."""
    try:
        with open(os.path.join(journal, MANIFEST)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        shutil.rmtree(journal, ignore_errors=True)
        return None


def _roll_forward(target: str, ready: str) -> None:
    """Move a complete journalled save into `target` (weights before config); safe to repeat after a kill."""
    manifest = _journal_manifest(ready)
    if manifest is None:
        return
    for relative in sorted(manifest, key=lambda name: (os.path.basename(name) == CONFIG_NAME, name)):
        source, destination = os.path.join(ready, relative), os.path.join(target, relative)
        if os.path.lexists(source):
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.replace(source, destination)
    dirs = {os.path.dirname(relative) for relative in manifest}
    for folder in dirs:
        for name in ADAPTER_FILES:
            if os.path.join(folder, name) not in manifest:
                try:
                    os.remove(os.path.join(target, folder, name))
                except FileNotFoundError:
                    pass
    _fsync_dir(target)
    _discard_journal(target, ready, READY_PREFIX)


def _roll_back(target: str, undo: str) -> None:
    """Put back the adapter an interrupted `PeftModel.save_pretrained` set aside (weights before config) and remove
    the adapter files that save wrote where the old adapter had none; safe to repeat after a kill."""
    kept = _journal_manifest(undo)
    if kept is None:
        return
    for name in sorted(ADAPTER_FILES, key=lambda file: file == CONFIG_NAME):
        if name not in kept:
            try:
                os.remove(os.path.join(target, name))
            except FileNotFoundError:
                pass
        elif os.path.lexists(os.path.join(undo, name)):  # else it was never set aside: the folder's one is the old
            os.replace(os.path.join(undo, name), os.path.join(target, name))
    _fsync_dir(target)
    _discard_journal(target, undo, UNDO_PREFIX)


def _discard_journal(target: str, journal: str, prefix: str) -> None:
    """Remove a journal that has been applied: one rename from "to apply" to "garbage" (a kill in the rmtree then
    leaves no half journal that a later recovery would apply again), then the garbage."""
    done = os.path.join(target, STAGING_PREFIX + os.path.basename(journal)[len(prefix):])
    try:
        os.rename(journal, done)
    except OSError:
        return  # applied and renamed meanwhile by another process
    shutil.rmtree(done, ignore_errors=True)


def recover_adapter_folder(folder: str, saving: bool = False) -> None:
    """Finish a journalled save that a kill interrupted, undo an unfinished in-place peft save, and remove staging
    leftovers of `folder` (see module docs).

    Called by `save_adapter` and `begin_in_place_save` before they save and by `check_adapter_folder` /
    `MemVPConfig.from_pretrained` before a load; a folder without leftovers is only listed, never written."""
    target = os.path.realpath(os.fspath(folder))
    if os.path.isdir(target):
        for name in sorted(os.listdir(target)):
            path = os.path.join(target, name)
            journal = next((prefix for prefix in (READY_PREFIX, UNDO_PREFIX) if name.startswith(prefix)), None)
            if journal is not None:
                running = _may_be_running(name[len(journal):], path, saving, journal=True)
                if running and journal == UNDO_PREFIX and not saving:
                    owner = name[len(UNDO_PREFIX):].split("-")[1]
                    raise ValueError(
                        f"{target} is being overwritten by PeftModel.save_pretrained in process {owner}, or that save "
                        "failed and that process still runs: until the save finishes the folder holds neither "
                        "adapter whole. Load it once the save has finished, or once that process has exited (the "
                        "load then puts the previous adapter back)."
                    )
                if not running:
                    try:
                        (_roll_forward if journal == READY_PREFIX else _roll_back)(target, path)
                    except (OSError, ValueError) as error:
                        what = "completed" if journal == READY_PREFIX else "undone"
                        raise ValueError(
                            f"{target} holds an interrupted MemVP save ({name}) that could not be {what}: {error}"
                        ) from error
            elif name.startswith(STAGING_PREFIX):
                if not _may_be_running(name[len(STAGING_PREFIX):], path, saving, journal=False):
                    shutil.rmtree(path, ignore_errors=True)
    parent, base = os.path.split(target)
    prefix = f".{base}{STAGING_PREFIX}"
    try:
        beside = os.listdir(parent)
    except OSError:
        return
    for name in beside:
        path = os.path.join(parent, name)
        if name.startswith(prefix) and not _may_be_running(name[len(prefix):], path, saving, journal=False):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- the switch


def _exchange(first: str, second: str) -> None:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); OSError where that is not possible."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here")
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), first, None, second)


def _fsync_dir(path: str) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems cannot sync a folder; the data files themselves were synced
    finally:
        os.close(handle)


def _files_under(folder: str) -> list:
    found = []
    for root, _, files in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, name), folder) for name in files]
    return sorted(found)


def _fsync_file(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _sync_files(folder: str, relatives: list) -> None:
    """Flush the new files to disk before they replace the old ones (a power cut must not leave empty files)."""
    for relative in relatives:
        _fsync_file(os.path.join(folder, relative))
    for root, _, _ in os.walk(folder):
        _fsync_dir(root)


def flush_folder(folder: str) -> None:
    """Flush every file under `folder` and the folders themselves to disk: a folder about to be renamed into place
    must not come back with empty files after a power cut."""
    _sync_files(folder, _files_under(folder))


def _carry_over(source: str, destination: str, manifest: list, move: bool) -> None:
    """Put every entry of `source` that the new save does not replace into `destination`: hard links (OSError where
    impossible), or with `move=True` renames -- the pass after the swap, for files another process wrote meanwhile."""
    written, dirs = set(manifest), {os.path.dirname(relative) for relative in manifest}
    for root, subdirs, files in os.walk(source):
        relative_root = os.path.relpath(root, source)
        relative_root = "" if relative_root == "." else relative_root
        subdirs[:] = [d for d in subdirs if not d.startswith(".memvp-")]
        for name in [d for d in subdirs if os.path.islink(os.path.join(root, d))] + files:
            relative = os.path.join(relative_root, name)
            src, dst = os.path.join(root, name), os.path.join(destination, relative)
            if relative in written or _is_obsolete(relative, dirs) or os.path.lexists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if move:
                os.rename(src, dst)
            elif os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            else:  # no copy when that fails (no hard links here, a mount point inside): the caller takes the journal
                os.link(src, dst)
        subdirs[:] = [d for d in subdirs if not os.path.islink(os.path.join(root, d))]
        for name in subdirs:
            os.makedirs(os.path.join(destination, relative_root, name), exist_ok=True)


def _working_inside(target: str) -> bool:
    try:
        cwd = os.getcwd()
    except OSError:
        return False
    return cwd == target or cwd.startswith(target + os.sep)


def _journal(staging: str, target: str, manifest: list) -> None:
    """Switch by moving the new files in one by one behind a `.memvp-ready-*` marker (see the module docstring)."""
    if os.path.dirname(staging) != target:  # staged beside the target, maybe on another filesystem: copy it in
        inside = tempfile.mkdtemp(prefix=STAGING_PREFIX + _owner(), dir=target)
        for relative in manifest:
            os.makedirs(os.path.dirname(os.path.join(inside, relative)), exist_ok=True)
            shutil.copy2(os.path.join(staging, relative), os.path.join(inside, relative))
        _sync_files(inside, manifest)
        staging = inside
    with open(os.path.join(staging, MANIFEST), "w") as handle:
        json.dump(manifest, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(staging)
    ready = os.path.join(target, READY_PREFIX + os.path.basename(staging)[len(STAGING_PREFIX):])
    os.rename(staging, ready)  # from here on the new adapter wins, whatever happens
    _fsync_dir(target)
    _roll_forward(target, ready)


def _switch(staging: str, target: str, manifest: list) -> None:
    """Make `target` hold the staged adapter (plus the target's other files), by a swap where possible."""
    parent = os.path.dirname(target)
    if not os.path.lexists(target):
        os.rename(staging, target)
        _fsync_dir(parent)
        return
    if os.path.dirname(staging) == parent and not _working_inside(target):
        try:
            _carry_over(target, staging, manifest, move=False)
            _sync_files(staging, [])
            _exchange(staging, target)
        except OSError:
            pass  # nothing has changed in the target: fall back to the journal
        else:
            _carry_over(staging, target, manifest, move=True)  # written into the old folder during the swap
            _fsync_dir(parent)
            return
    _journal(staging, target, manifest)


def _staging_folder(target: str) -> str:
    """A fresh staging folder beside the target (the swap needs the same filesystem), else inside it (journal)."""
    parent, base = os.path.split(target)
    try:
        return tempfile.mkdtemp(prefix=f".{base}{STAGING_PREFIX}{_owner()}", dir=parent)
    except OSError:  # a parent we may not write, or a name too long for the prefix
        os.makedirs(target, exist_ok=True)
        return tempfile.mkdtemp(prefix=STAGING_PREFIX + _owner(), dir=target)


# ------------------------------------------------------------------------------- peft's own save_pretrained, in place

_UNDO_JOURNALS: dict = {}  # folder -> undo journal of the PeftModel.save_pretrained this process runs into it
_UNDO_LOCK = threading.Lock()


def _peft_save_folder(peft_model: Any, adapter_name: str) -> Optional[str]:
    """The folder `PeftModel.save_pretrained` is about to write `adapter_name`'s files into, when that save of this
    very model is what asks for the adapter's tensors now; None otherwise (another caller, a non-main process).

    peft does not pass its folder down to the tuner, and asking the tuner for the tensors is the last moment before
    it overwrites the weights; so the folder is read from that call's own arguments on the stack. The call is found
    by its code object, not by name, and the folder rule is peft's: an adapter other than "default" goes into a
    subfolder of its name."""
    from peft import PeftModel

    code = PeftModel.save_pretrained.__code__
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code is code and frame.f_locals.get("self") is peft_model:
                arguments = frame.f_locals
                if not arguments.get("is_main_process", True):
                    return None
                folder = os.fspath(arguments["save_directory"])
                return folder if adapter_name == "default" else os.path.join(folder, adapter_name)
            frame = frame.f_back
        return None
    finally:
        del frame


def begin_in_place_save(peft_model: Any, adapter_name: str) -> None:
    """Set the folder's current adapter aside before `PeftModel.save_pretrained` overwrites it (module docstring).

    Called by `MemVPModel._get_adapter_state_dict`, i.e. right before peft writes the weights; does nothing when that
    is not a save of `peft_model` or the folder holds no adapter yet. The old config is copied (it stays in place, so
    any reader always finds whole JSON), the old weights files are renamed into the journal (peft then writes a new
    file instead of truncating the only copy). Until `finish_in_place_save` drops the journal, the next load or save
    puts the old adapter back."""
    folder = _peft_save_folder(peft_model, adapter_name)
    if folder is None or not os.path.isdir(folder):
        return
    target = os.path.realpath(folder)
    recover_adapter_folder(target, saving=True)  # an earlier save of this folder that was killed is undone first
    old = [name for name in ADAPTER_FILES if os.path.isfile(os.path.join(target, name))]
    if not old:
        return
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX + _owner(), dir=target)
    try:
        if CONFIG_NAME in old:
            shutil.copy2(os.path.join(target, CONFIG_NAME), os.path.join(staging, CONFIG_NAME))
        with open(os.path.join(staging, MANIFEST), "w") as handle:
            json.dump(old, handle)
        _sync_files(staging, _files_under(staging))
        undo = os.path.join(target, UNDO_PREFIX + os.path.basename(staging)[len(STAGING_PREFIX):])
        os.rename(staging, undo)  # from here on, an unfinished save is undone
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # nothing in the folder has changed
        raise
    _fsync_dir(target)
    with _UNDO_LOCK:
        _UNDO_JOURNALS[target] = undo
    for name in old:
        if name != CONFIG_NAME:
            os.rename(os.path.join(target, name), os.path.join(undo, name))
    _fsync_dir(target)


def finish_in_place_save(folder: str) -> None:
    """The new adapter wins: flush its weights and drop the undo journal `begin_in_place_save` made for `folder`.

    Called by `MemVPConfig.save_pretrained` once the new `adapter_config.json` is in place (peft writes the config
    last); does nothing for a folder this process is not saving into with peft."""
    target = os.path.realpath(os.fspath(folder))
    with _UNDO_LOCK:
        undo = _UNDO_JOURNALS.pop(target, None)
    if undo is None or not os.path.isdir(undo):
        return
    for name in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):  # peft does not flush them; a power cut must not empty them
        if os.path.isfile(os.path.join(target, name)):
            _fsync_file(os.path.join(target, name))
    _fsync_dir(target)
    _discard_journal(target, undo, UNDO_PREFIX)


@contextmanager
def staging_folder_inside(folder: str) -> Iterator[str]:
    """A fresh staging folder inside `folder` (created if missing), removed on exit; one a kill leaves behind is
    removed by the next recovery of `folder`."""
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX + _owner(), dir=folder)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_file(source: str, destination: str) -> None:
    """Move a fully written file over `destination` in one step, flushed to disk first: a reader (and a kill) sees
    the old file or the new one, never a truncated one."""
    _fsync_file(source)
    os.replace(source, destination)
    _fsync_dir(os.path.dirname(os.path.abspath(destination)))


def save_adapter(peft_model: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """`peft_model.save_pretrained(save_directory, ...)`, switched in whole: the folder holds exactly the previous
    adapter until it holds exactly the new one, whenever the process dies.

    Only global rank 0 writes (and only when `is_main_process` is not False). A half-done earlier save is finished or
    cleaned up first; the save goes to a staging folder, is checked (readable, no 0-element tensors), flushed to disk
    and switched in (module docstring); the staging folder is removed whatever happens. Other files in the folder
    stay; old adapter weights the new save does not rewrite (e.g. `.bin` after a safetensors save) are dropped."""
    if not kwargs.get("is_main_process", True) or global_rank() != 0:
        return None
    target = os.path.realpath(os.fspath(save_directory))
    if os.path.lexists(target) and not os.path.isdir(target):
        raise ValueError(f"cannot save the adapter into {save_directory}: it exists and is not a folder.")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    recover_adapter_folder(target, saving=True)
    staging = _staging_folder(target)
    try:
        if os.path.isfile(os.path.join(target, MODEL_CARD)):  # peft updates an existing model card: keep user edits
            shutil.copy2(os.path.join(target, MODEL_CARD), os.path.join(staging, MODEL_CARD))
        type(peft_model).save_pretrained(peft_model, staging, *args, **kwargs)
        manifest = _files_under(staging)
        for relative in manifest:
            if os.path.basename(relative) in (WEIGHTS_NAME, BIN_WEIGHTS_NAME):
                check_adapter_file_complete(os.path.join(staging, relative))
        _sync_files(staging, manifest)
        _switch(staging, target, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the old folder
    return None


def atomic_saves(peft_model: Any) -> Any:
    """Make this one PeftModel instance save through `save_adapter` (the class and other models are untouched).

    The HF `Trainer` saves with `self.model.save_pretrained(...)`; an instance attribute is what it finds first.
    Returns the model, for chaining.
    """

    def save_pretrained(self: Any, save_directory: str, *args: Any, **kwargs: Any) -> None:
        return save_adapter(self, save_directory, *args, **kwargs)

    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)
    return peft_model


# ------------------------------------------------------------------------------------------------------ the model card


SECTION_START = "<!-- memvp-peft: start -->"
SECTION_END = "<!-- memvp-peft: end -->"
CARD_TAGS = ("memvp", "memvp-peft", "vision-language")
PAPER = "https://arxiv.org/abs/2405.05615"
AUTO_CLASSES = {"SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TaskType.SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}


def memvp_card_section(
    config: Any, dataset: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None
) -> str:
    """The card's MemVP section for `config` (a MemVPConfig), with the training data and figures when known."""
    base = config.base_model_name_or_path or "<the base model this adapter was trained on>"
    auto_class = AUTO_CLASSES.get(str(config.task_type), "AutoModelForCausalLM")  # a VLM: its own class, same call
    encoder = config.vision_encoder
    if encoder:
        encoder_line = (
            f"- **Vision encoder:** `{encoder}` (recorded in `adapter_config.json`; `PeftModel.from_pretrained` "
            "attaches it, so `pixel_values` work directly)"
        )
    else:
        encoder_line = (
            "- **Vision encoder:** none recorded: pass `image_features` (patch features of the encoder the adapter "
            "was trained with) or attach an encoder with `memvp_peft.attach_vision_encoder`"
        )
    lines = [
        SECTION_START,
        "## MemVP adapter (memvp-peft)",
        "",
        f"A [MemVP]({PAPER}) adapter (Memory-Space Visual Prompting, ICML 2024) made with "
        "[memvp-peft](https://pypi.org/project/memvp-peft/): the image's projected features are appended to the "
        "key-value memory of every FFN of the frozen language model instead of being prepended as tokens, so the "
        "sequence never grows. It cannot be merged into the base weights (the memory depends on the input).",
        "",
        "Load it with memvp-peft imported first (the import registers the `MEMVP` peft type; without it peft "
        "cannot read `adapter_config.json`):",
        "",
        "```python",
        "import memvp_peft  # pip install memvp-peft",
        "from peft import PeftModel",
        f"from transformers import {auto_class}",
        "",
        f"base = {auto_class}.from_pretrained({json.dumps(base)})",
        "model = PeftModel.from_pretrained(base, \"<this folder or Hub id>\")",
        "```",
        "",
        f"- **Base model:** `{base}` (frozen)",
        encoder_line,
        f"- **Memory:** {config.num_memory_slots} slots of {config.visual_dim}-dim visual features, read "
        f"`{config.memory_read}`, scale s = {config.memory_scale}, lambda = {config.visual_scale}",
    ]
    if config.lora_config is not None:
        lines.append(f"- **LoRA part:** r = {config.lora_config.get('r')}, targets "
                     f"`{config.lora_config.get('target_modules')}` (saved in the same file)")
    if dataset:
        lines.append(f"- **Training data:** {dataset}")
    for key, label in (("heldout_accuracy", "Held-out accuracy"), ("final_loss", "Final training loss"),
                       ("global_steps", "Training steps")):
        value = (metrics or {}).get(key)
        if value is None:
            continue
        shown = f"{value:.2%}" if key == "heldout_accuracy" else (f"{value:.4f}" if isinstance(value, float) else value)
        lines.append(f"- **{label}:** {shown}")
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_model_card(
    folder: str, config: Any, dataset: Optional[str] = None, metrics: Optional[Mapping[str, Any]] = None
) -> None:
    """Add (or replace) the MemVP section and tags of the card in `folder`, keeping the rest of the card."""
    path = os.path.join(folder, MODEL_CARD)
    card = ModelCard.load(path) if os.path.exists(path) else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = card.data.get("library_name") or "peft"  # peft loads it: the Hub's "use this model"
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(CARD_TAGS))
    section = memvp_card_section(config, dataset=dataset, metrics=metrics)
    text = card.text
    if SECTION_START in text and SECTION_END in text:
        before, rest = text.split(SECTION_START, 1)
        after = rest.split(SECTION_END, 1)[1]
        text = before + section + after
    else:
        text = section + "\n\n" + text.lstrip("\n")
    card.text = text
    with staging_folder_inside(folder) as staging:  # a kill leaves the previous card; recovery removes the staging
        staged = os.path.join(staging, MODEL_CARD)
        card.save(staged)
        replace_file(staged, path)
