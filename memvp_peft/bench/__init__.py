"""Benchmark MemVP against input-space visual prompting + LoRA (LLaVA style) and text-only + LoRA.

    python -m memvp_peft.bench                       # 3x3 sweep N in {64,256,576} x T in {32,64,256}, B=4
    python -m memvp_peft.bench --quick               # CI smoke: tiny model, one point, one repeat (< 30 s)
    python -m memvp_peft.bench --accuracy            # accuracy at equal budget on scikit-learn's real digits
    python -m memvp_peft.bench --profile             # + torch.profiler tables of MemVP vs text-only (one point)

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

The modules follow one run: `methods` (the three methods behind one interface, their batches), `base_model` (the
frozen base they share), `measure` (timers, peak memory, cache bytes), `sweep` (the interleaved repeats), `flops`
and `ratios` (what FLOPs predict, the paired ratios, the targets), `report` (markdown, plot, files), `profiling`
(``--profile``), `accuracy` (``--accuracy``), `machine` (what the run ran on) and `cli` (the options, ``main``).
"""

from .accuracy import DIGIT_WORDS, PROMPT, accuracy_markdown, plot_accuracy, run_accuracy
from .base_model import DEFAULT_MODEL, QUICK_MODEL, build_base_model, describe_model
from .cli import DESCRIPTION, main, parse_args, run
from .flops import flop_model, forward_flops_per_token
from .measure import cache_nbytes, peak_allocated_bytes, time_generate, time_prefill, time_train_step
from .methods import METHOD_LABELS, METHODS, Batch, LoRAMethod, MemVPMethod, Method, count_trainable, make_batch
from .profiling import profile_point
from .ratios import FLOP_PREDICTION, RATIO_DEFS, TARGETS, check_targets, compute_ratios
from .report import markdown_report, plot_report, write_outputs
from .sweep import run_sweep

__all__ = [
    "DEFAULT_MODEL",
    "DESCRIPTION",
    "DIGIT_WORDS",
    "FLOP_PREDICTION",
    "METHODS",
    "METHOD_LABELS",
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
    "run_sweep",
    "time_generate",
    "time_prefill",
    "time_train_step",
    "write_outputs",
]
