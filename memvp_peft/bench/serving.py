"""`memvp-bench --serving`: MemVP served by vLLM against LLaVA-style input-space prompting and the text alone, on
the same engine, the same base and the same requests.

Three ways to serve one random base (the benchmark's built-in Llama shape), each an engine of its own, all started
before the first timed request so that the repeats interleave across them as the other sweeps do:

* **MemVP** -- the plugin's model class (`memvp_peft.serving`, picked by ``hf_overrides``) reads each request's N
  visual features in every FFN; the prompt is the T text tokens.
* **input-space** -- what LLaVA-style prompting feeds the language model: the adapter's own projector applied to the
  same N features, prepended to the T text embeddings and sent as ``prompt_embeds`` to the untouched base. vLLM's
  own Llava cannot load on its CPU build (its Pixtral import needs torchvision), and the vision tower costs both
  methods the same, so the tower is left out of both and the projector runs in the client, untimed.
* **text-only** -- the T tokens on the untouched base: the floor every visual method pays.

Clients are closed-loop: `concurrency` coroutines each send their next request when the last one finished, through
vLLM's `AsyncLLM` (the engine behind its OpenAI server), streaming, so that the time to the first token is what a
client sees, queueing included. Every request carries an image of its own and prefix caching is off: nothing a
request computes is reused by another. The KV cache per request is computed from the shapes (a paged cache holds
exactly prompt + output tokens per layer; MemVP adds its memory-bank slot, K and V of `slots x d`).

How much of a decode step is the engine's fixed work and not the model's: a second text-only engine at half the
depth, at concurrency 1, and the line `step = fixed + layers x per_layer` through the two (`cost_model.fit_line`).

Runs in the serving environment (vLLM installed: docs/serving.md); nothing here is imported unless ``--serving`` is
asked for.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import gc
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .cost_model import fit_line, paired_ratio

#: concurrency levels, N, T and generated tokens of the serving sweep unless the options say otherwise
DEFAULT_CONCURRENCY = (1, 8, 32)
#: the quick smoke run's base: the smallest Llama vLLM's CPU attention takes (head_dim 64)
QUICK_SERVING_MODEL = dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, intermediate_size=344,
                           num_attention_heads=2, num_key_value_heads=2)
#: MemVP request throughput >= 3x input-space, time to first token >= 5x lower, throughput within 1.25x of
#: text-only -- at N = 576 and concurrency 8: (name, ratio key, bound, direction)
SERVING_TARGETS = (
    ("request throughput vs input-space", "throughput_memvp_over_input", 3.0, ">="),
    ("time to first token, input-space / MemVP", "ttft_input_over_memvp", 5.0, ">="),
    ("request throughput, text-only / MemVP", "throughput_text_over_memvp", 1.25, "<="),
)
TARGET_POINT = (576, 8)


class ServedMethod(abc.ABC):
    """One way to serve the base: the engine it needs and the prompt of each request."""

    name: str
    label: str

    def __init__(self, setup: "ServingSetup") -> None:
        self.setup = setup

    def engine_options(self) -> dict[str, Any]:
        """What this method adds to the common engine options."""
        return {}

    @abc.abstractmethod
    def prompt(self, index: int) -> dict[str, Any]:
        """Request `index`'s prompt, as vLLM's `generate` takes it."""

    @abc.abstractmethod
    def sequence_tokens(self) -> int:
        """Tokens of one request in the KV cache at its end (prompt + generated)."""

    def extra_state_bytes(self) -> int:
        """Per-request state beyond the KV cache (MemVP: its memory-bank slot)."""
        return 0


class MemVPServed(ServedMethod):
    name, label = "memvp", "MemVP"

    def engine_options(self) -> dict[str, Any]:
        return {"hf_overrides": {"architectures": [f"MemVP{self.setup.architecture}"],
                                 "memvp_adapter": str(self.setup.adapter_dir)},
                "enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 1}}

    def prompt(self, index: int) -> dict[str, Any]:
        return {"prompt_token_ids": self.setup.text_ids(index),
                "multi_modal_data": {"image": [self.setup.features(index)]}}

    def sequence_tokens(self) -> int:
        return self.setup.text_tokens + self.setup.new_tokens

    def extra_state_bytes(self) -> int:
        return 2 * self.setup.slots * self.setup.hidden_size * self.setup.dtype_bytes


class InputSpaceServed(ServedMethod):
    name, label = "input_space", "input-space (LLaVA-style)"

    def engine_options(self) -> dict[str, Any]:
        return {"enable_prompt_embeds": True}

    def prompt(self, index: int) -> dict[str, Any]:
        return {"prompt_embeds": self.setup.input_space_embeddings(index)}

    def sequence_tokens(self) -> int:
        return self.setup.visual_tokens + self.setup.text_tokens + self.setup.new_tokens


class TextOnlyServed(ServedMethod):
    name, label = "text_only", "text only"

    def prompt(self, index: int) -> dict[str, Any]:
        return {"prompt_token_ids": self.setup.text_ids(index)}

    def sequence_tokens(self) -> int:
        return self.setup.text_tokens + self.setup.new_tokens


SERVED_METHODS = (MemVPServed, InputSpaceServed, TextOnlyServed)


class ServingSetup:
    """The base, its half-depth twin and the adapter on disk, and every request's inputs, seeded: the three methods
    answer the same requests (the same text, the same image's features)."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        from peft import get_peft_model

        from ..demo_models import build_word_tokenizer
        from ..tuner.config import MemVPConfig
        from ..tuner.memory import VisualMemory
        from .methods import built_in_shape

        self.visual_tokens = args.num_visual_tokens[0]
        self.text_tokens = args.text_lengths[0]
        self.new_tokens = args.new_tokens
        self.visual_dim = args.visual_dim
        self.seed = args.seed
        self.slots = self.visual_tokens + args.extra_slots
        shape = built_in_shape(args, max(args.num_layers) if args.num_layers else None, QUICK_SERVING_MODEL)
        self.shape = shape
        self.hidden_size = shape["hidden_size"]
        self.layers = shape["num_hidden_layers"]
        self.half_layers = max(1, self.layers // 2)
        self.dtype_bytes = 4
        self.architecture = "LlamaForCausalLM"
        self.max_model_len = self.visual_tokens + self.text_tokens + self.new_tokens + 32
        self.base_dir, self.half_dir, self.adapter_dir = root / "base", root / "base_half", root / "adapter"
        # vLLM's multimodal front end needs a tokenizer (ids go in, ids come out, nothing is detokenized): one word
        # per id of the base's vocabulary, so that every id a request holds is a word of it
        self.tokenizer = build_word_tokenizer([" ".join(f"w{i}" for i in range(shape["vocab_size"] - 4))])
        base = self._save_base(self.base_dir, self.layers)
        self._save_base(self.half_dir, self.half_layers)
        config = MemVPConfig(visual_dim=self.visual_dim, num_memory_slots=self.slots,
                             projector_hidden_dim=args.projector_hidden_dim, memory_dropout=0.0)
        model = get_peft_model(base, config)
        generator = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():  # trained-like weights: p_v starts at zero, which would read nothing
            for name, param in model.named_parameters():
                if "memvp" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(self.adapter_dir)
        memory = next(module for module in model.modules() if isinstance(module, VisualMemory))
        self.projector = memory.projector.eval()
        self.embeddings = base.get_input_embeddings().weight.detach()

    def _save_base(self, folder: Path, layers: int) -> torch.nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(self.seed)
        config = LlamaConfig(**{**self.shape, "num_hidden_layers": layers}, max_position_embeddings=4096,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return model

    def text_ids(self, index: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.randint(4, self.shape["vocab_size"], (self.text_tokens,), generator=generator).tolist()

    def features(self, index: int) -> torch.Tensor:
        """Request `index`'s image: N visual features of the encoder's width (a CLIP-L-like 1024 by default)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + 50_000 + index)
        return torch.randn(self.visual_tokens, self.visual_dim, generator=generator)

    @torch.no_grad()
    def input_space_embeddings(self, index: int) -> torch.Tensor:
        """LLaVA-style input: the projected visual tokens, then the text's embeddings, (N + T, d)."""
        visual = self.projector(self.features(index))
        return torch.cat([visual, self.embeddings[torch.tensor(self.text_ids(index))]]).float()

    def kv_bytes(self, tokens: int) -> int:
        """The KV cache of `tokens` tokens of one request: K and V, every layer, every KV head."""
        head_dim = self.hidden_size // self.shape["num_attention_heads"]
        return 2 * self.layers * self.shape["num_key_value_heads"] * head_dim * self.dtype_bytes * tokens


def engine_options(setup: ServingSetup, args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    """What every engine of the sweep shares: eager float32, no prefix caching, ids in and ids out."""
    return dict(model=str(model_dir), enforce_eager=True, dtype="float32",
                max_model_len=setup.max_model_len, max_num_seqs=max(args.concurrency), block_size=32,
                enable_prefix_caching=False, seed=setup.seed,
                max_num_batched_tokens=max(2048, setup.max_model_len))


def start_engine(options: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(**options))


async def serve_requests(engine: Any, method: ServedMethod, concurrency: int, count: int, first_index: int,
                         new_tokens: int) -> dict[str, Any]:
    """`count` requests through `concurrency` closed-loop clients; per request its time to the first token, its
    latency and its output tokens; the whole wall time."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    queue = list(range(first_index, first_index + count))
    records: list[tuple[float, float, int]] = []

    async def client() -> None:
        while queue:
            index = queue.pop(0)
            start = time.perf_counter()
            first, tokens = None, 0
            async for output in engine.generate(method.prompt(index), params, request_id=f"{method.name}-{index}"):
                if first is None:
                    first = time.perf_counter() - start
                tokens += len(output.outputs[0].token_ids)
            records.append((first, time.perf_counter() - start, tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in records)
    if tokens != count * new_tokens:
        raise RuntimeError(f"{method.label}: {tokens} tokens came back for {count} requests of {new_tokens}")
    decode = [(latency - first) / (new_tokens - 1) for first, latency, _ in records] if new_tokens > 1 else [0.0]
    return {"wall_s": wall, "requests_per_s": count / wall, "output_tokens_per_s": tokens / wall,
            "ttft_ms": statistics.median(r[0] for r in records) * 1e3,
            "latency_ms": statistics.median(r[1] for r in records) * 1e3,
            "decode_ms_per_token": statistics.median(decode) * 1e3}


def requests_at(concurrency: int, args: argparse.Namespace) -> int:
    """Requests per timed point: every client sends at least two (a steady state, not one start-up wave)."""
    return max(2 * concurrency, args.serving_min_requests)


async def _sweep(args: argparse.Namespace, setup: ServingSetup, progress: Any) -> dict[str, Any]:
    methods = [cls(setup) for cls in SERVED_METHODS]
    engines: dict[str, Any] = {}
    started: dict[str, float] = {}
    try:
        for method in methods:
            start = time.perf_counter()
            engines[method.name] = start_engine({**engine_options(setup, args, setup.base_dir),
                                                 **method.engine_options()})
            started[method.name] = time.perf_counter() - start
            progress.update(1)
        half = TextOnlyServed(setup)
        if not args.quick:  # the smoke run skips the overhead fit (one engine start fewer)
            engines["text_only_half"] = start_engine(engine_options(setup, args, setup.half_dir))
            progress.update(1)
        index = 0
        for method in methods:  # untimed: the first requests of an engine pay for lazy set-up
            await serve_requests(engines[method.name], method, 2, 2, index, setup.new_tokens)
            index += 2
        if "text_only_half" in engines:
            await serve_requests(engines["text_only_half"], half, 1, 1, index, setup.new_tokens)
        index += 1
        samples: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                count = requests_at(concurrency, args)
                order = methods[repeat % len(methods):] + methods[:repeat % len(methods)]
                for method in order:  # the same requests for every method of a repeat
                    result = await serve_requests(engines[method.name], method, concurrency, count, index,
                                                  setup.new_tokens)
                    samples.setdefault((method.name, concurrency), []).append(result)
                    progress.update(1)
                if concurrency == 1 and "text_only_half" in engines:
                    samples.setdefault(("text_only_half", 1), []).append(await serve_requests(
                        engines["text_only_half"], half, 1, count, index, setup.new_tokens))
                index += count
    finally:
        for engine in engines.values():
            engine.shutdown()
        engines.clear()
    return {"samples": samples, "engine_start_s": started, "methods": methods}


def _median(samples: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(s[key] for s in samples))


def summarize(sweep: dict[str, Any], setup: ServingSetup, args: argparse.Namespace) -> dict[str, Any]:
    """Medians per (method, concurrency), the paired ratios, the fixed share of a decode step, the targets."""
    samples = sweep["samples"]
    rows = []
    for method in sweep["methods"]:
        for concurrency in args.concurrency:
            runs = samples[(method.name, concurrency)]
            rows.append({
                "method": method.name, "label": method.label, "concurrency": concurrency,
                "requests": requests_at(concurrency, args),
                "prompt_tokens": method.sequence_tokens() - setup.new_tokens,
                "requests_per_s": _median(runs, "requests_per_s"),
                "output_tokens_per_s": _median(runs, "output_tokens_per_s"),
                "ttft_ms": _median(runs, "ttft_ms"), "latency_ms": _median(runs, "latency_ms"),
                "decode_ms_per_token": _median(runs, "decode_ms_per_token"),
                "kv_cache_bytes_per_request": setup.kv_bytes(method.sequence_tokens()),
                "memory_bank_bytes_per_request": method.extra_state_bytes(),
            })
    def paired(numerator: list[dict[str, Any]], denominator: list[dict[str, Any]], key: str) -> float:
        return paired_ratio([run[key] for run in numerator], [run[key] for run in denominator])

    ratios = []
    for concurrency in args.concurrency:
        memvp, text = samples[("memvp", concurrency)], samples[("text_only", concurrency)]
        inp = samples[("input_space", concurrency)]
        ratios.append({
            "N": setup.visual_tokens, "concurrency": concurrency,
            "throughput_memvp_over_input": paired(memvp, inp, "requests_per_s"),
            "ttft_input_over_memvp": paired(inp, memvp, "ttft_ms"),
            "throughput_text_over_memvp": paired(text, memvp, "requests_per_s"),
            "output_tokens_memvp_over_input": paired(memvp, inp, "output_tokens_per_s"),
        })
    overhead = None
    if ("text_only_half", 1) in samples and ("text_only", 1) in samples and setup.half_layers < setup.layers:
        full = _median(samples[("text_only", 1)], "decode_ms_per_token")
        half = _median(samples[("text_only_half", 1)], "decode_ms_per_token")
        per_layer, fixed = fit_line([setup.half_layers, setup.layers], [half, full])
        overhead = {"decode_ms_per_token": {str(setup.half_layers): half, str(setup.layers): full},
                    "per_layer_ms": per_layer, "fixed_ms": fixed, "fixed_share": fixed / full if full > 0 else None}
    return {"results": rows, "ratios": ratios, "overhead": overhead, "targets": check_serving_targets(ratios),
            "engine_start_s": sweep["engine_start_s"]}


def check_serving_targets(ratios: list[dict[str, Any]]) -> dict[str, Any]:
    """The targets at N = 576, concurrency 8 (judged only where that point was measured)."""
    point = next((r for r in ratios if (r["N"], r["concurrency"]) == TARGET_POINT), None)
    if point is None:
        return {"point": list(TARGET_POINT), "measured": False, "checks": []}
    checks = []
    for name, key, bound, direction in SERVING_TARGETS:
        value = point[key]
        met = value >= bound if direction == ">=" else value <= bound
        checks.append({"target": name, "key": key, "value": value, "bound": bound, "direction": direction,
                       "met": bool(met)})
    return {"point": list(TARGET_POINT), "measured": True, "checks": checks}


def run_serving(args: argparse.Namespace) -> dict[str, Any]:
    """Build the checkpoints, start the engines, run the sweep; the report (meta, rows, ratios, overhead, targets)."""
    try:
        import vllm
    except ImportError as error:
        raise SystemExit("memvp-bench --serving needs vLLM and memvp-peft's serving plugin in this environment: "
                         f"pip install 'memvp-peft[vllm]' (docs/serving.md) ({error})") from None
    from tqdm.auto import tqdm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memvp-bench-serving-") as root:
        setup = ServingSetup(args, Path(root))
        points = args.repeats * len(args.concurrency) * len(SERVED_METHODS)
        engines = len(SERVED_METHODS) + (0 if args.quick else 1)
        with tqdm(total=engines + points, desc="serving", disable=args.no_progress) as progress:
            sweep = asyncio.run(_sweep(args, setup, progress))
        gc.collect()  # the engines' last references die with the event loop: release them here, not at exit
        report = summarize(sweep, setup, args)
    report["meta"] = {
        "command": "python -m memvp_peft.bench " + " ".join(args.argv),
        "vllm": vllm.__version__, "vllm_platform": _platform(), "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "model": {**setup.shape, "architecture": setup.architecture, "dtype": "float32"},
        "N": setup.visual_tokens, "T": setup.text_tokens, "new_tokens": setup.new_tokens,
        "visual_dim": setup.visual_dim, "memory_slots": setup.slots, "repeats": args.repeats,
        "concurrency": list(args.concurrency), "half_depth": setup.half_layers,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    return report


def _platform() -> str:
    """Where vLLM served (its build decides: CPU for vllm-cpu, the GPU for a CUDA build)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)


def serving_markdown(report: dict[str, Any]) -> str:
    meta, model = report["meta"], report["meta"]["model"]
    lines = [
        "# memvp-bench --serving results",
        "",
        f"vLLM {meta['vllm']} on {meta.get('vllm_platform', 'cpu')}, torch {meta['torch']}, {meta['cpu_count']} "
        f"CPUs. Base: random Llama, width "
        f"{model['hidden_size']}, {model['num_hidden_layers']} layers, FFN {model['intermediate_size']}, "
        f"{model['num_attention_heads']} heads, vocab {model['vocab_size']}, {model['dtype']}, eager. Requests: "
        f"N = {meta['N']} visual tokens (visual_dim {meta['visual_dim']}), T = {meta['T']} text tokens, "
        f"{meta['new_tokens']} output tokens (greedy, EOS ignored), each with an image of its own, prefix caching off; "
        f"closed-loop clients; medians of {meta['repeats']} interleaved repeats. MemVP memory: {meta['memory_slots']} "
        f"slots.",
        "",
        "| concurrency | method | prompt tokens | requests/s | output tokens/s | TTFT ms | latency ms | "
        "decode ms/token | KV cache KiB/request | + MemVP bank KiB/request |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(report["results"], key=lambda r: (r["concurrency"], r["method"])):
        bank = r["memory_bank_bytes_per_request"]
        lines.append(
            f"| {r['concurrency']} | {r['label']} | {r['prompt_tokens']} | {r['requests_per_s']:.2f} | "
            f"{r['output_tokens_per_s']:.1f} | {r['ttft_ms']:.1f} | {r['latency_ms']:.1f} | "
            f"{r['decode_ms_per_token']:.2f} | {r['kv_cache_bytes_per_request'] / 1024:.0f} | "
            f"{f'{bank / 1024:.0f}' if bank else '-'} |")
    lines += ["", "Ratios (median over the repeats of the per-repeat ratio):", "",
              "| concurrency | requests/s MemVP / input-space | TTFT input-space / MemVP "
              "| requests/s text-only / MemVP "
              "| output tokens/s MemVP / input-space |", "|---|---|---|---|---|"]
    for r in report["ratios"]:
        lines.append(f"| {r['concurrency']} | {r['throughput_memvp_over_input']:.2f} | "
                     f"{r['ttft_input_over_memvp']:.2f} | {r['throughput_text_over_memvp']:.2f} | "
                     f"{r['output_tokens_memvp_over_input']:.2f} |")
    overhead = report["overhead"]
    if overhead is None:
        lines += ["", "Engine overhead: not measured (--quick, or concurrency 1 not in the sweep)."]
    else:
        share = overhead["fixed_share"]
        steps = ", ".join(f"{ms:.2f} ms at {layers} layers" for layers, ms in overhead["decode_ms_per_token"].items())
        lines += ["", f"Engine overhead: a text-only decode step at concurrency 1 takes {steps}; the line through "
                  f"them puts {overhead['fixed_ms']:.2f} ms of a step outside the layers"
                  + (f" ({100 * share:.0f}% of the full model's step)." if share is not None else ".")]
    targets = report["targets"]
    if targets["measured"]:
        lines += ["", f"Targets at N = {targets['point'][0]}, concurrency {targets['point'][1]}:", ""]
        for check in targets["checks"]:
            lines.append(f"- {check['target']}: {check['value']:.2f} (target {check['direction']} {check['bound']}) "
                         f"-- {'met' if check['met'] else 'NOT met'}")
    lines += ["", f"Command: `{meta['command']}` ({meta['wall_time_s']:.0f} s, engine start-up included).", ""]
    return "\n".join(lines)


def plot_serving(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("requests_per_s", "requests / s"), ("ttft_ms", "time to first token (ms)"),
              ("output_tokens_per_s", "output tokens / s"))
    labels = {r["method"]: r["label"] for r in report["results"]}
    for axis, (key, title) in zip(axes, panels):
        for method, label in labels.items():
            rows = sorted((r for r in report["results"] if r["method"] == method), key=lambda r: r["concurrency"])
            axis.plot([r["concurrency"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        if key == "ttft_ms":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0].legend()
    meta = report["meta"]
    figure.suptitle(f"vLLM {meta['vllm']}: N = {meta['N']} visual tokens, T = {meta['T']}, "
                    f"{meta['new_tokens']} output tokens (width {meta['model']['hidden_size']}, "
                    f"{meta['model']['num_hidden_layers']} layers)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
