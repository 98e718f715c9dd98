"""`memvp-bench` / `python -m memvp_peft.bench`: the options, which mode runs (sweep, long context, profile, decode
comparison, accuracy, ablations), and the files it writes.

Defaults depend on the mode (``--quick`` shrinks the model and the grid, ``--accuracy`` uses one thread), so they
are resolved here, once, and every mode reads the finished namespace. What cannot run is refused here too, before a
model is built: the CUDA branches of the timers cannot run on a machine without a GPU, so whether ``--device`` /
``--dtype`` can be had (and which modes exist only on CPU) is decided from the options alone, testable anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch

from .ablations import (ABLATION_TASKS, DEFAULT_LR, DEFAULT_STEPS, QUICK_STEPS, VARIANT_NAMES, ablations_markdown,
                        plot_ablations, run_ablations)
from .accuracy import accuracy_markdown, plot_accuracy, run_accuracy
from .cost_model import check_long_context_targets, long_context_ratios
from .methods import (
    ALL_METHODS, DEFAULT_IMAGE_SIZE, DEFAULT_LAYOUTS, METHODS, MODEL_SHAPES, QUICK_LAYOUTS, VLM_IMAGE_PROCESSORS,
    parse_layout, visual_tokens_per_image,
)
from .profiling import decode_compare_markdown, profile_point, run_decode_compare
from .sweep import long_context_markdown, markdown_report, plot_long_context, plot_report, run_sweep

#: where results go unless --output_dir says otherwise (beside memvp-train's outputs/memvp-* run folders)
DEFAULT_OUTPUT_DIR = "outputs/memvp-bench"
#: what ``--help`` prints above the options (the first line of the package docstring)
DESCRIPTION = "Benchmark MemVP against input-space visual prompting + LoRA (LLaVA style) and text-only + LoRA."

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The options, with the mode-dependent defaults (``--quick``, ``--accuracy``) filled in."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # '--repeat 3' must not silently mean --repeats (or a later, longer flag)
        prog="memvp-bench", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name_or_path", default=None, help="local HF causal-LM folder (default: built-in Llama)")
    parser.add_argument("--model_shape", choices=tuple(MODEL_SHAPES), default=None,
                        help="a random base of that real model's exact shape (width, heads, KV heads, FFN, vocab), "
                             "with --layers decoder layers (default 1 2: per-layer times from two depths)")
    parser.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("WIDTH", "HEIGHT"),
                        help="with a VLM shape (qwen2-vl-7b): N is what its own image processor makes of an image "
                             f"of this size (default {DEFAULT_IMAGE_SIZE[0]} {DEFAULT_IMAGE_SIZE[1]})")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="cpu (default) or cuda: CUDA events around synchronised calls, CUDA allocator peaks")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of the base (default float32; e.g. bfloat16 on a GPU); adapters stay fp32")
    parser.add_argument("--attn_implementation", default=None,
                        help="attention of the base (default: sdpa for built models, a local model's own default)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of every phase per method and point")
    parser.add_argument("--hidden_size", type=int, default=None, help="built-in model width (default 512)")
    parser.add_argument("--num_layers", "--layers", type=int, nargs="+", default=None, metavar="K",
                        help="decoder layers of the built model (default 4); two or more depths are each measured, "
                             "and per-layer times are fitted across them")
    parser.add_argument("--intermediate_size", type=int, default=None, help="built-in model FFN width (default 1376)")
    parser.add_argument("--vocab_size", type=int, default=None, help="built-in model vocabulary (default 2000)")
    parser.add_argument("--num_visual_tokens", "-N", type=int, nargs="+", default=None, help="default 64 256 576")
    parser.add_argument("--text_lengths", "-T", type=int, nargs="+", default=None, help="default 32 64 256")
    parser.add_argument("--batch_size", "-B", type=int, default=None, help="default 4")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per point (default 5)")
    parser.add_argument("--new_tokens", type=int, default=32, help="greedy tokens generated for the decode timing")
    parser.add_argument("--visual_dim", type=int, default=None, help="visual feature width (default 1024, CLIP-L)")
    parser.add_argument("--extra_slots", type=int, default=64, help="MemVP slots beyond N (authors: 256 -> 320)")
    parser.add_argument("--projector_hidden_dim", type=int, default=128)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--lora_alpha", type=int, default=16)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--lora_target_modules", default="q_proj,v_proj")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None,
                        help=f"default: {' '.join(METHODS)} ({' '.join(ALL_METHODS)} with --long_context)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    # not docs/benchmarks: run from the repository root, that default overwrote the results the docs cite
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR,
                        help=f"folder for the JSON / markdown / PNG (default: {DEFAULT_OUTPUT_DIR}, relative to the "
                             "current folder; the docs' results were written with --output_dir docs/benchmarks)")
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny model, one point, one repeat (< 30 s)")
    parser.add_argument("--no_memory", action="store_true", help="skip the (untimed) peak-memory runs")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--profile", action="store_true",
                        help="also write torch.profiler op tables of MemVP vs text-only + LoRA at --profile_point")
    parser.add_argument("--profile_point", type=int, nargs=2, default=(256, 64), metavar=("N", "T"))
    parser.add_argument("--decode_compare", action="store_true",
                        help="instead of the sweep: decode per token of MemVP vs text-only + LoRA, interleaved in "
                             "one process, and MemVP's memory-read products timed alone, at --profile_point")
    long = parser.add_argument_group("cost against memory size N (--long_context)")
    long.add_argument("--long_context", action="store_true",
                      help="instead of the N x T grid: sweep the memory size N over --layouts at one text length "
                           "(default T=64) for MemVP, MemVP pooled 2x2, the ADEM-VL form, input-space and text-only")
    long.add_argument("--layouts", nargs="+", default=None, metavar="LAYOUT",
                      help="P (one image of P tokens), tiles:IxP or frames:IxP (I images of P tokens; frames set "
                           f"num_frames); default {' '.join(DEFAULT_LAYOUTS)} (quick: {' '.join(QUICK_LAYOUTS)})")
    long.add_argument("--time_cap_s", type=float, default=None,
                      help="a method whose first training step at a point takes longer is reported as over the cap "
                           "and not measured further there (default with --long_context: 60 s)")
    acc = parser.add_argument_group("accuracy at equal budget (--accuracy)")
    acc.add_argument("--accuracy", action="store_true",
                     help="run the digits accuracy comparison (MemVP vs input-space + LoRA) instead of the sweep")
    acc.add_argument("--steps", type=int, default=None,
                     help="training steps per method (default 1000; quick: 10) or, with --ablations, per variant "
                          f"(default {DEFAULT_STEPS}; quick: {QUICK_STEPS})")
    acc.add_argument("--lr", type=float, nargs="+", default=None,
                     help="peak learning rates tried for both methods (default 0.003 0.01 0.03); validation accuracy "
                          "picks one per method. With --ablations: the one lr of every variant "
                          f"(default {DEFAULT_LR})")
    acc.add_argument("--acc_batch_size", type=int, default=32)
    acc.add_argument("--acc_hidden_size", type=int, default=128)
    acc.add_argument("--acc_extra_slots", type=int, default=16, help="MemVP slots beyond the 16 visual tokens")
    serve = parser.add_argument_group("vLLM serving (--serving; in the serving environment, docs/serving.md)")
    serve.add_argument("--serving", action="store_true",
                       help="MemVP vs input-space prompting vs text-only served by vLLM: throughput, time to first "
                            "token, KV cache per request (defaults: N 576, T 64, 32 output tokens, 3 repeats)")
    serve.add_argument("--concurrency", type=int, nargs="+", default=None, metavar="C",
                       help="concurrent closed-loop clients (default 1 8 32)")
    serve.add_argument("--serving_min_requests", type=int, default=8,
                       help="requests per timed point at least (every client sends two or more)")
    serve.add_argument("--kv_cache_gib", type=int, default=1, help="each engine's KV cache (VLLM_CPU_KVCACHE_SPACE)")
    abl = parser.add_argument_group("ablations of MemVP's knobs (--ablations)")
    abl.add_argument("--ablations", action="store_true",
                     help="instead of the sweep: train every variant (position embeddings, lambda, s, layers, slots, "
                          "the read's activation) on the digit tasks at one budget over --seeds; accuracy and cost")
    abl.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of every variant (default 0 1 2; "
                     "quick: 0); each picks the split, base, adapter start and batch order, as memvp-train --seed")
    abl.add_argument("--ablation_tasks", nargs="+", choices=ABLATION_TASKS, default=list(ABLATION_TASKS),
                     help="the built-in tasks (default: all three)")
    abl.add_argument("--variants", nargs="+", choices=VARIANT_NAMES, default=list(VARIANT_NAMES),
                     help="the variants (default: all)")
    abl.add_argument("--workers", type=int, default=None,
                     help="processes that take the runs in parallel, --threads each (default: 2 where the machine "
                          "has 2 cores or more, else 1; quick: 1)")
    args = parser.parse_args(argv)
    if args.serving:
        problem = _serving_problem(args)
        if problem:
            parser.error(problem)
    elif args.concurrency is not None:
        parser.error("--concurrency belongs to --serving; add it (or drop it)")
    problem = device_problem(args.device, args.dtype) or check_modes(args) or _shape_problem(args)
    if problem:
        parser.error(problem)
    if args.model_shape and args.num_layers is None:
        args.num_layers = [1, 2]
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.lora_targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    quick = args.quick
    if args.long_context:
        problem = _long_context_problem(args)
        if problem:
            parser.error(problem)
    elif args.layouts is not None or args.time_cap_s is not None:
        parser.error("--layouts and --time_cap_s belong to --long_context; add it (or drop them)")
    if args.methods is None:
        args.methods = list(ALL_METHODS if args.long_context else METHODS)
    if args.model_shape in VLM_IMAGE_PROCESSORS and args.num_visual_tokens is None:
        args.image_size = tuple(args.image_size or DEFAULT_IMAGE_SIZE)
        args.num_visual_tokens = [visual_tokens_per_image(args.model_shape, *args.image_size)]
    if args.num_visual_tokens is None:
        args.num_visual_tokens = [16] if quick else [64, 256, 576]
    if args.text_lengths is None:
        args.text_lengths = [16] if quick else [32, 64, 256]
    if args.batch_size is None:
        args.batch_size = 2 if quick else 4
    if args.repeats is None:
        args.repeats = 1 if quick else 5
    if args.visual_dim is None:
        args.visual_dim = 32 if quick else 1024
    problem = _ablations_problem(args)
    if problem:
        parser.error(problem)
    others = [flag for flag, on in (("--accuracy", args.accuracy), ("--long_context", args.long_context),
                                    ("--decode_compare", args.decode_compare)) if on]
    if args.profile and others:
        parser.error(f"--profile profiles the sweep's point; {' '.join(others)} is a mode of its own: drop one")
    if args.lr is None:
        args.lr = [3e-3, 1e-2, 3e-2]
    if args.accuracy or args.ablations:
        args.threads = args.threads or 1  # tiny matrices: one thread beats two that wait on each other
    elif quick:
        args.threads = args.threads or 1
        args.extra_slots = min(args.extra_slots, 16)
        args.projector_hidden_dim = min(args.projector_hidden_dim, 32)
    return args


def _serving_problem(args: argparse.Namespace) -> Optional[str]:
    """Fill in --serving's defaults (one N and one T, the concurrency levels); what cannot be combined with it."""
    others = [flag for flag, on in (("--accuracy", args.accuracy), ("--long_context", args.long_context),
                                    ("--decode_compare", args.decode_compare), ("--profile", args.profile),
                                    ("--ablations", args.ablations), ("--model_shape", args.model_shape),
                                    ("--model_name_or_path", args.model_name_or_path)) if on]
    if others:
        return f"--serving runs a sweep of its own on the built-in Llama shape: drop {' '.join(others)}"
    if args.device != "cpu":
        return ("--device does not apply to --serving: vLLM serves on the platform its build targets (vllm-cpu "
                "here; with vllm==0.32.* on a GPU machine the same command serves on the GPU)")
    for flag, values in (("-N", args.num_visual_tokens), ("-T", args.text_lengths)):
        if values is not None and len(values) != 1:
            return f"--serving measures one point: give {flag} one value, got {' '.join(map(str, values))}"
    args.num_visual_tokens = args.num_visual_tokens or ([16] if args.quick else [576])
    args.text_lengths = args.text_lengths or ([16] if args.quick else [64])
    args.concurrency = sorted(set(args.concurrency or ([1, 2] if args.quick else [1, 8, 32])))
    if min(args.concurrency) < 1 or args.new_tokens < 2:
        return f"--serving needs concurrency >= 1 and --new_tokens >= 2, got {args.concurrency} / {args.new_tokens}"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.quick:
        args.new_tokens = min(args.new_tokens, 8)
    return None


