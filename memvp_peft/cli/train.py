"""`memvp-train`: fine-tune a frozen (V)LM with MemVP through the HF Trainer, from flags and/or a YAML file.

    memvp-train                                   # embedded default: digits, small local model, no download
    memvp-train my.yaml --learning_rate 2e-3      # YAML keys = flag names (LLaMA-Factory / HF style)
    python -m memvp_peft.train --help

A run writes into `output_dir`: the adapter (`adapter_config.json`, `adapter_model.safetensors`), `metrics.json`,
`loss_curve.png`, and for the embedded model its base (`base_model/`) so that `memvp-infer` can load it again. At the
end the adapter is reloaded from disk onto a fresh base and answers a few held-out images.

Nothing is written before every check has passed -- the options, the output folder, the dataset (every record read as
its batch will read it), the base, the MemVP and LoRA configs, the `TrainingArguments`: a refused call leaves a
previous run in `output_dir` byte-identical. A folder holding a run is only replaced with `--overwrite_output_dir` --
and only once the new run has trained (`run_folder.py`) -- or continued with a `--resume_from_checkpoint` inside it.

`train` runs as named steps, one function each: `check_request` (the refusals that need no model), `build` (the task,
base, collator, adapter and `TrainingArguments`, each refusing what it cannot build; still nothing written), `fit`
(the first write: train -- one line per logged loss, not the Trainer's log dict as well -- save, and switch the run
into `output_dir`), `reload` (the saved adapter on a fresh base answers the held-out records) and `report` (the loss
curve, `metrics.json`, the model card).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..distributed import check_deepspeed_launch, leave_process_group, wait_for_every_rank
from ..finite_training import StopOnNonFinite
from ..hub import check_model_source, resolvable_name
from ..tuner.save_load import atomic_saves, write_model_card
from .answering import accuracy, asked_question, generate_answers
from .model_loading import load_base, without_peft_probe_warning, write_run_manifest
from .options import TrainOptions, run_command
from .run_folder import (StagedCheckpointTrainer, check_output_dir, finish_run_folder, refusing_write_failures,
                         run_folder_of, start_run_folder)
from .visual_input import (build_collator, cached_collator, chat_template_choice, check_cache_request, check_preset,
                           collation_manifest, embedded_corpus, encode_in_training_precision, encoder_image_processor,
                           memory_fields, memory_slots, preset_fields, reads_digit_patches, visual_layout)

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

DIGIT_WORDS = [str(d) for d in range(10)]
PROMPT_CORPUS = ["Question: What digit is shown ?\nAnswer:"]


@dataclass
class Run:
    """What `build` leaves for the later steps: everything checked, nothing written yet."""

    options: TrainOptions
    replaced: list[str]  # what --overwrite_output_dir replaces once the run has trained (`check_request`)
    task: Any  # `data.tasks.load_task`'s train and held-out records
    eval_records: list[dict]  # the held-out records answered by `reload`
    tokenizer: Any
    kind: str  # how the base was loaded: 'causal', 'seq2seq' or 'vlm'
    base_path: str  # what adapter_config.json records as the base, and what `reload` loads
    embedded_base: Optional[tuple[Any, Any]]  # the embedded (model, tokenizer) as built, saved next to the adapter
    collator: Any  # the collator answers are built with
    train_collator: Any  # the training batches' collator: with --cache_image_features the cache's, else `collator`
    input_name: str  # 'pixel_values' or, for the built-in digit patches, 'image_features'
    peft_model: Any
    args: TrainingArguments
    run_dir: str  # where the Trainer writes: output_dir, or beside a previous run it replaces (`run_folder_of`)


@dataclass
class HeldOutAnswers:
    """What `reload` found: the held-out accuracy of the trained model and of the adapter reloaded from disk."""

    trained: Optional[float]  # None under ZeRO-3, where only the reloaded adapter answers
    reloaded: float
    scienceqa_scores: Optional[dict[str, Any]]  # the paper's columns, of the reloaded adapter, for ScienceQA
    adapter_config: Any  # the reloaded adapter's config, which the model card describes


def train(options: TrainOptions) -> dict[str, Any]:
    """One `memvp-train` run (module docstring): its metrics, or {} on a rank other than 0 of a launch."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    started = time.time()
    replaced = check_request(options)
    run = build(options, replaced)
    trainer, train_time = fit(run)
    # Under ZeRO-3 the trained model's weights stay partitioned across the ranks: a generate() on rank 0 alone would
    # wait for all-gathers the other ranks never join (gloo aborts, NCCL hangs). The held-out answers then come from
    # the saved adapter reloaded onto a single-process base -- the model users deploy.
    partitioned = is_deepspeed_zero3_enabled()
    if not trainer.is_world_process_zero():
        wait_for_every_rank()  # until rank 0 has answered: no rank leaves while a peer still holds the group
        return {}
    if partitioned:
        unset_hf_deepspeed_config()  # the reload is a plain single-process model: no zero.Init, no synced_gpus
    write_run_manifest(options.output_dir, run_manifest(run))
    answers = reload(run, answer_trained=not partitioned)
    metrics = report(run, trainer, answers, train_time, started)
    wait_for_every_rank()  # the other ranks wait here for rank 0: they leave the process group together
    return metrics


