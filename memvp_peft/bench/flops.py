"""What matmul FLOPs predict for every method and phase: the yardstick that each measured ratio is set against.

For MemVP / text-only the prediction is the physical floor (text-only + the memory branch + the projector, with
MemVP's shorter backward): a measured ratio above it is overhead, one on it is not.
"""

from __future__ import annotations

import argparse
from typing import Any


def forward_flops_per_token(info: dict[str, Any], context: float) -> float:
    """Matmul FLOPs of one token's forward through a Llama-shaped model attending to `context` earlier tokens."""
    d, layers, inter = info["hidden_size"], info["num_layers"], info["intermediate_size"] or 4 * info["hidden_size"]
    heads, kv = info["num_attention_heads"] or 1, info["num_key_value_heads"] or info["num_attention_heads"] or 1
    kv_width = d * kv // heads
    per_layer = 2 * (2 * d * d + 2 * d * kv_width + 3 * d * inter) + 4 * context * d
    return layers * per_layer


def flop_model(info: dict[str, Any], visual_tokens: int, text_len: int, slots: int, args: argparse.Namespace,
               new_tokens: int) -> dict[str, dict[str, float]]:
    """Matmul FLOPs per sample of every method and phase (LoRA's own FLOPs, < 0.5%, are ignored).

    Forward of a token: `forward_flops_per_token` (+ the LM head: on every position in training, on the last one in
    prefill). Backward of the frozen base computes input gradients only (~1x the forward of each layer it passes).
    How far back it must go differs: LoRA on q/v of layer 0 (and input-space's projector under layer 0) need every
    layer's backward, while MemVP's first trainable tensors are the keys/values read *inside* layer 0's FFN, so
    layer 0's attention and FFN get no backward at all. MemVP's memory branch act(x K^T) V costs 4*n*d per token per
    layer forward and 8*n*d backward (dX, d(scores), dK, dV; 6*n*d in layer 0, which needs no dX). Its projector
    runs on N visual tokens, as input-space's does.
    """
    d, layers, vocab = info["hidden_size"], info["num_layers"], info["vocab_size"]
    heads = info["num_attention_heads"] or 1
    kv_width = d * (info["num_key_value_heads"] or heads) // heads
    head = 2 * d * vocab
    qkv = 2 * (d * d + 2 * d * kv_width)  # layer 0's q/k/v input gradients: never needed (embeddings are frozen)
    dv, hid = args.visual_dim, args.projector_hidden_dim
    proj_fwd = 2 * visual_tokens * (dv * hid + hid * d)
    proj_train = proj_fwd + 2 * visual_tokens * (dv * hid + 2 * hid * d)  # + dW1, dW2 and d(hidden)
    mem_fwd = 4 * slots * d * layers
    mem_bwd = 8 * slots * d * (layers - 1) + 6 * slots * d
    t_all, v_all = text_len, text_len + visual_tokens
    body = lambda tokens: tokens * forward_flops_per_token(info, tokens / 2)  # noqa: E731  (causal: mean context L/2)
    lora_train = lambda tokens: 2 * (body(tokens) + tokens * head) - tokens * qkv  # noqa: E731
    decode_ctx = lambda length: forward_flops_per_token(info, length + new_tokens / 2) + head  # noqa: E731
    return {
        "text_lora": {"train": lora_train(t_all), "prefill": body(t_all) + head, "decode": decode_ctx(t_all)},
        "memvp": {
            "train": body(t_all) * (1 + (layers - 1) / layers) + 2 * t_all * head + t_all * (mem_fwd + mem_bwd)
            + proj_train,
            "prefill": body(t_all) + head + t_all * mem_fwd + proj_fwd,
            "decode": decode_ctx(t_all) + mem_fwd,
        },
        "input_lora": {"train": lora_train(v_all) + proj_train, "prefill": body(v_all) + head + proj_fwd,
                       "decode": decode_ctx(v_all)},
    }
