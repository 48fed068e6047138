"""MLflow: one parent run per workflow, one child run per step, and the model registry with aliases.

A step's child run carries its step key (a hash of its resolved config and its inputs' versions) as a
tag; a finished child run with the same key is reused, which is how a rerun skips finished steps.
Aliases move through `promote`, which records each alias's previous holders so `rollback` can restore
them (MLflow stages are deprecated since 2.9; aliases and tags replace them).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

KIND, WORKFLOW_KEY, STEP, STEP_KEY, PARENT = "atoken.kind", "atoken.workflow_key", "atoken.step", "atoken.step_key", "mlflow.parentRunId"
NOTE = "mlflow.note.content"  # the run description the MLflow UI shows and edits
# MLflow 3.x's UI opens an experiment on its GenAI overview unless the experiment says it is a training one
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


@dataclass
class Step:
    name: str
    key: str
    run_id: str
    skipped: bool
    outputs: dict = field(default_factory=dict)


class Tracker:
    def __init__(self, tracking_uri: str, experiment: str, workflow_key: str, artifact_location: str | None = None):
        mlflow.set_tracking_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location)
        self.client.set_experiment_tag(self.experiment_id, *EXPERIMENT_KIND)
        found = self.client.search_runs([self.experiment_id], f"tags.`{KIND}` = 'workflow' and tags.`{WORKFLOW_KEY}` = '{workflow_key}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.parent = found[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
        else:
            self.parent = self.client.create_run(self.experiment_id, tags={KIND: "workflow", WORKFLOW_KEY: workflow_key},
                                                 run_name=f"workflow-{workflow_key[:8]}").info.run_id

    def start_step(self, name: str, key: str, config: dict, tags: dict[str, str], description: str = "") -> Step:
        runs = self.client.search_runs([self.experiment_id], f"tags.`{PARENT}` = '{self.parent}' and tags.`{STEP}` = '{name}' "
                                       f"and tags.`{STEP_KEY}` = '{key}'", order_by=["attributes.start_time DESC"])
        for r in runs:
            if r.info.status == "FINISHED":
                outputs = {k[len("output."):]: v for k, v in r.data.tags.items() if k.startswith("output.")}
                return Step(name, key, r.info.run_id, True, outputs)
        for r in runs:  # an interrupted earlier attempt
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, status="KILLED")
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT: self.parent, STEP: name, STEP_KEY: key, KIND: "step", NOTE: description,
                                           **tags})
        rid = run.info.run_id
        params = flatten(config)
        items = list(params.items())
        for i in range(0, len(items), 100):
            self.client.log_batch(rid, params=[mlflow.entities.Param(k[:250], v[:6000]) for k, v in items[i:i + 100]])
        import yaml

        with tempfile.TemporaryDirectory() as d:
            p = Path(d, "config.yaml")
            p.write_text(yaml.safe_dump(config, sort_keys=True))
            self.client.log_artifact(rid, str(p))
        return Step(name, key, rid, False)

    def metrics(self, step: Step, metrics: dict, at: int | None = None) -> None:
        clean = [mlflow.entities.Metric(k, float(v), int(time.time() * 1000), at or 0)
                 for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
        for i in range(0, len(clean), 500):
            self.client.log_batch(step.run_id, metrics=clean[i:i + 500])

    def outputs(self, step: Step, outputs: dict[str, str]) -> None:
        for k, v in outputs.items():
            self.client.set_tag(step.run_id, f"output.{k}", str(v))
        step.outputs.update({k: str(v) for k, v in outputs.items()})

    def artifact(self, step: Step, path: str, sub: str | None = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(step.run_id, path, sub)
        elif os.path.exists(path):
            self.client.log_artifact(step.run_id, path, sub)

    def params(self, step: Step, params: dict) -> None:
        items = [mlflow.entities.Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(step.run_id, params=items[i:i + 100])

    def images(self, step: Step, directory: str, stage: str) -> None:
        """Each picture as an MLflow image (key = picture name, step = stage number), so the UI's image
        panel compares the stages' pictures side by side."""
        from PIL import Image

        n = int("".join(c for c in stage if c.isdigit()) or 0)
        for p in sorted(Path(directory).glob("*.png")):
            self.client.log_image(step.run_id, Image.open(p).convert("RGB"), key=p.stem, step=n)

    def system_metrics(self, step: Step):
        """MLflow's system-metrics monitor (CPU, memory, GPU of this node) on a step's run while it runs."""
        import contextlib

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        @contextlib.contextmanager
        def monitor():
            m = SystemMetricsMonitor(step.run_id, sampling_interval=5, samples_before_logging=1)
            m.start()
            try:
                yield m
            finally:
                m.finish()

        return monitor()

    def finish(self, step: Step, status: str = "FINISHED", description: str | None = None) -> None:
        if description is not None:
            self.client.set_tag(step.run_id, NOTE, description)
        self.client.set_terminated(step.run_id, status=status)

    def finish_workflow(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status=status)


