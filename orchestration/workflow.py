"""The curriculum workflow: ingest -> stage 1 -> eval -> promote -> ... -> stage 4, as MLflow steps.

Every step is a child run of one workflow run with a step key; a rerun skips finished steps, and an
interrupted stage resumes from its last checkpoint. Each stage registers a model version (alias
`stageN-candidate`); `stageN` and `champion` move only when the stage's gates pass. Stage N+1 starts
from the exact version stage N promoted, recorded in its run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from orchestration.tracking import Tracker, promote, register_version
from orchestration.workflow_config import Gates, StageSpec, WorkflowConfig
from preprocess import storage


class GateFailed(RuntimeError):
    pass


def _key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[workflow] {msg}", flush=True)


def check_gates(g: Gates, metrics: dict, previous: dict | None) -> list[str]:
    """Failures as 'gate: value vs threshold (by how much)'; empty when every gate passes."""
    fails = []
    psnr = metrics.get("image_psnr")
    if g.min_image_psnr is not None and psnr is not None and psnr < g.min_image_psnr:
        fails.append(f"min_image_psnr: image_psnr {psnr:.2f} dB < {g.min_image_psnr:.2f} (short by {g.min_image_psnr - psnr:.2f})")
    if g.max_image_psnr_drop is not None and previous and psnr is not None and previous.get("image_psnr") is not None:
        drop = previous["image_psnr"] - psnr
        if drop > g.max_image_psnr_drop:
            fails.append(f"max_image_psnr_drop: dropped {drop:.2f} dB from {previous['image_psnr']:.2f} "
                         f"(limit {g.max_image_psnr_drop:.2f}, over by {drop - g.max_image_psnr_drop:.2f})")
    for key, limit in (("video_psnr", g.min_video_psnr), ("3d_psnr", g.min_3d_psnr)):
        v = metrics.get(key)
        if limit is not None and v is not None and v < limit:
            fails.append(f"min_{key}: {key} {v:.2f} dB < {limit:.2f} (short by {limit - v:.2f})")
    if g.beat_pca_floor and psnr is not None and metrics.get("pca_floor_psnr") is not None and psnr <= metrics["pca_floor_psnr"]:
        fails.append(f"beat_pca_floor: image_psnr {psnr:.2f} <= PCA floor {metrics['pca_floor_psnr']:.2f} "
                     f"(short by {metrics['pca_floor_psnr'] - psnr:.2f})")
    return fails


def _stage_config(cfg: WorkflowConfig, spec: StageSpec, shards: str, storage_root: str, init_from: str, key: str):
    from trainers.config import StageConfig

    c = StageConfig(stage=spec.stage, steps=spec.steps)
    c.model.preset, c.model.latent_channels, c.model.fsq = cfg.model.preset, spec.latent_channels, spec.fsq
    c.model.init_from = init_from
    if not init_from and cfg.model.init_official:
        c.model.init_official, c.model.official_variant = cfg.model.init_official, cfg.model.official_variant
    elif not init_from and cfg.model.siglip2_path:
        c.model.siglip2_path = cfg.model.siglip2_path
    c.data.shards, c.data.ratios = shards, dict(spec.ratios)
    c.data.token_budget, c.data.max_tokens_per_sample = cfg.curriculum.token_budget, cfg.curriculum.max_tokens_per_sample
    c.optim.lr, c.optim.warmup_steps = cfg.curriculum.lr, cfg.curriculum.warmup_steps
    c.losses.feature_resolution = cfg.curriculum.feature_resolution
    c.scaling.num_workers, c.scaling.use_gpu = cfg.cluster.num_workers, cfg.cluster.use_gpu
    c.scaling.cpus_per_worker, c.scaling.gpus_per_worker = cfg.cluster.cpus_per_worker, cfg.cluster.gpus_per_worker
    c.scaling.custom_resources = dict(cfg.cluster.train_resources)
    c.scaling.zero_persistence_threshold = cfg.cluster.zero_persistence_threshold
    c.run.storage, c.run.name = storage.join(storage_root, "runs"), f"stage{spec.stage}-{key[:10]}"
    c.run.checkpoint_every = cfg.curriculum.checkpoint_every
    c.run.report_every = max(1, min(cfg.curriculum.checkpoint_every, spec.steps))
    return c.validate()


def _local_copy(uri: str) -> str:
    """A local directory with the export's files (MLflow logs artifacts from local paths)."""
    if not storage.is_remote(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    d = tempfile.mkdtemp(prefix="atoken-export-")
    fs, path = storage.filesystem(uri)
    for f in fs.ls(path, detail=False):
        fs.get_file(f, os.path.join(d, f.rsplit("/", 1)[-1]))
    return d


def run_workflow(cfg: WorkflowConfig) -> dict:
    from orchestration.hydra_config import load
    from orchestration.ray_env import ensure_ray
    from pipelines.ingest import run_ingest
    from pipelines.shards import read_index
    from preprocess.sample_corpus import CorpusConfig, build_corpus
    from trainers.evaluate import evaluate
    from trainers.stage import run_stage

    cfg.validate()
    t0 = time.time()
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    storage_root = cfg.cluster.storage or str(work / "storage")
    tracking = cfg.resolved_tracking_uri()
    ensure_ray(cfg.cluster.ray_address or None, cfg.cluster.num_cpus or None)
    import ray

    ray_job = os.environ.get("RAY_JOB_ID") or ray.get_runtime_context().get_job_id()
    from pipelines.shards import code_version

    tags = {"atoken.code_version": code_version(), "atoken.ray_job_id": str(ray_job)}
    wf_key = _key(cfg.name, dataclasses.asdict(cfg.data), dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.curriculum),
                  storage_root, cfg.registered_model)
    tracker = Tracker(tracking, cfg.name, wf_key, artifact_location=(work / "mlartifacts").as_uri() if tracking.startswith("sqlite:") else None)
    client, model_name = tracker.client, cfg.registered_model
    _log(f"workflow {cfg.name} (key {wf_key}); MLflow {tracking}; storage {storage_root}")

    # ---------------------------------------------------------------- ingest
    manifest = cfg.data.input or str(build_corpus(work / "samples", CorpusConfig(
        digits_per_class=cfg.data.digits_per_class, gaussians_per_asset=cfg.data.gaussians_per_asset)))
    shards = storage.join(storage_root, "shards")
    icfg = load("ingest", [f"input={manifest}", f"output={shards}", *cfg.data.ingest_overrides])
    icfg.resources.task_resources = dict(cfg.cluster.ingest_resources)
    icfg.validate()
    manifest_digest = hashlib.sha1(storage.read_bytes(manifest)).hexdigest() if manifest.endswith((".jsonl", ".csv", ".parquet")) else manifest
    step = tracker.start_step("ingest", _key(dataclasses.asdict(icfg), manifest_digest), dataclasses.asdict(icfg), tags)
    if step.skipped:
        _log(f"ingest: finished earlier (run {step.run_id}); skipped")
    else:
        _log(f"ingest: {manifest} -> {shards}")
        summary = run_ingest(icfg)
        tracker.metrics(step, {"samples_written": summary["samples_written"], "rejected": summary["rejected"],
                               "frames_per_s": summary["frames_per_s"] or 0, "wall_s": summary["wall_s"]})
        with tempfile.TemporaryDirectory() as d:
            for f in ("index.json", "summary.json"):
                Path(d, f).write_bytes(storage.read_bytes(storage.join(shards, f)))
                tracker.artifact(step, str(Path(d, f)), "ingest")
        tracker.outputs(step, {"shards": shards, "rows": summary["samples_written"]})
        tracker.finish(step)
    index_digest = hashlib.sha1(json.dumps(read_index(shards)["shards"], sort_keys=True).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- stages
    rows, previous_metrics, init_version, init_export = [], None, None, ""
    for spec in cfg.curriculum.stages:
        if spec.stage > cfg.stop_after:
            break
        if spec.stage < cfg.start_stage:
            continue
        n = spec.stage
        key = _key(dataclasses.asdict(spec), dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.curriculum.gates),
                   cfg.curriculum.token_budget, cfg.curriculum.lr, index_digest, init_version)
        scfg = _stage_config(cfg, spec, shards, storage_root, init_export, key)
        step = tracker.start_step(f"stage{n}", key, dataclasses.asdict(scfg),
                                  {**tags, "atoken.stage": str(n), "atoken.init_version": str(init_version)})
        if step.skipped:
            _log(f"stage {n}: finished earlier (run {step.run_id}); skipped")
            out = step.outputs
            version, metrics = out["version"], json.loads(out["metrics"])
            gate_fails = json.loads(out.get("gate_failures", "[]"))
        else:
            start = (init_export or (f"official checkpoint {scfg.model.init_official} ({scfg.model.official_variant})"
                                     if scfg.model.init_official else "fresh init"))
            _log(f"stage {n}: training {spec.steps} steps from {start} ({scfg.run.name})")
            res = run_stage(scfg)
            hist_uri = storage.join(scfg.run.storage, scfg.run.name, "metrics.jsonl")
            if storage.exists(hist_uri):
                for line in storage.read_bytes(hist_uri).decode().splitlines():
                    if line.strip():
                        m = json.loads(line)
                        tracker.metrics(step, {f"train.{k}": v for k, v in m.items() if k != "step"}, at=int(m["step"]))
            eval_dir = str(work / "eval" / f"stage{n}-{key[:10]}")
            metrics = evaluate(res.export, shards, eval_dir, max_items=cfg.curriculum.eval_items)
            tracker.metrics(step, {f"eval.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, at=spec.steps)
            tracker.artifact(step, eval_dir, "eval")
            export_local = _local_copy(res.export)
            version = register_version(tracker, step, model_name, export_local, {
                "stage": n, "export": res.export, "checkpoint": res.checkpoint, "shard_index": storage.join(shards, "index.json"),
                "init_version": init_version, **{f"metric.{k}": round(v, 4) for k, v in metrics.items() if isinstance(v, float)}})
            promote(client, model_name, version, f"stage{n}-candidate")
            gate_fails = check_gates(cfg.curriculum.gates, metrics, previous_metrics)
            if not gate_fails:
                promote(client, model_name, version, f"stage{n}")
                promote(client, model_name, version, "champion")
            _log(f"stage {n}: registered {model_name} version {version} (image PSNR {metrics.get('image_psnr', float('nan')):.2f} dB, "
                 f"PCA floor {metrics.get('pca_floor_psnr', float('nan')):.2f}); gates {'pass' if not gate_fails else 'FAIL'}")
            tracker.outputs(step, {"version": version, "export": res.export, "checkpoint": res.checkpoint,
                                   "metrics": json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}),
                                   "gate_failures": json.dumps(gate_fails), "eval_dir": eval_dir,
                                   "resumed_from_step": res.resumed_from_step})
            tracker.finish(step)
        rows.append({"stage": n, "version": version, "metrics": metrics, "gates": "pass" if not gate_fails else "FAIL"})
        if gate_fails:
            report = "\n  ".join(gate_fails)
            _log(f"stage {n}: gates failed; aliases stage{n} and champion not moved:\n  {report}")
            tracker.finish_workflow("FAILED")
            _with_aliases(rows, client, model_name)
            _print_summary(rows, work, time.time() - t0)
            raise GateFailed(f"stage {n} (version {version}) failed its gates:\n  {report}")
        previous_metrics, init_version = metrics, version
        init_export = client.get_model_version(model_name, version).tags["export"]
    tracker.finish_workflow()
    _with_aliases(rows, client, model_name)
    summary = {"rows": rows, "wall_s": round(time.time() - t0, 1), "tracking_uri": tracking, "work_dir": str(work)}
    _print_summary(rows, work, summary["wall_s"])
    return summary


