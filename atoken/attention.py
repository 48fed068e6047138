"""Variable-length attention that never crosses segment boundaries.

CUDA with fp16/bf16: one fused flash-attention varlen call (torch.nn.attention.varlen, split-KV off so a
sample's output does not depend on its batch neighbours). Elsewhere: exact per-segment SDPA, which is
the correct block-diagonal result and keeps each sample's output bit-identical whatever else is packed.
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
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
    return out
