"""`--accuracy`: MemVP vs input-space + LoRA on scikit-learn's real digits, at an equal training budget.

The sweep times random features; this mode shows what the methods learn for that time: same frozen base, same
steps, batches, optimizer and schedule, comparable trainable parameters, the learning rate chosen per method on a
validation slice and the held-out test scored once.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..demo_models import FixedVocabTokenizer, tiny_llama_config
from ..tasks.digits import digit_scan_tokens
from .measure import cpu_name
from .methods import METHOD_LABELS, Batch, LoRAMethod, MemVPMethod, Method


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = "what digit is this ?"
#: the two methods compared, in the order every learning rate trains them
_COMPARED = ("memvp", "input_lora")


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """MemVP vs input-space + LoRA on real digits at equal budget.

    Same frozen base, same steps, batches, optimizer and schedule, comparable trainable parameters. Each method is
    trained at every learning rate of ``--lr``; the one with the best validation accuracy (a slice of the training
    images) is selected, and its held-out test accuracy is the result.
    """
    task = _DigitsTask.load(args)
    steps = args.steps if args.steps is not None else (10 if args.quick else 1000)
    lrs = args.lr[:1] if args.quick else args.lr
    runs = [_train_and_score(name, lr, task, args, steps) for lr in lrs for name in _COMPARED]
    return {"meta": _accuracy_meta(args, task, steps, lrs), "selected": _select_by_validation(runs), "runs": runs}


@dataclass
class _DigitsTask:
    """The digits as the methods see them: 16 visual tokens per scan, the question and the digit word as the answer,
    split into training images, a validation slice (it picks the learning rate) and a held-out test (scored once)."""
    features: torch.Tensor
    targets: torch.Tensor
    train_idx: Any
    val_idx: Any
    test_idx: Any
    tokenizer: FixedVocabTokenizer
    prompt: list[int]

    @classmethod
    def load(cls, args: argparse.Namespace) -> "_DigitsTask":
        """Stratified splits by ``--seed`` (both methods see the same images); ``--quick`` scores 64 of each."""
        import numpy as np
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        features = digit_scan_tokens(digits.images)
        targets = torch.from_numpy(digits.target).long()
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)), test_size=0.2, random_state=args.seed, stratify=digits.target
        )
        train_idx, val_idx = train_test_split(
            train_idx, test_size=0.15, random_state=args.seed, stratify=digits.target[train_idx]
        )
        if args.quick:
            val_idx, test_idx = val_idx[:64], test_idx[:64]
        tokenizer = FixedVocabTokenizer([*PROMPT.split(), *DIGIT_WORDS])
        return cls(features, targets, train_idx, val_idx, test_idx, tokenizer, tokenizer.encode(PROMPT, add_bos=True))

    def batch_of(self, idx: Any) -> Batch:
        """The prompt and its answer (the digit word + eos) for the images `idx`; the loss is on the answer only."""
        idx = torch.as_tensor(idx)
        rows = [self.prompt + [self.tokenizer.token_to_id[DIGIT_WORDS[int(y)]], self.tokenizer.eos_token_id]
                for y in self.targets[idx]]
        ids = torch.tensor(rows)
        labels = ids.clone()
        labels[:, : len(self.prompt)] = -100  # answer-only loss
        return Batch(ids, torch.ones_like(ids), labels, self.features[idx])

    @torch.no_grad()
    def accuracy(self, method: Method, indices: Any) -> float:
        """The share of `indices` whose greedy answer after the prompt is exactly their digit word."""
        method.train(False)
        correct = 0
        for chunk in range(0, len(indices), 256):
            part = indices[chunk : chunk + 256]
            batch = self.batch_of(part)
            batch.input_ids = batch.input_ids[:, : len(self.prompt)]
            batch.attention_mask = batch.attention_mask[:, : len(self.prompt)]
            out = method.model.generate(**method.inputs(batch), max_new_tokens=2, do_sample=False, pad_token_id=0,
                                        eos_token_id=self.tokenizer.eos_token_id)
            for row, y in zip(method.new_tokens(batch, out), self.targets[torch.as_tensor(part)]):
                correct += self.tokenizer.decode(row) == DIGIT_WORDS[int(y)]
        return correct / len(indices)


def _build_method(name: str, task: _DigitsTask, args: argparse.Namespace) -> Method:
    """`name` on a fresh frozen base, the same one for every run (seeded by ``--seed``), so that the runs differ only
    in the method and the learning rate."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = tiny_llama_config(
        len(task.tokenizer), args.acc_hidden_size, max_position_embeddings=64, tie_word_embeddings=False,
        # a frozen random lm_head with the default 0.02 init caps the answer probability (logits within +-2.5)
        initializer_range=0.1,
    )
    base = LlamaForCausalLM(config)
    base.requires_grad_(False)
    visual_dim = task.features.shape[2]
    if name == "memvp":
        return MemVPMethod(base, visual_dim, task.features.shape[1] + args.acc_extra_slots, args.projector_hidden_dim)
    return LoRAMethod(base, True, visual_dim, args.projector_hidden_dim, args.lora_r, args.lora_alpha,
                      args.lora_dropout, args.lora_targets)