def _ablations_problem(args: argparse.Namespace) -> Optional[str]:
    """Fill in --ablations' defaults (steps, one lr, seeds); what cannot be combined with it."""
    if not args.ablations:
        given = [flag for flag, on in (("--seeds", args.seeds is not None), ("--workers", args.workers is not None),
                                       ("--ablation_tasks", args.ablation_tasks != list(ABLATION_TASKS)),
                                       ("--variants", args.variants != list(VARIANT_NAMES))) if on]
        return f"{' '.join(given)} belong to --ablations; add it (or drop them)" if given else None
    others = [flag for flag, on in (("--accuracy", args.accuracy), ("--long_context", args.long_context),
                                    ("--decode_compare", args.decode_compare), ("--profile", args.profile)) if on]
    if others:
        return f"--ablations is a mode of its own: drop {' '.join(others)}"
    if args.lr is not None and len(args.lr) != 1:
        return f"--ablations trains every variant at one learning rate; --lr got {len(args.lr)}: give one"
    args.lr = args.lr or [DEFAULT_LR]
    args.steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if len(set(args.seeds)) != len(args.seeds):
        return f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}"
    if args.workers is None:
        args.workers = 1 if args.quick else min(2, os.cpu_count() or 1)
    if args.workers < 1:
        return f"--workers must be >= 1, got {args.workers}"
    args.ablation_tasks = list(dict.fromkeys(args.ablation_tasks))
    args.variants = list(dict.fromkeys(args.variants))
    return None


