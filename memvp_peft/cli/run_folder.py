"""`memvp-train`'s `output_dir`: which folders a run may write, and how a run replaces a previous one.

A refused or failed run must leave a previous run in `output_dir` as it was -- an old adapter next to a new base, or
no adapter at all after a crash, is what `memvp-infer` would then load. So:

* nothing is written before every check has passed (`check_output_dir`, and `cli.train.check_request` around it);
* a run that replaces a previous one (`--overwrite_output_dir`) trains into `output_dir/.memvp-new-run/` and the
  previous run stays in place until the new one has trained and saved its adapter (`start_run_folder`,
  `finish_run_folder`). Then the previous run's files are renamed into `output_dir/.memvp-old-run/`, the new run's
  are renamed in -- its adapter files last, so an adapter is never there before its base and checkpoints -- and the
  old folder is removed. Every step is a rename within one folder, so the switch is quick and never copies; a run
  killed in the middle of it leaves both hidden folders, which the next `--overwrite_output_dir` run removes.

A replacing run that fails or is killed while it trains leaves the previous run as it was, and what it wrote itself
(its checkpoints) in `.memvp-new-run/` until the next run; resuming from a checkpoint in there is refused, since that
run would remove it first: move the checkpoint out.

A run that writes into a new or empty folder, or continues a run from one of its checkpoints, writes in place.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch

from ..tuner.save_load import global_rank
from .options import TrainOptions
from .record import CLI_RECORD

# what a memvp-train run writes into output_dir, besides its checkpoint-* folders
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", CLI_RECORD, "metrics.json", "loss_curve.png",
             "training_args.bin", "base_model")
#: inside output_dir: where a run replacing a previous one trains, and where the previous run goes when it is replaced
NEW_RUN_FOLDER, OLD_RUN_FOLDER = ".memvp-new-run", ".memvp-old-run"
# switched in last: an adapter appears once everything it refers to (its base, the checkpoints) is in place
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def _is_inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def writable_folder_problem(folder: str) -> Optional[str]:
    """Why `folder` cannot be created or written (the nearest folder that exists, itself or one above it, is a file
    or not writable), or None when it can."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing!r} is not a writable folder"
    return None


def check_output_dir(options: TrainOptions) -> list[str]:
    """Refuse an `output_dir` that is a file, or a non-empty folder (the HF convention) unless the run replaces it
    (`--overwrite_output_dir`) or continues it (`--resume_from_checkpoint` one of its checkpoints). Returns the paths a
    replacing run removes once it has trained: the previous run's own files and `checkpoint-*` folders (old checkpoints
    are not mixed with the new ones), and what a killed replacing run left. Anything else in the folder is left
    alone."""
    out = options.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output_dir {out!r} is a file, not a folder: pass a new or empty folder.")
    problem = writable_folder_problem(out)
    if problem is not None:
        verb = "created" if problem.endswith("is a file") else "written"
        raise ValueError(f"output_dir {out!r} cannot be {verb}: {problem}.")
    entries = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if not entries:
        return []
    ours = [name for name in entries
            if name in RUN_FILES or name.startswith("checkpoint-") or name in (NEW_RUN_FOLDER, OLD_RUN_FOLDER)]
    resume = options.resume_from_checkpoint
    unfinished = next((name for name in (NEW_RUN_FOLDER, OLD_RUN_FOLDER)
                       if resume is not None and _is_inside(resume, os.path.join(out, name))), None)
    if unfinished is not None:
        raise ValueError(f"resume_from_checkpoint {resume!r} is inside {unfinished}, what a replacing run that did not "
                         f"finish left in {out!r}; the next run into {out!r} removes it: move the checkpoint out of "
                         f"{out!r} first, then resume from there.")
    if resume is not None and _is_inside(resume, out):
        if options.overwrite_output_dir:
            raise ValueError(f"--overwrite_output_dir would remove the run in {out!r}, including {resume!r} that "
                             "--resume_from_checkpoint continues from: drop --overwrite_output_dir to continue it.")
        return []  # continuing this folder's run: its checkpoints are kept, the Trainer writes the later ones
    if not options.overwrite_output_dir:
        shown = ", ".join((ours or entries)[:4]) + (", ..." if len(ours or entries) > 4 else "")
        what = f"already holds a run ({shown})" if ours else f"is not empty ({shown})"
        raise ValueError(f"output_dir {out!r} {what}: pass --overwrite_output_dir to replace it, or another "
                         "--output_dir.")
    return [os.path.join(out, name) for name in ours]


def _barrier() -> bool:
    """Wait for every rank of a launch (a single process has none); whether there was a process group."""
    launched = torch.distributed.is_available() and torch.distributed.is_initialized()
    if launched:
        torch.distributed.barrier()
    return launched


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def run_folder_of(output_dir: str, replaced: list[str]) -> str:
    """The folder a run trains into: `output_dir`, or with a previous run to replace `output_dir/.memvp-new-run`."""
    return os.path.join(output_dir, NEW_RUN_FOLDER) if replaced else output_dir


def start_run_folder(output_dir: str, replaced: list[str], embedded_base: Optional[tuple[Any, Any]]) -> None:
    """The run's first write, once every check has passed: the folder the run trains into (`run_folder_of`), with the
    embedded base (model, tokenizer) in its `base_model/`.

    Under a launcher every rank checked `output_dir`; the barrier before rank 0 writes keeps a slower rank from
    finding rank 0's new files and refusing the run, and the one after keeps the others from going on before it is
    done. The rank is the process group's (a single process is rank 0), not a RANK variable left in the environment.
    """
    folder = run_folder_of(output_dir, replaced)
    _barrier()
    if global_rank() == 0:
        for leftover in (NEW_RUN_FOLDER, OLD_RUN_FOLDER):  # of a replacing run that was killed
            _remove(os.path.join(output_dir, leftover))
        os.makedirs(folder, exist_ok=True)
        if embedded_base is not None:
            model, tokenizer = embedded_base
            model.save_pretrained(os.path.join(folder, "base_model"))
            tokenizer.save_pretrained(os.path.join(folder, "base_model"))
    _barrier()


def finish_run_folder(output_dir: str, folder: str, replaced: list[str]) -> None:
    """Once the run in `folder` has trained and saved its adapter: switch it in for the previous run it replaces
    (module docstring), on rank 0 between two barriers. Nothing to do for a run that wrote into `output_dir`."""
    if os.path.abspath(folder) == os.path.abspath(output_dir):
        return
    _barrier()
    if global_rank() == 0:
        old = os.path.join(output_dir, OLD_RUN_FOLDER)
        os.makedirs(old)
        new_entries = sorted(os.listdir(folder), key=lambda name: (name in _ADAPTER_FILES, name))
        # the previous run's files, and whatever of the folder the new run writes again, go aside first
        for path in [path for path in replaced if os.path.basename(path) not in (NEW_RUN_FOLDER, OLD_RUN_FOLDER)] + [
            os.path.join(output_dir, name) for name in new_entries
        ]:
            if os.path.lexists(path):
                os.replace(path, os.path.join(old, os.path.basename(path)))
        for name in new_entries:
            os.replace(os.path.join(folder, name), os.path.join(output_dir, name))
        os.rmdir(folder)
        shutil.rmtree(old)
    _barrier()
