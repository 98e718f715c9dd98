"""The one frozen base model that every method adapts (a built-in random Llama or a local HF causal LM).

Built once per run and deep-copied into each method, so that the methods differ only in how they feed the image;
`describe_model` records its shape for the FLOP model and the reports.
"""

from __future__ import annotations

import argparse
from typing import Any

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


def build_base_model(args: argparse.Namespace) -> nn.Module:
    """The frozen base: a local HF causal LM (``--model_name_or_path``) or a seeded random Llama of the chosen
    shape, long enough for the longest prompt + generation of the sweep."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            args.model_name_or_path, local_files_only=True, torch_dtype=torch.float32
        )
    else:
        shape = dict(QUICK_MODEL if args.quick else DEFAULT_MODEL)
        for key, arg in (("hidden_size", "hidden_size"), ("num_hidden_layers", "num_layers"),
                         ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size")):
            if getattr(args, arg) is not None:
                shape[key] = getattr(args, arg)
        if args.hidden_size is not None:
            shape["num_attention_heads"] = shape["num_key_value_heads"] = max(1, args.hidden_size // 64)
        longest = max(args.num_visual_tokens) + max(args.text_lengths) + args.new_tokens + 8
        torch.manual_seed(args.seed)
        model = LlamaForCausalLM(
            LlamaConfig(**shape, max_position_embeddings=max(2048, longest), pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
        )
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
    }
