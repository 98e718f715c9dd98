"""Benchmark MemVP against input-space visual prompting + LoRA (LLaVA style) and text-only + LoRA.

    python -m memvp_peft.bench                       # 3x3 sweep N in {64,256,576} x T in {32,64,256}, B=4
    python -m memvp_peft.bench --quick               # CI smoke: tiny model, one point, one repeat (< 30 s)
    python -m memvp_peft.bench --accuracy            # accuracy at equal budget on scikit-learn's real digits
    python -m memvp_peft.bench --ablations           # MemVP's knobs one at a time on the digit tasks, 3 seeds
    python -m memvp_peft.bench --profile             # + torch.profiler tables of MemVP vs text-only (one point)
    python -m memvp_peft.bench --decode_compare      # decode step: MemVP vs text only, its memory read's products
    python -m memvp_peft.bench --long_context        # cost vs memory size N up to 4,096 (tiles, frames)
    python -m memvp_peft.bench --device cuda --dtype bfloat16 --model_shape llama-7b --layers 1 2   # on a GPU
    bash memvp_peft/bench/gpu.sh                     # the prepared GPU run at the GPU targets (< 8 min, one H200)

(also installed as the console script ``memvp-bench``). Three methods on ONE frozen base model, built and measured
in one process, interleaved (each repeat runs A, B, C back to back per phase, the first method rotating: A, B, C,
B, C, A, ...); tables give the median over the repeats, ratios the median of the per-repeat ratios (calls of one
repeat share the machine's load, so the ratio cancels most drift). Wall clock and process CPU time are both kept.
The methods:

* ``memvp``: this package. ``num_memory_slots = N + extra_slots`` (the authors' 256 -> 320), projector hidden 128,
  the paper's dropout 0.1 / scales. The sequence stays T tokens long.
* ``input_lora``: LLaVA-style input-space prompting: the same kind of projector (Linear -> SiLU -> Linear to the
  model width) applied to the N visual features, prepended as N extra input embeddings via ``inputs_embeds``
  (attention mask ones, labels -100), plus peft LoRA r=8 on q_proj/v_proj. The sequence is N + T tokens long.
* ``text_lora``: the same LoRA on the T text tokens alone (no image): the floor every visual method pays.

Per (N, T) and method: training step (forward + backward, optimizer excluded, gradients reset with
``zero_grad(set_to_none=True)`` outside the timed region), prefill latency (one forward over the prompt with
``use_cache=True, logits_to_keep=1`` -- what ``generate`` does first), decode time per token with the KV cache
(greedy ``generate`` with ``min_new_tokens = max_new_tokens = 32``; per-step timestamps from a StoppingCriteria,
(t_32 - t_1) / 31), KV-cache bytes (``past_key_values`` after prefill), MemVP's per-call memory K/V bytes, trainable
parameters, and peak memory: the peak of torch's CPU allocator above the level before the call (bytes allocated
by tensors; from the allocation events of ``torch.profiler(profile_memory=True)``, measured in a separate untimed
run). Writes ``benchmark.json``, ``benchmark.md`` and ``benchmark.png`` into ``--output_dir``, and compares every
ratio with what matmul FLOPs predict (``flop_model``). See docs/benchmarks.md for measured results.

On CUDA (``--device cuda``) every timed call starts on a synchronised device and is clocked with CUDA events,
decode steps with an event per step, peaks with ``torch.cuda.max_memory_allocated``; ``--model_shape`` builds a
random base of LLaMA-7B's, LLaMA-13B's or Qwen2.5-7B's exact shape with ``--layers K`` decoder layers, and two or
more depths give per-layer times, from which a full-depth figure is an extrapolation that the report labels as such.

The modules follow one run: `cli` (the options, what cannot run here, which mode runs, the files it writes,
``main``), `methods` (the frozen base the methods share and the real models' shapes, the methods behind one
interface -- MemVP's pooled and ADEM-VL forms through their `MemVPConfig` options --, the batches and their image
layouts), `measure` (timers, peak memory, cache bytes on CPU and CUDA, and what the run ran on), `sweep` (the
interleaved repeats at every point, once per depth, and the markdown and plots of the N x T grid and of
``--long_context``'s N up to 4,096, capped rows included), `cost_model` (what FLOPs predict, the paired ratios, the
CPU, GPU and long-context targets, per-layer times and the full-depth extrapolation), `profiling` (``--profile``
and ``--decode_compare``), `accuracy` (``--accuracy``), `ablations` (``--ablations``) and `gpu_plan` (the
prepared GPU run behind ``gpu.sh``).
"""

from .ablations import VARIANTS, ablations_markdown, plot_ablations, run_ablations
from .accuracy import DIGIT_WORDS, PROMPT, accuracy_markdown, plot_accuracy, run_accuracy
from .cli import DESCRIPTION, main, parse_args, run, write_outputs
from .cost_model import (
    FLOP_PREDICTION, GPU_TARGETS, LONG_CONTEXT_TARGETS, RATIO_DEFS, TARGETS, check_long_context_targets, check_targets,
    compute_ratios, fit_depths, flop_model, forward_flops_per_token, long_context_ratios, memory_form_flops,
)
from .measure import cache_nbytes, peak_allocated_bytes, time_generate, time_prefill, time_train_step
from .methods import (
    ALL_METHODS, DEFAULT_MODEL, MEMVP_FORMS, METHOD_LABELS, METHODS, MODEL_SHAPES, QUICK_MODEL, Batch, LoRAMethod,
    MemVPMethod, Method, build_base_model, count_trainable, describe_model, make_batch, parse_layout, shape_config,
)
from .profiling import profile_point, run_decode_compare
from .sweep import long_context_markdown, markdown_report, plot_long_context, plot_report, run_sweep

__all__ = [
    "VARIANTS",
    "ablations_markdown",
    "plot_ablations",
    "run_ablations",
    "ALL_METHODS",
    "LONG_CONTEXT_TARGETS",
    "MEMVP_FORMS",
    "check_long_context_targets",
    "long_context_markdown",
    "long_context_ratios",
    "memory_form_flops",
    "parse_layout",
    "plot_long_context",
    "DEFAULT_MODEL",
    "DESCRIPTION",
    "DIGIT_WORDS",
    "FLOP_PREDICTION",
    "GPU_TARGETS",
    "METHODS",
    "METHOD_LABELS",
    "MODEL_SHAPES",
    "PROMPT",
    "QUICK_MODEL",
    "RATIO_DEFS",
    "TARGETS",
    "Batch",
    "LoRAMethod",
    "MemVPMethod",
    "Method",
    "accuracy_markdown",
    "build_base_model",
    "cache_nbytes",
    "check_targets",
    "compute_ratios",
    "count_trainable",
    "describe_model",
    "fit_depths",
    "flop_model",
    "forward_flops_per_token",
    "main",
    "run",
    "make_batch",
    "markdown_report",
    "parse_args",
    "peak_allocated_bytes",
    "plot_accuracy",
    "plot_report",
    "profile_point",
    "run_accuracy",
    "run_decode_compare",
    "run_sweep",
    "shape_config",
    "time_generate",
    "time_prefill",
    "time_train_step",
    "write_outputs",
]