# ------------------------------------------------------------------------------------------ registry

def register_version(tracker: Tracker, step: Step, model_name: str, export_local: str, tags: dict[str, str]) -> str:
    """Logs the export as an MLflow pyfunc model in the step's run and registers a version (reusing one
    already registered for this step key, so a retried step never creates a duplicate)."""
    client = tracker.client
    try:
        existing = client.search_model_versions(f"name = '{model_name}' and tag.`{STEP_KEY}` = '{step.key}'")
    except Exception:
        existing = []
    if existing:
        return str(max(int(v.version) for v in existing))
    # the fluent API logs into the active experiment: make it the workflow's, whatever the caller set
    mlflow.set_experiment(experiment_id=tracker.experiment_id)
    with mlflow.start_run(run_id=step.run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("pyfunc.py")),  # models-from-code: no pickle
            artifacts={"export": export_local}, signature=pyfunc_signature(), input_example=pyfunc_input_example(),
            pip_requirements=["torch==2.13.0", "safetensors", "pillow", "numpy", "atoken-pipeline"])
    try:
        client.create_registered_model(model_name)
    except mlflow.exceptions.MlflowException:
        pass  # registered already
    # model_id: a tracking server (REST) refuses a models:/ source without it (the local store does not)
    version = str(client.create_model_version(model_name, info.model_uri, run_id=step.run_id,
                                              model_id=info.model_id).version)
    for k, v in {**tags, STEP_KEY: step.key}.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    describe_registered_model(client, model_name)
    return version


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]),
                          params=ParamSchema([ParamSpec("mode", "string", "encode")]))


def pyfunc_input_example():
    """One encoded 32x32 picture: what a client sends (bytes of a PNG) in the signature's `image` column."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[:, None, None], (1, 32, 3))).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()]})


ALIASES_DOC = """AToken tokenizer versions, one per curriculum stage of a workflow run (the version's tags say
which stage, from which version it started, and its evaluation metrics; its description lists them beside
their baselines).

Aliases:
- `stageN-candidate`: the version stage N registered, before its gates were checked.
- `stageN`: the version stage N promoted (every gate passed); stage N+1 starts from it.
- `champion`: the latest promoted version: what downstream users load (`models:/{name}@champion`).
Moved only by the workflow's promote steps or `atoken promote` / `atoken rollback` (which keeps each
alias's previous holders as the tag `alias_history.<alias>`)."""


def describe_registered_model(client: MlflowClient, name: str) -> None:
    client.update_registered_model(name, description=ALIASES_DOC.replace("{name}", name))


