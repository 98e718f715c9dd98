"""How a layer reads the memory: MemVP's `act(x K^T)` or ADEM-VL's `silu(x) silu(K)^T`, and ADEM-VL's score drop.

MemVP (MEMVP_SPEC step 6) reads `s * Dropout(act(x K^T)) V`, `act` being the FFN's own activation. ADEM-VL (Hao et
al. 2024, arXiv 2410.17779, "adaptive and embedded fusion") puts the same projected image into the same place -- a
memory read in parallel to every FFN -- but reads it as a linear-attention-like product of two SiLU feature maps,
`silu(x) silu(K)^T`, and then *drops* the lowest `drop_ratio` of each token's scores (sets them to zero) before the
product with `V`: each text token keeps only the visual slots it responds to most. The authors' code uses
`drop_ratio = 0.1` and applies no dropout to the scores.

Both forms share the keys and values of `VisualMemory` (`K = lambda * f(z) + p_k`, `V = lambda * f(z) + p_v`), so a
`MemVPConfig(memory_read=..., drop_ratio=...)` changes only what this module computes. Nothing here reads a value on
the host: the drop's threshold is a `kthvalue` on the device (no host-device synchronisation on the hot path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: `MemVPConfig.memory_read` values: the paper's read, and ADEM-VL's
MEMORY_READS = ("memvp", "adem")


def dropped_count(num_slots: int, drop_ratio: float) -> int:
    """How many of a token's `num_slots` scores the drop zeroes: `floor(drop_ratio * num_slots)`, as ADEM-VL takes
    the score at that index of the ascending sort as the threshold (everything strictly below it is dropped)."""
    return int(drop_ratio * num_slots)


def drop_lowest_scores(scores: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """`scores` (..., n) with each row's `floor(drop_ratio * n)` lowest values set to zero (ADEM-VL's drop).

    Why `kthvalue` and a comparison, not a sort: the threshold is the k-th smallest score of the row (k = the number
    dropped, 0-based), one selection instead of a full sort, and scores equal to the threshold are kept, exactly like
    the authors' `x < threshold` mask. The mask is not differentiated: gradients reach the kept scores only.
    """
    dropped = dropped_count(scores.shape[-1], drop_ratio)
    if dropped == 0:
        return scores
    threshold = scores.kthvalue(dropped + 1, dim=-1, keepdim=True).values
    return scores * (scores >= threshold).to(scores.dtype)


def adem_keys(keys: torch.Tensor) -> torch.Tensor:
    """ADEM-VL's key feature map `silu(K)`; computed once per call and cached with the keys (`MemoryState`)."""
    return F.silu(keys)


def adem_scores(x: torch.Tensor, activated_keys: torch.Tensor) -> torch.Tensor:
    """`silu(x) silu(K)^T` for x (B, T, d) and `silu(K)` (B, n, d) or the shared (n, d)."""
    x = F.silu(x)
    if x.dim() == 3 and activated_keys.dim() == 3:
        return torch.bmm(x, activated_keys.transpose(1, 2))
    return torch.matmul(x, activated_keys.transpose(-1, -2))
