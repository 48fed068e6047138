"""The per-worker training loop (Ray Train `train_loop_per_worker`) for one curriculum stage."""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from preprocess import storage
from trainers.config import StageConfig
from trainers.data import TaskPool, TaskStream, lr_lambda, task_schedule

CHECKPOINT_META = "atoken_checkpoint.json"
EXPORT_EXTRA = "text_projection.safetensors"


def deepspeed_config(cfg: StageConfig, gpu: bool) -> dict:
    bf16 = cfg.scaling.precision == "bf16" or (cfg.scaling.precision == "auto" and gpu)
    persist = cfg.scaling.zero_persistence_threshold
    if persist < 0:
        persist = 100_000 if gpu else 0
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False,
                              "stage3_param_persistence_threshold": persist},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "weight_decay": cfg.optim.weight_decay,
            "eps": 1e-8, "torch_adam": not gpu}},  # CPU: torch's AdamW, no FusedAdam JIT build
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def param_groups(module: torch.nn.Module, cfg: StageConfig) -> list[dict]:
    """Encoder at lr x encoder_lr_mult; no weight decay on norms, biases, tables and scalars."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        enc = name.startswith("model.encoder.")
        decay = p.ndim >= 2 and "position_embedding" not in name
        groups.setdefault((enc, decay), []).append(p)
    return [{"params": ps, "lr": cfg.optim.lr * (cfg.optim.encoder_lr_mult if enc else 1.0),
             "weight_decay": cfg.optim.weight_decay if decay else 0.0, "name": f"{'enc' if enc else 'rest'}-{'wd' if decay else 'nowd'}"}
            for (enc, decay), ps in sorted(groups.items())]


def build_model(cfg: StageConfig):
    """The stage's starting model: previous export / official checkpoint / SigLIP2 / fresh preset, then
    the stage's transitions (latent growth, FSQ, a Gaussian decoder for 3D)."""
    from atoken.config import preset
    from atoken.gaussian import GaussianDecoder, GaussianDecoderConfig
    from atoken.model import AToken
    m = cfg.model
    if m.init_from:
        with storage.local_path(m.init_from + "/model.safetensors") as w, storage.local_path(m.init_from + "/config.json") as c:
            d = Path(tempfile.mkdtemp(prefix="atoken-init-"))
            os.symlink(w, d / "model.safetensors")
            os.symlink(c, d / "config.json")
            model = AToken.from_pretrained(d)
    elif m.init_official:
        from atoken.official import variant_config

        with storage.local_path(m.init_official) as f:
            model = AToken.from_official(f, m.official_variant, variant_config(m.official_variant, base=m.preset))
    elif m.siglip2_path:
        model = AToken.from_siglip2(m.siglip2_path, preset(m.preset, latent_channels=m.latent_channels))
    else:
        model = AToken(preset(m.preset, latent_channels=m.latent_channels))
    if model.config.latent_channels < m.latent_channels:
        model.grow_latent(m.latent_channels)
    elif model.config.latent_channels > m.latent_channels:
        raise ValueError(f"model.latent_channels={m.latent_channels} but the starting model has "
                         f"{model.config.latent_channels}; latents only grow")
    if m.fsq and model.quantizer is None:
        model.enable_fsq()
    if "3d_rec" in cfg.tasks and model.gs_decoder is None:
        model.attach_gaussian_decoder(GaussianDecoder(GaussianDecoderConfig()))
    model.config.gradient_checkpointing = m.gradient_checkpointing
    return model


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train
    from safetensors.torch import load_file

    from atoken.features import FeatureNetwork
    from atoken.text import text_tower
    from trainers.ema import ShardedEMA
    from trainers.module import TrainModule
    from trainers.stage import stage_config_from_dict

    cfg = stage_config_from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    torch.manual_seed(cfg.data.seed)  # identical init on every rank

    model = build_model(cfg)
    text = text_tower(cfg.losses.text_tower, cfg.losses.text_path or None)
    feature_net = None
    if cfg.losses.feature_network != "none" and "image_rec" in cfg.tasks:
        feature_net = FeatureNetwork(cfg.losses.feature_network, cfg.losses.feature_network_path or None,
                                     cfg.losses.feature_resolution).to(device)
    module = TrainModule(model, text.dim, feature_net, cfg)
    if cfg.model.init_from:
        extra = cfg.model.init_from + "/" + EXPORT_EXTRA
        if storage.exists(extra):
            with storage.local_path(extra) as p:
                w = load_file(p)["weight"]
            if w.shape == module.text_proj.weight.shape:
                module.text_proj.weight.data.copy_(w)
    schedule_fn = lr_lambda(cfg.optim.warmup_steps, cfg.steps, cfg.optim.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, cfg), config=deepspeed_config(cfg, gpu),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule_fn), dist_init_required=False)
    ema = ShardedEMA(engine.module, cfg.optim.ema_decay)

    start_step, positions = 0, {}
    # a restarted worker group gets Ray's latest checkpoint; a relaunched driver passes the latest
    # complete one it found in storage (Ray Train V2 has no resume_from_checkpoint)
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and config.get("_resume_from"):
        fs, path = storage.pyarrow_filesystem(config["_resume_from"])
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    if ckpt:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(d, tag="ds", load_module_strict=True)
            state = torch.load(os.path.join(d, f"worker_state_rank{rank}.pt"), weights_only=True)
            ema.load_state_dict(state["ema"])
            torch.set_rng_state(state["rng"])
            positions = json.loads(state["positions"])
            start_step = int(state["step"])
        print(f"[rank {rank}] resumed at step {start_step} from checkpoint", flush=True)

    cycle = task_schedule(cfg.data.ratios)
    shards = {t: ray.train.get_dataset_shard(t) for t in cfg.tasks}
    streams = {t: TaskStream(lambda t=t: shards[t].iter_rows(), cfg.data.max_tokens_per_sample, positions.get(t, 0))
               for t in cfg.tasks}
    pools = {t: TaskPool(streams[t], cfg.data.pool_size) for t in cfg.tasks}

    def next_batch(task: str) -> tuple[list, float]:
        waited = pools[task].wait()
        pool = pools[task]
        # [samples to take, -extra samples to pool]: MIN agrees on the fewest to take and the most to add
        agree = torch.tensor([len(pool.best_bin(cfg.data.token_budget)), -pool.want(2 * cfg.data.token_budget)])
        if dist.is_initialized():
            dist.all_reduce(agree, op=dist.ReduceOp.MIN)  # lockstep row consumption across ranks
        return pool.take(int(agree[0]), cfg.data.token_budget, extra=-int(agree[1])), waited

    text_cache: dict[str, torch.Tensor] = {}

    def text_embed(captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in text_cache]
        if missing:
            for c, e in zip(missing, text.encode(missing)):
                text_cache[c] = e
        return torch.stack([text_cache[c] for c in captions])

    window = _new_window()
    history_uri = storage.join(cfg.run.storage, cfg.run.name, "metrics.jsonl")
    history = _read_history(history_uri, start_step) if rank == 0 else []
    step = start_step
    for step in range(start_step, cfg.steps):
        task = cycle[step % len(cycle)]
        t0, c0 = time.perf_counter(), time.process_time()
        samples, waited = next_batch(task)
        window["wait"] += waited
        captions = text_embed([s.caption for s in samples]) if task.endswith("_und") else None
        t1 = time.perf_counter()
        terms = engine(task, samples, captions, step)
        t2 = time.perf_counter()
        engine.backward(terms["total"])
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        ema.update()
        t5 = time.perf_counter()
        window["phases"].update({"data": waited, "select": t1 - t0 - waited, "forward": t2 - t1, "backward": t3 - t2,
                                 "optimizer": t4 - t3, "ema": t5 - t4, "step": t5 - t0,
                                 "cpu": time.process_time() - c0})
        window["tokens"] += sum(s.tokens for s in samples)
        window["samples"] += len(samples)
        window["steps"] += 1
        for k, v in terms.items():
            window["losses"][f"loss/{task}/{k}"] = float(v.detach())
        done = step + 1
        is_ckpt = done % cfg.run.checkpoint_every == 0 or done == cfg.steps
        if done % cfg.run.report_every == 0 or is_ckpt:
            metrics = _window_metrics(window, engine, device, world, done, task)
            if rank == 0:  # the step-by-step history the workflow logs to MLflow
                history.append(metrics)
                _write_history(history_uri, history)
            if is_ckpt:
                with tempfile.TemporaryDirectory(prefix="atoken-ckpt-") as d:
                    engine.save_checkpoint(d, tag="ds", client_state={"step": done})
                    for p in pools.values():
                        window["wait"] += p.wait()  # settle refills so positions are exact
                    # rows consumed minus those still pooled: a resumed run re-reads the pool
                    positions = {t: streams[t].consumed - len(pools[t].samples) for t in streams}
                    torch.save({"ema": ema.state_dict(), "rng": torch.get_rng_state(), "step": done,
                                "positions": json.dumps(positions)}, os.path.join(d, f"worker_state_rank{rank}.pt"))
                    if rank == 0:
                        Path(d, CHECKPOINT_META).write_text(json.dumps({"step": done, "stage": cfg.stage,
                                                                         "world_size": world}))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                                     checkpoint_dir_name=f"checkpoint_{done:08d}")
            else:
                ray.train.report(metrics)
            window = _new_window()
    _export(engine, ema, module, cfg, rank)