# --------------------------------------------------------------------------------------------------------------- check


def check_request(options: TrainOptions) -> list[str]:
    """The refusals that need no model, before anything is loaded; returns what `--overwrite_output_dir` replaces.

    Why these are checked up front: each used to fail (or be ignored) only after `output_dir/base_model/` had been
    rewritten, which leaves a previous adapter next to a different base -- memvp-infer then answers garbage, exit 0.
    """
    if options.load_in_4bit and options.model_name_or_path is None:
        raise ValueError("--load_in_4bit quantises a base loaded from --model_name_or_path; the embedded demo base is "
                         "built in memory and not quantised: pass --model_name_or_path or drop --load_in_4bit.")
    if options.fp16 and not torch.cuda.is_available():
        raise ValueError("--fp16 (float16 mixed precision) needs a CUDA GPU and none is available: use --bf16 on a "
                         "CPU, or no mixed precision.")
    resume = options.resume_from_checkpoint
    if resume is not None and not os.path.isfile(os.path.join(resume, "trainer_state.json")):
        raise ValueError(f"resume_from_checkpoint {resume!r} is not a checkpoint folder (no trainer_state.json): pass "
                         "a checkpoint-N folder that a run with --save_steps wrote.")
    # a folder, or a Hub id that can be had here (offline: in the cache), before the dataset is read
    if options.model_name_or_path is not None:
        check_model_source(options.model_name_or_path, "model_name_or_path", options.revision)
    elif options.revision is not None or options.trust_remote_code:
        raise ValueError("--revision and --trust_remote_code apply to a base loaded from --model_name_or_path; the "
                         "embedded demo base is built in memory: drop them or pass --model_name_or_path.")
    if options.vision_model_name_or_path:
        check_model_source(options.vision_model_name_or_path, "vision_model_name_or_path")
    check_cache_request(options)  # --cache_image_features with vision adapters (they change the features)
    check_preset(options)  # --preset adem-vl with an option it sets otherwise
    check_deepspeed_launch(options.deepspeed)  # DeepSpeed would find no ranks only once training begins
    return check_output_dir(options)


# --------------------------------------------------------------------------------------------------------------- build


