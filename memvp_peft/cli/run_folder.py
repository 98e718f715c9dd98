"""`memvp-train`'s `output_dir`: which folders a run may write, how a run replaces a previous one, and how it writes
while it trains: every `checkpoint-N` appears whole or not at all, and a write that fails (a full disk, a quota or
file-size limit, a read-only folder) ends the run with one error line.

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

Why checkpoints are staged: the HF `Trainer` writes a checkpoint file by file into `output_dir/checkpoint-N`
(adapter, optimizer, scheduler, RNG state, `trainer_state.json`). A run that stops in the middle -- the disk fills
while `optimizer.pt` is written, the process is killed -- leaves a `checkpoint-N` without its optimizer, scheduler,
RNG state or trainer state, and `--resume_from_checkpoint` (transformers' `get_last_checkpoint` takes the highest
`checkpoint-N` folder there is) would then pick exactly that one. `StagedCheckpointTrainer` lets the `Trainer` write
the checkpoint into `output_dir/.checkpoint-N.memvp-staging/checkpoint-N`, a name neither `get_last_checkpoint` nor
the checkpoint rotation matches, and renames it to `output_dir/checkpoint-N` once every rank has written its part.
Leftovers of a killed run are removed by the next checkpoint save.

Why failed writes are translated: they surface as `OSError` tracebacks, as safetensors' `Error while serializing:
I/O error`, or as torch's `[enforce fail at inline_container.cc] unexpected pos` -- none of which says what happened
to the run. `refusing_write_failures` turns exactly these (never an error of reading) into the CLI's one-line
`ValueError`, which says what was being written and what is left.
"""

from __future__ import annotations

import errno
import os
import shutil
from typing import Any, Callable, Optional

import torch
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..tuner.save_load import flush_folder, global_rank
from .model_loading import RUN_MANIFEST
from .options import TrainOptions

# what a memvp-train run writes into output_dir, besides its checkpoint-* folders
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", RUN_MANIFEST, "metrics.json", "loss_curve.png",
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


# ---------------------------------------------------------------------------------------------- writing while training

STAGING_SUFFIX = ".memvp-staging"
# errors only a write can raise (EACCES / EPERM can come from a read too: those count inside a checkpoint save only)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# what torch.save raises when its file cannot be written to the end (the errno is lost inside its C++ writer)
_TORCH_WRITE_ERRORS = ("inline_container", "PytorchStreamWriter", "iostream error")
WHY = "The disk may be full, a quota or file-size limit reached, or the folder read-only."


def write_failure(error: BaseException, writing: bool = False) -> Optional[str]:
    """What went wrong, in a few words, when `error` (or an error it was raised from) is a failed write; else None.

    With `writing=True` the error came from code that only writes, so any `OSError` counts."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if isinstance(error, OSError) and (writing or error.errno in _WRITE_ERRNOS):
            return f"{error.strerror or text}" + (f" ({error.filename})" if error.filename else "")
        if type(error).__name__ == "SafetensorError" and text.startswith("Error while serializing"):
            return text.split("I/O error: ", 1)[-1]
        if isinstance(error, RuntimeError) and any(mark in text for mark in _TORCH_WRITE_ERRORS):
            return "torch.save could not write its file to the end"
        error = error.__cause__ or error.__context__
    return None


def refusing_write_failures(action: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`action(options)`, with a failed write anywhere in the run raised as one `ValueError` naming `output_dir`."""

    def run(options: Any) -> Any:
        try:
            return action(options)
        except ValueError:
            raise
        except Exception as error:
            reason = write_failure(error)
            if reason is None:
                raise
            raise ValueError(
                f"writing the run into output_dir {options.output_dir!r} failed: {reason}. {WHY} Its complete "
                "checkpoints and a saved adapter are whole (a failed one is never left half-written): free some space "
                "or pass a writable --output_dir, then run again or --resume_from_checkpoint the last checkpoint."
            ) from error

    return run


class StagedCheckpointTrainer(Trainer):
    """The HF `Trainer`, with each `checkpoint-N` written into a staging folder and renamed into place whole (module
    docstring); a checkpoint that cannot be written raises a `ValueError` and leaves no `checkpoint-N` behind."""

    _memvp_staging_run: Optional[str] = None

    def _get_output_dir(self, trial: Any) -> str:
        """Where the `Trainer` writes a checkpoint: the staging folder while `_save_checkpoint` runs."""
        if self._memvp_staging_run is not None:
            return self._memvp_staging_run
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_run = os.path.join(run_dir, f".{name}{STAGING_SUFFIX}")
        staged, final = os.path.join(staging_run, name), os.path.join(run_dir, name)
        if self.args.should_save:
            self._remove_staging_leftovers(run_dir)
        self.accelerator.wait_for_everyone()  # no rank writes into the staging folder before it is fresh
        self._memvp_staging_run = staging_run
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (RNG state, DeepSpeed shards) there
        except Exception as error:
            self._refuse(error, name, run_dir, staging_run)
        finally:
            self._memvp_staging_run = None
        self.accelerator.wait_for_everyone()  # every part is written before rank 0 moves the folder
        best_was_staged = self.state.best_model_checkpoint == staged  # the Trainer found it where it wrote it
        if best_was_staged:
            self.state.best_model_checkpoint = final
        if not self.args.should_save:
            return
        try:
            if best_was_staged and os.path.isfile(os.path.join(staged, TRAINER_STATE_NAME)):
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))  # with the path it will have
            flush_folder(staged)
            if os.path.lexists(final):  # a checkpoint of this step from an earlier run: replaced whole
                os.rename(final, os.path.join(staging_run, f"{name}.replaced"))
            os.rename(staged, final)
        except OSError as error:
            self._refuse(error, name, run_dir, staging_run)
        shutil.rmtree(staging_run, ignore_errors=True)
        rotate_checkpoints(  # the Trainer rotated inside the staging folder, where only this checkpoint was
            output_dir=run_dir, save_total_limit=self.args.save_total_limit,
            best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
        )

    def _remove_staging_leftovers(self, run_dir: str) -> None:
        """Staging folders of checkpoints a killed run did not finish (one run writes a run folder at a time)."""
        if os.path.isdir(run_dir):
            for entry in os.listdir(run_dir):
                if entry.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and entry.endswith(STAGING_SUFFIX):
                    shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)

    def _refuse(self, error: BaseException, name: str, run_dir: str, staging_run: str) -> None:
        """Remove what this checkpoint left and raise: a `ValueError` for a failed write (any `OSError` here: this
        code only writes), else the error itself."""
        if self.args.should_save:
            shutil.rmtree(staging_run, ignore_errors=True)
        reason = write_failure(error, writing=True)
        if reason is None:
            raise error
        raise ValueError(
            f"could not write {name} into {run_dir!r}: {reason}. {WHY} No {name} was left: the last complete "
            "checkpoint, if any, is still the one --resume_from_checkpoint continues from."
        ) from error
