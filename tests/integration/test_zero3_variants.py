"""ZeRO-3 variants under real DeepSpeed (2 gloo processes), each against the stage as it trains by default,
from one spawn of the two ranks.

- Leaf modules: naming blocks in `scaling.zero_leaf_modules` changes how parameters are fetched, not what
  the stage learns. DeepSpeed reduces a leaf's gradients from a backward hook on the leaf module; on a
  module whose hook never fires (the stage's module itself, which `stage3_module_granularity_threshold`
  picks at large values) the gradients are silently dropped and the loss stays flat, so the config tree
  rejects that key (tests/unit/test_workflow_logic.py).
- Trimmed tokens: a batch of images packed with its one frame per token reads and writes only the leading
  slice of the encoder's input and the decoder's output weights (`atoken.layers.TrimmableLinear`). ZeRO-3
  gathers those weights for the module call and releases them after, and the slices feed the backward
  pass: the trimmed stage must take the same steps as the released model's 4-frame tokens, or a stale or
  dropped slice would train something else (dropping the slices' gradients moves a parameter by ~2e-3).
"""
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


def _train(leaf: list[str], trim: bool) -> tuple[list[float], torch.Tensor, torch.Tensor]:
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
    module = TrainModule(AToken(preset("tiny", latent_channels=cfg.model.latent_channels)), 384, None, cfg,
                         trim_padding=trim)
    engine = build_engine(module, cfg, gpu=False)
    start, losses = full_parameters(module), []
    for step in range(STEPS):
        torch.manual_seed(step)  # the posterior's sample: the same noise in every variant
        terms = engine("image_rec", _batch(dist.get_rank(), step), None, step)
        engine.backward(terms["total"])
        engine.step()
        losses.append(terms["total"].item())
    return losses, start, full_parameters(module)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)
    runs = {"default": _train([], True), "leaf": _train(["TransformerBlock"], True), "untrimmed": _train([], False)}
    if rank == 0:
        base_losses, start, base = runs["default"]
        with open(out, "w") as f:
            json.dump({"moved": (base - start).abs().max().item(), "losses": {k: r[0] for k, r in runs.items()},
                       "vs_default": {k: (r[2] - base).abs().max().item() for k, r in runs.items()}}, f)
    dist.barrier()  # neither rank tears down gloo while its peer is still in it
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("zero3") / "variants.json"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2)
    r = json.loads(out.read_text())
    assert r["moved"] > 1e-3, r  # the steps trained: the parameters moved
    assert r["losses"]["default"][-1] < r["losses"]["default"][0], r
    return r


def _same_steps(r: dict, variant: str) -> None:
    assert r["vs_default"][variant] < 1e-5, r  # the same updates, up to float reordering
    for a, b in zip(r["losses"]["default"], r["losses"][variant]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), r


def test_transformer_blocks_as_zero3_leaves_train_as_without(variants):
    _same_steps(variants, "leaf")


def test_trimmed_image_tokens_train_as_the_released_4_frame_tokens(variants):
    _same_steps(variants, "untrimmed")
