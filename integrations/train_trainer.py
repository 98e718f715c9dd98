#!/usr/bin/env python
"""Recipe: train a MemVP adapter with the Hugging Face `Trainer`, optionally under DeepSpeed ZeRO-2/ZeRO-3.

One machine, two processes, ZeRO-3 (CPU-only machines included):

    torchrun --nproc_per_node 2 integrations/train_trainer.py \
        --deepspeed integrations/deepspeed/zero3.json --output_dir runs/memvp-z3

See `integrations/README.md` for the `deepspeed` and `accelerate` launchers and for several machines.

What the script does (each step is a small function, so it can be copied into a real project):

1. builds a tiny Llama from a config (nothing is downloaded) or loads `--model_name_or_path` with `from_pretrained`:
   a local folder or a Hub id (downloaded when online, read from the Hugging Face cache offline; every rank loads it);
   `TrainingArguments` is created first, so that under ZeRO-3 `from_pretrained` partitions the weights while loading;
2. attaches MemVP (`--lora` adds LoRA on q/v projections to the same adapter);
3. builds a synthetic but learnable visual question answering set: every sample has `image_features` drawn around
   one of `--num_classes` prototypes and the same text prompt; the answer token is the prototype's class, so only
   the visual memory can tell the answer and the loss can only fall below log(num_classes) by reading the image;
4. trains with `Trainer(args=TrainingArguments(deepspeed=<json>, use_cpu=<no CUDA>, ...))`;
5. saves with `trainer.save_model` (under ZeRO-3 the Trainer gathers the trainable parameters first);
6. writes what the tests check into `--output_dir`:
   `rank_<r>.json` (rank, world size, dataset indices this rank read, steps it ran, losses, ...) and, with
   `--reference_logits`, `reference.pt` (eval inputs and the trained model's logits, computed on all ranks so that
   ZeRO-3 can gather the weights, written by rank 0).

The pitfall this script guards against: on a CPU-only machine `TrainingArguments(use_cpu=True)` is required for
DeepSpeed runs; without it accelerate picks no distributed backend and every rank believes it is the main process
(`--use_cpu never` reproduces that on purpose, for the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

try:
    import memvp_peft  # noqa: F401  (registers the MEMVP peft type: required before PeftModel.from_pretrained)
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import memvp_peft  # noqa: F401

from memvp_peft import MemVPConfig  # noqa: E402
from memvp_peft.cli.train import logged_losses  # noqa: E402
from memvp_peft.distributed import run_then_leave_process_group  # noqa: E402
from memvp_peft.tuner.save_load import atomic_saves  # noqa: E402

PROMPT_IDS = [1, 5, 6, 7, 8]  # bos + a fixed "question"; the answer follows it
ANSWER_BASE = 10  # answer token of class c is ANSWER_BASE + c


# ------------------------------------------------------------------------------------------------------ arguments


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output_dir", required=True)
    p.add_argument(
        "--deepspeed", default=None, help="DeepSpeed JSON (integrations/deepspeed/zero{2,3}.json); none: plain DDP"
    )
    p.add_argument("--model_name_or_path", default=None, help="local model directory; default: a tiny random Llama")
    p.add_argument("--lora", action="store_true", help="train LoRA (q_proj, v_proj) together with MemVP")
    p.add_argument("--load_in_4bit", action="store_true", help="load --model_name_or_path as a 4-bit NF4 base")
    p.add_argument("--max_steps", type=int, default=8)
    p.add_argument("--save_steps", type=int, default=0, help="write checkpoint-N every N steps (0: none)")
    p.add_argument("--resume_from_checkpoint", default=None)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--warmup_steps", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=256)
    p.add_argument("--num_classes", type=int, default=4)
    p.add_argument("--num_visual_tokens", type=int, default=4)
    p.add_argument("--visual_dim", type=int, default=16)
    p.add_argument("--num_memory_slots", type=int, default=8)
    p.add_argument("--projector_hidden_dim", type=int, default=16)
    p.add_argument("--memory_dropout", type=float, default=0.0)
    p.add_argument(
        "--text_only_every",
        type=int,
        default=0,
        help="mix in text-only batches (no image_features: MemVP reads its learned memory only): a batch is\n"
        "text-only when the sum of its answer tokens is divisible by this number (0: never). Decided by the\n"
        "content, so a resumed run sees the same batches.",
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument(
        "--use_cpu",
        choices=["auto", "always", "never"],
        default="auto",
        help="auto: use_cpu=True exactly when CUDA is unavailable (needed by DeepSpeed on CPU-only machines);\n"
        "never: reproduce the pitfall of forgetting it",
    )
    p.add_argument("--reference_logits", action="store_true", help="write reference.pt (eval inputs + logits)")
    p.add_argument(
        "--save_copy_per_rank",
        action="store_true",
        help="diagnostics: also call trainer.save_model(<output_dir>/per_rank/rank<r>) on every rank, to see what\n"
        "each rank writes (with use_cpu forgotten every rank believes it is the main process)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the `deepspeed` launcher")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------- data


class SyntheticVQA(torch.utils.data.Dataset):
    """`(input_ids, attention_mask, image_features, labels)` where the answer token depends on the image only.

    Every `__getitem__` index is recorded in `self.seen`, so that a distributed run can show which shard a rank read.
    """

    def __init__(self, num_samples: int, num_classes: int, tokens: int, visual_dim: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn(num_classes, tokens, visual_dim, generator=generator)
        self.classes = torch.randint(num_classes, (num_samples,), generator=generator)
        noise = 0.1 * torch.randn(num_samples, tokens, visual_dim, generator=generator)
        self.features = self.prototypes[self.classes] + noise
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        answer = ANSWER_BASE + int(self.classes[index])
        input_ids = torch.tensor(PROMPT_IDS + [answer])
        labels = torch.full_like(input_ids, -100)
        labels[-1] = answer  # loss on the answer token only
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "image_features": self.features[index].clone(),
            "labels": labels,
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.seen.append(int(index))
        return self.sample(index)


class MixedCollator:
    """`default_data_collator`, dropping `image_features` from some batches (text-only batches, as when image-text
    data is mixed with plain instruction data)."""

    def __init__(self, text_only_every: int = 0) -> None:
        self.text_only_every = text_only_every
        self.text_only_batches = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        from transformers import default_data_collator

        batch = default_data_collator(rows)
        if self.text_only_every and int(batch["labels"][:, -1].sum()) % self.text_only_every == 0:
            batch.pop("image_features")
            self.text_only_batches += 1
        return batch


def eval_batch(dataset: SyntheticVQA, size: int = 8) -> dict[str, torch.Tensor]:
    rows = [dataset.sample(i) for i in range(min(size, len(dataset)))]
    return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "image_features")}


# --------------------------------------------------------------------------------------------------------- model


def load_base_model(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if args.model_name_or_path is None:
        if args.load_in_4bit:
            raise SystemExit("--load_in_4bit needs --model_name_or_path (a local checkpoint to quantise)")
        torch.manual_seed(args.seed)
        # `from_config` (not the constructor) so that ZeRO-3 partitions the weights at creation (deepspeed.zero.Init)
        return LlamaForCausalLM._from_config(tiny_llama_config())
    kwargs: dict = {}
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        # A device_map is how a 4-bit model is put on the CPU without DeepSpeed; ZeRO-3 refuses any device_map
        # ("DeepSpeed Zero-3 is not compatible with passing a `device_map`") and places the weights itself.
        if not torch.cuda.is_available() and not args.deepspeed:
            kwargs["device_map"] = "cpu"
    return AutoModelForCausalLM.from_pretrained(args.model_name_or_path, **kwargs)


def attach_memvp(model, args: argparse.Namespace):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if args.lora else None
    config = MemVPConfig(
        visual_dim=args.visual_dim,
        num_memory_slots=args.num_memory_slots,
        projector_hidden_dim=args.projector_hidden_dim,
        memory_dropout=args.memory_dropout,
        lora_config=lora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------------------------------------- train


def training_arguments(args: argparse.Namespace):
    from transformers import TrainingArguments

    use_cpu = {"auto": not torch.cuda.is_available(), "always": True, "never": False}[args.use_cpu]
    return TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=args.deepspeed,
        use_cpu=use_cpu,  # REQUIRED on CPU-only machines, see the module docstring
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_steps=args.max_steps,
        logging_steps=1,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=max(args.save_steps, 1),
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,  # the dataset records its indices in this process
        # remove_unused_columns stays True (the default): MemVP's forward names image_features, so it is kept
    )


def connect_deepspeed_comm(training_args) -> None:
    """On CPU (`use_cpu=True`) accelerate starts torch.distributed (gloo) but not `deepspeed.comm`.

    ZeRO-3's `deepspeed.zero.Init` (used by `from_pretrained` / `_from_config` while the weights are created) then
    sees world size 1 and fails DeepSpeed's batch assertion (`8 != 4 * 1 * 1`). On GPUs accelerate calls
    `deepspeed.init_distributed` itself; here we attach deepspeed.comm to the existing process group.
    """
    if training_args.deepspeed_plugin is None or not training_args.use_cpu:  # --deepspeed or `accelerate launch`
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def reference_mode(args: argparse.Namespace) -> str:
    """`train` for a 4-bit base on CPU: bitsandbytes' CPU inference path (eval mode, no grad) repacks the weights
    for its own kernel and asserts on small widths ("N must be divisible by block_n"); the training path does not.
    Every dropout of this recipe is 0 by default, so both modes compute the same function."""
    return "train" if args.load_in_4bit and not torch.cuda.is_available() else "eval"


def reference_logits(trainer, batch: dict[str, torch.Tensor], mode: str = "eval") -> torch.Tensor:
    """Logits of the trained model on `batch`. Run on EVERY rank: under ZeRO-3 the forward gathers the weights."""
    model = trainer.model
    was_training = model.training
    model.train(mode == "train")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    model.train(was_training)
    return logits


def main(argv: Optional[list[str]] = None) -> dict:
    from transformers import Trainer, TrainerCallback, set_seed

    args = parse_args(argv)
    started = time.time()
    training_args = training_arguments(args)  # before the model: ZeRO-3 must see its config while weights load
    connect_deepspeed_comm(training_args)
    model = load_base_model(args)
    set_seed(args.seed)  # the adapter's initial weights must not depend on how the base was loaded
    peft_model = attach_memvp(model, args)

    dataset = SyntheticVQA(args.num_samples, args.num_classes, args.num_visual_tokens, args.visual_dim, args.seed)
    collator = MixedCollator(args.text_only_every)
    steps: list[int] = []

    class RecordSteps(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            steps.append(int(state.global_step))

    atomic_saves(peft_model)  # save_model / checkpoint-N stage their files (a crash keeps the previous adapter)
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[RecordSteps()],
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)

    rank, world = rank_and_world()
    if args.save_copy_per_rank:
        trainer.save_model(str(Path(args.output_dir) / "per_rank" / f"rank{rank}"))
    batch = eval_batch(dataset)
    mode = reference_mode(args)
    logits = text_logits = None
    if args.reference_logits:
        logits = reference_logits(trainer, batch, mode)
        text_only = {k: v for k, v in batch.items() if k != "image_features"}
        text_logits = reference_logits(trainer, text_only, mode)  # the learned memory alone
    _, losses = logged_losses(trainer.state.log_history)
    info = {
        "rank": rank,
        "world_size": world,
        "args_world_size": training_args.world_size,
        "process_index": training_args.process_index,
        "should_save": training_args.should_save,
        "is_world_process_zero": trainer.is_world_process_zero(),
        "deepspeed": args.deepspeed,
        "zero_stage": (trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None),
        "seen_indices": dataset.seen,
        "text_only_batches": collator.text_only_batches,  # collated by this rank (incl. one prefetched batch)
        "steps": steps,
        "global_step": int(trainer.state.global_step),
        "losses": losses,
        "train_loss": float(result.training_loss),
        "chance_loss": math.log(args.num_classes),
        "trainable_parameters": sorted(n for n, p in peft_model.named_parameters() if p.requires_grad),
        "seconds": round(time.time() - started, 2),
    }
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(args.output_dir) / f"rank_{rank}.json", "w") as handle:
        json.dump(info, handle, indent=1)
    if logits is not None and rank == 0:
        reference = {**batch, "logits": logits, "text_only_logits": text_logits, "mode": mode}
        torch.save(reference, Path(args.output_dir) / "reference.pt")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    if rank == 0:
        print(f"[train_trainer] done in {info['seconds']}s: global_step={info['global_step']} losses={losses}")
    trainer.accelerator.free_memory()  # drop the DeepSpeed engine (and its process-group handles) now
    return info


if __name__ == "__main__":
    # explicit teardown: left to interpreter exit, a rank occasionally aborts after all work is done
    run_then_leave_process_group(main)
