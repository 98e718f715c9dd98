"""`memvp-train`: fine-tune a frozen (V)LM with MemVP through the HF Trainer, from flags and/or a YAML file.

    memvp-train                                   # embedded default: digits, small local model, no download
    memvp-train my.yaml --learning_rate 2e-3      # YAML keys = flag names (LLaMA-Factory / HF style)
    python -m memvp_peft.train --help

A run writes into `output_dir`: the adapter (`adapter_config.json`, `adapter_model.safetensors`), `metrics.json`,
`loss_curve.png`, and for the embedded model its base (`base_model/`) so that `memvp-infer` can load it again. At the
end the adapter is reloaded from disk onto a fresh base and answers a few held-out images.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from typing import Any, Optional, Sequence

import torch

from ..distributed import leave_process_group
from ..tuner.save_load import atomic_saves
from .answering import accuracy, generate_answers
from .base_loading import image_processor_for, load_base
from .options import TrainOptions, run_command
from .record import write_cli_record

DIGIT_WORDS = [str(d) for d in range(10)]
PROMPT_CORPUS = ["Question: What digit is shown ?\nAnswer:"]


# ------------------------------------------------------------------------------------------------------ model set-up


def build_embedded_base(seed: int):
    """The embedded default: a 2-layer width-128 Llama (random, frozen) and a word-level tokenizer."""
    from ..local_models import build_word_tokenizer, tiny_llama

    tokenizer = build_word_tokenizer(PROMPT_CORPUS, DIGIT_WORDS)
    # initializer_range 0.1: with LlamaConfig's 0.02 a random lm_head caps every answer probability well below 1
    model = tiny_llama(tokenizer, hidden_size=128, layers=2, seed=seed, initializer_range=0.1, tie_word_embeddings=False)
    return model, tokenizer


def visual_setup(options: TrainOptions, model, kind: str):
    """(image processor/featurizer, input name, visual_dim, visual tokens per image, encoder module or None)."""
    from ..data.digits import DIGIT_PATCH_DIM, DIGIT_PATCH_TOKENS, DigitPatchFeaturizer
    from ..vision import load_vision_encoder

    if options.vision_model_name_or_path:
        encoder = load_vision_encoder(options.vision_model_name_or_path)
        config = encoder.config
        tokens = (config.image_size // config.patch_size) ** 2
        processor = image_processor_for(options.vision_model_name_or_path, config)
        return processor, "pixel_values", int(config.hidden_size), tokens, encoder
    if kind == "vlm":
        config = model.config.vision_config
        tokens = (config.image_size // config.patch_size) ** 2
        processor = image_processor_for(options.model_name_or_path, config)
        return processor, "pixel_values", int(config.hidden_size), tokens, None
    if options.dataset == "digits":
        return DigitPatchFeaturizer(), "image_features", DIGIT_PATCH_DIM, DIGIT_PATCH_TOKENS, None
    raise ValueError(
        f"dataset {options.dataset!r} has real images: pass --vision_model_name_or_path (a local CLIP/SigLIP folder) "
        "or use a VLM base (Llava family) as --model_name_or_path."
    )


def memvp_config(options: TrainOptions, visual_dim: int, tokens: int, encoder, kind: str):
    from peft import LoraConfig

    from ..tuner.config import MemVPConfig

    slots = options.num_memory_slots or max(tokens + 16, math.ceil(tokens * 1.25))
    lora = None
    if options.lora_rank > 0:
        targets = [t.strip() for t in options.lora_target.split(",") if t.strip()] if options.lora_target else None
        lora = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                          target_modules=targets)
    return MemVPConfig(
        visual_dim=visual_dim,
        num_memory_slots=slots,
        projector_hidden_dim=options.projector_hidden_dim,
        visual_scale=options.visual_scale,
        memory_scale=options.memory_scale,
        memory_dropout=options.memory_dropout,
        vision_encoder=encoder,
        vision_adapter_dim=options.vision_adapter_dim,
        lora_config=lora,
        task_type="SEQ_2_SEQ_LM" if kind == "seq2seq" else "CAUSAL_LM",
    )


# ---------------------------------------------------------------------------------------------------------- training


def default_learning_rate(options: TrainOptions) -> float:
    if options.learning_rate is not None:
        return options.learning_rate
    if options.dataset == "digits" and options.model_name_or_path is None:
        return 3e-2  # a frozen *random* LM must be steered through the memory alone: a large step is needed
    effective = options.per_device_train_batch_size * options.gradient_accumulation_steps
    return 1.125e-3 * effective / 32  # the authors' rate for batch 32, scaled linearly


def ascii_image(image) -> list[str]:
    import numpy as np

    array = np.asarray(image, dtype=float)
    if array.ndim != 2:
        return []
    scale = " .:-=+*#%@"
    top = array.max() or 1.0
    return ["".join(scale[min(9, int(v / top * 9))] * 2 for v in row) for row in array]


def train(options: TrainOptions) -> dict[str, Any]:
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, set_seed
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from ..data import MemVPDataCollator
    from ..data.tasks import load_task
    from .reporting import LossPrinter, logged_losses, save_loss_curve, write_metrics

    started = time.time()
    threads = options.threads or (1 if options.model_name_or_path is None else None)
    if threads:
        torch.set_num_threads(threads)
    set_seed(options.seed)
    task = load_task(options.dataset, options.image_folder, options.eval_fraction, options.seed,
                     allow_outside_image_folder=options.allow_outside_image_folder, decode_images=options.decode_images)
    if options.model_name_or_path is None:
        model, tokenizer = build_embedded_base(options.seed)
        kind = "causal"
    else:
        model, tokenizer, kind = load_base(options.model_name_or_path, options.load_in_4bit, options.bf16)
    processor, input_name, visual_dim, tokens, encoder = visual_setup(options, model, kind)
    os.makedirs(options.output_dir, exist_ok=True)
    base_path = options.model_name_or_path
    if base_path is None:  # saved next to the adapter, so that memvp-infer (and the reload check below) can load it
        base_path = os.path.abspath(os.path.join(options.output_dir, "base_model"))
        model.save_pretrained(base_path)
        tokenizer.save_pretrained(base_path)
        model.name_or_path = base_path
    if options.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)
    config = memvp_config(options, visual_dim, tokens, encoder, kind)
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    collator = MemVPDataCollator(
        tokenizer, processor, max_length=options.max_length,  # image paths are already resolved by load_task
        array_value_range=task.array_value_range, image_input_name=input_name, seq2seq=(kind == "seq2seq"),
    )
    eval_records = task.eval[: (48 if options.quick else options.max_eval_samples)]
    max_steps = 20 if options.quick and options.max_steps <= 0 else options.max_steps
    args = TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.per_device_train_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=default_learning_rate(options),
        num_train_epochs=options.num_train_epochs,
        max_steps=max_steps,
        warmup_steps=float(options.warmup_ratio),  # a float in [0, 1) is a ratio of the total steps
        weight_decay=options.weight_decay,
        adam_beta2=options.adam_beta2,
        lr_scheduler_type=options.lr_scheduler_type,
        logging_steps=max(1, min(options.logging_steps, max_steps // 4 if max_steps > 0 else options.logging_steps)),
        save_strategy="steps" if options.save_steps > 0 else "no",
        save_steps=options.save_steps if options.save_steps > 0 else 500,
        bf16=options.bf16,
        fp16=options.fp16,
        gradient_checkpointing=options.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        deepspeed=options.deepspeed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator needs the raw image/question/answer columns
        report_to=[],
        seed=options.seed,
        dataloader_num_workers=0,
    )
    atomic_saves(peft_model)  # trainer.save_model and checkpoint-N stage their files: a crash keeps the previous adapter
    trainer = Trainer(model=peft_model, args=args, train_dataset=task.train, data_collator=collator,
                      callbacks=[LossPrinter()])
    train_started = time.time()
    trainer.train(resume_from_checkpoint=options.resume_from_checkpoint)
    train_time = time.time() - train_started
    trainer.save_model(options.output_dir)
    # Under ZeRO-3 the trained model's weights stay partitioned across the ranks: a generate() on rank 0 alone would
    # wait for all-gathers the other ranks never join (gloo aborts, NCCL hangs). The held-out answers then come from
    # the saved adapter reloaded onto a single-process base below -- the model users deploy.
    partitioned = is_deepspeed_zero3_enabled()
    if not trainer.is_world_process_zero():
        return {}
    if partitioned:
        unset_hf_deepspeed_config()  # the reload below is a plain single-process model: no zero.Init, no synced_gpus
    write_cli_record(options.output_dir, {
        "featurizer": "digit_patches" if input_name == "image_features" else None,
        "vision_model_name_or_path": options.vision_model_name_or_path,
        "array_value_range": list(task.array_value_range) if task.array_value_range else None,
        "kind": kind,
    })

    held_out = None
    if not partitioned:
        answers = generate_answers(peft_model, collator, eval_records, kind, tokenizer, options.max_new_tokens)
        held_out = accuracy(answers, eval_records)
        print(f"held-out accuracy by generation: {held_out:.2%} on {len(eval_records)} samples")

    # reload the base and the adapter from disk and answer again: what a user deploying the adapter gets (the vision
    # encoder is re-attached from the folder the adapter config records)
    fresh, _, _ = load_base(base_path, options.load_in_4bit, options.bf16)
    reloaded = PeftModel.from_pretrained(fresh, options.output_dir)
    if not options.load_in_4bit:  # a 4-bit base is placed by bitsandbytes when it loads
        reloaded.to(next(peft_model.parameters()).device)  # answer on the device that trained, not on the CPU
    reloaded_answers = generate_answers(reloaded, collator, eval_records, kind, tokenizer, options.max_new_tokens,
                                        progress=False)
    reloaded_accuracy = accuracy(reloaded_answers, eval_records)
    print(f"reloaded adapter from {options.output_dir}: held-out accuracy {reloaded_accuracy:.2%}")
    for record, answer in list(zip(eval_records, reloaded_answers))[:4]:
        art = ascii_image(record.get("image")) if task.name == "digits" else []
        print("\n".join(art))
        print(f"Q: {record.get('question', '')}  ->  A: {answer!r}  (reference {record.get('answer', '')!r})\n")

    steps, losses = logged_losses(trainer.state.log_history)
    save_loss_curve(steps, losses, os.path.join(options.output_dir, "loss_curve.png"),
                    f"MemVP on {task.name}")
    metrics = {
        "dataset": task.name,
        "train_samples": len(task.train),
        "eval_samples": len(eval_records),
        "heldout_accuracy": reloaded_accuracy if held_out is None else held_out,  # ZeRO-3: from the reloaded adapter
        "reloaded_heldout_accuracy": reloaded_accuracy,
        "final_loss": losses[-1] if losses else None,
        "loss_history": {"steps": steps, "loss": losses},
        "global_steps": trainer.state.global_step,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - started, 2),
        "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "options": asdict(options),
    }
    write_metrics(os.path.join(options.output_dir, "metrics.json"), metrics)
    print(f"wrote {options.output_dir}/metrics.json and loss_curve.png ({metrics['wall_time_s']:.0f} s in total)")
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run_command("memvp-train", TrainOptions, train, argv, __doc__.split("\n\n")[0])
    finally:  # under torchrun, ranks > 0 finish while rank 0 still evaluates: each leaves the process group itself
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
