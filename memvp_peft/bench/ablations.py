"""`--ablations`: the knobs the MemVP paper's analysis studies, each trained and scored on the built-in digit tasks at
one budget, over several seeds.

What varies is one knob of `MemVPConfig` at a time, against MemVP as `memvp-train` runs it on the embedded base
(the `default` variant): the position embeddings p_k / p_v, the scales lambda (`visual_scale`) and s
(`memory_scale`), which layers hold the memory (`layers_to_transform`: the first or the last half), how many slots
the image fills (`pool_kernel=2`: every image's 4x4 patch grid pooled to 2x2) and the read's activation
(`memory_activation="identity"`). Everything else is fixed, so a difference is the knob's:

* the task, base, tokenizer, collator, memory size and optimisation of `memvp-train`'s embedded default
  (`cli.train.build_embedded_base`, `cli.visual_input.build_collator` / `memory_slots`; AdamW(0.9, 0.95), weight
  decay 0.02, 10% warm-up then cosine, gradient clipping at 1.0, batch 32), with one learning rate and one number of
  steps for every variant (one difference: the decay reaches every trainable tensor, where the HF Trainer spares the
  projector's two biases);
* per seed, the seed's split, random base, adapter start and batch order are the same for every variant (the seed
  plays the part it plays in `memvp-train --seed`).

Why a loop of its own instead of `memvp-train`: the runs are many and small (variants x tasks x seeds), so the
batches are collated once per task and seed -- by `memvp-train`'s own collator -- and reused by every variant, and a
run is the optimisation steps and one scoring pass, with nothing written. A held-out record counts as right when
every token of its answer (the digit and <eos>) is the model's argmax given the tokens before it: exactly when
greedy generation would produce the answer and stop, what `memvp-train` scores, from one forward instead of a
generate loop.

Cost is reported three ways: train seconds per step (the median step, wall clock; the machine's load moves it, the
other two do not), trainable parameters, and memory slots with the read's FLOPs per text token (4 n d per layer
holding the memory, MEMVP_SPEC).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..tasks.digits import DIGIT_PATCH_DIM, DIGIT_PATCH_TOKENS, layout_of
from .measure import cpu_name

#: the built-in tasks the ablations run on (`tasks.catalogue.load_task` names)
ABLATION_TASKS = ("digits", "digits-grid", "digits-sequence")
#: `memvp-train`'s learning rate for the digit tasks on the embedded base (`cli.train.default_learning_rate`)
DEFAULT_LR = 3e-2
DEFAULT_STEPS = 200
QUICK_STEPS = 3
#: `memvp-train`'s batch, warm-up share and gradient clipping (its options' and the HF Trainer's defaults)
BATCH_SIZE = 32
WARMUP_RATIO = 0.1
MAX_GRAD_NORM = 1.0
#: held-out records scored per task (all of them: 360 digits, 400 composites); `--quick` scores this many
QUICK_HELD_OUT = 32


@dataclass(frozen=True)
class Variant:
    """One point of the ablation: `MemVPConfig` fields that differ from the default (`fields`), the share of the
    layers that hold the memory (`layers`: None = all, "first" or "last" half), and whether p_k / p_v exist
    (`positions=False`: both fixed at zero -- K = V = lambda f(z), the slots past the image read nothing)."""

    name: str
    knob: str
    label: str
    fields: dict[str, Any] = field(default_factory=dict)
    layers: Optional[str] = None
    positions: bool = True

    def config_fields(self, depth: int) -> dict[str, Any]:
        """The variant's `MemVPConfig` fields on a base of `depth` decoder layers."""
        chosen = dict(self.fields)
        if self.layers is not None:
            half = max(1, depth // 2)
            chosen["layers_to_transform"] = list(range(half)) if self.layers == "first" else list(range(half, depth))
        return chosen

    def prepare(self, model: torch.nn.Module) -> None:
        """What the variant changes after injection: without position embeddings, p_k and p_v are zeroed and frozen
        (no config field removes them; a zero that never trains is the same memory)."""
        if self.positions:
            return
        for name, param in model.named_parameters():
            if name.endswith(("key_pos", "value_pos")):
                with torch.no_grad():
                    param.zero_()
                param.requires_grad_(False)


#: the variants, the default first; each changes one knob
VARIANTS: tuple[Variant, ...] = (
    Variant("default", "(none)", "default: p_k/p_v, lambda 0.01, s 0.1, every layer, all tokens, FFN act"),
    Variant("no_positions", "position embeddings", "no p_k/p_v", positions=False),
    Variant("lambda_0.1", "scale lambda", "lambda = 0.1", {"visual_scale": 0.1}),
    Variant("lambda_1", "scale lambda", "lambda = 1", {"visual_scale": 1.0}),
    Variant("lambda_10", "scale lambda", "lambda = 10", {"visual_scale": 10.0}),
    Variant("s_0.01", "scale s", "s = 0.01", {"memory_scale": 0.01}),
    Variant("s_1", "scale s", "s = 1", {"memory_scale": 1.0}),
    Variant("first_half", "layers", "first half of the layers", layers="first"),
    Variant("last_half", "layers", "last half of the layers", layers="last"),
    Variant("pooled_2x2", "slots", "pooled 2x2 (4 slots per image)", {"pool_kernel": 2}),
    Variant("identity_read", "activation", "identity read: s (x K^T) V", {"memory_activation": "identity"}),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


@dataclass
class TaskData:
    """One task at one seed, collated once: the training rows (as many as the steps can use) and the held-out rows,
    each a dict of `memvp-train`'s collated tensors, and the `MemVPConfig` layout fields of the task."""

    name: str
    seed: int
    train: dict[str, torch.Tensor]
    held_out: dict[str, torch.Tensor]
    layout: dict[str, Any]

    @classmethod
    def load(cls, name: str, seed: int, train_records: int, held_out_records: Optional[int]) -> "TaskData":
        """`name`'s split at `seed` (`load_task`, as `memvp-train --seed`), through `memvp-train`'s collator for the
        embedded base: the first `train_records` training records (a run of S steps of B reads at most S x B) and
        `held_out_records` held-out ones (None: all)."""
        from ..cli.train import build_embedded_base
        from ..cli.visual_input import build_collator, chat_template_choice, embedded_corpus
        from ..tasks.catalogue import load_task
        from ..tasks.digits import DigitPatchFeaturizer

        task = load_task(name, None, None, seed)
        _, tokenizer = build_embedded_base(seed, embedded_corpus(name))
        layout = layout_of(name) or {"image_grid": None, "num_frames": None}
        collator = build_collator(tokenizer, DigitPatchFeaturizer(), input_name="image_features", kind="causal",
                                  array_value_range=task.array_value_range,
                                  chat_template=chat_template_choice(name), image_grid=layout["image_grid"],
                                  num_frames=layout["num_frames"])
        held_out = task.eval if held_out_records is None else task.eval[:held_out_records]
        fields = {"image_grid": list(layout["image_grid"]) if layout["image_grid"] else None,
                  "num_frames": layout["num_frames"]}
        return cls(name, seed, _collate(collator, task.train[:train_records]), _collate(collator, held_out), fields)

    @property
    def train_size(self) -> int:
        return self.train["input_ids"].shape[0]

    def rows(self, part: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: value[idx] for key, value in part.items()}


def _collate(collator: Any, records: list[dict]) -> dict[str, torch.Tensor]:
    """All of `records` as one batch of `collator`'s tensors (in chunks; the rows of a chunk are padded to its longest,
    so chunks of different lengths are padded to the longest of all: on the right, ids 0 and labels -100, as the
    collator pads)."""
    chunks = [collator(records[start : start + 512]) for start in range(0, len(records), 512)]
    keys = ("input_ids", "attention_mask", "labels", "image_features", "image_mask")
    width = max(chunk["input_ids"].shape[1] for chunk in chunks)
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    joined = {}
    for key in keys:
        parts = [chunk[key] for chunk in chunks]
        if key in pads:
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pads[key]) for p in parts]
        joined[key] = torch.cat(parts)
    return joined