def _lr_schedule(steps: int) -> Callable[[int], float]:
    """The learning-rate factor of a step: 5% linear warm-up, then a half cosine down to 0 at `steps`."""
    def schedule(step: int) -> float:
        warm = max(1, steps // 20)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return schedule


def _train_and_score(name: str, lr: float, task: _DigitsTask, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """One run: `steps` AdamW steps of method `name` at peak learning rate `lr` on batches drawn in the same order
    for every run, then the validation and held-out test accuracies; the run's row with its loss curve."""
    import numpy as np
    from tqdm.auto import tqdm

    method = _build_method(name, task, args)
    params = method.parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_schedule(steps))
    generator = torch.Generator().manual_seed(args.seed)  # identical batches for both methods
    train_idx = task.train_idx
    order, cursor, losses = torch.randperm(len(train_idx), generator=generator), 0, []
    method.train(True)
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"{name} lr={lr:g}", unit="step", dynamic_ncols=True,
                  disable=args.no_progress, leave=False):
        if cursor + args.acc_batch_size > len(order):
            order, cursor = torch.randperm(len(train_idx), generator=generator), 0
        idx = train_idx[order[cursor : cursor + args.acc_batch_size].numpy()]
        cursor += args.acc_batch_size
        method.train(True)
        loss = method.loss(task.batch_of(idx))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    train_time = time.perf_counter() - start
    val_accuracy = task.accuracy(method, task.val_idx)
    start = time.perf_counter()
    test_accuracy = task.accuracy(method, task.test_idx)
    eval_time = time.perf_counter() - start
    return {
        "method": name,
        "label": METHOD_LABELS[name],
        "lr": lr,
        "val_accuracy": val_accuracy,
        "heldout_accuracy": test_accuracy,
        "trainable_params": method.trainable_parameters(),
        "train_time_s": round(train_time, 2),
        "ms_per_step": round(1e3 * train_time / steps, 2),
        "eval_time_s": round(eval_time, 3),
        "final_loss": float(np.mean(losses[-20:])),
        "losses": [round(v, 5) for v in losses],
    }


def _select_by_validation(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each method's run with the best validation accuracy (the lower final loss breaks a tie), marked ``selected``
    in `runs`; the selected rows without their loss curves, by method. The test accuracy never chooses."""
    selected = {}
    for name in _COMPARED:
        mine = [r for r in runs if r["method"] == name]
        best = max(mine, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
        best["selected"] = True
        selected[name] = {k: v for k, v in best.items() if k != "losses"}
    for run in runs:
        run.setdefault("selected", False)
    return selected


def _accuracy_meta(args: argparse.Namespace, task: _DigitsTask, steps: int, lrs: list[float]) -> dict[str, Any]:
    """What was compared and how (the report's ``meta``), so that the accuracies can be read and reproduced."""
    features = task.features
    return {
        "command": "python -m memvp_peft.bench " + " ".join(args.argv),
        "task": "scikit-learn load_digits (1,797 real 8x8 scans); 16 visual tokens per image (2x2 patches: 4 "
                "pixels + (row, col)), visual_dim 6; prompt 'what digit is this ?', answer the digit word + "
                "<eos>, answer-only loss; accuracy = exact greedy generate of the digit word",
        "split": f"stratified: {len(task.train_idx)} train / {len(task.val_idx)} validation (selects the lr) / "
                 f"{len(task.test_idx)} held-out test",
        "base": f"random frozen Llama, width {args.acc_hidden_size}, 2 layers, FFN {2 * args.acc_hidden_size} "
                f"(seed {args.seed})",
        "steps": steps,
        "batch_size": args.acc_batch_size,
        "learning_rates": lrs,
        "optimizer": "AdamW(0.9, 0.95), weight decay 0.02, 5% linear warm-up then half-cosine, grad clip 1.0",
        "memvp": f"{features.shape[1] + args.acc_extra_slots} slots (16 visual + {args.acc_extra_slots} learned), "
                 f"projector hidden {args.projector_hidden_dim}, paper scales/dropout",
        "input_lora": f"same projector to width {args.acc_hidden_size}, 16 prepended input embeddings, LoRA r="
                      f"{args.lora_r} alpha {args.lora_alpha} dropout {args.lora_dropout} on {args.lora_targets}",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
    }


def accuracy_markdown(report: dict[str, Any]) -> str:
    """The accuracy report as markdown: the selected run per method first, then every (method, lr) run."""
    meta = report["meta"]
    lines = [
        "# memvp-bench accuracy at equal budget",
        "",
        f"Task: {meta['task']}. Split: {meta['split']}. Base: {meta['base']}. {meta['steps']} steps of batch "
        f"{meta['batch_size']} for every run, {meta['optimizer']}. MemVP: {meta['memvp']}. Input-space: "
        f"{meta['input_lora']}. {meta['processor']}, {meta['torch_threads']} thread(s), torch {meta['torch']}.",
        "",
        "Selected by validation accuracy (one lr per method):",
        "",
        "| method | trainable | lr | validation | held-out test | train time s | ms/step | test eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["selected"].values():
        lines.append(
            f"| {r['label']} | {r['trainable_params']:,} | {r['lr']:g} | {100 * r['val_accuracy']:.1f}% | "
            f"**{100 * r['heldout_accuracy']:.1f}%** | {r['train_time_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['eval_time_s']:.2f} |"
        )
    lines += ["", "All runs:", "", "| method | lr | validation | held-out test | final loss | train time s |",
              "|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {100 * r['val_accuracy']:.1f}% | {100 * r['heldout_accuracy']:.1f}% | "
            f"{r['final_loss']:.4f} | {r['train_time_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Loss curves of every run (the selected ones drawn bold), labelled with held-out accuracy and train time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"memvp": "tab:green", "input_lora": "tab:red"}
    for r in report["runs"]:
        losses = np.asarray(r["losses"])
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), smooth, color=colors[r["method"]],
                alpha=1.0 if r["selected"] else 0.25, lw=1.8 if r["selected"] else 1.0,
                label=f"{r['label']} lr={r['lr']:g}: {100 * r['heldout_accuracy']:.1f}% test, {r['train_time_s']:.0f} s"
                + (" (selected)" if r["selected"] else ""))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-only cross-entropy (moving average)")
    ax.set_title("digits: MemVP vs input-space + LoRA, equal steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
