"""CUDA paths: fused varlen attention, the model in bf16 and the GPU process group (skipped on CPU machines)."""
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


def test_gpu_process_group_reduces_cpu_and_cuda_tensors(tmp_path):
    """The lockstep batch agreement and the report windows' reductions are CPU tensors beside the
    model's CUDA collectives; a group made for NCCL alone rejects the CPU ones."""
    import torch.distributed as dist

    from trainers.engine import process_group_backend

    dist.init_process_group(process_group_backend(gpu=True), init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        cpu, cuda = torch.tensor([3.0]), torch.tensor([5.0], device="cuda")
        dist.all_reduce(cpu, op=dist.ReduceOp.MIN)
        dist.all_reduce(cuda)
        parts = [torch.empty(1, 4, dtype=torch.float64)]
        dist.all_gather(parts, torch.ones(1, 4, dtype=torch.float64))
        assert cpu.item() == 3.0 and cuda.item() == 5.0 and parts[0].sum().item() == 4.0
    finally:
        dist.destroy_process_group()
