"""What a training run leaves behind for people: a loss curve PNG, a metrics JSON, one line per logged loss -- and
nothing they cannot act on (no duplicated log lines, no library deprecation warnings about library code)."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import TYPE_CHECKING, Any, Iterator

from transformers.trainer_callback import PrinterCallback, ProgressCallback

if TYPE_CHECKING:
    from transformers import Trainer


def logged_losses(log_history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training-loss entries of `trainer.state.log_history`.

    Why the Trainer's history and not a callback's own list: a run resumed from `checkpoint-N` restores the history
    from `trainer_state.json`, so the curve and the metrics cover the whole run, not just the part after the resume.
    """
    entries = [entry for entry in log_history if "loss" in entry and "step" in entry]
    return [int(entry["step"]) for entry in entries], [float(entry["loss"]) for entry in entries]


class _LossLines:
    """Mixin for the Trainer's own log callback: a log holding the training loss becomes one readable line (rank 0),
    any other log (the end-of-training summary) is left to the Trainer's callback.

    Why replace the Trainer's callback rather than add a printer next to it: both printed every logged step, our
    line and the Trainer's dict of the same numbers.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401  (Trainer callback signature)
        if not (logs and "loss" in logs):
            return super().on_log(args, state, control, logs=logs, **kwargs)
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            lr = logs.get("learning_rate")
            lr_text = f"  lr {lr:.2e}" if isinstance(lr, (int, float)) else ""
            # tqdm.write: the line goes above the progress bar instead of into it
            tqdm.write(f"step {state.global_step:>6}/{state.max_steps}  loss {logs['loss']:.4f}{lr_text}")
        return None


class LossProgressBar(_LossLines, ProgressCallback):
    """The Trainer's progress bar, with each logged loss as one line instead of the log dict."""


class LossPrinter(_LossLines, PrinterCallback):
    """The Trainer's printer (its choice when tqdm is disabled), with each logged loss as one line."""


def print_each_loss_once(trainer: "Trainer") -> None:
    """Swap the Trainer's log callback (progress bar or printer) for the same one printing our loss lines."""
    for default, ours in ((ProgressCallback, LossProgressBar), (PrinterCallback, LossPrinter)):
        if trainer.pop_callback(default) is not None:
            trainer.add_callback(ours)


@contextlib.contextmanager
def without_peft_probe_warning() -> Iterator[None]:
    """Silence one FutureWarning while a model is wrapped or loaded with peft, and only that one.

    peft 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5 deprecates in
    favour of `is_activation_checkpointing`: every `get_peft_model` / `PeftModel.from_pretrained` printed the warning,
    about code that is neither ours nor the user's. Scoped (`catch_warnings`), so the process's filters are unchanged.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def save_loss_curve(steps: list[int], losses: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, marker="o" if len(steps) < 30 else None, linewidth=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_metrics(path: str, metrics: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)