def _new_window() -> dict:
    """Per-report accumulators; `phases` sums seconds per step phase (a Counter adds on update): data wait,
    select (batch agreement and caption embedding), forward, backward, optimizer, ema, the whole step, and
    the CPU seconds this process used meanwhile (all its threads: well below `step` means other processes
    took the cores)."""
    return {"tokens": 0, "samples": 0, "wait": 0.0, "t0": time.perf_counter(), "steps": 0, "losses": {},
            "phases": Counter()}


def _read_history(uri: str, upto: int) -> list[dict]:
    if not storage.exists(uri):
        return []
    rows = [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]
    return [r for r in rows if r["step"] <= upto]


def _write_history(uri: str, rows: list[dict]) -> None:
    storage.commit_bytes(uri, "\n".join(json.dumps(r) for r in rows).encode())


def _window_metrics(w: dict, engine, device, world: int, step: int, task: str) -> dict:
    dt = max(time.perf_counter() - w["t0"], 1e-9)
    counts = torch.tensor([w["tokens"], w["samples"], w["wait"], dt], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    tokens, samples, wait, total_dt = counts.tolist()
    wall = total_dt / world
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else _rss_peak_mb()
    return {"step": step, "task": task, "lr": engine.get_lr()[0], "tokens_per_s": tokens / wall,
            "samples_per_s": samples / wall, "data_wait_fraction": wait / max(total_dt, 1e-9),
            "peak_memory_mb": peak, **w["losses"],
            # where a rank's step time goes (seconds per step, this rank): data, forward, backward, optimizer, ema
            **{f"time/{k}_s": v / max(w["steps"], 1) for k, v in w["phases"].items()}}


def _export(engine, ema, module, cfg: StageConfig, rank: int) -> None:
    """Consolidates the EMA weights (gathered across ZeRO-3 partitions) and writes save_pretrained +
    the text projection to <storage>/<run>/export."""
    import deepspeed
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    with ema.swapped_in():
        for name, p in engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    state[name] = p.data.detach().float().cpu().clone()
    if rank != 0:
        return
    for name, b in engine.module.named_buffers():
        state.setdefault(name, b.detach().cpu().clone())
    import copy

    from atoken.model import AToken

    model = AToken(copy.deepcopy(module.model.config))  # the live module holds ZeRO-3 placeholders
    want = model.state_dict()
    own = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.") and k[len("model."):] in want}
    missing = sorted(set(want) - set(own))
    if missing:
        raise RuntimeError(f"export: gathered state lacks {missing}")
    model.load_state_dict(own, strict=True)
    out = storage.join(cfg.run.storage, cfg.run.name, "export")
    with tempfile.TemporaryDirectory(prefix="atoken-export-") as d:
        model.save_pretrained(d, metadata={"stage": cfg.stage, "steps": cfg.steps, "ema_decay": cfg.optim.ema_decay})
        save_file({"weight": state["text_proj.weight"].contiguous()}, os.path.join(d, EXPORT_EXTRA))
        Path(d, "text_tower.json").write_text(json.dumps({"tower": cfg.losses.text_tower, "path": cfg.losses.text_path}))
        for f in sorted(os.listdir(d)):
            storage.commit_file(os.path.join(d, f), storage.join(out, f))
