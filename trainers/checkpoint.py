"""The checkpoint component: what a stage saves, where, and how a restarted worker group resumes.

A checkpoint is a Ray Train checkpoint directory `checkpoint_<step>` under the stage's run folder:
DeepSpeed's ZeRO-3 state (model, optimiser, scheduler) under tag `ds`, one `worker_state_rank<r>.pt`
per rank (EMA partition, RNG, step, rows consumed per task stream), and `atoken_checkpoint.json`
(written last by rank 0: its presence marks the checkpoint complete). Owns `run.checkpoint_every` and
`run.keep_checkpoints`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preprocess import storage
from trainers.config import TrainConfig

META = "atoken_checkpoint.json"
ENGINE_TAG = "ds"


def worker_state_file(rank: int) -> str:
    return f"worker_state_rank{rank}.pt"


@dataclass
class TrainState:
    """Where a stage stands: the next step to run and the rows consumed per task stream."""

    step: int = 0
    positions: dict[str, int] = field(default_factory=dict)


def run_dir(cfg: TrainConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def latest_checkpoint(cfg: TrainConfig) -> tuple[str | None, int]:
    """The newest complete checkpoint of this stage's run folder, and its step."""
    root = run_dir(cfg)
    if not storage.exists(root):
        return None, 0
    fs, path = storage.filesystem(root)
    best, step = None, 0
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_"):
            continue
        meta = storage.join(root, name, META)
        if storage.exists(meta):
            s = json.loads(storage.read_bytes(meta))["step"]
            if s > step:
                best, step = storage.join(root, name), s
    return best, step


def load_engine_state(engine, directory: str, cfg: TrainConfig, uri: str) -> None:
    """DeepSpeed's state from a checkpoint directory, with an error that says what to do when its optimizer
    state was written for other parameter groups (DeepSpeed's own names neither the file nor a way out)."""
    try:
        engine.load_checkpoint(directory, tag=ENGINE_TAG, load_module_strict=True)
    except ValueError as e:
        if "parameter group" not in str(e):  # torch's count and size mismatches both say so
            raise
        raise ValueError(
            f"checkpoint {uri}: its optimizer state was written for other parameter groups than this run's "
            f"{len(engine.optimizer.param_groups)} (one per learning rate and weight decay: "
            "trainers.engine.param_groups). It was written by another version or with other optim.*_lr_mult "
            f"settings: resume it with those, or delete {run_dir(cfg)} to start the stage over") from e


class Checkpointer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world

    def due(self, done: int) -> bool:
        return done % self.cfg.run.checkpoint_every == 0 or done == self.cfg.steps

    def load(self, engine, ema, resume_from: str | None) -> TrainState:
        """Ray's checkpoint for a restarted worker group, else the one a relaunched driver found in
        storage (Ray Train V2 has no resume_from_checkpoint), else a fresh start."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and resume_from:
            fs, path = storage.pyarrow_filesystem(resume_from)
            ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
        if ckpt is None:
            return TrainState()
        with ckpt.as_directory() as d:
            load_engine_state(engine, d, self.cfg, storage.unstrip(self.cfg.run.storage, ckpt.path))
            state = torch.load(os.path.join(d, worker_state_file(self.rank)), weights_only=True)
        ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        return TrainState(int(state["step"]), json.loads(state["positions"]))

    def save(self, engine, ema, state: TrainState, metrics: dict) -> None:
        """Writes the checkpoint and reports it (with the metrics of the window that ends here)."""
        import ray.train

        with tempfile.TemporaryDirectory(prefix="atoken-ckpt-") as d:
            engine.save_checkpoint(d, tag=ENGINE_TAG, client_state={"step": state.step})
            torch.save({"ema": ema.state_dict(), "rng": torch.get_rng_state(), "step": state.step,
                        "positions": json.dumps(state.positions)}, os.path.join(d, worker_state_file(self.rank)))
            if self.rank == 0:
                Path(d, META).write_text(json.dumps({"step": state.step, "stage": self.cfg.stage,
                                                     "world_size": self.world}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"checkpoint_{state.step:08d}")
