"""What a training run leaves behind for people: a loss curve PNG, a metrics JSON, periodic loss lines."""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import TrainerCallback


def logged_losses(log_history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training-loss entries of `trainer.state.log_history`.

    Why the Trainer's history and not a callback's own list: a run resumed from `checkpoint-N` restores the history
    from `trainer_state.json`, so the curve and the metrics cover the whole run, not just the part after the resume.
    """
    entries = [entry for entry in log_history if "loss" in entry and "step" in entry]
    return [int(entry["step"]) for entry in entries], [float(entry["loss"]) for entry in entries]


class LossPrinter(TrainerCallback):
    """Prints the Trainer's logged losses (rank 0) as readable lines."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D401  (Trainer callback signature)
        if logs and "loss" in logs and state.is_world_process_zero:
            lr = logs.get("learning_rate")
            lr_text = f"  lr {lr:.2e}" if isinstance(lr, (int, float)) else ""
            print(f"step {state.global_step:>6}/{state.max_steps}  loss {logs['loss']:.4f}{lr_text}", flush=True)


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