def _long_context_problem(args: argparse.Namespace) -> Optional[str]:
    """Fill in --long_context's defaults (layouts -> N, T = 64, a 60 s cap); what cannot be combined with it."""
    if args.num_visual_tokens is not None:
        return "--long_context takes its memory sizes from --layouts (e.g. 256 tiles:4x576 frames:16x256), not -N"
    if args.accuracy or args.decode_compare:
        return "--long_context is a sweep of its own: drop --accuracy / --decode_compare"
    specs = list(args.layouts or (QUICK_LAYOUTS if args.quick else DEFAULT_LAYOUTS))
    try:
        layouts = [parse_layout(spec) for spec in specs]
    except ValueError as error:
        return str(error)
    args.layouts = {images * tokens: (images, tokens, kind) for images, tokens, kind in layouts}
    if len(args.layouts) != len(layouts):
        return f"--layouts: two layouts with the same memory size N: {' '.join(specs)}"
    args.num_visual_tokens = sorted(args.layouts)
    if args.text_lengths is None:
        args.text_lengths = [16] if args.quick else [64]
    if args.time_cap_s is None:
        args.time_cap_s = 60.0
    return None


def _shape_problem(args: argparse.Namespace) -> Optional[str]:
    """Flag combinations that would silently measure another model than the one asked for."""
    if args.model_shape:
        given = [f"--{name}" for name in ("model_name_or_path", "hidden_size", "intermediate_size", "vocab_size")
                 if getattr(args, name) is not None]
        if given:
            return f"--model_shape {args.model_shape} fixes the model's shape; drop {' '.join(given)}"
    if args.image_size is not None:
        if args.model_shape not in VLM_IMAGE_PROCESSORS:
            return (f"--image_size sizes the images of a VLM shape ({', '.join(VLM_IMAGE_PROCESSORS)}); "
                    f"--model_shape is {args.model_shape}")
        if args.num_visual_tokens is not None:
            return "--image_size sets N from the VLM's image processor; drop -N (or --image_size)"
        if min(args.image_size) < 1:
            return f"--image_size needs a positive width and height, got {args.image_size[0]} {args.image_size[1]}"
    if args.num_layers is not None:
        if args.model_name_or_path:
            return "--layers/--num_layers sets the depth of a built model; a --model_name_or_path model keeps its own"
        if min(args.num_layers) < 1 or len(set(args.num_layers)) != len(args.num_layers):
            return f"--layers needs distinct depths >= 1, got {' '.join(map(str, args.num_layers))}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    return None


