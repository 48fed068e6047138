"""Running one curriculum stage: Ray Train TorchTrainer + DeepSpeed ZeRO-3 workers on streamed shards.

The stage's outputs live under <run.storage>/<run.name>/: Ray Train checkpoints (checkpoint_<step>),
`export/` (consolidated EMA weights, save_pretrained + text projection) and `stage_done.json`. A rerun
of a finished stage returns its recorded result without training; an interrupted one resumes from its
latest complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass


from preprocess import storage
from trainers.config import TASK_MODALITY, StageConfig
from trainers.loop import CHECKPOINT_META, train_loop_per_worker

DONE = "stage_done.json"


@dataclass
class StageResult:
    stage: int
    name: str
    export: str
    checkpoint: str | None
    steps: int
    metrics: dict
    wall_s: float
    resumed_from_step: int
    skipped: bool = False


def _build(cls, d: dict):
    """Nested dataclass from a plain dict (what Ray passes to workers); unknown keys are errors."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"stage config: unknown keys {unknown} in {cls.__name__}")
    kw = {}
    for k, v in d.items():
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            kw[k] = _build(t, v)
        elif typing.get_origin(t) is tuple and isinstance(v, list):
            kw[k] = tuple(v)
        else:
            kw[k] = v
    return cls(**kw)


def stage_config_from_dict(d: dict) -> StageConfig:
    return _build(StageConfig, {k: v for k, v in d.items() if not k.startswith("_")}).validate()


def stage_dir(cfg: StageConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def latest_checkpoint(cfg: StageConfig) -> tuple[str | None, int]:
    """The newest complete checkpoint (its metadata file exists) of this stage's run, and its step."""
    root = stage_dir(cfg)
    if not storage.exists(root):
        return None, 0
    fs, path = storage.filesystem(root)
    best, step = None, 0
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith("checkpoint_"):
            continue
        meta = storage.join(root, name, CHECKPOINT_META)
        if storage.exists(meta):
            s = json.loads(storage.read_bytes(meta))["step"]
            if s > step:
                best, step = storage.join(root, name), s
    return best, step


def run_stage(cfg: StageConfig) -> StageResult:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.reader import read_shards

    cfg.validate()
    root = stage_dir(cfg)
    done = storage.join(root, DONE)
    if storage.exists(done):
        res = StageResult(**json.loads(storage.read_bytes(done)))
        res.skipped = True
        print(f"[stage {cfg.stage}] {cfg.run.name} already finished; nothing to do ({res.export})", flush=True)
        return res
    t0 = time.time()
    datasets = {}
    for task in cfg.tasks:
        ds = read_shards(cfg.data.shards, modality=TASK_MODALITY[task], split="train", num_cpus=cfg.data.read_cpus,
                         concurrency=cfg.data.read_concurrency or cfg.scaling.num_workers)
        datasets[task] = ds
    ckpt_uri, ckpt_step = latest_checkpoint(cfg)
    fs, path = storage.pyarrow_filesystem(cfg.run.storage)
    resources = cfg.scaling.worker_resources()
    loop_config = {**dataclasses.asdict(cfg), "_resume_from": ckpt_uri}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets=datasets,
    )
    if ckpt_uri:
        print(f"[stage {cfg.stage}] resuming {cfg.run.name} from {ckpt_uri} (step {ckpt_step})", flush=True)
    result = trainer.fit()
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    final_ckpt = None
    if result.checkpoint is not None:
        final_ckpt = (f"s3://{result.checkpoint.path}" if cfg.run.storage.startswith("s3://") else result.checkpoint.path)
    res = StageResult(stage=cfg.stage, name=cfg.run.name, export=storage.join(root, "export"), checkpoint=final_ckpt,
                      steps=int(metrics.get("step", cfg.steps)), metrics=metrics, wall_s=round(time.time() - t0, 1),
                      resumed_from_step=ckpt_step)
    storage.commit_bytes(done, json.dumps(dataclasses.asdict(res), indent=1).encode())
    return res