def build(options: TrainOptions, replaced: list[str]) -> Run:
    """The run's task, base, collator, adapter and `TrainingArguments`, each refusing what it cannot build: a dataset
    record its batch could not read, a memory too small for a record, an unknown `--lora_target`,
    `--cache_image_features` without an encoder, a scheduler name, precision or DeepSpeed JSON the Trainer refuses.

    Why all of it before `fit`: nothing is written until every check has passed, so a refused run leaves a previous
    run in `output_dir` as it was. (The Trainer is built in `fit`: its constructor creates its output folder.)"""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from ..tasks.catalogue import load_task

    threads = options.threads or (1 if options.model_name_or_path is None else None)
    if threads:
        torch.set_num_threads(threads)
    set_seed(options.seed)
    task = load_task(options.dataset, options.image_folder, options.eval_fraction, options.seed,
                     allow_outside_image_folder=options.allow_outside_image_folder, decode_images=options.decode_images,
                     split=options.dataset_split, config=options.dataset_config, train_split=options.train_split,
                     use_caption=options.use_caption,
                     image_column=options.image_column)
    model, tokenizer, kind, base_path, embedded_base = run_base(options)
    processor, input_name, visual_dim, tokens, encoder = visual_setup(options, model, kind)
    layout = visual_layout(options)
    collator = build_collator(  # image paths are already resolved by load_task
        tokenizer, processor, input_name=input_name, kind=kind, max_length=options.max_length,
        array_value_range=task.array_value_range, prompt_template=options.prompt_template,
        chat_template=chat_template_choice(options.dataset), image_grid=layout["image_grid"],
        num_frames=layout["num_frames"],
    )
    most_images, eval_records = read_every_record(options, task, collator)
    if options.load_in_4bit:  # checkpointing is the Trainer's (`training_arguments`), as without 4-bit
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = memvp_config(options, visual_dim, tokens, encoder, kind, most_images, tokenizer)  # memory sized for the records
    with without_peft_probe_warning():
        peft_model = get_peft_model(model, config, revision=options.revision)  # refuses an unknown --lora_target
    peft_model.print_trainable_parameters()
    train_collator = cached_collator(options, peft_model, collator, processor, input_name)  # the flag's, else itself
    run_dir = run_folder_of(options.output_dir, replaced)  # with a previous run to replace, a folder inside
    args = training_arguments(options, run_dir)
    replaced_schedule = deepspeed_schedule_notice(options.deepspeed, options.lr_scheduler_type)
    if replaced_schedule and args.process_index == 0:
        print(replaced_schedule)
    return Run(options=options, replaced=replaced, task=task, eval_records=eval_records, tokenizer=tokenizer,
               kind=kind, base_path=base_path, embedded_base=embedded_base, collator=collator,
               train_collator=train_collator, input_name=input_name, peft_model=peft_model, args=args, run_dir=run_dir)


def run_base(options: TrainOptions) -> tuple[Any, Any, str, str, Optional[tuple[Any, Any]]]:
    """(model, tokenizer, kind, base path, embedded base): the base from `--model_name_or_path`, or the embedded one.

    The base path is what adapter_config.json records and `reload` loads again: the name given (a Hub id stays the
    id), or for the embedded base the folder next to the adapter that `fit` saves it into -- from a copy made now, the
    base as built, before `get_peft_model` changes the model."""
    if options.model_name_or_path is None:
        model, tokenizer = build_embedded_base(options.seed, embedded_corpus(options.dataset))
        base_path = os.path.abspath(os.path.join(options.output_dir, "base_model"))
        embedded_base = (copy.deepcopy(model), tokenizer)
        model.name_or_path = base_path  # what adapter_config.json records as the base
        return model, tokenizer, "causal", base_path, embedded_base
    model, tokenizer, kind = load_base(options.model_name_or_path, options.load_in_4bit, options.bf16,
                                       revision=options.revision, trust_remote_code=options.trust_remote_code)
    return model, tokenizer, kind, options.model_name_or_path, None


def build_embedded_base(seed: int, extra_corpus: Sequence[str] = ()):
    """The embedded default: a 2-layer width-128 Llama (random, frozen) and a word-level tokenizer (that also knows
    the words of `extra_corpus`: the questions of a digit-layout task)."""
    from ..demo_models import build_word_tokenizer, tiny_llama

    tokenizer = build_word_tokenizer(PROMPT_CORPUS + list(extra_corpus), DIGIT_WORDS)
    # initializer_range 0.1: with LlamaConfig's 0.02 a random lm_head caps every answer probability well below 1
    model = tiny_llama(tokenizer, hidden_size=128, layers=2, seed=seed, initializer_range=0.1, tie_word_embeddings=False)
    return model, tokenizer


