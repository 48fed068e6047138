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
        self.client = MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location)
        found = self.client.search_runs([self.experiment_id], f"tags.`{KIND}` = 'workflow' and tags.`{WORKFLOW_KEY}` = '{workflow_key}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.parent = found[0].info.run_id
            self.client.update_run(self.parent, status="RUNNING")
        else:
            self.parent = self.client.create_run(self.experiment_id, tags={KIND: "workflow", WORKFLOW_KEY: workflow_key},
                                                 run_name=f"workflow-{workflow_key[:8]}").info.run_id

    def start_step(self, name: str, key: str, config: dict, tags: dict[str, str]) -> Step:
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
                                     tags={PARENT: self.parent, STEP: name, STEP_KEY: key, KIND: "step", **tags})
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
        clean = [mlflow.entities.Metric(k.replace("/", "."), float(v), int(time.time() * 1000), at or 0)
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

    def finish(self, step: Step, status: str = "FINISHED") -> None:
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
    from orchestration.pyfunc import ATokenPyfunc

    # the fluent API logs into the active experiment: make it the workflow's, whatever the caller set
    mlflow.set_experiment(experiment_id=tracker.experiment_id)
    with mlflow.start_run(run_id=step.run_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=ATokenPyfunc(), artifacts={"export": export_local},
                                       pip_requirements=["torch==2.13.0", "safetensors", "pillow", "numpy"],
                                       registered_model_name=model_name)
    version = str(info.registered_model_version)
    for k, v in {**tags, STEP_KEY: step.key}.items():
        client.set_model_version_tag(model_name, version, k, str(v))
    return version


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
