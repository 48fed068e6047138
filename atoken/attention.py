"""Variable-length attention that never crosses segment boundaries.

CUDA with fp16/bf16: one fused flash-attention varlen call (torch.nn.attention.varlen, split-KV off so a
sample's output does not depend on its batch neighbours). Elsewhere: exact block-diagonal attention with
one SDPA call per segment length (segments of equal length batched, no padding, no mask): a batch of 64
four-token digits costs one call instead of 64. A sample's output never depends on another sample's
values; it is bit-identical as long as the batch's shapes are (other segment counts change the kernels'
blocking, so other shapes agree to rounding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _fused_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int]) -> torch.Tensor:
    """q, k, v: [L, H, D]; cu: cumulative segment lengths. Returns [L, H, D]."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if _fused_ok(q):
        from torch.nn.attention.varlen import varlen_attn

        cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
        max_len = max(b - a for a, b in zip(cu[:-1], cu[1:]))
        return varlen_attn(q, k, v, cu_t, cu_t, max_len, max_len, scale=scale, num_splits=1)
    out = torch.empty_like(q)
    by_len: dict[int, list[int]] = {}
    for a, b in zip(cu[:-1], cu[1:]):
        by_len.setdefault(b - a, []).append(a)
    L, H, D = q.shape
    for n, starts in by_len.items():
        if len(starts) == 1:
            a = starts[0]
            qs, ks, vs = (x[a:a + n].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
            out[a:a + n] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
            continue
        idx = (torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)[None]).reshape(-1)
        qs, ks, vs = (x[idx].view(len(starts), n, H, D).transpose(1, 2) for x in (q, k, v))
        out[idx] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(-1, H, D)
    return out
