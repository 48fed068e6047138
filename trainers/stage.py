"""Running one curriculum stage: prepare its start model, then Ray Train TorchTrainer + DeepSpeed ZeRO-3
workers on streamed shards.

The stage's outputs live under <run.storage>/<run.name>/: `start/` (the model every worker starts from),
Ray Train checkpoints (checkpoint_<step>), `export/` (consolidated EMA weights), `metrics.jsonl` and
`stage_done.json`. A rerun of a finished stage returns its recorded result without training; an
interrupted one resumes from its latest complete checkpoint. Metrics reach the caller live through
Ray Train callbacks (`callbacks`, run on the driver side; trainers/ itself imports no tracking library).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

from preprocess import storage
from trainers.checkpoint import latest_checkpoint, run_dir
from trainers.config import TASK_MODALITY, TrainConfig
from trainers.data import task_schedule
from trainers.engine import process_group_backend
from trainers.export import export_dir
from trainers.loop import train_loop_per_worker
from trainers.start import prepare_start

log = logging.getLogger("atoken.stage")
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
    start: dict
    startup_s: dict
    skipped: bool = False


def _prepare_remote(cfg: TrainConfig) -> dict:
    """prepare_start as a Ray task with one training worker's resources (on a cluster: a training node,
    whose GPU and memory the data-dependent init of a large preset needs)."""
    import ray

    res = cfg.scaling.worker_resources()
    opts = {"num_cpus": min(res.pop("CPU"), 1.0), "num_gpus": res.pop("GPU", 0), "resources": res or None}
    return ray.get(ray.remote(prepare_start).options(**opts).remote(cfg))


def stream_plan(cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """task -> {stream key: share of its samples}. One stream per task, unless data.rec_dataset_weights
    reweights the datasets a reconstruction task's rows come from: then one stream per dataset ("task@dataset"), with
    shares proportional to weight x rows."""
    from pipelines.reader import dataset_counts

    plan = {}
    for t in cfg.tasks:
        w = cfg.data.rec_dataset_weights if t.endswith("_rec") else {}
        counts = dataset_counts(cfg.data.shards, TASK_MODALITY[t], "train") if w else {}
        if not w or all(w.get(d, 1.0) == 1.0 for d in counts):
            plan[t] = {t: 1.0}
            continue
        mass = {d: w.get(d, 1.0) * n for d, n in counts.items() if w.get(d, 1.0) > 0}
        if not mass:
            raise ValueError(f"data.rec_dataset_weights={dict(w)} leaves no {TASK_MODALITY[t]} training rows for {t}")
        total = sum(mass.values())
        plan[t] = {f"{t}@{d}": m / total for d, m in mass.items()}
    return plan


def passes_per_stage(cfg: TrainConfig, task: str, shares: dict[str, float]) -> dict[str, int]:
    """How many times each stream's shards are listed so that one pass spans the stage (every new pass of
    a streaming split re-plans and restarts its read tasks): the rows it must deliver (its share of the
    samples of the task's steps, at the budget's tokens per step on every worker) over its rows, twice
    over, plus one (at most 1,000: a large dataset needs 1). Twice: the estimate counts full-size tokens,
    but the augmentation's crop drops a patch row and a patch column half the time each (a 4x4-patch
    photo averages 12.25 tokens, a 2x2 one 2.25), and the main job's photo streams ran out at 82% of
    stages 1 and 2 (each restart stalled both ranks ~6 s). A listed copy costs nothing until it is read."""
    from pipelines.reader import dataset_counts, token_count

    cycle = task_schedule(cfg.data.ratios)
    steps = cfg.steps * cycle.count(task) / len(cycle)
    mod = TASK_MODALITY[task]
    rows = {k: (sum(dataset_counts(cfg.data.shards, mod, "train").values()) if "@" not in k else
                dataset_counts(cfg.data.shards, mod, "train").get(k.split("@", 1)[1], 0)) for k in shares}
    tokens = {k: token_count(cfg.data.shards, mod, "train", dataset=k.split("@", 1)[1] if "@" in k else None) for k in shares}
    per_sample = sum(shares[k] * tokens[k] / max(rows[k], 1) for k in shares)
    samples = steps * cfg.scaling.num_workers * cfg.data.token_budget / max(per_sample, 1.0)
    return {k: int(min(1000, max(1, -(-2 * samples * shares[k] // max(rows[k], 1)) + 1))) for k in shares}


class HistoryPoller:
    """Calls `on_report` with each new line of the stage's metrics.jsonl while it trains (a thread on the
    driver side: it works the same whether the run folder is local or on S3, and needs no Ray API)."""

    def __init__(self, uri: str, on_report, every: float = 2.0):
        import threading

        self.uri, self.on_report, self.every = uri, on_report, every
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        try:
            if not storage.exists(self.uri):
                return
            rows = [json.loads(x) for x in storage.read_bytes(self.uri).decode().splitlines() if x.strip()]
        except (OSError, ValueError):
            return  # mid-write or not there yet: next time
        for r in rows:
            if r["step"] > self.seen:
                self.seen = r["step"]
                self.on_report(r)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._poll()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


def first_report(cfg: TrainConfig) -> dict:
    """The start-up figures the first report of a stage carries (the workers measure them)."""
    uri = storage.join(run_dir(cfg), "metrics.jsonl")
    if not storage.exists(uri):
        return {}
    for line in storage.read_bytes(uri).decode().splitlines():
        row = json.loads(line)
        found = {k: v for k, v in row.items() if k.startswith("startup/")}
        if found:
            return found
    return {}


def run_stage(cfg: TrainConfig, callbacks: list | None = None, on_report=None) -> StageResult:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.idle_backoff import IdleLoopBackoff
    from pipelines.reader import read_shards

    cfg.validate()
    done = storage.join(run_dir(cfg), DONE)
    if storage.exists(done):
        res = StageResult(**json.loads(storage.read_bytes(done)))
        res.skipped = True
        log.info("stage %d: %s already finished; nothing to do (%s)", cfg.stage, cfg.run.name, res.export)
        return res
    t0 = time.time()
    start = _prepare_remote(cfg)
    t_start = time.time()
    import ray.data

    # the training streams run in the background for the whole stage: no progress bars (they would
    # interleave with the stage's own progress; the ingest job keeps its bars)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    hooks = ctx.custom_execution_callback_classes
    if IdleLoopBackoff in hooks:
        hooks.remove(IdleLoopBackoff)
    if cfg.data.idle_stream_pause:
        hooks.append(IdleLoopBackoff)
    plan = stream_plan(cfg)
    datasets = {}
    for t, shares in plan.items():
        for key, repeat in passes_per_stage(cfg, t, shares).items():
            datasets[key] = read_shards(cfg.data.shards, modality=TASK_MODALITY[t], split="train", num_cpus=cfg.data.read_cpus,
                                        concurrency=cfg.data.read_concurrency or cfg.scaling.num_workers, repeat=repeat,
                                        dataset=key.split("@", 1)[1] if "@" in key else None)
    ckpt_uri, ckpt_step = latest_checkpoint(cfg)
    fs, path = storage.pyarrow_filesystem(cfg.run.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": dataclasses.asdict(cfg), "resume_from": ckpt_uri, "streams": plan,
                           "fit_started": time.time()},
        torch_config=TorchConfig(backend=process_group_backend(cfg.scaling.use_gpu)),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=cfg.scaling.worker_resources()),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs, callbacks=list(callbacks or []),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
        datasets=datasets,
    )
    if ckpt_uri:
        log.info("stage %d: resuming %s from %s (step %d)", cfg.stage, cfg.run.name, ckpt_uri, ckpt_step)
    t_fit = time.time()
    if on_report is None:
        result = trainer.fit()
    else:
        with HistoryPoller(storage.join(run_dir(cfg), "metrics.jsonl"), on_report):
            result = trainer.fit()
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    final_ckpt = None
    if result.checkpoint is not None:
        final_ckpt = storage.unstrip(cfg.run.storage, result.checkpoint.path)
    res = StageResult(stage=cfg.stage, name=cfg.run.name, export=export_dir(cfg), checkpoint=final_ckpt,
                      steps=int(metrics.get("step", cfg.steps)), metrics=metrics, wall_s=round(time.time() - t0, 1),
                      resumed_from_step=ckpt_step, start=start,
                      startup_s={"prepare_start": round(t_start - t0, 2), "streams_and_trainer": round(t_fit - t_start, 2),
                                 **{k[len("startup/"):]: round(v, 2) for k, v in first_report(cfg).items()}})
    storage.commit_bytes(done, json.dumps(dataclasses.asdict(res), indent=1).encode())
    return res