def alias_holder(client: MlflowClient, model: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except Exception:
        return None


def _history(client: MlflowClient, model: str, alias: str) -> list[str]:
    tags = client.get_registered_model(model).tags or {}
    return json.loads(tags.get(f"alias_history.{alias}", "[]"))


def promote(client: MlflowClient, model: str, version: str, alias: str) -> str | None:
    """Points `alias` at `version`, remembering the previous holder for rollback. Returns it."""
    client.get_model_version(model, str(version))  # raises if the version does not exist
    prev = alias_holder(client, model, alias)
    if prev == str(version):
        return prev
    if prev is not None:
        hist = _history(client, model, alias) + [prev]
        client.set_registered_model_tag(model, f"alias_history.{alias}", json.dumps(hist))
    client.set_registered_model_alias(model, alias, str(version))
    return prev


def rollback(client: MlflowClient, model: str, alias: str) -> str:
    """Moves `alias` back to its previous holder."""
    hist = _history(client, model, alias)
    if not hist:
        raise ValueError(f"alias {alias!r} of {model!r} has no previous holder to roll back to")
    prev = hist.pop()
    client.set_registered_model_alias(model, alias, prev)
    client.set_registered_model_tag(model, f"alias_history.{alias}", json.dumps(hist))
    return prev


# ------------------------------------------------------------------------------------- live metrics

try:
    from ray.train import UserCallback as _UserCallback
except ImportError:  # pragma: no cover - Ray Train V2 is the pinned default
    _UserCallback = object


class LiveMetrics(_UserCallback):
    """A Ray Train callback (run by the Train controller, driver side) that logs every report of a
    running stage to its MLflow step run as it arrives: losses, throughput, step-time breakdown."""

    def __init__(self, tracking_uri: str, run_id: str, steps: int):
        self.tracking_uri, self.run_id, self.steps = tracking_uri, run_id, steps
        self._client = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        m = metrics[0]  # rank 0's window (throughputs in it are totals over the ranks)
        step = int(m.get("step", 0))
        now = int(time.time() * 1000)
        batch = [mlflow.entities.Metric(f"train/{k}", float(v), now, step)
                 for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and v == v]
        batch.append(mlflow.entities.Metric("train/progress", step / max(self.steps, 1), now, step))
        for i in range(0, len(batch), 500):
            self._client.log_batch(self.run_id, metrics=batch[i:i + 500])


def describe_version(stage: int, m: dict) -> str:
    """Markdown lines of a stage's key metrics beside their baselines."""
    from orchestration.gates import image_datasets, image_floor, video_floor

    lines = []
    for ds in image_datasets(m):
        name, floor = image_floor(m, ds)
        lines.append(f"- images ({ds}, {int(m.get(f'image/{ds}/count', 0))}): PSNR {m[f'image/{ds}/psnr']:.2f} dB, "
                     f"{name} {floor:.2f}, mean colour {m.get(f'image/{ds}/mean_colour_psnr', float('nan')):.2f}; "
                     f"SSIM {m.get(f'image/{ds}/ssim', float('nan')):.3f} (PCA {m.get(f'image/{ds}/pca_ssim', float('nan')):.3f})")
    if "video/psnr" in m:
        name, floor = video_floor(m)
        lines.append(f"- video ({int(m.get('video/count', 0))}): PSNR {m['video/psnr']:.2f} dB, {name} {floor:.2f}, "
                     f"mean colour {m.get('video/mean_colour_psnr', float('nan')):.2f}")
    if "3d/psnr" in m:
        lines.append(f"- 3D held-out view: PSNR {m['3d/psnr']:.2f} dB, background-only render {m['3d/background_psnr']:.2f}")
    und = [f"{k[len('und/'):]} {m[k]:.3f}" for k in sorted(m) if k.startswith("und/") and k.endswith(("acc", "r1", "r5"))]
    if und:
        lines.append("- understanding: " + ", ".join(und))
    return "\n".join(lines)


def _running_progress(client: MlflowClient, run) -> str:
    """`step s/N, loss ..., tokens/s, ETA` of a running training step, from its live metrics."""
    m = run.data.metrics
    if "train/steps_total" not in m:
        return "starting"
    step, total = int(m.get("train/progress", 0) * m["train/steps_total"] + 0.5), int(m["train/steps_total"])
    losses = {k: v for k, v in m.items() if k.startswith("train/loss/") and k.endswith("/total")}
    loss = "  ".join(f"{k.split('/')[2]} {v:.4f}" for k, v in sorted(losses.items()))
    hist = client.get_metric_history(run.info.run_id, "train/progress")
    eta = ""
    if len(hist) >= 2:
        hist = sorted(hist, key=lambda x: x.timestamp)
        first, last = hist[0], hist[-1]
        rate = (last.value - first.value) / max((last.timestamp - first.timestamp) / 1000, 1e-6)
        if rate > 0:
            eta = f", ETA {max(0.0, (1 - last.value) / rate):.0f} s"
    return f"step {step}/{total}, {m.get('train/tokens_per_s', 0):.0f} tokens/s{eta}; {loss}"


def workflow_status(tracking_uri: str, experiment: str, registered_model: str) -> str:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return f"no workflow named {experiment!r} in {tracking_uri}"
    parents = client.search_runs([exp.experiment_id], f"tags.`{KIND}` = 'workflow'", order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not parents:
        return "no workflow runs yet"
    p = parents[0]
    steps = client.search_runs([exp.experiment_id], f"tags.`{PARENT}` = '{p.info.run_id}'", order_by=["attributes.start_time ASC"])
    lines = [f"workflow {experiment} run {p.info.run_id} [{p.info.status}]  (MLflow {tracking_uri})"]
    latest: dict[str, object] = {}
    for s in steps:  # the newest attempt of each step
        latest[s.data.tags.get(STEP, s.info.run_name)] = s
    for name, s in latest.items():
        m, t = s.data.metrics, s.data.tags
        detail = ""
        if name.endswith(".train"):
            detail = (_running_progress(client, s) if s.info.status == "RUNNING" else
                      f"v{t.get('output.version', '?')}, {m.get('train/tokens_per_s', 0):.0f} tokens/s")
        elif name.endswith(".eval"):
            keys = [k for k in m if k.endswith("/psnr") and "/pca" not in k and "mean_colour" not in k]
            detail = ", ".join(f"{k[5:]} {m[k]:.2f}" for k in sorted(keys)[:4])
        elif name.endswith(".promote"):
            fails = json.loads(t.get("output.gate_failures", "[]"))
            detail = "pass" if t.get("output.passed") == "True" else ("; ".join(fails) or "")
        lines.append(f"  {name:<16} {s.info.status:<9} {detail}")
        if s.info.status == "RUNNING" and t.get("atoken.log_dir"):
            lines.append(f"  {'':<16} logs: {t['atoken.log_dir']}")
    try:
        rm = client.get_registered_model(registered_model)
        aliases = sorted((a, v) for a, v in (rm.aliases or {}).items())
        lines.append("aliases: " + ", ".join(f"{a}->v{v}" for a, v in aliases))
    except Exception:
        lines.append("aliases: (no registered model yet)")
    return "\n".join(lines)