def visual_setup(options: TrainOptions, model, kind: str):
    """(image processor/featurizer, input name, visual_dim, visual tokens per image, encoder module or None)."""
    from ..tasks.digits import DIGIT_PATCH_DIM, DIGIT_PATCH_TOKENS, DigitPatchFeaturizer
    from ..vision import load_vision_encoder

    normalization = options.image_normalization
    if options.vision_model_name_or_path:  # a folder or a Hub id; the adapter records the name as given
        encoder = load_vision_encoder(options.vision_model_name_or_path)
        config = encoder.config
        tokens = (config.image_size // config.patch_size) ** 2
        processor = encoder_image_processor(options.vision_model_name_or_path, config, normalization)
        return processor, "pixel_values", int(config.hidden_size), tokens, encoder
    if kind == "vlm":
        config = model.config.vision_config
        tokens = (config.image_size // config.patch_size) ** 2
        processor = encoder_image_processor(options.model_name_or_path, config, normalization,
                                            revision=options.revision, trust_remote_code=options.trust_remote_code)
        return processor, "pixel_values", int(config.hidden_size), tokens, None
    if reads_digit_patches(options.dataset):  # digits and its tile / frame layouts
        if normalization != "encoder":
            raise ValueError(f"--image_normalization {normalization} normalises the pixels of a vision encoder; the "
                             "built-in digits run reads 2x2-pixel patches without one: pass "
                             "--vision_model_name_or_path, or drop --image_normalization.")
        return DigitPatchFeaturizer(), "image_features", DIGIT_PATCH_DIM, DIGIT_PATCH_TOKENS, None
    raise ValueError(
        f"dataset {options.dataset!r} has real images: pass --vision_model_name_or_path (a CLIP/SigLIP folder or Hub "
        "id) or use a VLM base (Llava family) as --model_name_or_path."
    )


def read_every_record(options: TrainOptions, task: Any, collator: Any) -> tuple[tuple[int, Optional[str]], list[dict]]:
    """(the most image slots one record fills and that record's name, the held-out records `reload` answers).

    Why now: every record is read as its batch will read it, so a bad one is named before anything is written, not
    hours into training; and the memory is sized for the fullest record (`visual_input.memory_slots`)."""
    held_out_rows = task.held_out_rows(48 if options.quick else options.max_eval_samples)
    checking = time.time()
    most_images = max(collator.check_records(task.train), collator.check_records(held_out_rows), key=lambda m: m[0])
    print(f"memvp-train: read the {len(task.train) + len(held_out_rows)} records as training and answering will "
          f"({time.time() - checking:.1f} s)")
    return most_images, task.held_out(len(held_out_rows))


def memvp_config(options: TrainOptions, visual_dim: int, tokens: int, encoder, kind: str,
                 most_images: tuple[int, Optional[str]] = (0, None), tokenizer=None):
    """The run's `MemVPConfig`; its memory sized for `most_images` (`visual_input.memory_slots`); `--preset`'s
    fields (`visual_input.preset_fields`, the CLS token's ids from `tokenizer`) replace the options'."""
    from peft import LoraConfig

    from ..tuner.config import MemVPConfig

    layout = memory_fields(options, visual_layout(options))  # tiles, frames, compression, read (visual_input.py)
    preset = preset_fields(options, tokens, tokenizer, kind, encoder is not None or kind == "vlm")  # --preset
    layout.update({name: value for name, value in preset.items() if name in layout})
    given = options.num_memory_slots
    if preset and given is None:  # ADEM-VL's memory holds exactly the visual slots
        given = MemVPConfig(**layout).memory_tokens(tokens)
    slots = memory_slots(MemVPConfig, layout, tokens, given, most_images)
    lora = None
    if options.lora_rank > 0:
        targets = [t.strip() for t in options.lora_target.split(",") if t.strip()] if options.lora_target else None
        lora = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                          target_modules=targets)
    settings = dict(
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
        **layout,
    )
    return MemVPConfig(**{**settings, **preset})


def training_arguments(options: TrainOptions, run_dir: str) -> TrainingArguments:
    """The run's `TrainingArguments`, writing into `run_dir`. Building them checks the scheduler name, the precision and
    the DeepSpeed JSON; under a launcher it joins the process group."""
    from transformers import TrainingArguments

    max_steps = 20 if options.quick and options.max_steps <= 0 else options.max_steps
    return TrainingArguments(
        output_dir=run_dir,
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
        **_checkpointing_arguments(options.gradient_checkpointing),
        deepspeed=options.deepspeed,
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,  # the collator needs the raw image/question/answer columns
        report_to=[],
        seed=options.seed,
        dataloader_num_workers=0,
        logging_nan_inf_filter=False,  # a NaN step is logged as NaN (and stops the run), not left out of the mean
    )


def default_learning_rate(options: TrainOptions) -> float:
    if options.learning_rate is not None:
        return options.learning_rate
    if reads_digit_patches(options.dataset) and options.model_name_or_path is None:
        return 3e-2  # a frozen *random* LM must be steered through the memory alone: a large step is needed
    # the batch of a step: every process of a launch (torchrun, deepspeed and accelerate set WORLD_SIZE) takes its own
    # per-device batch -- the authors' 32 is 4 per GPU on 8 GPUs
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    effective = options.per_device_train_batch_size * options.gradient_accumulation_steps * processes
    return 1.125e-3 * effective / 32  # the authors' rate for batch 32, scaled linearly


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """Non-reentrant activation checkpointing under the name this transformers release's `TrainingArguments` takes:
    `activation_checkpointing` from 5.20 (where `gradient_checkpointing` is a deprecated alias), `gradient_checkpointing`
    before (5.16-5.19, the releases vLLM pins)."""
    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)} else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def deepspeed_schedule_notice(deepspeed: Optional[str], lr_scheduler_type: str) -> Optional[str]:
    """What to tell the user when a DeepSpeed JSON's "scheduler" section replaces `--lr_scheduler_type`, else None.

    The HF Trainer hands the schedule to DeepSpeed whenever the JSON has that section (the shipped configs have
    `WarmupDecayLR`: warm-up, then a *linear* decay), and `lr_scheduler_type` / `warmup_ratio` then do nothing --
    a run that asked for a cosine would decay linearly without a word. Said once, at the start.
    """
    if not deepspeed or not os.path.isfile(deepspeed):
        return None
    with open(deepspeed, encoding="utf-8") as handle:
        section = json.load(handle).get("scheduler")
    if not isinstance(section, dict):
        return None
    kind = section.get("type", "?")
    return (f"memvp-train: the DeepSpeed config {deepspeed} has a \"scheduler\" section ({kind}): DeepSpeed's "
            f"schedule runs, not --lr_scheduler_type {lr_scheduler_type} / --warmup_ratio (the HF Trainer's rule). "
            "Delete the section to use them.")


