"""How `memvp-train` writes while it trains: every `checkpoint-N` appears whole or not at all, and a write that fails
(a full disk, a quota or file-size limit, a read-only folder) ends the run with one error line.

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

from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..tuner.save_load import flush_folder

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