def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every labelled token of a row is the argmax of the logits before it -- greedy generation after the
    prompt would write exactly the answer (and its <eos>)."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    labelled = target != -100
    return ((predicted == target) | ~labelled).all(dim=1) & labelled.any(dim=1)


def _slots(data: TaskData, config_fields: dict[str, Any]) -> int:
    """`memvp-train`'s memory size for the task and the variant's compression (`visual_input.memory_slots`)."""
    from ..cli.visual_input import memory_slots
    from ..tuner.config import MemVPConfig

    layout = {**data.layout, **{k: v for k, v in config_fields.items() if k == "pool_kernel"}}
    return memory_slots(MemVPConfig, {"pool_kernel": 1, "pool_tokens": None, "multiscale_tokens": None, **layout},
                        DIGIT_PATCH_TOKENS, None)


def train_and_score(variant: Variant, data: TaskData, steps: int, lr: float) -> dict[str, Any]:
    """One run: the variant on `memvp-train`'s embedded base at the data's seed, `steps` steps at peak `lr`, then
    the held-out accuracy; the run's row."""
    from peft import get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from ..cli.train import build_embedded_base
    from ..cli.visual_input import embedded_corpus
    from ..tuner.config import MemVPConfig

    base, _ = build_embedded_base(data.seed, embedded_corpus(data.name))
    depth = base.config.num_hidden_layers
    chosen = variant.config_fields(depth)
    slots = _slots(data, chosen)
    settings = dict(visual_dim=DIGIT_PATCH_DIM, num_memory_slots=slots, projector_hidden_dim=128, visual_scale=0.01,
                    memory_scale=0.1, memory_dropout=0.1, task_type="CAUSAL_LM", **data.layout)
    config = MemVPConfig(**{**settings, **chosen})
    torch.manual_seed(data.seed)  # the adapter's start: the same for every variant of a seed
    model = get_peft_model(base, config)
    variant.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(WARMUP_RATIO * steps), steps)
    generator = torch.Generator().manual_seed(data.seed)  # the same batches for every variant of a seed
    order, cursor, losses, step_times = torch.randperm(data.train_size, generator=generator), 0, [], []
    model.train()
    for _ in range(steps):
        if cursor + BATCH_SIZE > len(order):
            order, cursor = torch.randperm(data.train_size, generator=generator), 0
        batch = data.rows(data.train, order[cursor : cursor + BATCH_SIZE])
        cursor += BATCH_SIZE
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    accuracy = _held_out_accuracy(model, data)
    layers = len(config.layers_to_transform) if config.layers_to_transform is not None else depth
    width = base.config.hidden_size
    return {
        "task": data.name,
        "variant": variant.name,
        "seed": data.seed,
        "accuracy": accuracy,
        "final_loss": float(sum(losses[-10:]) / len(losses[-10:])) if losses else float("nan"),
        "train_s_per_step": statistics.median(step_times) if step_times else float("nan"),
        "trainable_params": sum(p.numel() for p in params),
        "memory_slots": slots,
        "visual_slots": config.memory_tokens(DIGIT_PATCH_TOKENS, data.layout["num_frames"] or 1),
        "layers_with_memory": layers,
        "read_flops_per_token": 4 * slots * width * layers,
    }