# ----------------------------------------------------------------------------------------------------------------- fit


def fit(run: Run) -> tuple[StagedCheckpointTrainer, float]:
    """Train the adapter and switch the run into `output_dir`: (the trainer, seconds of training).

    Why the first write is here: `build` has checked everything. The run folder (with the embedded base) is written
    first, then the Trainer built (its constructor creates its output folder); every `checkpoint-N` appears whole or
    not at all (`run_folder.StagedCheckpointTrainer`), and a previous run is replaced only once this one has trained
    and saved its adapter (`run_folder.finish_run_folder`)."""
    options = run.options
    start_run_folder(options.output_dir, run.replaced, run.embedded_base)  # the first write: every check has passed
    atomic_saves(run.peft_model)  # save_model and checkpoint-N stage their files: a crash keeps the previous adapter
    trainer = StagedCheckpointTrainer(  # each checkpoint-N appears whole or not at all (run_folder.py)
        model=run.peft_model, args=run.args, train_dataset=run.task.train, data_collator=run.train_collator
    )
    encode_in_training_precision(run.train_collator, trainer)  # --cache_image_features: under the forward's autocast
    print_each_loss_once(trainer)
    trainer.add_callback(StopOnNonFinite())  # a loss or weights that stop being finite end the run, naming the step
    train_started = time.time()
    trainer.train(resume_from_checkpoint=options.resume_from_checkpoint)
    train_time = time.time() - train_started
    trainer.save_model(run.run_dir)
    finish_run_folder(options.output_dir, run.run_dir, run.replaced)  # a previous run is replaced only now
    return trainer, train_time


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


