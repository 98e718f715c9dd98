"""What matmul FLOPs predict for every method and phase: the yardstick that each measured ratio is set against.

For MemVP / text-only the prediction is the physical floor (text-only + the memory branch + the projector, with
MemVP's shorter backward): a measured ratio above it is overhead, one on it is not.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional


def forward_flops_per_token(info: dict[str, Any], context: float) -> float:
    """Matmul FLOPs of one token's forward through a Llama-shaped model attending to `context` earlier tokens."""
    d, layers, inter = info["hidden_size"], info["num_layers"], info["intermediate_size"] or 4 * info["hidden_size"]
    heads, kv = info["num_attention_heads"] or 1, info["num_key_value_heads"] or info["num_attention_heads"] or 1
    kv_width = d * kv // heads
    per_layer = 2 * (2 * d * d + 2 * d * kv_width + 3 * d * inter) + 4 * context * d
    return layers * per_layer


def _parts(info: dict[str, Any], args: argparse.Namespace, new_tokens: int) -> dict[str, Any]:
    """The pieces every method's FLOPs are made of (per sample): the body, the LM head, LoRA's training step..."""
    d, layers, vocab = info["hidden_size"], info["num_layers"], info["vocab_size"]
    heads = info["num_attention_heads"] or 1
    kv_width = d * (info["num_key_value_heads"] or heads) // heads
    head = 2 * d * vocab
    qkv = 2 * (d * d + 2 * d * kv_width)  # layer 0's q/k/v input gradients: never needed (embeddings are frozen)
    body = lambda tokens: tokens * forward_flops_per_token(info, tokens / 2)  # noqa: E731  (causal: mean context L/2)
    return {
        "d": d, "layers": layers, "head": head, "body": body,
        "lora_train": lambda tokens: 2 * (body(tokens) + tokens * head) - tokens * qkv,
        "decode_ctx": lambda length: forward_flops_per_token(info, length + new_tokens / 2) + head,
        "proj_fwd": lambda tokens: 2 * tokens * (args.visual_dim * args.projector_hidden_dim
                                                 + args.projector_hidden_dim * d),
        # + dW1, dW2 and d(hidden)
        "proj_train": lambda tokens: 2 * tokens * (2 * args.visual_dim * args.projector_hidden_dim
                                                   + 3 * args.projector_hidden_dim * d),
    }


def memory_form_flops(info: dict[str, Any], text_len: int, slots: int, projector_tokens: int,
                      args: argparse.Namespace, new_tokens: int) -> dict[str, float]:
    """Matmul FLOPs per sample of a MemVP memory form: `slots` memory slots read by every FFN, a projector run on
    `projector_tokens` visual tokens (N for MemVP; N/4 after `pool_kernel=2`, which pools *before* the projector;
    1.25 N for ADEM-VL's multiscale slots, which concatenates the grid and its pool before it).

    ADEM-VL's read, `silu(x) silu(K)^T` with the lowest scores dropped, has the same two matmuls as MemVP's
    `act(x K^T) V` (the SiLUs and the drop's selection are elementwise / selection work, not matmuls), so only the
    slot count and the projector's token count tell the forms apart here.
    """
    p = _parts(info, args, new_tokens)
    d, layers, body, head = p["d"], p["layers"], p["body"], p["head"]
    mem_fwd = 4 * slots * d * layers
    mem_bwd = 8 * slots * d * (layers - 1) + 6 * slots * d
    return {
        "train": body(text_len) * (1 + (layers - 1) / layers) + 2 * text_len * head
        + text_len * (mem_fwd + mem_bwd) + p["proj_train"](projector_tokens),
        "prefill": body(text_len) + head + text_len * mem_fwd + p["proj_fwd"](projector_tokens),
        "decode": p["decode_ctx"](text_len) + mem_fwd,
    }


def flop_model(info: dict[str, Any], visual_tokens: int, text_len: int, slots: int, args: argparse.Namespace,
               new_tokens: int, forms: Optional[dict[str, tuple[int, int]]] = None) -> dict[str, dict[str, float]]:
    """Matmul FLOPs per sample of every method and phase (LoRA's own FLOPs, < 0.5%, are ignored).

    Forward of a token: `forward_flops_per_token` (+ the LM head: on every position in training, on the last one in
    prefill). Backward of the frozen base computes input gradients only (~1x the forward of each layer it passes).
    How far back it must go differs: LoRA on q/v of layer 0 (and input-space's projector under layer 0) need every
    layer's backward, while MemVP's first trainable tensors are the keys/values read *inside* layer 0's FFN, so
    layer 0's attention and FFN get no backward at all. MemVP's memory branch act(x K^T) V costs 4*n*d per token per
    layer forward and 8*n*d backward (dX, d(scores), dK, dV; 6*n*d in layer 0, which needs no dX). Its projector
    runs on N visual tokens, as input-space's does.

    `forms` adds MemVP's other memory forms: method name -> (slots, projector tokens), see `memory_form_flops`.
    """
    p = _parts(info, args, new_tokens)
    t_all, v_all = text_len, text_len + visual_tokens
    body, head, lora_train, decode_ctx = p["body"], p["head"], p["lora_train"], p["decode_ctx"]
    model = {
        "text_lora": {"train": lora_train(t_all), "prefill": body(t_all) + head, "decode": decode_ctx(t_all)},
        "memvp": memory_form_flops(info, text_len, slots, visual_tokens, args, new_tokens),
        "input_lora": {"train": lora_train(v_all) + p["proj_train"](visual_tokens),
                       "prefill": body(v_all) + head + p["proj_fwd"](visual_tokens), "decode": decode_ctx(v_all)},
    }
    for name, (form_slots, projector_tokens) in (forms or {}).items():
        model[name] = memory_form_flops(info, text_len, form_slots, projector_tokens, args, new_tokens)
    return model