def _with_aliases(rows: list[dict], client, model: str) -> None:
    """Each row's aliases as the registry holds them at the end (read when the stage finished, every
    promoted version still showed `champion`)."""
    for r in rows:
        mv = client.get_model_version(model, r["version"])
        r["aliases"] = sorted(getattr(mv, "aliases", []) or [])


def _print_summary(rows: list[dict], work: Path, wall: float) -> None:
    head = f"{'stage':<6}{'version':<9}{'img PSNR':>9}{'PCA floor':>10}{'img SSIM':>9}{'vid PSNR':>9}{'3D PSNR':>8}{'0-shot':>7}{'R@1 t2v':>8}  {'gates':<6}aliases"
    lines = [head]
    f = lambda m, k: f"{m[k]:.2f}" if isinstance(m.get(k), (int, float)) else "-"  # noqa: E731
    for r in rows:
        m = r["metrics"]
        lines.append(f"{r['stage']:<6}{r['version']:<9}{f(m, 'image_psnr'):>9}{f(m, 'pca_floor_psnr'):>10}{f(m, 'image_ssim'):>9}"
                     f"{f(m, 'video_psnr'):>9}{f(m, '3d_psnr'):>8}{f(m, 'zero_shot_acc'):>7}{f(m, 'retrieval_t2v_r1'):>8}  "
                     f"{r['gates']:<6}{','.join(r['aliases'])}")
    lines.append(f"pictures: {work / 'eval'}/<stage>/*.png   MLflow UI: mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}"
                 f"   wall {wall:.0f} s")
    print("\n".join(lines), flush=True)


