#!/usr/bin/env python
"""Recipe: train a MemVP adapter under PyTorch FSDP2 (`fully_shard`), generate with it and save it.

Needs torch >= 2.6 (`torch.distributed.fsdp.fully_shard`). One machine, two processes (GPUs with NCCL; on a
CPU-only machine the same line runs over gloo; the default 300 steps reach ~90% held-out accuracy there in ~15 s):

    torchrun --nproc_per_node 2 integrations/train_fsdp.py --output_dir runs/memvp-fsdp

See `integrations/README.md` (FSDP) for several GPUs, several machines and the accelerate/Trainer alternative
(`integrations/fsdp/fsdp2.yaml`).

What the script does (each step is a small function, so it can be copied into a real project):

1. starts `torch.distributed` (NCCL on GPUs, gloo on CPUs) and a 1-D device mesh over all ranks;
2. builds a tiny random Llama from a config (or loads `--model_name_or_path`, a *local* path) and attaches MemVP;
   every rank builds the same model from the same seed;
3. shards it: `fully_shard` on every decoder layer (the classes the model lists in `_no_split_modules`, what
   accelerate's transformer wrap policy picks too), then on the PeftModel as the root. MemVP's own parameters --
   projector, `key_pos`, `value_pos`, on the tuner in `base_model.memvp_memory` -- belong to the root group: the
   root's pre-forward hook all-gathers them before `MemVPModel.forward` computes the call's memory, and the root's
   post-backward reduce-scatters their gradients;
4. trains a few steps on real images: scikit-learn's handwritten digits (16 patch tokens per image,
   `memvp_peft.tasks.digits`), "What digit is shown ?" -> "7". Rank r of step s reads global batch `s * world + r`
   of a fixed permutation, so an unsharded run can replay the same batches (`train_unsharded`, what the test
   compares against). `--text_only_every N` makes one rank's batch text-only (no `image_features`) every N-th step;
5. generates greedy answers for held-out images, after `register_fsdp_forward_method(model, "generate")`: FSDP2
   all-gathers only around `forward`, and `PeftModel.generate` is another entry point (all ranks must call it);
6. gathers the *trainable* parameters into full tensors on every rank (`DTensor.full_tensor`, a collective; the
   frozen base is never gathered) and rank 0 saves them with `memvp_peft.save_adapter(model, dir,
   state_dict=...)`, i.e. `save_pretrained(state_dict=...)` switched in atomically;
7. writes what the tests check into `--output_dir`: `rank_<r>.json` (losses, which batches had images, answers,
   held-out accuracy) and, from rank 0, `reference.pt` (held-out inputs, logits, generated ids).

A plain `model.save_pretrained(dir)` under FSDP2 would see the DTensor shards of `model.state_dict()`: gather first
(step 6).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import memvp_peft  # noqa: F401  (registers the MEMVP peft type: required before PeftModel.from_pretrained)
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import memvp_peft  # noqa: F401

from memvp_peft import MemVPConfig, save_adapter  # noqa: E402
from memvp_peft.demo_models import FixedVocabTokenizer, tiny_llama_config  # noqa: E402
from memvp_peft.distributed import run_then_leave_process_group  # noqa: E402
from memvp_peft.tasks.digits import DIGIT_QUESTION, digit_scan_tokens  # noqa: E402

ANSWERS = tuple(str(d) for d in range(10))


# ------------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_name_or_path", default=None, help="local model + tokenizer; default: a tiny random Llama")
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--per_device_batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden_size", type=int, default=64, help="width of the tiny Llama")
    p.add_argument("--num_memory_slots", type=int, default=32, help="16 visual tokens + 16 learned-only slots")
    p.add_argument("--memory_dropout", type=float, default=0.1)
    p.add_argument("--num_eval", type=int, default=64, help="held-out images answered by generate()")
    p.add_argument(
        "--text_only_every",
        type=int,
        default=0,
        help="every N-th step one rank (in turn) gets a text-only batch, the others image batches (0: never)",
    )
    p.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- distributed


def start_distributed() -> tuple[int, int, torch.device]:
    """NCCL on GPUs (one per local rank), gloo on CPUs. torchrun sets RANK/WORLD_SIZE/MASTER_ADDR."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


# ---------------------------------------------------------------------------------------------------------- data