def print_each_loss_once(trainer: Trainer) -> None:
    """Swap the Trainer's log callback (progress bar or printer) for the same one printing our loss lines."""
    for default, ours in ((ProgressCallback, LossProgressBar), (PrinterCallback, LossPrinter)):
        if trainer.pop_callback(default) is not None:
            trainer.add_callback(ours)


def run_manifest(run: Run) -> dict[str, Any]:
    """What the run manifest `memvp_cli.json` keeps of the run, so that `memvp-infer` feeds images and prompts the
    questions as training did (`model_loading`'s module docstring)."""
    options = run.options
    return {
        "featurizer": "digit_patches" if run.input_name == "image_features" else None,
        # a folder by its absolute path, as adapter_config.json records it: memvp-infer may run from another folder
        "vision_model_name_or_path": resolvable_name(options.vision_model_name_or_path),
        "array_value_range": list(run.task.array_value_range) if run.task.array_value_range else None,
        "kind": run.kind,
        **collation_manifest(run.collator, options.prompt_template, options.image_normalization),
    }


# -------------------------------------------------------------------------------------------------------------- reload


def reload(run: Run, answer_trained: bool = True) -> HeldOutAnswers:
    """The reload check: the held-out records answered by the trained model (`answer_trained`; not under ZeRO-3,
    where its weights are partitioned), then by the saved adapter reloaded from disk onto a fresh base -- what a user
    deploying the adapter gets (the vision encoder is re-attached from the folder the adapter config records). Prints
    both accuracies, ScienceQA's table, and a few answers next to their references."""
    from peft import PeftModel

    options, task, eval_records = run.options, run.task, run.eval_records
    held_out = None
    if answer_trained:
        held_out, _, _ = answer_held_out(run.peft_model, run.collator, eval_records, run.kind, run.tokenizer, options,
                                         task.name)
        print(f"held-out accuracy by generation: {held_out:.2%} on {len(eval_records)} samples")

    fresh, _, _ = load_base(run.base_path, options.load_in_4bit, options.bf16, revision=options.revision,
                            trust_remote_code=options.trust_remote_code)
    with without_peft_probe_warning():
        reloaded = PeftModel.from_pretrained(fresh, options.output_dir)
    if not options.load_in_4bit:  # a 4-bit base is placed by bitsandbytes when it loads
        reloaded.to(next(run.peft_model.parameters()).device)  # answer on the device that trained, not on the CPU
    reloaded_accuracy, reloaded_answers, scores = answer_held_out(reloaded, run.collator, eval_records, run.kind,
                                                                   run.tokenizer, options, task.name, progress=False)
    print(f"reloaded adapter from {options.output_dir}: held-out accuracy {reloaded_accuracy:.2%}")
    if scores is not None:
        from ..tasks.scienceqa import format_scores_table

        print(format_scores_table(scores))
    for record, answer in list(zip(eval_records, reloaded_answers))[:4]:
        art = ascii_image(record.get("image")) if task.name == "digits" else []
        print("\n".join(art))
        print(f"Q: {asked_question(record)}  ->  A: {answer!r}  (reference {shown_reference(record)!r})\n")
    return HeldOutAnswers(trained=held_out, reloaded=reloaded_accuracy, scienceqa_scores=scores,
                          adapter_config=reloaded.peft_config["default"])


def answer_held_out(model, collator, records: list[dict], kind: str, tokenizer, options: TrainOptions, task: str,
                    progress: bool = True) -> tuple[float, list[str], Optional[dict[str, Any]]]:
    """(accuracy, answers, ScienceQA scores or None) of the held-out records: ScienceQA as the authors score it (the
    letter after 'The answer is', `cli.scienceqa_eval`) on a decoder-only base, else exact match of the generated
    answer (a seq2seq base answers ScienceQA with its whole target, 'The answer is B.')."""
    if task == "scienceqa" and kind != "seq2seq":
        from .scienceqa_eval import answer_scienceqa
        from ..tasks.scienceqa import scienceqa_scores

        letters = answer_scienceqa(model, collator, records, kind, tokenizer, progress=progress)
        scores = scienceqa_scores(records, letters)
        return scores["Avg"] / 100.0, letters, scores
    answers = generate_answers(model, collator, records, kind, tokenizer, options.max_new_tokens, progress=progress)
    return accuracy(answers, records), answers, None


