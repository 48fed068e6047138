"""The one config tree of `atoken run` (Hydra groups in conf/{data,model,curriculum,cluster}).

    name, work_dir, tracking_uri, registered_model, start_stage, stop_after, verbose
    data        the offline sample corpus (when no input is given)
    ingest      pipelines.config.IngestConfig: the Ray Data job (input / output are set by the workflow)
    train       trainers.config.TrainConfig: every stage's training config
    curriculum  stages: each a partial override of `train` (any leaf, plus its `stage` number); gates
    eval        what the evaluation step measures
    cluster     where it runs: Ray address, storage root, local CPUs

A stage's resolved training config is `train` with the stage's set leaves merged over it
(`stage_train_config`). Everything is validated before any work starts, and errors name the key as it
is written on the command line (`curriculum.stages.1.optim.lr`, `train.scaling.num_workers`).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from orchestration.gates import Gates
from pipelines.config import IngestConfig
from trainers.config import ConfigError, TrainConfig
from trainers.evaluate import EvalConfig


def partial_of(cls, required: dict[str, type] | None = None):
    """A dataclass with `cls`'s tree where every leaf is Optional and unset (None): a partial override.
    Nested sections stay (all unset), so `curriculum.stages.0.losses.mse=1` needs no `+`."""
    hints = typing.get_type_hints(cls)
    out = [(k, t) for k, t in (required or {}).items()]  # no default: OmegaConf's '???', must be set
    for f in dataclasses.fields(cls):
        if f.name in (required or {}):
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            sub = partial_of(t)
            out.append((f.name, sub, field(default_factory=sub)))
        else:
            out.append((f.name, typing.Optional[t], field(default=None)))
    return dataclasses.make_dataclass(f"Partial{cls.__name__}", out)


StageOverride = partial_of(TrainConfig, required={"stage": int})


def set_leaves(node, prefix: str = "") -> dict[str, object]:
    """Dotted keys of the leaves a partial override sets (not None)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(set_leaves(v, key + "."))
        elif v is not None:
            out[key] = v
    return out


def _unset_removed(node) -> dict:
    """A partial override as a nested dict of its set leaves only."""
    out = {}
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            sub = _unset_removed(v)
            if sub:
                out[f.name] = sub
        elif v is not None:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


@dataclass
class DataGroup:
    input: str = ""  # manifest or folder; empty: build the offline sample corpus under work_dir
    digits_per_class: int = 500
    gaussians_per_asset: int = 600


@dataclass
class CurriculumGroup:
    stages: list[StageOverride] = field(default_factory=list)
    gates: Gates = field(default_factory=Gates)


@dataclass
class ClusterGroup:
    ray_address: str = ""  # empty: local Ray (or RAY_ADDRESS when set by `ray job submit`)
    storage: str = ""  # shards, checkpoints, exports; empty: <work_dir>/storage
    num_cpus: int = 0  # local Ray only; 0: all


@dataclass
class WorkflowConfig:
    name: str = "atoken-curriculum"
    work_dir: str = "atoken-work"
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite under work_dir
    registered_model: str = "atoken"
    start_stage: int = 1  # first stage to run (e.g. 3 with train.model.init_official: fine-tune from So/C)
    stop_after: int = 4  # last stage to run
    verbose: bool = False  # full Ray / DeepSpeed / worker logs on the console (they always go to work_dir/logs)
    data: DataGroup = field(default_factory=DataGroup)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumGroup = field(default_factory=CurriculumGroup)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterGroup = field(default_factory=ClusterGroup)

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI: the setting, else MLflow's standard environment variable (set on the
        cluster's head, infra/k8s/raycluster.yaml), else a sqlite file under work_dir."""
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{Path(self.work_dir).resolve() / 'mlflow.db'}")

    def stage_train_config(self, index: int) -> TrainConfig:
        """`train` with curriculum stage `index`'s set leaves merged over it (not yet validated; the
        workflow fills data.shards, run.*, model.init_from)."""
        base = OmegaConf.structured(self.train)
        over = OmegaConf.create(_unset_removed(self.curriculum.stages[index]))
        return OmegaConf.to_object(OmegaConf.merge(base, over))

    def stage_key_name(self, index: int, key: str) -> str:
        """The command-line name of a training key for stage `index`: the stage's own override when it
        sets that leaf, else the shared `train` node."""
        if key in set_leaves(self.curriculum.stages[index]):
            return f"curriculum.stages.{index}.{key}"
        return f"train.{key}"

    def validate(self) -> "WorkflowConfig":
        stages = self.curriculum.stages
        if not stages:
            raise ValueError("curriculum.stages is empty (pick a curriculum: curriculum=cpu_smoke or paper)")
        seen = [s.stage for s in stages]
        for i, n in enumerate(seen):
            if n not in (1, 2, 3, 4):
                raise ValueError(f"curriculum.stages.{i}.stage: {n} is not one of 1, 2, 3, 4")
        if seen != sorted(seen) or len(set(seen)) != len(seen):
            raise ValueError(f"curriculum.stages: stage numbers must increase, got {seen}")
        if not 1 <= self.start_stage <= self.stop_after <= 4:
            raise ValueError(f"start_stage={self.start_stage}, stop_after={self.stop_after}: need 1 <= start <= stop <= 4")
        for i in range(len(stages)):
            tc = self.stage_train_config(i)
            try:
                tc.validate(need_shards=False)
            except ConfigError as e:
                raise ValueError(f"{self.stage_key_name(i, e.key)}: {e.why}") from None
            self._check_model_source(i, tc)
        try:
            self.eval.validate()
        except ConfigError as e:
            raise ValueError(f"eval.{e.key}: {e.why}") from None
        ing = dataclasses.replace(self.ingest, input=self.ingest.input or "<set by the workflow>",
                                  output=self.ingest.output or "<set by the workflow>")
        try:
            ing.validate()
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith("ingest") else f"ingest.{msg}") from None
        return self

    def _check_model_source(self, i: int, tc: TrainConfig) -> None:
        m = tc.model
        from atoken.config import PRESETS

        if m.preset not in PRESETS:
            raise ValueError(f"{self.stage_key_name(i, 'model.preset')}: {m.preset!r}; choose one of {sorted(PRESETS)}")
        if m.init_official:
            from atoken.official import VARIANTS

            if m.official_variant not in VARIANTS:
                raise ValueError(f"{self.stage_key_name(i, 'model.official_variant')}: {m.official_variant!r}; "
                                 f"choose one of {sorted(VARIANTS)} (the 3D Gaussian decoder is attached to a "
                                 "converted model, docs/model.md)")
        if self.start_stage > 1 and not m.init_official:
            raise ValueError("start_stage > 1 needs train.model.init_official (the checkpoint the stage starts from)")

    def resolved_yaml(self) -> str:
        """The composed tree, stages showing only what they override (`atoken run --cfg job`)."""
        tree = OmegaConf.to_container(OmegaConf.structured(self))
        tree["curriculum"]["stages"] = [_unset_removed(s) for s in self.curriculum.stages]
        return OmegaConf.to_yaml(tree)
