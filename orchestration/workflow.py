"""The curriculum workflow: ingest, then per stage train -> eval -> promote, each an MLflow step.

Every step is a child run of one workflow run, keyed by exactly what it depends on:
  ingest          the ingest config and the manifest's bytes
  stageN.train    the stage's resolved training config, the shard index, the version it starts from
  stageN.eval     the eval config and the model version it measures
  stageN.promote  the gates, its evaluation, and the previous stage's evaluation (for the drop gates)
A rerun skips steps whose key already finished, so changing a training knob retrains that stage and
everything after it, changing a gate or an eval setting re-decides promotion without retraining, and an
unchanged rerun does nothing. An interrupted stage resumes from its last checkpoint. Each stage registers
a model version (alias `stageN-candidate`); `stageN` and `champion` move only when its gates pass, and
stage N+1 starts from the exact version stage N promoted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from orchestration.console import StageProgress, setup_logging
from orchestration.gates import check_gates, image_datasets, image_floor, video_floor
from orchestration.ray_env import ensure_ray
from orchestration.tracking import LiveMetrics, Tracker, describe_version, promote, register_version
from orchestration.workflow_config import WorkflowConfig
from pipelines.ingest import run_ingest
from pipelines.shards import code_version, read_index
from preprocess import storage
from preprocess.sample_corpus import CorpusConfig, build_corpus
from trainers.config import TrainConfig
from trainers.evaluate import evaluate
from trainers.stage import run_stage

log = logging.getLogger("atoken.workflow")


class GateFailed(RuntimeError):
    pass


def step_key(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_key(tc: TrainConfig, index_digest: str, init_version: str | None) -> str:
    """The hash of a stage's resolved training config and its inputs' versions. The fields the workflow
    derives from those inputs (shard folder, run folder, start export) are represented by the inputs."""
    d = dataclasses.asdict(tc)
    d["data"]["shards"], d["run"]["name"], d["model"]["init_from"] = "", "", ""
    return step_key("train", d, index_digest, init_version)


def _local_copy(uri: str) -> str:
    """A local directory with the export's files (MLflow logs artifacts from local paths)."""
    if not storage.is_remote(uri):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    d = tempfile.mkdtemp(prefix="atoken-export-")
    fs, path = storage.filesystem(uri)
    for f in fs.ls(path, detail=False):
        fs.get_file(f, os.path.join(d, f.rsplit("/", 1)[-1]))
    return d


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_workflow(cfg: WorkflowConfig) -> dict:
    cfg.validate()
    t0 = time.time()
    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_file = setup_logging(cfg.verbose, work / "logs")
    storage_root = cfg.cluster.storage or str(work / "storage")
    tracking = cfg.resolved_tracking_uri()
    ensure_ray(cfg.cluster.ray_address or None, cfg.cluster.num_cpus or None, verbose=cfg.verbose, log_dir=work / "logs")
    import ray

    ray_job = os.environ.get("RAY_JOB_ID") or ray.get_runtime_context().get_job_id()
    ray_logs = _ray_log_dir()
    tags = {"atoken.code_version": code_version(), "atoken.ray_job_id": str(ray_job),
            "atoken.ray_submission_id": _submission_id(),
            "atoken.log_dir": f"{log_file} and Ray's session logs {ray_logs}"}
    wf_key = step_key(cfg.name, cfg.registered_model, storage_root)
    tracker = Tracker(tracking, cfg.name, wf_key, artifact_location=(work / "mlartifacts").as_uri() if tracking.startswith("sqlite:") else None)
    client, model_name = tracker.client, cfg.registered_model
    log.info("workflow %s: MLflow %s; storage %s", cfg.name, tracking, storage_root)

    # ---------------------------------------------------------------- ingest
    manifest = cfg.data.input or str(build_corpus(work / "samples", CorpusConfig(
        digits_per_class=cfg.data.digits_per_class, gaussians_per_asset=cfg.data.gaussians_per_asset)))
    shards = storage.join(storage_root, "shards")
    icfg = dataclasses.replace(cfg.ingest, input=manifest, output=shards).validate()
    digest = hashlib.sha1(storage.read_bytes(manifest)).hexdigest() if manifest.endswith((".jsonl", ".csv", ".parquet")) else manifest
    step = tracker.start_step("ingest", step_key("ingest", dataclasses.asdict(icfg), digest), dataclasses.asdict(icfg), tags,
                              description=f"Ray Data ingestion of {manifest} into Arrow shards at {shards}")
    if step.skipped:
        log.info("ingest: finished earlier (run %s); skipped", step.run_id)
    else:
        log.info("ingest: %s -> %s", manifest, shards)
        summary = run_ingest(icfg)
        tracker.metrics(step, {"samples_written": summary["samples_written"], "rejected": summary["rejected"],
                               "frames_per_s": summary["frames_per_s"] or 0, "wall_s": summary["wall_s"]})
        with tempfile.TemporaryDirectory() as d:
            for f in ("index.json", "summary.json"):
                Path(d, f).write_bytes(storage.read_bytes(storage.join(shards, f)))
                tracker.artifact(step, str(Path(d, f)), "ingest")
        tracker.outputs(step, {"shards": shards, "rows": summary["samples_written"]})
        tracker.finish(step, description=f"{summary['samples_written']} samples written, {summary['rejected']} rejected "
                                         f"(quarantine: {summary['quarantine']}), {summary['wall_s']} s")
        log.info("ingest: %d samples written, %d rejected (%s s)", summary["samples_written"], summary["rejected"], summary["wall_s"])
    index_digest = hashlib.sha1(json.dumps(read_index(shards)["shards"], sort_keys=True).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- stages
    rows, previous, prev_eval_key, init_version, init_export = [], None, None, None, ""
    for i, spec in enumerate(cfg.curriculum.stages):
        n = spec.stage
        if n > cfg.stop_after:
            break
        if n < cfg.start_stage:
            continue
        tc = cfg.stage_train_config(i)
        if init_export:
            tc.model.init_from, tc.model.init_official, tc.model.siglip2_path = init_export, "", ""
        key = train_key(tc, index_digest, init_version)
        tc.data.shards, tc.run.storage, tc.run.name = shards, storage.join(storage_root, "runs"), f"stage{n}-{key[:10]}"
        tc.validate()
        version, export = _train_step(tracker, tc, key, init_version, tags, model_name)
        metrics, eval_key, eval_dir = _eval_step(tracker, cfg, n, version, key, export, shards, work, tags, model_name)
        fails = _promote_step(tracker, cfg, n, version, eval_key, prev_eval_key, metrics, previous, tc.tasks, tags, model_name)
        rows.append({"stage": n, "version": version, "metrics": metrics, "gates": "pass" if not fails else "FAIL",
                     "eval_dir": eval_dir})
        if fails:
            report = "\n  ".join(fails)
            log.error("stage %d: gates failed; aliases stage%d and champion not moved:\n  %s", n, n, report)
            tracker.finish_workflow("FAILED")
            _with_aliases(rows, client, model_name)
            print_summary(rows, work, tracking, time.time() - t0, log_file, ray_logs)
            raise GateFailed(f"stage {n} (version {version}) failed its gates:\n  {report}")
        previous, prev_eval_key, init_version, init_export = metrics, eval_key, version, export
    tracker.finish_workflow()
    _with_aliases(rows, client, model_name)
    summary = {"rows": rows, "wall_s": round(time.time() - t0, 1), "tracking_uri": tracking, "work_dir": str(work)}
    print_summary(rows, work, tracking, summary["wall_s"], log_file, ray_logs)
    return summary


def _submission_id() -> str:
    """The id `ray job submit` printed (what `ray job status / logs` take); empty outside a Ray job."""
    try:
        conf = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        return ""
    return str(conf.get("metadata", {}).get("job_submission_id", ""))


def _ray_log_dir() -> str:
    try:
        import ray

        return str(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except Exception:  # a remote cluster: its logs live on its nodes
        return "the cluster's Ray dashboard / ray logs"


def _train_step(tracker: Tracker, tc: TrainConfig, key: str, init_version: str | None, tags: dict, model_name: str):
    n = tc.stage
    start = (tc.model.init_from or (f"official checkpoint {tc.model.init_official} ({tc.model.official_variant})"
                                    if tc.model.init_official else f"a fresh {tc.model.preset} model"))
    step = tracker.start_step(f"stage{n}.train", key, dataclasses.asdict(tc),
                              {**tags, "atoken.stage": str(n), "atoken.init_version": str(init_version)},
                              description=f"Stage {n}: {tc.steps} steps of {', '.join(tc.tasks)} from {start}.")
    if step.skipped:
        log.info("stage %d train: finished earlier (run %s, version %s); skipped", n, step.run_id, step.outputs["version"])
        return step.outputs["version"], step.outputs["export"]
    log.info("stage %d train: %d steps of %s from %s (%s)", n, tc.steps, "+".join(tc.tasks), start, tc.run.name)
    with tracker.system_metrics(step):
        res = run_stage(tc, callbacks=[LiveMetrics(tracker.tracking_uri, step.run_id, tc.steps)],
                        on_report=StageProgress(n, tc.steps))
    tracker.params(step, {f"start.{k}": v for k, v in _flat(res.start).items()})
    version = register_version(tracker, step, model_name, _local_copy(res.export), {
        "stage": n, "export": res.export, "checkpoint": res.checkpoint, "init_version": init_version})
    promote(tracker.client, model_name, version, f"stage{n}-candidate")
    tracker.outputs(step, {"version": version, "export": res.export, "checkpoint": res.checkpoint,
                           "resumed_from_step": res.resumed_from_step})
    last = res.metrics
    tracker.finish(step, description=f"Stage {n}: {tc.steps} steps of {', '.join(tc.tasks)} from {start}; registered "
                                     f"{model_name} v{version}. Last report: {last.get('tokens_per_s', 0):.0f} tokens/s, "
                                     f"data wait {100 * last.get('data_wait_fraction', 0):.1f}%, {res.wall_s} s.")
    log.info("stage %d train: done in %.0f s; registered %s version %s", n, res.wall_s, model_name, version)
    return version, res.export


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _eval_step(tracker, cfg: WorkflowConfig, n: int, version: str, train_key_: str, export: str, shards: str,
               work: Path, tags: dict, model_name: str):
    key = step_key("eval", dataclasses.asdict(cfg.eval), train_key_, version)
    eval_dir = str(work / "eval" / f"stage{n}-{key[:10]}")
    step = tracker.start_step(f"stage{n}.eval", key, dataclasses.asdict(cfg.eval), {**tags, "atoken.stage": str(n)},
                              description=f"Evaluation of {model_name} v{version} on the eval split.")
    if step.skipped:
        log.info("stage %d eval: finished earlier (run %s); skipped", n, step.run_id)
        return json.loads(step.outputs["metrics"]), key, step.outputs["eval_dir"]
    log.info("stage %d eval: %s v%s", n, model_name, version)
    metrics = evaluate(export, shards, eval_dir, cfg.eval)
    nums = _numbers(metrics)
    tracker.metrics(step, {f"eval/{k}": v for k, v in nums.items()})
    tracker.images(step, eval_dir, f"stage{n}")
    tracker.artifact(step, str(Path(eval_dir, "eval.json")), "eval")
    text = describe_version(n, nums)
    describe = f"Stage {n} evaluation of v{version}.\n\n{text}"
    tracker.client.update_model_version(model_name, version, description=describe)
    for k, v in nums.items():
        tracker.client.set_model_version_tag(model_name, version, f"metric.{k}", f"{v:.4g}")
    tracker.outputs(step, {"metrics": json.dumps(nums), "eval_dir": eval_dir})
    tracker.finish(step, description=describe)
    log.info("stage %d eval: %s", n, eval_line(nums))
    return nums, key, eval_dir


def _promote_step(tracker, cfg: WorkflowConfig, n: int, version: str, eval_key: str, prev_eval_key: str | None,
                  metrics: dict, previous: dict | None, tasks: list[str], tags: dict, model_name: str) -> list[str]:
    g = cfg.curriculum.gates
    key = step_key("promote", dataclasses.asdict(g), eval_key, prev_eval_key)
    step = tracker.start_step(f"stage{n}.promote", key, dataclasses.asdict(g), {**tags, "atoken.stage": str(n)},
                              description=f"Gates of stage {n} for {model_name} v{version}.")
    if step.skipped:
        fails = json.loads(step.outputs.get("gate_failures", "[]"))
        log.info("stage %d promote: decided earlier (run %s): %s; skipped", n, step.run_id, "pass" if not fails else "FAIL")
        return fails
    fails = check_gates(g, metrics, previous, tasks)
    if not fails:
        promote(tracker.client, model_name, version, f"stage{n}")
        promote(tracker.client, model_name, version, "champion")
    tracker.outputs(step, {"version": version, "passed": not fails, "gate_failures": json.dumps(fails)})
    verdict = (f"All gates passed: {model_name}@stage{n} and @champion -> v{version}." if not fails else
               "Not promoted; failed gates:\n" + "\n".join(f"- {f}" for f in fails))
    tracker.finish(step, description=verdict)
    log.info("stage %d promote: %s", n, "gates pass; champion -> v" + version if not fails else "gates FAIL")
    return fails


def eval_line(m: dict) -> str:
    """One console line: each measured modality beside what its gate compares it with."""
    parts = [f"{d} {m[f'image/{d}/psnr']:.2f} dB (floor {image_floor(m, d)[0]} {image_floor(m, d)[1]:.2f})"
             for d in image_datasets(m)]
    if "video/psnr" in m:
        name, floor = video_floor(m)
        parts.append(f"video {m['video/psnr']:.2f} ({name} {floor:.2f})")
    if "3d/psnr" in m:
        parts.append(f"3D {m['3d/psnr']:.2f} (background {m['3d/background_psnr']:.2f})")
    for k in sorted(k for k in m if k.endswith("/linear_probe_acc")):
        ds = k.split("/")[1]
        parts.append(f"{ds} probe {m[k]:.2f} (random encoder {m.get(f'und/{ds}/probe_random_encoder', float('nan')):.2f}, "
                     f"pixels {m.get(f'und/{ds}/probe_pixels', float('nan')):.2f}), 0-shot {m.get(f'und/{ds}/zero_shot_acc', float('nan')):.2f}")
    for mod in ("image", "video", "3d"):
        pre = f"und/{mod}_retrieval/"
        if pre + "v2t_r1" in m:
            parts.append(f"{mod}->text R@1 {m[pre + 'v2t_r1']:.2f} (random encoder {m[pre + 'random_encoder_v2t_r1']:.2f}, "
                         f"chance {m[pre + 'v2t_chance_r1']:.2f})")
    return "; ".join(parts) or "nothing measured"


def _with_aliases(rows: list[dict], client, model: str) -> None:
    """Each row's aliases as the registry holds them at the end."""
    for r in rows:
        mv = client.get_model_version(model, r["version"])
        r["aliases"] = sorted(getattr(mv, "aliases", []) or [])


def summary_table(rows: list[dict]) -> list[str]:
    f = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    head = (f"{'stage':<6}{'ver':<5}{'images: PSNR / floor (dataset)':<44}{'video / floor':>15}{'3D / bg':>14}"
            f"{'probe / random':>16}{'video->text':>13}  {'gates':<6}aliases")
    lines = [head]
    for r in rows:
        m = r["metrics"]
        imgs = "  ".join(f"{f(m[f'image/{d}/psnr'])}/{f(image_floor(m, d)[1])} {d}" for d in image_datasets(m))
        vid = f"{f(m.get('video/psnr'))}/{f(video_floor(m)[1])}"
        threed = f"{f(m.get('3d/psnr'))}/{f(m.get('3d/background_psnr'))}"
        probe_key = next((k for k in sorted(m) if k.endswith("/linear_probe_acc")), "")
        ds = probe_key.split("/")[1] if probe_key else ""
        probe = f"{f(m.get(probe_key))}/{f(m.get(f'und/{ds}/probe_random_encoder'))}" if probe_key else "-"
        v2t = f"{f(m.get('und/video_retrieval/v2t_r1'))}/{f(m.get('und/video_retrieval/random_encoder_v2t_r1'))}"
        lines.append(f"{r['stage']:<6}{r['version']:<5}{imgs:<44}{vid:>15}{threed:>14}{probe:>16}{v2t:>13}  "
                     f"{r['gates']:<6}{','.join(r.get('aliases', []))}")
    return lines


def print_summary(rows: list[dict], work: Path, tracking: str, wall: float, log_file=None, ray_logs: str = "") -> None:
    lines = ["", "summary (PSNR in dB against the baselines the gates compare with; probe and video->text R@1 "
             "against a random encoder):", *summary_table(rows)]
    ui = (f"mlflow ui --backend-store-uri {tracking}" if tracking.startswith("sqlite:") else tracking)
    lines += [f"pictures: {work / 'eval'}/<stage>/*.png", f"MLflow:   {ui}",
              f"logs:     {log_file or work / 'logs'}; workers: {ray_logs}", f"wall:     {wall:.0f} s"]
    print("\n".join(lines), flush=True)


def status(cfg: WorkflowConfig) -> str:
    """The workflow's steps with state, key metrics, versions and aliases; a running stage's progress."""
    from orchestration.tracking import workflow_status

    return workflow_status(cfg.resolved_tracking_uri(), cfg.name, cfg.registered_model)