def status(cfg: WorkflowConfig) -> str:
    """The workflow's steps with state, key metrics, versions and aliases."""
    from mlflow.tracking import MlflowClient

    tracking = cfg.resolved_tracking_uri()
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(cfg.name)
    if exp is None:
        return f"no workflow named {cfg.name!r} in {tracking}"
    parents = client.search_runs([exp.experiment_id], "tags.`atoken.kind` = 'workflow'", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        return "no workflow runs yet"
    p = parents[0]
    steps = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'", order_by=["attributes.start_time ASC"])
    lines = [f"workflow run {p.info.run_id} [{p.info.status}]"]
    for s in steps:
        m = s.data.metrics
        key = ", ".join(f"{k[5:]}={m[k]:.2f}" for k in ("eval.image_psnr", "eval.pca_floor_psnr", "eval.video_psnr", "eval.3d_psnr") if k in m)
        v = s.data.tags.get("output.version", "")
        lines.append(f"  {s.data.tags.get('atoken.step', s.info.run_name):<8} {s.info.status:<9} {('v' + v) if v else '':<5} {key}")
    try:
        rm = client.get_registered_model(cfg.registered_model)
        aliases = sorted((a, v) for a, v in (rm.aliases or {}).items())
        lines.append("aliases: " + ", ".join(f"{a}->v{v}" for a, v in aliases))
    except Exception:
        lines.append("aliases: (no registered model yet)")
    return "\n".join(lines)