@torch.no_grad()
def _held_out_accuracy(model: torch.nn.Module, data: TaskData) -> float:
    model.eval()
    correct = 0
    total = data.held_out["input_ids"].shape[0]
    for start in range(0, total, 200):
        batch = data.rows(data.held_out, torch.arange(start, min(total, start + 200)))
        labels = batch.pop("labels")
        correct += int(answer_correct(model(**batch).logits, labels).sum())
    return correct / total


#: one run: (task, seed, variant name, steps, lr, held-out records or None for all)
Job = tuple[str, int, str, int, float, Optional[int]]
#: the task data a process collated last, by (task, seed, train records, held-out records): the runs of one task
#: and seed come one after another, so each process collates each of them once
_LAST_DATA: dict[tuple, TaskData] = {}


def run_job(job: Job) -> dict[str, Any]:
    """One run of the ablation, in this process or a worker (`run_ablations`)."""
    task, seed, name, steps, lr, held_out = job
    key = (task, seed, steps * BATCH_SIZE, held_out)
    if key not in _LAST_DATA:
        _LAST_DATA.clear()
        _LAST_DATA[key] = TaskData.load(task, seed, steps * BATCH_SIZE, held_out)
    return train_and_score(next(v for v in VARIANTS if v.name == name), _LAST_DATA[key], steps, lr)