def device_problem(device: str, dtype: str) -> Optional[str]:
    """Why `--device device --dtype dtype` cannot run here (None when it can)."""
    if device not in DEVICES:
        return f"--device must be one of {', '.join(DEVICES)}, got {device!r}"
    if dtype not in DTYPES:
        return f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}"
    if device == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda
            why = (f"this torch ({torch.__version__}) is a CPU-only build" if built is None
                   else f"this torch was built with CUDA {built} but no GPU is visible (CUDA_VISIBLE_DEVICES, driver)")
            return f"--device cuda was asked for, but CUDA is not available: {why}. Use --device cpu."
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return f"--dtype bfloat16 is not supported on {torch.cuda.get_device_name()}; use --dtype float16."
    return None


def check_modes(args: argparse.Namespace) -> Optional[str]:
    """Modes that only exist on CPU (None when the combination is fine)."""
    if args.device == "cpu":
        return None
    if args.profile:
        return ("--profile attributes torch.profiler's self CPU time per op and runs on --device cpu only; on a GPU "
                "profile with torch.profiler (ProfilerActivity.CUDA) or Nsight Systems around `memvp-bench`")
    if args.accuracy:
        return "--accuracy trains tiny digit models and runs on --device cpu only"
    if args.ablations:
        return "--ablations trains tiny digit models and runs on --device cpu only"
    return None


