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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..demo_models import FixedVocabTokenizer, tiny_llama_config
from ..tasks.digits import digit_scan_tokens
from .machine import cpu_name
from .methods import METHOD_LABELS, Batch, LoRAMethod, MemVPMethod, Method


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = "what digit is this ?"


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """MemVP vs input-space + LoRA on real digits at equal budget.

    Same frozen base, same steps, batches, optimizer and schedule, comparable trainable parameters. Each method is
    trained at every learning rate of ``--lr``; the one with the best validation accuracy (a slice of the training
    images) is selected, and its held-out test accuracy is the result.
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

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
    prompt = tokenizer.encode(PROMPT, add_bos=True)

    def base_model() -> nn.Module:
        torch.manual_seed(args.seed)
        config = tiny_llama_config(
            len(tokenizer), args.acc_hidden_size, max_position_embeddings=64, tie_word_embeddings=False,
            # a frozen random lm_head with the default 0.02 init caps the answer probability (logits within +-2.5)
            initializer_range=0.1,
        )
        model = LlamaForCausalLM(config)
        model.requires_grad_(False)
        return model

    visual_dim = features.shape[2]
    steps = args.steps if args.steps is not None else (10 if args.quick else 1000)
    lrs = args.lr[:1] if args.quick else args.lr

    def build(name: str) -> Method:
        if name == "memvp":
            return MemVPMethod(base_model(), visual_dim, features.shape[1] + args.acc_extra_slots,
                               args.projector_hidden_dim)
        return LoRAMethod(base_model(), True, visual_dim, args.projector_hidden_dim, args.lora_r, args.lora_alpha,
                          args.lora_dropout, args.lora_targets)

    def batch_of(idx: Any) -> Batch:
        idx = torch.as_tensor(idx)
        rows = [prompt + [tokenizer.token_to_id[DIGIT_WORDS[int(y)]], tokenizer.eos_token_id] for y in targets[idx]]
        ids = torch.tensor(rows)
        labels = ids.clone()
        labels[:, : len(prompt)] = -100  # answer-only loss
        return Batch(ids, torch.ones_like(ids), labels, features[idx])

    def schedule(step: int) -> float:
        warm = max(1, steps // 20)
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    @torch.no_grad()
    def accuracy(method: Method, indices: Any) -> float:
        method.train(False)
        correct = 0
        for chunk in range(0, len(indices), 256):
            part = indices[chunk : chunk + 256]
            batch = batch_of(part)
            batch.input_ids = batch.input_ids[:, : len(prompt)]
            batch.attention_mask = batch.attention_mask[:, : len(prompt)]
            out = method.model.generate(**method.inputs(batch), max_new_tokens=2, do_sample=False, pad_token_id=0,
                                        eos_token_id=tokenizer.eos_token_id)
            for row, y in zip(method.new_tokens(batch, out), targets[torch.as_tensor(part)]):
                correct += tokenizer.decode(row) == DIGIT_WORDS[int(y)]
        return correct / len(indices)

    runs = []
    for lr in lrs:
        for name in ("memvp", "input_lora"):
            method = build(name)
            params = method.parameters()
            optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.02)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
            generator = torch.Generator().manual_seed(args.seed)  # identical batches for both methods
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
                loss = method.loss(batch_of(idx))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
            train_time = time.perf_counter() - start
            val_accuracy = accuracy(method, val_idx)
            start = time.perf_counter()
            test_accuracy = accuracy(method, test_idx)
            eval_time = time.perf_counter() - start
            runs.append({
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
            })
    selected = {}
    for name in ("memvp", "input_lora"):
        mine = [r for r in runs if r["method"] == name]
        best = max(mine, key=lambda r: (r["val_accuracy"], -r["final_loss"]))
        best["selected"] = True
        selected[name] = {k: v for k, v in best.items() if k != "losses"}
    for run in runs:
        run.setdefault("selected", False)
    return {
        "meta": {
            "command": "python -m memvp_peft.bench " + " ".join(args.argv),
            "task": "scikit-learn load_digits (1,797 real 8x8 scans); 16 visual tokens per image (2x2 patches: 4 "
                    "pixels + (row, col)), visual_dim 6; prompt 'what digit is this ?', answer the digit word + "
                    "<eos>, answer-only loss; accuracy = exact greedy generate of the digit word",
            "split": f"stratified: {len(train_idx)} train / {len(val_idx)} validation (selects the lr) / "
                     f"{len(test_idx)} held-out test",
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
        },
        "selected": selected,
        "runs": runs,
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
