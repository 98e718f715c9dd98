"""Options of `memvp-train` / `memvp-infer`: one documented dataclass, filled from a YAML file and/or flags.

Key names follow what users know from LLaMA-Factory and the HF `TrainingArguments` (`model_name_or_path`,
`learning_rate`, `per_device_train_batch_size`, `lora_rank`, `load_in_4bit`, `deepspeed`, ...). Flags override the
YAML. An unknown YAML key or flag is an error with a suggestion ("did you mean ...?"), never silently ignored, and a
flag is never abbreviated: argparse's prefix matching took `--lr 0.01` as `--lr_scheduler_type 0.01`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, get_type_hints

FLOAT32_MAX = 3.4028234663852886e38
# the `deepspeed` launcher appends `--local_rank=N` to the program's arguments (unless --no_local_rank); the same rank
# is in the LOCAL_RANK variable it sets, which is what the Trainer reads, so the flag is accepted and not used
LAUNCHER_FLAGS = ("local_rank", "local-rank")
# names users bring from other tools, which difflib's spelling distance cannot connect to ours
ALIASES = {"lr": "learning_rate", "epochs": "num_train_epochs", "num_epochs": "num_train_epochs",
           "batch_size": "per_device_train_batch_size", "bs": "per_device_train_batch_size", "steps": "max_steps",
           "wd": "weight_decay", "warmup": "warmup_ratio", "rank": "lora_rank", "model": "model_name_or_path",
           "overwrite": "overwrite_output_dir", "resume": "resume_from_checkpoint"}


def did_you_mean(name: str, known: Sequence[str], prefix: str = "") -> str:
    """" Did you mean '<closest known name>'?" or "": the same hint for a misspelt YAML key and a misspelt flag.

    Why an alias table as well as difflib: `lr` is too short to be close to `learning_rate` by spelling, and the one
    name that starts with it (`lr_scheduler_type`) is the wrong guess that argparse's abbreviation matching made.
    """
    bare = name.removeprefix("no-")
    alias = ALIASES.get(bare)
    if alias in known:
        guess = alias if bare == name else f"no-{alias}"
        if guess in known:
            return f" Did you mean '{prefix}{guess}'?"
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


def _check_finite(options: Any) -> None:
    """Refuse a float option that is not a finite number float32 can hold: `--visual_scale inf`, `--memory_scale
    1e300` (inf once the fp32 adapter multiplies by it) or `--learning_rate inf` trained an all-NaN adapter and exited
    0. NaN would also slip past the range checks' comparisons for options that have none (`memory_dropout`)."""
    for item in dataclasses.fields(options):
        value = getattr(options, item.name)
        if _field_type(type(options), item.name) is not float or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and (not math.isfinite(value) or abs(value) > FLOAT32_MAX):
            raise ValueError(
                f"option '{item.name}' must be a finite number (float32 holds |x| <= 3.4e38), got {value!r}."
            )


