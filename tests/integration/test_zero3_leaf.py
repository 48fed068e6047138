"""ZeRO-3 leaf modules under real DeepSpeed (2 gloo processes): naming blocks in `scaling.zero_leaf_modules`
changes how parameters are fetched, not what the stage learns. DeepSpeed reduces a leaf's gradients from
a backward hook on the leaf module; on a module whose hook never fires (the stage's module itself, which
`stage3_module_granularity_threshold` picks at large values) the gradients are silently dropped and the
loss stays flat, so the config tree rejects that key (tests/unit/test_workflow_logic.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.services import free_port
from tests.zero3 import full_parameters, join_gloo

pytestmark = pytest.mark.integration
STEPS = 3


def _batch(rank: int, step: int) -> list:
    from trainers.data import Sample

    g = torch.Generator().manual_seed(100 * rank + step)
    return [Sample("image", torch.rand(h, 64, 3, generator=g) * 2 - 1, (h // 16) * 4, "", 0, f"s{i}")
            for i, h in enumerate((64, 48, 64))]


def _train(leaf: list[str]) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    from atoken.config import preset
    from atoken.model import AToken
    from trainers.config import TrainConfig
    from trainers.engine import build_engine
    from trainers.module import TrainModule

    cfg = TrainConfig(steps=STEPS)
    cfg.losses.feature_network = "none"
    cfg.optim.warmup_steps, cfg.optim.lr = 0, 1e-3  # Adam moves each parameter up to ~lr a step
    cfg.scaling.zero_leaf_modules = leaf
    torch.manual_seed(0)
    module = TrainModule(AToken(preset("tiny", latent_channels=cfg.model.latent_channels)), 384, None, cfg)

    engine = build_engine(module, cfg, gpu=False)
    start, losses = full_parameters(module), []
    for step in range(STEPS):
        terms = engine("image_rec", _batch(dist.get_rank(), step), None, step)
        engine.backward(terms["total"])
        engine.step()
        losses.append(terms["total"].item())
    return losses, start, full_parameters(module)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)
    plain_losses, start, plain = _train([])
    leaf_losses, _, leaf = _train(["TransformerBlock"])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"plain_losses": plain_losses, "leaf_losses": leaf_losses,
                       "moved": (plain - start).abs().max().item(), "leaf_vs_plain": (leaf - plain).abs().max().item()}, f)
    dist.barrier()  # neither rank tears down gloo while its peer is still in it
    dist.destroy_process_group()


def test_transformer_blocks_as_zero3_leaves_train_as_without(tmp_path):
    out = tmp_path / "leaf.json"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    r = json.loads(out.read_text())
    assert r["moved"] > 1e-3, r  # the steps trained: the parameters moved
    assert r["leaf_vs_plain"] < 1e-5, r  # the same updates, up to float reordering (dropped gradients: ~1e-3)
    assert r["plain_losses"][-1] < r["plain_losses"][0], r
    for a, b in zip(r["plain_losses"], r["leaf_losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), r
