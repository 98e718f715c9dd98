"""The one frozen base model that every method adapts (a built-in random Llama, a real model's shape, or a local LM).

Built once per depth and deep-copied into each method, so that the methods differ only in how they feed the image;
`describe_model` records its shape for the FLOP model and the reports.

`--model_shape llama-7b` (or `llama-13b`, `qwen2.5-7b`) builds a random base of that model's exact shape -- width,
heads, KV heads, FFN size, vocabulary -- with only `--layers K` of its decoder layers, so that a 7B-class layer can be
timed on one accelerator (or on the meta device in a test). Speed does not depend on the weights; the full depth is
recorded so that a full-depth figure is an explicit extrapolation from per-layer times (`depth_fit`).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
from torch import nn


DEFAULT_MODEL = dict(
    vocab_size=2000, hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
    num_key_value_heads=8,
)
QUICK_MODEL = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=2,
    num_key_value_heads=2,
)

#: real models' shapes (from their published config.json files); `num_hidden_layers` is the full depth
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    # LLaMA-1 7B, the paper's main model
    "llama-7b": dict(architecture="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                     intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                     max_position_embeddings=2048),
    "llama-13b": dict(architecture="llama", vocab_size=32000, hidden_size=5120, num_hidden_layers=40,
                      intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40, rms_norm_eps=1e-6,
                      max_position_embeddings=2048),
    # Qwen2.5-7B: grouped-query attention (4 KV heads), biases on q/k/v, untied embeddings
    "qwen2.5-7b": dict(architecture="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                       intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False),
}


def full_depth(shape: Optional[str]) -> Optional[int]:
    """The real model's number of decoder layers (None for the built-in and local models: no full depth to reach)."""
    return MODEL_SHAPES[shape]["num_hidden_layers"] if shape else None


def shape_config(shape: str, layers: int, min_positions: int = 0, attn_implementation: str = "sdpa") -> Any:
    """The transformers config of `shape` with `layers` decoder layers (everything else exactly the real model's).

    `min_positions` raises `max_position_embeddings` where the benchmark's longest sequence needs it (RoPE has no
    learned position table, so this changes no weight shape).
    """
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    if layers < 1:
        raise ValueError(f"a model shape needs at least 1 layer, got {layers}")
    fields = dict(MODEL_SHAPES[shape])
    architecture = fields.pop("architecture")
    fields.update(num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=max(fields["max_position_embeddings"], min_positions),
                  attn_implementation=attn_implementation)
    if architecture == "qwen2":
        from transformers import Qwen2Config

        config = Qwen2Config(**fields)
    else:
        from transformers import LlamaConfig

        config = LlamaConfig(**fields)
    return config


def instantiate(config: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """A random-initialised causal LM of `config`, created directly on `device` (no multi-GB CPU detour for a
    7B-class layer; ``"meta"`` allocates nothing) and cast to `dtype`."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype)


def longest_sequence(args: argparse.Namespace) -> int:
    """The longest sequence of the sweep: N visual + T text tokens + the generated ones (+ a margin)."""
    return max(args.num_visual_tokens) + max(args.text_lengths) + args.new_tokens + 8


def build_base_model(args: argparse.Namespace, layers: Optional[int] = None) -> nn.Module:
    """The frozen base on ``args.device`` in ``args.dtype``: a local HF causal LM (``--model_name_or_path``), a random
    base of a real model's shape (``--model_shape``), or a seeded random Llama of the chosen shape -- with `layers`
    decoder layers where given (the depth of this part of the sweep), long enough for the longest prompt."""
    from transformers import LlamaConfig

    device = getattr(args, "device", "cpu")
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    chosen = getattr(args, "attn_implementation", None)  # None: SDPA for built models, a local model's own default
    attn = chosen or "sdpa"
    torch.manual_seed(args.seed)
    if args.model_name_or_path:
        from transformers import AutoModelForCausalLM

        extra = {} if chosen is None else {"attn_implementation": chosen}
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, local_files_only=True, dtype=dtype, **extra
        ).to(device)
    elif getattr(args, "model_shape", None):
        config = shape_config(args.model_shape, layers or 1, longest_sequence(args), attn)
        model = instantiate(config, device, dtype)
    else:
        shape = dict(QUICK_MODEL if args.quick else DEFAULT_MODEL)
        for key, arg in (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                         ("vocab_size", "vocab_size")):
            if getattr(args, arg) is not None:
                shape[key] = getattr(args, arg)
        if layers is not None:
            shape["num_hidden_layers"] = layers
        if args.hidden_size is not None:
            shape["num_attention_heads"] = shape["num_key_value_heads"] = max(1, args.hidden_size // 64)
        config = LlamaConfig(**shape, max_position_embeddings=max(2048, longest_sequence(args)), pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, attn_implementation=attn)
        if str(device) == "cpu" and dtype == torch.float32:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(config)  # exactly the CPU benchmark's construction (same seeded weights)
        else:
            model = instantiate(config, device, dtype)
    model.requires_grad_(False)
    return model


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The base's shape under one set of names, whichever of the usual config spellings it uses."""
    config = model.config
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)  # noqa: E731
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "hidden_size": get("hidden_size", "d_model", "n_embd"),
        "num_layers": get("num_hidden_layers", "n_layer"),
        "intermediate_size": get("intermediate_size", "ffn_dim", "n_inner"),
        "num_attention_heads": get("num_attention_heads", "n_head"),
        "num_key_value_heads": get("num_key_value_heads"),
        "vocab_size": get("vocab_size"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attn_implementation": getattr(config, "_attn_implementation", None),
    }