def _check_ranges(options: Any, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Reject out-of-range option values before any model is built: `--per_device_train_batch_size 0` should be one
    clear line, not a traceback from deep inside the Trainer minutes later, and `--lora_rank -1` must not silently
    train without LoRA. Options left at None (meaning "the default") are not checked. The MemVP options
    (`projector_hidden_dim`, `visual_scale`, ...) are checked once, by `MemVPConfig`, except what the CLI itself
    interprets: `num_memory_slots` (None derives it from the visual tokens, so 0 must not mean "the default") and
    finiteness (`_check_finite`, for every float option)."""
    for name, (valid, expected) in rules.items():
        value = getattr(options, name)
        if value is not None and not valid(value):
            raise ValueError(f"option '{name}' must be {expected}, got {value!r}.")


def _positive(value: Any) -> bool:
    return value > 0


def _non_negative(value: Any) -> bool:
    return value >= 0


def _fraction(value: Any) -> bool:
    return 0 <= value < 1


def _open_fraction(value: Any) -> bool:
    return 0 < value < 1


#: `--image_normalization`: the processor of the encoder (or VLM), or the authors' ImageNet transform
IMAGE_NORMALIZATIONS = ("encoder", "imagenet")


def _normalization(value: Any) -> bool:
    return value in IMAGE_NORMALIZATIONS


#: `--preset`: ADEM-VL's released model (`long_context.preset_fields`)
PRESETS = ("adem-vl",)


def _preset(value: Any) -> bool:
    return value in PRESETS


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


#: file extensions a default run name leaves out (`data/llava_instruct.json` names the run `llava_instruct`)
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


def run_name_part(name: str) -> str:
    """The readable part of a dataset or model name in a default `output_dir`: the prefix of `scienceqa:DIR`, else
    the last path part (a Hub id's name, a folder's or a file's name without its data extension), in the characters a
    folder name keeps everywhere. A part that reads as nothing (`data/*.parquet`, `.`) gives way to the folder above."""
    prefix, colon, _ = name.partition(":")
    if colon and len(prefix) > 1 and prefix.isidentifier():  # scienceqa:DIR (len > 1: not a Windows drive)
        return prefix
    for part in reversed(os.path.abspath(name).split(os.sep)):
        for suffix in _DATA_SUFFIXES:
            if part.endswith(suffix):
                part = part[: -len(suffix)]
                break
        readable = re.sub(r"[^A-Za-z0-9._-]+", "-", part).strip("-.")
        if readable:
            return readable
    return "run"


def default_output_dir(dataset: str, model_name_or_path: Optional[str], vision_model_name_or_path: Optional[str],
                       quick: bool) -> str:
    """`outputs/memvp-DATASET[-BASE][-ENCODER][-quick]`: the folder of a run given no `--output_dir`.

    Why derived: with one folder for every run, the documented commands would refuse each other -- the embedded
    default, a T5 run and a LLaVA run would all want it -- and a `--quick` smoke run would replace a real run. Each
    (dataset, base, encoder) gets its own folder; the embedded default's is `outputs/memvp-digits`, the folder
    `memvp-infer --adapter` defaults to."""
    parts = [run_name_part(dataset)]
    parts += [run_name_part(name) for name in (model_name_or_path, vision_model_name_or_path) if name]
    if quick:
        parts.append("quick")
    return os.path.join("outputs", "memvp-" + "-".join(parts))


@dataclass
class TrainOptions:
    # ------------------------------------------------------------------ model
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "HF causal-LM / seq2seq / Llava-family model: a local folder or a Hub id (downloaded when online, the HF cache offline). Default: a small local Llama built from a config (no download)."},
    )
    vision_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "CLIP/SigLIP vision model whose patch features feed the memory: a local folder or a Hub id. Default for `digits`: 2x2 pixel patches; VLM bases use their own tower."},
    )
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of --model_name_or_path; recorded in the adapter (default: the Hub's default branch)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Let transformers run the code of the --model_name_or_path repo (its model, tokenizer and processor classes); off by default."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base in 4-bit NF4 (bitsandbytes), QLoRA style."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 mixed precision (adapter weights stay fp32)."})
    fp16: bool = field(default=False, metadata={"help": "Train in float16 mixed precision (GPU only)."})
    # ------------------------------------------------------------------ data
    dataset: str = field(
        default="digits",
        metadata={"help": "'digits' (scikit-learn handwritten digits, built in; 'digits-grid', 'digits-grid-3x3' and 'digits-sequence' lay several out as tiles or frames), a LLaVA conversation .json, a .jsonl with image/question/answer, a datasets.save_to_disk folder, .parquet/.arrow files (a glob too), a folder of data files, or a Hub dataset id."},
    )
    dataset_split: Optional[str] = field(default=None, metadata={"help": "Split of a Hub dataset, a data folder or a save_to_disk DatasetDict to train on (default: 'train'); the held-out records come from it too (--eval_fraction)."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration (subset) name of a Hub dataset or a data folder with several (datasets.load_dataset's `name`)."})
    train_split: Optional[str] = field(default=None, metadata={"help": "Split of --dataset scienceqa:DIR to train on: train, trainval, minitrain (default: train); the held-out answers at the end come from val (minival for minitrain, test for trainval)."})
    use_caption: bool = field(default=False, metadata={"help": "ScienceQA: add each problem's caption (captions.json) to the context, after the hint (off, as the authors trained)."})
    image_folder: Optional[str] = field(default=None, metadata={"help": "Folder that relative image paths in the dataset refer to."})
    allow_outside_image_folder: bool = field(default=False, metadata={"help": "Accept dataset image and video paths outside their folder (--image_folder, the dataset's folder, ScienceQA's images/; absolute, or with '..'); refused by default."})
    image_column: Optional[str] = field(default=None, metadata={"help": "Field (or column) holding each record's images when it is not 'image'/'images', e.g. img or image_path: read as 'image'."})
    decode_images: bool = field(default=True, metadata={"help": "Decode every dataset image when the dataset loads (--no-decode_images: header and size only, faster on large datasets)."})
    eval_fraction: Optional[float] = field(default=None, metadata={"help": "Held-out fraction used for the accuracy by generation (default: 0.2; ScienceQA holds out its own val split instead)."})
    max_eval_samples: int = field(default=400, metadata={"help": "At most this many held-out samples are answered at the end."})
    max_length: int = field(default=256, metadata={"help": "Maximum text length in tokens (the sequence never holds image tokens)."})
    prompt_template: Optional[str] = field(default=None, metadata={"help": "Template of every question, with a {question} field (default: 'Question: {question}\\nAnswer:'); giving one means the base's chat template is not used. Multiple-choice records (ScienceQA) keep the authors' prompt."})
    image_normalization: str = field(default="encoder", metadata={"help": "How images become pixel_values: 'encoder' (the encoder's or VLM's own image processor, else CLIP defaults) or 'imagenet' (the MemVP authors' ScienceQA transform: resize to the encoder's size, bicubic, no crop, ImageNet mean/std)."})
    # ------------------------------------------------------------------ MemVP
    num_memory_slots: Optional[int] = field(default=None, metadata={"help": "Memory slots n (default: visual tokens + 25%, like the authors' 256 -> 320)."})
    projector_hidden_dim: int = field(default=128, metadata={"help": "Projector hidden width h (paper: 128)."})
    visual_scale: float = field(default=0.01, metadata={"help": "lambda (paper: 0.01)."})
    memory_scale: float = field(default=0.1, metadata={"help": "s (paper: 0.1)."})
    memory_dropout: float = field(default=0.1, metadata={"help": "Dropout on the memory activations (paper: 0.1)."})
    vision_adapter_dim: int = field(default=0, metadata={"help": "Bottleneck adapters inside the vision encoder blocks (authors: 12; 0 = off)."})
    cache_image_features: Optional[str] = field(default=None, metadata={"optional_value": "auto", "help": "Encode each training image once with the frozen vision encoder and reuse its features in every epoch, cached on disk in DIR as safetensors shards keyed by the processed image and the encoder/layer/processor settings (the flag alone or 'auto': ~/.cache/memvp_peft/image_features). Needs a vision encoder and --vision_adapter_dim 0."})
    # ------------------------------------------------------------------ long visual context (docs/long_context.md)
    image_grid: Optional[str] = field(default=None, metadata={"help": "AnyRes tiling 'RxC' (e.g. 2x2): every image becomes the overview plus R x C tiles, each a block of memory slots (digits-grid: 2x2, digits-grid-3x3: 3x3)."})
    num_frames: Optional[int] = field(default=None, metadata={"help": "Video: a record's 'video' (a file or a frame list) or 'frames' sampled to this many frames, each a block of memory slots (digits-sequence: 8)."})
    pool_kernel: int = field(default=1, metadata={"help": "Memory compression: k x k average pooling of each image's patch grid before the projector (2: N -> N/4 slots; 1 = off)."})
    pool_tokens: Optional[int] = field(default=None, metadata={"help": "Memory compression: pool each image's patch grid to this many tokens (a perfect square)."})
    multiscale_tokens: Optional[str] = field(default=None, metadata={"help": "ADEM-VL's multiscale slots, comma-separated token counts (e.g. 256,64: the 16x16 grid plus its 8x8 pool)."})
    memory_read: str = field(default="memvp", metadata={"help": "'memvp' (act(x K^T) V, the paper) or 'adem' (ADEM-VL: silu(x) silu(K)^T V)."})
    drop_ratio: float = field(default=0.0, metadata={"help": "ADEM-VL: zero the lowest fraction of each token's memory scores before V (ADEM-VL: 0.1; 0 = off)."})
    preset: Optional[str] = field(default=None, metadata={"help": "'adem-vl': ADEM-VL's model as released -- its read, drop 0.1, no memory dropout, CLIP adapters of width 12, multiscale slots of the encoder's grid plus its half-side pool, exactly that many memory slots, and the CLS input token after 'Image: ' (needs a CLIP-style encoder and a decoder-only base)."})
    # ------------------------------------------------------------------ LoRA
    lora_rank: int = field(default=0, metadata={"help": "Add LoRA of this rank to the same adapter (0 = MemVP only, as in the paper)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target: Optional[str] = field(
        default=None,
        metadata={"help": "Comma-separated module names LoRA targets (default: peft's choice for the architecture, e.g. q_proj,v_proj for Llama, q,v for T5)."},
    )
    # ------------------------------------------------------------------ training
    output_dir: Optional[str] = field(default=None, metadata={"help": "Where the adapter, metrics.json and loss_curve.png go: a new or empty folder, or one holding a previous run with --overwrite_output_dir. Default: outputs/memvp-DATASET[-BASE][-ENCODER][-quick], named after --dataset, --model_name_or_path and --vision_model_name_or_path (their last path part; a file without its extension) and --quick: outputs/memvp-digits for the embedded default, outputs/memvp-llava_instruct-llama-clip for --dataset data/llava_instruct.json --model_name_or_path ./llama --vision_model_name_or_path ./clip."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace the run in a non-empty output_dir (its checkpoint-* folders are removed); without it such a folder is refused."})
    num_train_epochs: float = field(default=20.0, metadata={"help": "Epochs (authors: 20). Ignored when max_steps > 0."})
    max_steps: int = field(default=-1, metadata={"help": "Total optimiser steps; overrides num_train_epochs when > 0."})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (default: the authors' 1.125e-3 at batch 32, scaled linearly with the batch of a step -- per device x accumulation x processes; 3e-2 for the embedded digits demo, whose frozen LM is random)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device (authors: 32 in total)."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Gradient accumulation steps."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up fraction of the steps (authors: 2 of 20 epochs)."})
    weight_decay: float = field(default=0.02, metadata={"help": "AdamW weight decay (authors: 0.02)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (authors: 0.95)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "HF scheduler name (authors: half-cosine)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward to save memory."})
    deepspeed: Optional[str] = field(default=None, metadata={"help": "DeepSpeed JSON (see integrations/deepspeed/)."})
    logging_steps: int = field(default=25, metadata={"help": "Log the loss every N steps."})
    save_steps: int = field(default=0, metadata={"help": "Save an intermediate checkpoint every N steps (0 = only at the end)."})
    resume_from_checkpoint: Optional[str] = field(default=None, metadata={"help": "A checkpoint-N folder to resume from."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads for torch (default: 1 for the embedded tiny model, where threading only adds overhead; else torch's default)."},
    )
    max_new_tokens: int = field(default=8, metadata={"help": "Tokens generated per held-out answer."})
    quick: bool = field(default=False, metadata={"help": "Smoke run: a few steps and a small evaluation (CI)."})

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = default_output_dir(self.dataset, self.model_name_or_path,
                                                 self.vision_model_name_or_path, self.quick)
        _check_finite(self)
        _check_ranges(self, {
            "num_memory_slots": (_positive, "> 0 (leave it unset for the default)"),
            "num_frames": (_positive, "> 0 (leave it unset for no video)"),
            "max_eval_samples": (_positive, "> 0"),
            "max_length": (_positive, "> 0"),
            "eval_fraction": (_open_fraction, "in (0, 1)"),
            "image_normalization": (_normalization, f"one of {IMAGE_NORMALIZATIONS}"),
            "preset": (_preset, f"one of {PRESETS}"),
            "train_split": (_name, "a split name such as 'train'"),
            "lora_rank": (_non_negative, ">= 0 (0 = no LoRA)"),
            "lora_alpha": (_positive, "> 0"),
            "lora_dropout": (_fraction, "in [0, 1)"),
            "num_train_epochs": (_positive, "> 0"),
            "learning_rate": (_positive, "> 0"),
            "per_device_train_batch_size": (_positive, "> 0"),
            "gradient_accumulation_steps": (_positive, "> 0"),
            "warmup_ratio": (_fraction, "a fraction of the steps in [0, 1)"),
            "weight_decay": (_non_negative, ">= 0"),
            "adam_beta2": (_fraction, "in [0, 1)"),
            "logging_steps": (_positive, "> 0"),
            "save_steps": (_non_negative, ">= 0 (0 = only at the end)"),
            "threads": (_positive, "> 0"),
            "max_new_tokens": (_positive, "> 0"),
        })


@dataclass
class InferOptions:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Base model: a local folder or a Hub id (default: the base the adapter records in adapter_config.json; memvp-train stores the embedded demo model's as an absolute path)."})
    revision: Optional[str] = field(default=None, metadata={"help": "Hub revision of the base model (default: the revision the adapter records, else the Hub's default branch)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Let transformers run the code of the base model's repo; off by default (never taken from the adapter)."})
    adapter: str = field(default="outputs/memvp-digits", metadata={"help": "MemVP adapter folder written by memvp-train."})
    image: list = field(default_factory=list, metadata={"help": "One or more image files (or 'digits:INDEX' for a built-in digit)."})
    question: str = field(default="What digit is shown ?", metadata={"help": "Question asked about each image."})
    input_file: Optional[str] = field(default=None, metadata={"help": "JSONL with an image (a path, or digits:INDEX as for --image; none for a text-only question) and a question (or prompt) per line (an answer field, if any, is ignored)."})
    image_folder: Optional[str] = field(default=None, metadata={"help": "Folder for relative image paths in --input_file."})
    allow_outside_image_folder: bool = field(default=False, metadata={"help": "Accept --input_file image paths outside --image_folder (absolute, or with '..'); refused by default."})
    dataset: Optional[str] = field(default=None, metadata={"help": "Score a benchmark instead of answering --image/--input_file: scienceqa:DIR (the repository layout or the Hub parquet export) writes --output_file (one line per problem), scores.json next to it and prints the paper's table."})
    split: str = field(default="test", metadata={"help": "Split of --dataset to score (ScienceQA: test, val, minitest, ...)."})
    use_caption: bool = field(default=False, metadata={"help": "ScienceQA: add each problem's caption (captions.json) to the context, as the authors' eval.py does (off by default, as they trained)."})
    prompt_template: Optional[str] = field(default=None, metadata={"help": "Template of the questions, with a {question} field (default: the one the adapter was trained with, recorded in memvp_cli.json)."})
    batch_size: int = field(default=16, metadata={"help": "Images answered per batch."})
    max_new_tokens: Optional[int] = field(default=None, metadata={"help": "Maximum answer length in tokens (default: 16; 1 for --dataset scienceqa, whose answer is the letter after 'The answer is', as the authors score it)."})
    output_file: Optional[str] = field(default=None, metadata={"help": "Write the answers as JSONL here."})
    explain: Optional[str] = field(default=None, metadata={"help": "Write read maps into this folder (new or empty): for every answered image, heat maps of what each answer token's FFNs read from the memory, over the image, and an index.html showing them all (opens offline). Decoder-only bases; not with --dataset."})
    explain_layers: Optional[str] = field(default=None, metadata={"help": "With --explain: the reading layers (depth indices, comma-separated, e.g. 0,1) whose reads the maps add up (default: all)."})

    def __post_init__(self) -> None:
        _check_ranges(self, {"batch_size": (_positive, "> 0"), "max_new_tokens": (_positive, "> 0"),
                             "split": (_name, "a split name such as 'test'")})


def _field_type(options_cls: type, name: str) -> Any:
    hint = get_type_hints(options_cls)[name]
    args = getattr(hint, "__args__", None)
    if args and type(None) in args:  # Optional[X]
        hint = next(a for a in args if a is not type(None))
    return hint


def _default_of(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _help_text(item: dataclasses.Field) -> str:
    """The field's help plus its real default. The flags themselves default to None (so that only the flags a user
    gives override the YAML), which is why argparse cannot show the defaults; `%` is escaped for argparse."""
    text = item.metadata.get("help", "")
    default = _default_of(item)
    if default not in (None, []):
        text = f"{text} (default: {default})"
    return text.replace("%", "%%")


def build_parser(options_cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("config", nargs="?", default=None, help="optional YAML file with any of the options below")
    parser.add_argument(*(f"--{flag}" for flag in LAUNCHER_FLAGS), dest="launcher_local_rank", type=int,
                        default=None, help=argparse.SUPPRESS)
    for item in dataclasses.fields(options_cls):
        kind = _field_type(options_cls, item.name)
        help_text = _help_text(item)
        flag = f"--{item.name}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is list:
            parser.add_argument(flag, nargs="+", default=None, help=help_text)
        elif "optional_value" in item.metadata:  # `--flag` alone means the value in the metadata, `--flag X` X
            parser.add_argument(flag, type=kind, nargs="?", const=item.metadata["optional_value"], default=None,
                                metavar="DIR", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    return parser


def load_yaml_options(path: str, options_cls: type) -> dict[str, Any]:
    """Read a YAML config; unknown keys raise a ValueError with the closest valid name."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist.")
    with open(path) as handle:
        try:
            data = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}.")
    known = [f.name for f in dataclasses.fields(options_cls)]
    for key in data:
        if key not in known:
            raise ValueError(f"{path}: unknown option '{key}'.{did_you_mean(str(key), known)}")
    return {key: _yaml_value(path, key, value, _field_type(options_cls, key)) for key, value in data.items()}


