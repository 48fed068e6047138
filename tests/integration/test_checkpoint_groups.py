"""A stage's DeepSpeed checkpoint under real ZeRO-3 (one gloo process): it resumes into a run with the same
parameter groups, and one written for other groups (another version, other optim.*_lr_mult settings) is
refused with a message that names the checkpoint and the way out, instead of DeepSpeed's bare one."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.services import free_port
from tests.zero3 import full_parameters, join_gloo

pytestmark = pytest.mark.integration


def _engine(logit_lr_mult: float):
    from atoken.config import preset
    from atoken.model import AToken
    from trainers.config import TrainConfig
    from trainers.engine import build_engine
    from trainers.module import TrainModule

    cfg = TrainConfig(steps=4)
    cfg.losses.feature_network = "none"
    cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.logit_lr_mult = 0, 1e-3, logit_lr_mult
    cfg.run.storage, cfg.run.name = "s3://bucket/runs", "stage1-abc"
    torch.manual_seed(0)
    module = TrainModule(AToken(preset("tiny", latent_channels=cfg.model.latent_channels)), 384, None, cfg)
    return build_engine(module, cfg, gpu=False), cfg


def _worker(port: int, d: str, out: str) -> None:
    join_gloo(0, 1, port)
    from trainers.checkpoint import ENGINE_TAG, load_engine_state
    from trainers.data import Sample

    g = torch.Generator().manual_seed(0)
    batch = [Sample("image", torch.rand(64, 64, 3, generator=g) * 2 - 1, 16, "", 0, "s0")]
    saved, cfg = _engine(logit_lr_mult=10.0)  # the sigmoid loss's scalars in a group of their own: 3 groups
    terms = saved("image_rec", batch, None, 0)
    saved.backward(terms["total"])
    saved.step()
    saved.save_checkpoint(d, tag=ENGINE_TAG)
    res = {"saved_groups": len(saved.optimizer.param_groups), "saved": full_parameters(saved.module).tolist()}

    same, _ = _engine(logit_lr_mult=10.0)
    res["fresh_vs_saved"] = float((full_parameters(same.module) - torch.tensor(res["saved"])).abs().max())
    load_engine_state(same, d, cfg, "s3://bucket/runs/stage1-abc/checkpoint_00000001")
    res["loaded_vs_saved"] = float((full_parameters(same.module) - torch.tensor(res["saved"])).abs().max())

    other, other_cfg = _engine(logit_lr_mult=1.0)  # every part at the base rate: 2 groups
    res["other_groups"] = len(other.optimizer.param_groups)
    try:
        load_engine_state(other, d, other_cfg, "s3://bucket/runs/stage1-abc/checkpoint_00000001")
        res["error"] = None
    except ValueError as e:
        res["error"] = str(e)
    del res["saved"]
    with open(out, "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_checkpoint_resumes_into_the_same_groups_and_names_the_way_out_for_others(tmp_path):
    out = tmp_path / "res.json"
    p = mp.get_context("spawn").Process(target=_worker, args=(free_port(), str(tmp_path / "ckpt"), str(out)))
    p.start()
    p.join(timeout=300)
    assert p.exitcode == 0, f"worker exited with {p.exitcode}"
    res = json.loads(out.read_text())
    assert res["saved_groups"] == 3 and res["other_groups"] == 2
    assert res["fresh_vs_saved"] > 1e-4  # one step at lr 1e-3 moved the saved weights off the fresh ones
    assert res["loaded_vs_saved"] == 0.0  # same shapes, copied: the resumed run has the saved weights
    msg = res["error"]
    assert msg is not None and "checkpoint s3://bucket/runs/stage1-abc/checkpoint_00000001" in msg
    assert "parameter groups" in msg and "s3://bucket/runs/stage1-abc" in msg and "start the stage over" in msg
