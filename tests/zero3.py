"""Shared by the ZeRO-3 tests that run real DeepSpeed in spawned gloo processes."""
from __future__ import annotations

import os

import torch


def join_gloo(rank: int, world: int, port: int) -> None:
    """This process as rank `rank` of a gloo world on loopback, one thread (as a CPU training worker)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def full_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter of a ZeRO-3 module, gathered whole, flattened into one copy."""
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().clone() for p in params])