def _yaml_value(path: str, key: str, value: Any, kind: Any) -> Any:
    """Convert a YAML value to the option's type, as argparse does for the same flag.

    Why: YAML 1.1 reads `2e-3` (no dot) as a string and `image: a.png` as one string where a list is expected; without
    this, a typo-free config would fail deep inside training with a TypeError.
    """
    if value is None:
        return None
    if kind is list:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]
    problem = f"{path}: option '{key}' must be {getattr(kind, '__name__', kind)}, got {value!r}"
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{problem} (use true or false).")
        return value
    if isinstance(value, (bool, list, dict)):
        raise ValueError(f"{problem}.")
    if kind is str:
        return str(value)
    try:
        converted = kind(value)
    except (TypeError, ValueError, OverflowError) as error:  # OverflowError: `max_steps: .inf`
        raise ValueError(f"{problem}.") from error
    if kind is int and isinstance(value, float) and converted != value:
        raise ValueError(f"{problem} (a whole number).")
    return converted


def check_flags(options_cls: type, argv: Sequence[str]) -> None:
    """Refuse an unknown `--flag` with the closest valid one, before argparse sees it.

    Why not argparse's own "unrecognized arguments" error: it names no alternative, and it only comes after the
    other flags were parsed -- an unknown flag's value could even be taken as the positional YAML path.
    """
    known = ["help", *LAUNCHER_FLAGS]
    for item in dataclasses.fields(options_cls):
        known.append(item.name)
        if _field_type(options_cls, item.name) is bool:
            known.append(f"no-{item.name}")
    for token in argv:
        if token == "--":  # everything after it is positional
            return
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0]
            if name not in known:
                raise ValueError(f"unknown option '--{name}'.{did_you_mean(name, known, prefix='--')}")


def parse_options(options_cls: type, argv: Optional[Sequence[str]], description: str) -> Any:
    import sys

    parser = build_parser(options_cls, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    check_flags(options_cls, argv)
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config")
    args.pop("launcher_local_rank")
    if config_path:
        values.update(load_yaml_options(config_path, options_cls))
    values.update({k: v for k, v in args.items() if v is not None})
    try:
        return options_cls(**values)
    except TypeError as error:
        raise ValueError(f"invalid options: {error}") from error


def run_command(program: str, options_cls: type, action: Callable[[Any], Any], argv: Optional[Sequence[str]],
                description: str) -> int:
    """Parse options and run `action`; a ValueError (bad input) becomes one `program: error: ...` line and exit 2."""
    import sys

    try:
        action(parse_options(options_cls, argv, description))
    except ValueError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        return 2
    return 0
