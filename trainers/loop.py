"""The per-worker training loop (Ray Train `train_loop_per_worker`) of one curriculum stage.

It reads as the loop; the components own the rest: `start` (the model every rank starts from),
`engine` (DeepSpeed ZeRO-3), `data` (streams, pools, lockstep batches), `checkpoint` (save / resume),
`metrics` (report windows and sinks), `export` (the consolidated EMA model).
"""
from __future__ import annotations

import time

import torch

from preprocess import storage
from trainers.checkpoint import Checkpointer, TrainState
from trainers.config import TrainConfig, from_dict
from trainers.data import TaskData, task_schedule
from trainers.ema import ShardedEMA
from trainers.engine import build_engine, import_deepspeed, set_threads
from trainers.export import export_ema
from trainers.metrics import HistoryFile, MetricsProcessor, StepTimer
from trainers.module import TrainModule
from trainers.start import load_start


def _feature_network(cfg: TrainConfig, device: torch.device):
    """The frozen feature network, only when an image feature term is on at some step of this stage."""
    from atoken.features import FeatureNetwork

    w = cfg.losses
    on = any(s.weight > 0 and s.start < cfg.steps for s in (w.perceptual, w.gram, w.clip))
    if w.feature_network == "none" or "image_rec" not in cfg.tasks or not on:
        return None
    return FeatureNetwork(w.feature_network, w.feature_network_path or None, w.feature_resolution).to(device)


def _teacher(cfg: TrainConfig, device: torch.device):
    """The image-understanding teacher, only when configured and image understanding is trained."""
    if cfg.losses.teacher == "none" or "image_und" not in cfg.tasks:
        return None
    from atoken.siglip2 import SigLIP2Teacher

    return SigLIP2Teacher(cfg.losses.teacher_path).to(device)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    t_begin = time.time()
    startup: dict[str, float] = {"worker_group_s": t_begin - config["fit_started"]} if "fit_started" in config else {}
    import_deepspeed()  # before the config's validation imports it, with MLflow
    startup["import_deepspeed_s"] = time.time() - t_begin
    cfg = from_dict(TrainConfig, config["train"]).validate()
    set_threads(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    torch.manual_seed(cfg.data.seed)  # identical init of the text projection on every rank

    t = time.time()
    model, text_projection, captions = load_start(cfg)
    text_dim = next(iter(captions.values())).shape[0] if captions else 384
    startup["load_start_model_s"], t = time.time() - t, time.time()
    module = TrainModule(model, text_dim, _feature_network(cfg, device), cfg, text_projection, _teacher(cfg, device))
    startup["frozen_networks_s"], t = time.time() - t, time.time()
    engine = build_engine(module, cfg, gpu)
    ema = ShardedEMA(engine.module, cfg.optim.ema_decay)
    startup["deepspeed_init_s"], t = time.time() - t, time.time()
    checkpoints = Checkpointer(cfg, rank, world)
    state = checkpoints.load(engine, ema, config.get("resume_from"))
    startup["checkpoint_load_s"], t = time.time() - t, time.time()

    plan = config.get("streams") or {t: {t: 1.0} for t in cfg.tasks}
    data = TaskData(cfg, {k: ray.train.get_dataset_shard(k) for p in plan.values() for k in p}, state.positions, rank, plan)
    sinks = [HistoryFile(storage.join(cfg.run.storage, cfg.run.name, "metrics.jsonl"), state.step)] if rank == 0 else []
    metrics = MetricsProcessor(cfg, world, device, sinks, **config.get("flops", {}))
    cycle = task_schedule(cfg.data.ratios)
    startup["data_init_s"] = time.time() - t

    for step in range(state.step, cfg.steps):
        task = cycle[step % len(cycle)]
        timer = StepTimer()
        samples, waited = data.next(task)
        text = torch.stack([captions[s.caption] for s in samples]) if task.endswith("_und") else None
        timer.mark("select")
        timer.split("select", "data", waited)
        terms = engine(task, samples, text, step)
        timer.mark("forward")
        engine.backward(terms["total"])
        timer.mark("backward")
        engine.step()
        timer.mark("optimizer")
        ema.update()
        timer.mark("ema")
        times = timer.done()
        metrics.record(task, terms, sum(s.tokens for s in samples), len(samples), waited, times)
        done = step + 1
        if step == state.step:  # the first step's data wait is the first batch; report start-up once
            startup["first_batch_s"] = waited
            startup["worker_to_first_step_s"] = time.time() - t_begin
            metrics.extra.update({f"startup/{k}": v for k, v in startup.items()})
        if checkpoints.due(done):
            metrics.add_wait(data.settle())
            report = metrics.flush(done, engine.get_lr()[0], {"task": task})
            checkpoints.save(engine, ema, TrainState(done, data.position()), report)
        elif metrics.due(done):
            ray.train.report(metrics.flush(done, engine.get_lr()[0], {"task": task}))
    export_ema(engine, ema, module, cfg, rank)
