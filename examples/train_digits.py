"""MemVP end to end on real images: teach a frozen, randomly initialised tiny LLaMA to read handwritten digits.

    python examples/train_digits.py            # full run: ~97% held-out accuracy in 15-30 s on 2 CPU cores
    python examples/train_digits.py --quick    # smoke test for CI (20 steps, ~10 s, no accuracy target)

What happens:

1. Images: scikit-learn's `load_digits` (1,797 real 8x8 grey-scale scans of handwritten digits, 0-16 per pixel).
   Each image becomes 16 *visual tokens*, one per 2x2-pixel patch; a token is the 4 pixel values scaled to [0, 1]
   plus the patch's (row, column) on a [0, 1] grid, so `visual_dim = 6`. These play the role of CLIP patch features.
2. Language model: a tiny Llama-shaped decoder built from `LlamaConfig` (2 layers, width 128), randomly initialised
   and *frozen*, with a fixed-vocabulary word tokenizer (`memvp_peft.demo_models`; no hub download of any kind).
3. Task (visual question answering): prompt `what digit is this ?`, answer `7` followed by `<eos>`. The loss is on
   the answer tokens only (labels are -100 on the prompt), as in the MemVP recipe.
4. Only MemVP is trained -- its projector and the key/value position embeddings, nothing else. The image enters the
   model exclusively through the FFN memory (`out = FFN(x) + s * act(x K^T) V`), never as extra tokens: the input is
   the same 7 text tokens whether or not there is an image. Since the LM is random, anything it gets right about the
   image it reads from that memory.
5. Plain torch loop: AdamW with the authors' betas (0.9, 0.95) and weight decay 0.02, linear warm-up then cosine decay.
   The MemVP hyper-parameters are the paper's (lambda 0.01, s 0.1, dropout 0.1, projector width 128); only the peak
   learning rate is higher (3e-2 instead of 1.125e-3) because this run is 1,500 steps, not 20 epochs of ScienceQA.
6. Held-out accuracy by greedy `generate()`, `metrics.json` and `loss_curve.png` in `--output_dir`, the adapter saved
   with `save_pretrained`, then reloaded with `PeftModel.from_pretrained` onto a freshly built base model (same seed)
   to check that it answers exactly like the trained one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

try:
    import memvp_peft  # noqa: F401  (registers the MEMVP peft type: required before PeftModel.from_pretrained)
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import memvp_peft  # noqa: F401

import matplotlib

matplotlib.use("Agg")  # headless: we only write a PNG
import matplotlib.pyplot as plt  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from memvp_peft import MemVPConfig  # noqa: E402
from memvp_peft.demo_models import FixedVocabTokenizer, tiny_llama_config  # noqa: E402
from memvp_peft.tasks.digits import digit_scan_tokens  # noqa: E402

# peft 0.21 probes `model.is_gradient_checkpointing`, which transformers 5 deprecates; nothing to act on here.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

PROMPT = "what digit is this ?"
ANSWERS = tuple(str(d) for d in range(10))


# ---------------------------------------------------------------------------------------------------------- images


def load_data(seed: int, test_fraction: float = 0.2):
    """Real handwritten digits, stratified train/test split. Returns tensors (features, labels) per split + images."""
    digits = load_digits()
    features = digit_scan_tokens(digits.images)  # (N, 16, 6): one token per 2x2 patch, pixels + position
    indices = np.arange(len(features))
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, random_state=seed, stratify=digits.target
    )

    def split(idx):
        return features[idx], torch.from_numpy(digits.target[idx]).long()

    return split(train_idx), split(test_idx), digits.images[test_idx]


def build_batch(tokenizer: FixedVocabTokenizer, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """`<bos> what digit is this ? 7 <eos>` with labels -100 everywhere but on the answer (`7 <eos>`).

    Every sample has the same length, so no padding is needed and the attention mask is all ones.
    """
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    rows, targets = [], []
    for digit in labels.tolist():
        answer = tokenizer.encode(str(digit), add_eos=True)
        rows.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    input_ids = torch.tensor(rows)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor(targets),
    }


# ----------------------------------------------------------------------------------------------------------- model


def build_base_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A tiny LLaMA (2 layers, width 128, SwiGLU FFN) with random weights, never trained here. Same seed -> bit-identical weights."""
    torch.manual_seed(seed)
    config = tiny_llama_config(
        vocab_size,
        hidden_size=128,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        # 0.1 instead of LlamaConfig's 0.02: with 0.02 the frozen random lm_head is so small that even a perfectly
        # aligned final hidden state yields logits within about +-2.5, which caps the answer probability near 0.45
        # (cross-entropy floor ~0.8) although the argmax can be right. Real pretrained heads are far larger.
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


def cosine_with_warmup(warmup_steps: int, total_steps: int):
    """Multiplier for LambdaLR: linear warm-up from 0 to 1, then half-cosine decay to 0 (the authors' schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def predict(
    model, tokenizer: FixedVocabTokenizer, features: torch.Tensor, with_image: bool = True, batch_size: int = 256
) -> list[str]:
    """Greedy answers of `model.generate()` for every image (the prompt alone is the text input).

    `with_image=False` passes `image_mask=False` for every row: MemVP then reads only its learned, image-independent
    memory (K = p_k, V = p_v) -- the "blind" baseline that shows the answers really come from the image.
    """
    model.eval()
    prompt = tokenizer.encode(PROMPT, add_bos=True)
    answers = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        input_ids = torch.tensor([prompt] * len(chunk))
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            image_features=chunk,
            image_mask=torch.full((len(chunk),), with_image),
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.extend(tokenizer.decode(row[len(prompt) :]) for row in out)
    return answers


def accuracy(answers: list[str], labels: torch.Tensor) -> float:
    return float(np.mean([answer == str(label) for answer, label in zip(answers, labels.tolist())]))


def ascii_digit(image: np.ndarray) -> list[str]:
    shades = " .:-=+*#%@"
    return ["".join(shades[min(9, int(p) * 10 // 17)] * 2 for p in row) for row in image]


def save_loss_curve(losses: list[float], path: Path, title: str) -> None:
    steps = np.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, alpha=0.3, label="loss per step")
    ax.plot(steps[window - 1 :], smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-only cross-entropy")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default 1500, or 20 with --quick)")
    parser.add_argument("--output_dir", default="outputs/digits", help="where metrics, plot and adapter are written")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base model, the split and the training")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: a few steps, no accuracy target")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-2,
                        help="peak learning rate (paper: 1.125e-3 for 20 epochs on ScienceQA; this tiny run is short)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="default: 5%% of --steps")
    parser.add_argument("--num_memory_slots", type=int, default=32, help="16 visual tokens + 16 learned-only slots")
    parser.add_argument("--memory_scale", type=float, default=0.1, help="s in FFN(x) + s*act(xK^T)V (paper: 0.1)")
    parser.add_argument("--visual_scale", type=float, default=0.01, help="lambda on the projected features (paper: 0.01)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this tiny model)")
    parser.add_argument("--log_every", type=int, default=None, help="log the mean loss every N steps")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    steps = args.steps if args.steps is not None else (20 if args.quick else 1500)
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, steps // 20)
    log_every = args.log_every or max(1, steps // 10)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The matrices are tiny (batch 32 x 7 tokens x width 128): one thread beats several, whose synchronisation
    # dominates -- and collapses when other processes share the cores.
    torch.set_num_threads(args.threads)
    start_time = time.perf_counter()

    tokenizer = FixedVocabTokenizer([*PROMPT.split(), *ANSWERS])
    (train_x, train_y), (test_x, test_y), test_images = load_data(args.seed)
    print(f"digits: {len(train_x)} train / {len(test_x)} held-out images, {train_x.shape[1]} visual tokens each "
          f"of width {train_x.shape[2]}; vocabulary of {len(tokenizer)} words")

    # The base LM is random and stays frozen: get_peft_model marks only the MemVP parameters trainable.
    base = build_base_model(len(tokenizer), args.seed)
    config = MemVPConfig(
        visual_dim=train_x.shape[2],
        num_memory_slots=args.num_memory_slots,
        projector_hidden_dim=128,
        visual_scale=args.visual_scale,
        memory_scale=args.memory_scale,
        memory_dropout=0.1,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"MemVP wraps {config.target_modules}; trainable params {trainable:,} of {total:,} "
          f"({100 * trainable / total:.1f}%)")
    assert all("memvp" in n for n, p in model.named_parameters() if p.requires_grad), "only MemVP may train"

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(warmup, steps))

    # ---- training: plain torch loop over shuffled mini-batches (a new permutation every epoch)
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(train_x), generator=generator), 0
    losses: list[float] = []
    model.train()
    train_start = time.perf_counter()
    progress = tqdm(range(1, steps + 1), desc="MemVP", unit="step", dynamic_ncols=True)
    for step in progress:
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train_x), generator=generator), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        batch = build_batch(tokenizer, train_y[idx])
        loss = model(**batch, image_features=train_x[idx]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # a safety net against early spikes at this high lr
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", refresh=False)
        if step % log_every == 0 or step == steps:
            tqdm.write(f"step {step:5d}/{steps}  loss {np.mean(losses[-log_every:]):.4f}  "
                       f"lr {scheduler.get_last_lr()[0]:.2e}")
    train_time = time.perf_counter() - train_start  # the optimisation loop alone

    # ---- held-out accuracy by greedy generation
    answers = predict(model, tokenizer, test_x)
    test_accuracy = accuracy(answers, test_y)
    train_accuracy = accuracy(predict(model, tokenizer, train_x), train_y)
    blind_accuracy = accuracy(predict(model, tokenizer, test_x, with_image=False), test_y)
    print(f"held-out accuracy {test_accuracy:.2%} ({len(test_x)} images); train accuracy {train_accuracy:.2%}; "
          f"held-out accuracy with the image masked out (image_mask=False) {blind_accuracy:.2%}")

    # ---- save the adapter (adapter weights only), reload onto a fresh base built with the same seed
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    fresh_base = build_base_model(len(tokenizer), args.seed)
    reloaded = PeftModel.from_pretrained(fresh_base, adapter_dir)
    reloaded_answers = predict(reloaded, tokenizer, test_x)
    reloaded_accuracy = accuracy(reloaded_answers, test_y)
    print(f"reloaded adapter from {adapter_dir}: held-out accuracy {reloaded_accuracy:.2%}")
    if reloaded_answers != answers:
        raise SystemExit("the reloaded adapter answers differently from the trained one")

    print("a few held-out images and the reloaded model's answers:")
    for i in range(4):
        art = ascii_digit(test_images[i])
        verdict = "ok" if reloaded_answers[i] == str(int(test_y[i])) else "WRONG"
        art[3] += f"   Q: {PROMPT}"
        art[4] += f"   A: {reloaded_answers[i]!r}  (true: {int(test_y[i])}, {verdict})"
        print("\n".join(art) + "\n")

    wall_time = time.perf_counter() - start_time
    metrics = {
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "num_memory_slots": args.num_memory_slots,
        "memory_scale": args.memory_scale,
        "visual_scale": args.visual_scale,
        "seed": args.seed,
        "final_loss": float(np.mean(losses[-min(len(losses), 20) :])),  # mean of the last 20 steps
        "heldout_accuracy": test_accuracy,
        "train_accuracy": train_accuracy,
        "heldout_accuracy_image_masked": blind_accuracy,
        "reloaded_heldout_accuracy": reloaded_accuracy,
        "num_heldout": len(test_x),
        "num_train": len(train_x),
        "trainable_params": trainable,
        "total_params": total,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(wall_time, 2),  # data, model, training, evaluation, save and reload (not imports)
        "torch_threads": torch.get_num_threads(),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_loss_curve(losses, output_dir / "loss_curve.png",
                    f"MemVP on a frozen random LLaMA: held-out acc {test_accuracy:.1%}")
    print(f"wrote {output_dir / 'metrics.json'}, {output_dir / 'loss_curve.png'} and {adapter_dir}/ "
          f"(wall time {wall_time:.1f} s)")
    return metrics


if __name__ == "__main__":
    main()
