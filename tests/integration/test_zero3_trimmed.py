"""Trimmed tokens under real ZeRO-3 (2 gloo processes): a batch of images packed with its one frame per
token reads and writes only the leading slice of the encoder's input and the decoder's output weights
(`atoken.layers.TrimmableLinear`). ZeRO-3 gathers those weights for the module call and releases them
after, and the slices feed the backward pass: the trimmed stage must take the same steps as the
released model's 4-frame tokens, or a stale or dropped slice would train something else."""
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


def _train(trim: bool) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    from atoken.config import preset
    from atoken.model import AToken
    from trainers.config import TrainConfig
    from trainers.engine import build_engine
    from trainers.module import TrainModule

    cfg = TrainConfig(steps=STEPS)
    cfg.losses.feature_network = "none"
    cfg.optim.warmup_steps, cfg.optim.lr = 0, 1e-3
    torch.manual_seed(0)
    module = TrainModule(AToken(preset("tiny", latent_channels=cfg.model.latent_channels)), 384, None, cfg,
                         trim_padding=trim)
    engine = build_engine(module, cfg, gpu=False)
    start, losses = full_parameters(module), []
    for step in range(STEPS):
        torch.manual_seed(step)  # the posterior's sample: the same noise on both paths
        terms = engine("image_rec", _batch(dist.get_rank(), step), None, step)
        engine.backward(terms["total"])
        engine.step()
        losses.append(terms["total"].item())
    return losses, start, full_parameters(module)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)
    full_losses, start, full = _train(False)
    trim_losses, _, trimmed = _train(True)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"full_losses": full_losses, "trim_losses": trim_losses,
                       "moved": (full - start).abs().max().item(), "trim_vs_full": (trimmed - full).abs().max().item()}, f)
    dist.barrier()  # neither rank tears down gloo while its peer is still in it
    dist.destroy_process_group()


def test_trimmed_image_tokens_train_as_the_released_4_frame_tokens(tmp_path):
    out = tmp_path / "trim.json"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    r = json.loads(out.read_text())
    assert r["moved"] > 1e-3, r  # the steps trained
    assert r["trim_vs_full"] < 1e-5, r  # the same updates, up to float reordering
    assert r["full_losses"][-1] < r["full_losses"][0], r
    for a, b in zip(r["full_losses"], r["trim_losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), r