class Words:
    """The prompt/answer ids of the task for either tokenizer: the tiny model's fixed vocabulary, or a real
    model's HF tokenizer (`--model_name_or_path`)."""

    def __init__(self, model_name_or_path: Optional[str]) -> None:
        if model_name_or_path is None:
            self.tokenizer = FixedVocabTokenizer([*DIGIT_QUESTION.split(), *ANSWERS])
            self.prompt = self.tokenizer.encode(DIGIT_QUESTION, add_bos=True)
            self.answers = [self.tokenizer.encode(a, add_eos=True) for a in ANSWERS]
            self.vocab_size = len(self.tokenizer)
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            if self.tokenizer.pad_token_id is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.prompt = self.tokenizer(DIGIT_QUESTION).input_ids
            eos = [self.tokenizer.eos_token_id]
            self.answers = [self.tokenizer(" " + a, add_special_tokens=False).input_ids + eos for a in ANSWERS]
            self.vocab_size = len(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.eos_token_id = self.tokenizer.eos_token_id

    def answer_of(self, generated: list[int]) -> Optional[str]:
        for digit, ids in zip(ANSWERS, self.answers):
            if generated[: len(ids) - 1] == ids[:-1]:
                return digit
        return None

    def batch(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`<bos> What digit is shown ? 7 <eos>`, loss on the answer only, right-padded."""
        rows = [self.prompt + self.answers[int(d)] for d in labels]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id)
        attention_mask = torch.zeros_like(input_ids)
        targets = torch.full_like(input_ids, -100)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            targets[i, len(self.prompt) : len(row)] = torch.tensor(row[len(self.prompt) :])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": targets}


class Digits:
    """scikit-learn's 1,797 real 8x8 digit scans as visual tokens (N, 16, 6); the last `num_eval` are held out."""

    def __init__(self, num_eval: int, seed: int) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        order = torch.randperm(len(digits.images), generator=torch.Generator().manual_seed(seed))
        features = digit_scan_tokens(digits.images)[order]
        labels = torch.from_numpy(digits.target).long()[order]
        self.train_x, self.train_y = features[num_eval:], labels[num_eval:]
        self.eval_x, self.eval_y = features[:num_eval], labels[:num_eval]
        self.order = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(seed + 1))

    def global_batch(self, index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The `index`-th batch of `size` images of the fixed permutation (wrapping around)."""
        positions = torch.arange(index * size, (index + 1) * size) % len(self.order)
        chosen = self.order[positions]
        return self.train_x[chosen], self.train_y[chosen]


def is_text_only(step: int, rank: int, world: int, every: int) -> bool:
    """Every `every`-th step, rank `(step // every) % world` gets a text-only batch (the ranks take turns)."""
    return every > 0 and step % every == every - 1 and rank == (step // every) % world


def rank_batch(data: Digits, words: Words, args: argparse.Namespace, step: int, rank: int, world: int) -> dict:
    features, labels = data.global_batch(step * world + rank, args.per_device_batch_size)
    batch = words.batch(labels)
    if not is_text_only(step, rank, world, args.text_only_every):
        batch["image_features"] = features
    return batch


# --------------------------------------------------------------------------------------------------------- model


def build_base(args: argparse.Namespace, words: Words):
    """The frozen base, identical on every rank and in a later single process (same seed), on the CPU."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.model_name_or_path is None:
        return LlamaForCausalLM(
            tiny_llama_config(words.vocab_size, hidden_size=args.hidden_size, tie_word_embeddings=False,
                              initializer_range=0.1)  # a frozen random head large enough to be sure of an answer
        )
    return AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path, dtype=torch.bfloat16 if args.bf16 else torch.float32
    )


def build_model(args: argparse.Namespace, words: Words):
    """Base + MemVP, identical on every rank (same seeds), on the CPU; `fully_shard` moves the shards."""
    from peft import get_peft_model

    base = build_base(args, words)
    torch.manual_seed(args.seed)  # the adapter's initial weights must not depend on how the base was built
    config = MemVPConfig(
        visual_dim=6,  # digit patch tokens: 4 pixels + (row, column)
        num_memory_slots=args.num_memory_slots,
        projector_hidden_dim=64,
        memory_dropout=args.memory_dropout,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def decoder_layer_classes(peft_model) -> set[str]:
    """The classes HF marks as not to be split (`_no_split_modules`): the decoder layers. accelerate's
    TRANSFORMER_BASED_WRAP uses the same list when no class is named."""
    names = set(getattr(peft_model.get_base_model(), "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(peft_model.get_base_model()).__name__} lists no `_no_split_modules` to shard")
    return names


def shard(peft_model, device: torch.device, world: int, bf16: bool = False) -> list[str]:
    """`fully_shard` each decoder layer, then the PeftModel as root (everything else, MemVP's parameters included,
    is in the root's group). Returns the names of the sharded layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world,))
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy else {})}
    classes = decoder_layer_classes(peft_model)
    layers = [(n, m) for n, m in peft_model.named_modules() if type(m).__name__ in classes]
    for _, layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(peft_model, **kwargs)
    register_fsdp_forward_method(peft_model, "generate")  # all-gather around generate() too, not only forward
    return [n for n, _ in layers]


def full_trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable parameters as full CPU tensors, under the model's state-dict keys (what `save_pretrained(
    state_dict=...)` selects the adapter from). A collective under FSDP2: every rank must call it, in step."""
    from torch.distributed.tensor import DTensor

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    full = {}
    for key, value in model.state_dict().items():  # FSDP2: sharded DTensors, the same order on every rank
        if key in trainable:
            full[key] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
    return full


# --------------------------------------------------------------------------------------------------------- train


def train(model, batches_of_step: Callable[[int], list[dict]], args: argparse.Namespace, device: torch.device,
          seed_of: Callable[[int, int], int]) -> list[list[float]]:
    """AdamW over the trainable parameters; a step's loss is the mean over its batches (one batch per rank when
    sharded: FSDP2 averages the gradients over ranks; several in the unsharded replay). Each batch's dropout is
    seeded by its global position, so both runs draw the same masks. Returns the losses per step and batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    history = []
    for step in range(args.max_steps):
        losses = []
        for position, batch in enumerate(batches_of_step(step)):
            torch.manual_seed(seed_of(step, position))
            losses.append(model(**{k: v.to(device) for k, v in batch.items()}).loss)
        (sum(losses) / len(losses)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append([float(loss.detach()) for loss in losses])
    return history


@torch.no_grad()
def evaluate(model, data: Digits, words: Words, device: torch.device) -> dict:
    """Held-out logits and greedy answers (all ranks: under FSDP2 forward and generate are collectives)."""
    model.eval()
    input_ids = torch.tensor([words.prompt] * len(data.eval_x), device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "image_features": data.eval_x.to(device)}
    logits = model(**inputs).logits.float().cpu()
    generated = model.generate(
        **inputs, max_new_tokens=max(len(a) for a in words.answers), do_sample=False,
        pad_token_id=words.pad_token_id, eos_token_id=words.eos_token_id,
    )[:, input_ids.shape[1]:].cpu()
    answers = [words.answer_of(row.tolist()) for row in generated]
    accuracy = sum(a == str(int(y)) for a, y in zip(answers, data.eval_y)) / len(answers)
    return {"logits": logits, "generated": generated, "answers": answers, "accuracy": accuracy, **inputs}


def batch_seed(args: argparse.Namespace, world: int) -> Callable[[int, int], int]:
    return lambda step, rank: args.seed * 100_003 + step * world + rank


def train_unsharded(args: argparse.Namespace, world: int) -> dict:
    """The reference: one process, no FSDP, replaying every rank's batches of every step (what the test compares
    the sharded run with)."""
    words, data, device = Words(args.model_name_or_path), Digits(args.num_eval, args.seed), torch.device("cpu")
    model = build_model(args, words)
    history = train(model, lambda s: [rank_batch(data, words, args, s, r, world) for r in range(world)], args,
                    device, batch_seed(args, world))
    return {"model": model, "losses": history, **evaluate(model, data, words, device)}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    started = time.time()
    rank, world, device = start_distributed()
    words, data = Words(args.model_name_or_path), Digits(args.num_eval, args.seed)
    model = build_model(args, words)
    sharded = shard(model, device, world, args.bf16)
    seed_of = batch_seed(args, world)
    history = train(model, lambda s: [rank_batch(data, words, args, s, rank, world)], args, device,
                    lambda step, _: seed_of(step, rank))
    result = evaluate(model, data, words, device)

    output_dir = Path(args.output_dir)
    state_dict = full_trainable_state_dict(model)  # every rank: a collective
    save_adapter(model, str(output_dir), state_dict=state_dict)  # rank 0 writes, atomically
    torch.distributed.barrier()  # the others write into the folder only once it is switched in
    info = {
        "rank": rank,
        "world_size": world,
        "backend": torch.distributed.get_backend(),
        "sharded_layers": sharded,
        "root": type(model).__name__,
        "losses": [step[0] for step in history],
        "text_only_steps": [s for s in range(args.max_steps) if is_text_only(s, rank, world, args.text_only_every)],
        "heldout_accuracy": result["accuracy"],
        "answers": result["answers"],
        "saved_keys": sorted(state_dict),
        "seconds": round(time.time() - started, 2),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"rank_{rank}.json").write_text(json.dumps(info, indent=1))
    if rank == 0:
        keep = ("input_ids", "attention_mask", "image_features", "logits", "generated")
        torch.save({k: result[k].cpu() for k in keep}, output_dir / "reference.pt")
        print(f"[train_fsdp] {world} ranks ({info['backend']}), {len(sharded)} sharded layers + root, "
              f"{args.max_steps} steps in {info['seconds']}s: last loss {info['losses'][-1]:.4f}, "
              f"held-out accuracy {result['accuracy']:.2%}; adapter in {output_dir}")
    torch.distributed.barrier()
    return info


if __name__ == "__main__":
    # explicit teardown: left to interpreter exit, a rank occasionally aborts after all work is done
    run_then_leave_process_group(main)