class Mode(NamedTuple):
    """One of memvp-bench's modes: what it measures, how its report reads, its plot, and the files' stem."""

    stem: str
    measure: Callable[[argparse.Namespace], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    plot: Optional[Callable[[dict[str, Any], Path], None]]


def _timed_sweep(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    report = run_sweep(args)
    report["meta"]["wall_time_s"] = round(time.perf_counter() - start, 1)
    return report


def _long_context_sweep(args: argparse.Namespace) -> dict[str, Any]:
    report = _timed_sweep(args)
    ratios = long_context_ratios(report["results"], report["meta"]["model"], args)
    report["long_context"] = {"ratios": ratios, "targets": check_long_context_targets(ratios)}
    return report


def chosen_mode(args: argparse.Namespace) -> Mode:
    """The mode the options picked (parse_args has already refused any two together)."""
    if args.serving:
        from .serving import plot_serving, run_serving, serving_markdown  # vLLM: the serving environment only

        return Mode("serving", run_serving, serving_markdown, plot_serving)
    if args.ablations:
        return Mode("ablations", run_ablations, ablations_markdown, plot_ablations)
    if args.accuracy:
        return Mode("accuracy", run_accuracy, accuracy_markdown, plot_accuracy)
    if args.long_context:
        return Mode("long_context", _long_context_sweep, long_context_markdown, plot_long_context)
    if args.decode_compare:
        return Mode("decode_compare", run_decode_compare, decode_compare_markdown, None)
    return Mode("benchmark", _timed_sweep, markdown_report, plot_report)


def run(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the chosen mode, write its JSON / markdown / PNG (and profiler files), print the markdown; the report
    (with the written ``paths``) is returned for callers such as the tests."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # generation-config chatter would break the progress bar
    # peft's get_peft_model probes transformers' deprecated `is_gradient_checkpointing`: nothing for a user to act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    mode = chosen_mode(args)
    report = mode.measure(args)
    markdown = mode.markdown(report)
    paths = write_outputs(report, output_dir, mode.stem, markdown, mode.plot)
    print(markdown)
    if args.profile:
        paths.update(profile_point(args, output_dir))
    print("wrote " + ", ".join(paths.values()))
    report["paths"] = paths
    return report


def write_outputs(report: dict[str, Any], output_dir: Path, stem: str, markdown: str,
                  plot: Optional[Callable[[dict, Path], None]]) -> dict[str, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` where matplotlib is installed); the written paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / f"{stem}.json", "markdown": output_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown)
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        else:
            paths["png"] = output_dir / f"{stem}.png"
            plot(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def main(argv: Optional[list[str]] = None) -> None:
    """The console script `memvp-bench`: `run`, then exit 0 (setuptools' wrapper passes the return value to
    `sys.exit`, which would print a returned report and exit 1)."""
    run(argv)
