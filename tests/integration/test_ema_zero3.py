"""EMA under real DeepSpeed ZeRO-3 (2 gloo processes): each rank averages only its partition, and the
export path (EMA swapped in, parameters gathered) yields the EMA of the full parameters, for tensors ZeRO-3
partitions and gathers as well as for small ones it keeps persistent."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.services import free_port

pytestmark = pytest.mark.integration


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from trainers.ema import ShardedEMA
    from trainers.engine import skip_cpu_shm_op

    skip_cpu_shm_op()  # as the trainer does on CPU (no JIT build of an op training never uses)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    # 120,300 elements (above ZeRO-3's persistence threshold: gathered per use) and 1,204 (persistent)
    model = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.Linear(300, 4))
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
           "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                      dist_init_required=False)
    ema = ShardedEMA(engine.module, 0.5)

    def full() -> list[torch.Tensor]:
        res = []
        for p in engine.module.parameters():
            with deepspeed.zero.GatheredParameters([p]):
                res.append(p.data.detach().clone())
        return res

    expect = full()
    for step in range(4):
        torch.manual_seed(step)
        engine.backward(engine(torch.randn(8, 400)).pow(2).mean())
        engine.step()
        d = ema.update()  # the decay it used: the reference below averages the *full* parameters with it
        expect = [d * e + (1 - d) * c for e, c in zip(expect, full())]
    live = full()
    with ema.swapped_in():
        exported = full()
    after = full()
    if rank == 0:
        with open(out, "w") as f:
            json.dump([{"numel": e.numel(), "ema_err": (g - e).abs().max().item(),
                        "ema_vs_live": (e - l).abs().max().item(), "restored_err": (a - l).abs().max().item()}
                       for g, e, l, a in zip(exported, expect, live, after)], f)
    dist.barrier()  # neither rank tears down gloo while its peer is still in it (one rank aborted so)
    dist.destroy_process_group()


def test_sharded_ema_export_equals_full_parameter_ema_under_zero3(tmp_path):
    out = tmp_path / "ema.json"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    rows = json.loads(out.read_text())
    assert {r["numel"] for r in rows} == {120000, 300, 1200, 4}
    for r in rows:
        assert r["ema_vs_live"] > 1e-3, r  # the EMA is not just the live weights
        assert r["ema_err"] < 1e-6, r  # the exported values are the EMA of the full parameter
        assert r["restored_err"] == 0.0, r  # training weights are back after the export
