"""An independent re-implementation of the long-context memory forms, for tests only (from the papers, not from the
package's code): patch-grid average pooling, ADEM-VL's multiscale slots, its `silu(x) silu(K)^T` read and its drop.

Nothing here imports memvp_peft. Written from:

* ADEM-VL (Hao et al. 2024, arXiv 2410.17779, and the authors' released `Avg2dSampler` / `Adapter`): the CLIP grid
  and its average pools are concatenated *before* the projector; every LLaMA block adds
  `s * (drop(silu(x) silu(K)^T)) V` to its FFN output, x the FFN's normalised input, `K = lambda f(z) + p_k`,
  `V = lambda f(z) + p_v`; the drop sorts each token's scores ascending, takes the one at index
  `int(drop_ratio * n)` as the threshold and zeroes every score strictly below it;
* average pooling: non-overlapping k x k means of the row-major patch grid (here as explicit block means).

K and V themselves are MemVP's (reference_memvp.reference_memory). GLU FFNs only (Llama): the read is added by a
forward hook on the whole `mlp`.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from reference_memvp import reference_memory


def block_means(features: torch.Tensor, out_side: int) -> torch.Tensor:
    """(M, g*g, D) row-major grids -> (M, out_side^2, D): the mean of each (g/out_side)^2 block, row-major."""
    count, tokens, width = features.shape
    side = math.isqrt(tokens)
    assert side * side == tokens and side % out_side == 0, (tokens, out_side)
    k = side // out_side
    out = torch.empty(count, out_side * out_side, width)
    for m in range(count):
        grid = features[m].reshape(side, side, width)
        for i in range(out_side):
            for j in range(out_side):
                out[m, i * out_side + j] = grid[i * k:(i + 1) * k, j * k:(j + 1) * k].reshape(-1, width).mean(0)
    return out


def multiscale(features: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """ADEM-VL's sampler: the grid pooled to each count (the grid's own count = as it is), concatenated in order."""
    tokens = features.shape[1]
    parts = [features if c == tokens else block_means(features, math.isqrt(c)) for c in counts]
    return torch.cat(parts, dim=1)


def compress(features: torch.Tensor, config) -> torch.Tensor:
    """(B, N, D) or (B, I, N, D) -> (B, I*N', D): every image compressed on its own, then the images in order."""
    images = features if features.dim() == 4 else features[:, None]
    batch, count, tokens, width = images.shape
    flat = images.reshape(batch * count, tokens, width).float()
    if config.pool_kernel > 1:
        flat = block_means(flat, math.isqrt(tokens) // config.pool_kernel)
    elif config.pool_tokens is not None:
        flat = block_means(flat, math.isqrt(config.pool_tokens))
    elif config.multiscale_tokens:
        flat = multiscale(flat, config.multiscale_tokens)
    return flat.reshape(batch, count * flat.shape[1], width)


def adem_drop(scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """The authors' drop: ascending sort, threshold at index int(ratio * n), scores below it set to 0."""
    if drop_ratio <= 0:
        return scores
    ordered, _ = scores.sort(dim=-1)
    threshold = ordered[..., int(drop_ratio * scores.shape[-1])].unsqueeze(-1)
    return torch.where(scores < threshold, torch.zeros_like(scores), scores)


def form_read(x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, config, act: Callable) -> torch.Tensor:
    if config.memory_read == "adem":
        scores = torch.matmul(F.silu(x), F.silu(keys).transpose(-1, -2))
    else:
        scores = act(torch.matmul(x, keys.transpose(-1, -2)))
    return config.memory_scale * torch.matmul(adem_drop(scores, config.drop_ratio), values)


def reference_form_logits(
    base_model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    config,
    input_ids: torch.Tensor,
    image_features: Optional[torch.Tensor] = None,
    image_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits of a Llama-family `base_model` (deep-copied, never modified) with the config's memory form hooked in."""
    model = copy.deepcopy(base_model).eval()
    features = None if image_features is None else compress(image_features, config)
    keys, values = reference_memory(state, config, features, image_mask)
    for layer in model.model.layers:
        mlp = layer.mlp

        def hook(module, args, output, act=mlp.act_fn):
            return output + form_read(args[0], keys, values, config, act)

        mlp.register_forward_hook(hook)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def reference_gpt2_drop_logits(base_model, state, config, input_ids, image_features) -> torch.Tensor:
    """GPT-2 (plain FFN) with MemVP's read and the drop: x captured at c_fc, `s drop(gelu(x K^T)) V` added at c_proj."""
    model = copy.deepcopy(base_model).eval()
    keys, values = reference_memory(state, config, image_features)
    for block in model.transformer.h:
        captured = {}

        def capture(module, args, captured=captured):
            captured["x"] = args[0]

        def add(module, args, output, captured=captured, act=block.mlp.act):
            return output + form_read(captured.pop("x"), keys, values, config, act)

        block.mlp.c_fc.register_forward_pre_hook(capture)
        block.mlp.c_proj.register_forward_hook(add)
    with torch.no_grad():
        return model(input_ids=input_ids).logits