def _start_worker(threads: int) -> None:
    """A worker process: `threads` torch threads, and none of the library chatter the main process also silences."""
    import warnings

    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_ablations(args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of ``--variants`` on every task of ``--ablation_tasks`` at every seed of ``--seeds``, the same
    ``--steps`` and ``--lr`` for all; the runs, their summary per (task, variant) and what was run.

    ``--workers`` processes (each with ``--threads`` torch threads) take the runs in order, one at a time: the runs
    are independent and each is too small to use a second core, so on two cores two of them at once take about
    half the time; a run's seconds per step are then measured beside another run, like every other run's."""
    import multiprocessing

    from tqdm.auto import tqdm

    variants = [v for v in VARIANTS if v.name in args.variants]
    steps, lr = args.steps, args.lr[0]
    held_out = QUICK_HELD_OUT if args.quick else None
    jobs: list[Job] = [(task, seed, v.name, steps, lr, held_out)
                       for task in args.ablation_tasks for seed in args.seeds for v in variants]
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    progress = tqdm(total=len(jobs), desc="ablations", unit="run", dynamic_ncols=True, disable=args.no_progress)
    runs = []
    if args.workers > 1:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with context.Pool(args.workers, initializer=_start_worker, initargs=(args.threads or 1,)) as pool:
            for run in pool.imap_unordered(run_job, jobs):
                runs.append(run)
                progress.set_postfix_str(f"{run['task']} seed {run['seed']} {run['variant']}")
                progress.update()
    else:
        for job in jobs:
            progress.set_postfix_str(f"{job[0]} seed {job[1]} {job[2]}")
            runs.append(run_job(job))
            progress.update()
    progress.close()
    position = {(job[0], job[1], job[2]): i for i, job in enumerate(jobs)}
    runs.sort(key=lambda r: position[r["task"], r["seed"], r["variant"]])
    meta = _meta(args, variants, steps, lr)
    meta["wall_time_s"] = round(time.perf_counter() - started, 1)
    meta["cpu_time_s"] = round(_cpu_seconds() - cpu_started, 1)
    meta["load_average"] = [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"meta": meta, "variants": [_describe(v) for v in variants], "runs": runs,
            "summary": summarise(runs, [v.name for v in variants])}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished workers: what the ablation costs whatever
    else the machine runs (its wall time on a shared machine depends on the others)."""
    import resource

    return sum(item.ru_utime + item.ru_stime
               for item in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def _describe(variant: Variant) -> dict[str, Any]:
    return {"name": variant.name, "knob": variant.knob, "label": variant.label, "fields": variant.fields,
            "layers": variant.layers, "positions": variant.positions}


def summarise(runs: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Per (task, variant): accuracy mean, sample standard deviation, min and max over the seeds, the median train
    s/step, and the cost columns; the accuracy difference to the task's `default` variant where it ran."""
    rows = []
    for task in dict.fromkeys(r["task"] for r in runs):
        for name in order:
            mine = [r for r in runs if r["task"] == task and r["variant"] == name]
            if not mine:
                continue
            accuracies = [r["accuracy"] for r in mine]
            rows.append({
                "task": task, "variant": name, "seeds": [r["seed"] for r in mine],
                "accuracy_mean": statistics.fmean(accuracies),
                "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
                "train_s_per_step": statistics.median(r["train_s_per_step"] for r in mine),
                **{key: mine[0][key] for key in ("trainable_params", "memory_slots", "visual_slots",
                                                  "layers_with_memory", "read_flops_per_token")},
            })
    for row in rows:
        default = next((r for r in rows if r["task"] == row["task"] and r["variant"] == "default"), None)
        row["delta_vs_default"] = None if default is None else row["accuracy_mean"] - default["accuracy_mean"]
    return rows


def _meta(args: argparse.Namespace, variants: list[Variant], steps: int, lr: float) -> dict[str, Any]:
    return {
        "command": "memvp-bench " + " ".join(args.argv),
        "tasks": list(args.ablation_tasks),
        "seeds": list(args.seeds),
        "variants": [v.name for v in variants],
        "steps": steps,
        "lr": lr,
        "batch_size": BATCH_SIZE,
        "budget": f"{steps} steps of batch {BATCH_SIZE} at peak lr {lr:g} for every variant; AdamW(0.9, 0.95), "
                  f"weight decay 0.02, {WARMUP_RATIO:.0%} warm-up then cosine, gradient clipping {MAX_GRAD_NORM}",
        "base": "memvp-train's embedded base: random frozen Llama, width 128, 2 layers (seeded by the seed)",
        "default_memvp": "memvp-train's default: lambda 0.01, s 0.1, memory dropout 0.1, projector hidden 128, every "
                         "layer, the visual tokens + 25% (at least + 16) slots, the FFN's own activation",
        "scoring": "held-out records whose answer (digit + <eos>) greedy decoding writes exactly"
                   + (f" (--quick: the first {QUICK_HELD_OUT})" if args.quick else " (all of them)"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def ablations_markdown(report: dict[str, Any]) -> str:
    """One table per task: accuracy mean +- standard deviation (min-max) over the seeds, its difference to the
    default, and the costs."""
    meta = report["meta"]
    labels = {v["name"]: v for v in report["variants"]}
    lines = [
        "# memvp-bench ablations",
        "",
        f"`{meta['command']}` -- {meta['budget']}; seeds {', '.join(map(str, meta['seeds']))}. Base: {meta['base']}. "
        f"Default MemVP: {meta['default_memvp']}. Accuracy: {meta['scoring']}. {meta['processor']}, "
        f"{meta['workers']} worker process(es) of {meta['torch_threads']} thread(s), torch {meta['torch']}; wall time "
        f"{meta['wall_time_s']:.0f} s, CPU time {meta['cpu_time_s']:.0f} s (load average at the end: "
        f"{meta['load_average']}).",
    ]
    for task in meta["tasks"]:
        lines += ["", f"## {task}", "",
                  "| knob | variant | accuracy % (mean ± sd, min-max) | Δ vs default | train ms/step | trainable | "
                  "slots (visual) | layers | read FLOPs/token |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in (r for r in report["summary"] if r["task"] == task):
            variant = labels[row["variant"]]
            delta = row["delta_vs_default"]
            shown = "" if delta is None or row["variant"] == "default" else f"{100 * delta:+.1f}"
            lines.append(
                f"| {variant['knob']} | {variant['label']} | **{_pct(row['accuracy_mean'])}** ± "
                f"{_pct(row['accuracy_std'])} ({_pct(row['accuracy_min'])}-{_pct(row['accuracy_max'])}) | {shown} | "
                f"{1e3 * row['train_s_per_step']:.1f} | {row['trainable_params']:,} | {row['memory_slots']} "
                f"({row['visual_slots']}) | {row['layers_with_memory']} | {row['read_flops_per_token']:,} |"
            )
    return "\n".join(lines) + "\n"


def plot_ablations(report: dict[str, Any], path: Path) -> None:
    """One panel per task: every seed's accuracy as a dot, the mean as a bar with the standard deviation, per
    variant; the default's mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["meta"]["tasks"]
    names = [v["name"] for v in report["variants"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4.6), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        summary = {r["variant"]: r for r in report["summary"] if r["task"] == task}
        xs = range(len(names))
        means = [100 * summary[n]["accuracy_mean"] for n in names]
        stds = [100 * summary[n]["accuracy_std"] for n in names]
        ax.bar(xs, means, yerr=stds, color=["tab:green" if n == "default" else "tab:blue" for n in names],
               alpha=0.45, capsize=3)
        for x, name in zip(xs, names):
            seeds = [100 * r["accuracy"] for r in report["runs"] if r["task"] == task and r["variant"] == name]
            ax.plot([x] * len(seeds), seeds, "k.", ms=4)
        if "default" in summary:
            ax.axhline(100 * summary["default"]["accuracy_mean"], color="tab:green", ls="--", lw=1)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy % (bars: mean ± sd; dots: seeds)")
    meta = report["meta"]
    fig.suptitle(f"MemVP ablations: {meta['steps']} steps, lr {meta['lr']:g}, seeds "
                 f"{', '.join(map(str, meta['seeds']))}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