def shown_reference(record: dict) -> str:
    """The reference printed next to a sample answer: a multiple-choice record's letter, else the answer text."""
    from ..tasks.catalogue import reference_answer
    from ..tasks.scienceqa import answer_letter

    return answer_letter(record) if record.get("choices") is not None else reference_answer(record)


def ascii_image(image) -> list[str]:
    import numpy as np

    array = np.asarray(image, dtype=float)
    if array.ndim != 2:
        return []
    scale = " .:-=+*#%@"
    top = array.max() or 1.0
    return ["".join(scale[min(9, int(v / top * 9))] * 2 for v in row) for row in array]


# -------------------------------------------------------------------------------------------------------------- report


def report(run: Run, trainer: Trainer, answers: HeldOutAnswers, train_time: float, started: float) -> dict[str, Any]:
    """Write what the run leaves for people -- the loss curve, `metrics.json`, the model card -- and return the
    metrics. Last, so that the files describe the adapter as it was saved and reloaded: the losses come from the
    Trainer's history (`logged_losses`, the whole run when it was resumed), the accuracies from `reload`."""
    options, task, eval_records = run.options, run.task, run.eval_records
    steps, losses = logged_losses(trainer.state.log_history)
    save_loss_curve(steps, losses, os.path.join(options.output_dir, "loss_curve.png"),
                    f"MemVP on {task.name}")
    metrics = {
        "dataset": task.name,
        "train_samples": len(task.train),
        "eval_samples": len(eval_records),
        # ZeRO-3: from the reloaded adapter
        "heldout_accuracy": answers.reloaded if answers.trained is None else answers.trained,
        "reloaded_heldout_accuracy": answers.reloaded,
        "final_loss": losses[-1] if losses else None,
        "loss_history": {"steps": steps, "loss": losses},
        "global_steps": trainer.state.global_step,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.time() - started, 2),
        "trainable_params": sum(p.numel() for p in run.peft_model.parameters() if p.requires_grad),
        "options": asdict(options),
    }
    train_collator = run.train_collator
    if train_collator is not run.collator:  # how many training images the encoder ran on, and how many were read back
        metrics["feature_cache"] = {"folder": train_collator.cache.folder, "encoded": train_collator.cache.encoded,
                                    "reused": train_collator.cache.reused}
    if answers.scienceqa_scores is not None:
        metrics["scienceqa_scores"] = answers.scienceqa_scores  # the paper's columns on the held-out split, reloaded
    write_metrics(os.path.join(options.output_dir, "metrics.json"), metrics)
    write_model_card(options.output_dir, answers.adapter_config, dataset=task.name, metrics=metrics)
    print(f"wrote {options.output_dir}/metrics.json and loss_curve.png ({metrics['wall_time_s']:.0f} s in total)")
    return metrics


def logged_losses(log_history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, losses) of the training-loss entries of `trainer.state.log_history`.

    Why the Trainer's history and not a callback's own list: a run resumed from `checkpoint-N` restores the history
    from `trainer_state.json`, so the curve and the metrics cover the whole run, not just the part after the resume.
    """
    entries = [entry for entry in log_history if "loss" in entry and "step" in entry]
    return [int(entry["step"]) for entry in entries], [float(entry["loss"]) for entry in entries]


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        return run_command("memvp-train", TrainOptions, refusing_write_failures(train), argv,
                           __doc__.split("\n\n")[0])
    finally:  # under torchrun, ranks > 0 finish while rank 0 still evaluates: each leaves the process group itself
        leave_process_group()


if __name__ == "__main__":
    sys.exit(main())
