"""CUDA paths: fused varlen attention and the model in bf16 (skipped on CPU machines)."""
from __future__ import annotations

import pytest
import torch

from atoken.attention import varlen_attention

pytestmark = [pytest.mark.gpu]


def test_fused_varlen_attention_matches_per_segment_reference():
    torch.manual_seed(0)
    cu = [0, 7, 40, 41, 300]
    q, k, v = (torch.randn(300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fused = varlen_attention(q, k, v, cu)
    ref = varlen_attention(q.float(), k.float(), v.float(), cu)  # fp32: per-segment SDPA path
    assert (fused.float() - ref).abs().max() < 2e-2


def test_model_bf16_forward_backward_on_cuda():
    from atoken.config import preset
    from atoken.model import AToken

    m = AToken(preset("tiny")).cuda().to(torch.bfloat16)
    b = m.pack([("image", torch.rand(64, 48, 3) * 2 - 1), ("video", torch.rand(8, 32, 32, 3) * 2 - 1)])
    out = m(b.to("cuda", torch.bfloat16))
    out["rec"].float().abs().mean().backward()
    assert all(p.grad is not None for p in m.encoder.parameters() if p.requires_grad)
