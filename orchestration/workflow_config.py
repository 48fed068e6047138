"""Typed config of the curriculum workflow (`atoken run`); Hydra groups in conf/{data,model,curriculum,cluster}."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DataGroup:
    input: str = ""  # manifest or folder; empty: build the offline sample corpus under work_dir
    digits_per_class: int = 20
    gaussians_per_asset: int = 600
    ingest_overrides: list[str] = field(default_factory=lambda: [
        "image.max_side=64", "video.frames_per_clip=8", "video.max_clips_per_video=1", "video.max_side=64",
        "threed.views=4", "threed.resolution=64", "threed.grid=8"])


@dataclass
class ModelGroup:
    preset: str = "tiny"
    init_official: str = ""  # an official checkpoint (.pt / .safetensors, local or s3://) the first run stage starts from
    official_variant: str = "soc"  # soc (So/C, latent 48) | sod (So/D, FSQ) | soc-s1 (stage 1, latent 32); size = preset
    siglip2_path: str = ""


@dataclass
class StageSpec:
    stage: int = 1
    steps: int = 6
    ratios: dict[str, float] = field(default_factory=dict)
    latent_channels: int = 32
    fsq: bool = False


@dataclass
class Gates:
    """A stage is promoted only if every gate passes. Absolute floors and drops relative to the stage it
    starts from (None disables a gate)."""
    min_image_psnr: float | None = 5.0
    max_image_psnr_drop: float | None = 6.0
    min_video_psnr: float | None = None
    min_3d_psnr: float | None = None
    beat_pca_floor: bool = False  # image PSNR must exceed the linear PCA codec's


@dataclass
class CurriculumGroup:
    stages: list[StageSpec] = field(default_factory=list)
    token_budget: int = 256
    max_tokens_per_sample: int = 256
    lr: float = 1e-3
    warmup_steps: int = 2
    checkpoint_every: int = 3
    feature_resolution: int = 64
    eval_items: int = 16
    gates: Gates = field(default_factory=Gates)


@dataclass
class ClusterGroup:
    ray_address: str = ""  # empty: local Ray (or RAY_ADDRESS when set by `ray job submit`)
    storage: str = ""  # shards, checkpoints, exports; empty: <work_dir>/storage
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.9
    gpus_per_worker: float = 1.0
    num_cpus: int = 0  # local Ray only; 0: all
    zero_persistence_threshold: int = -1  # ZeRO-3 kept-whole parameter size; -1: auto (0 on CPU, 1e5 on GPU)
    # Custom Ray resources that steer work onto node types (names must match infra/ray/cluster-aws.yaml
    # and infra/k8s/raycluster.yaml): CPU ingest tasks and training workers.
    ingest_resources: dict[str, float] = field(default_factory=dict)
    train_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class WorkflowConfig:
    name: str = "atoken-curriculum"
    work_dir: str = "atoken-work"
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite under work_dir
    registered_model: str = "atoken"
    data: DataGroup = field(default_factory=DataGroup)
    model: ModelGroup = field(default_factory=ModelGroup)
    curriculum: CurriculumGroup = field(default_factory=CurriculumGroup)
    cluster: ClusterGroup = field(default_factory=ClusterGroup)
    start_stage: int = 1  # first stage to run (e.g. 3 with model.init_official: fine-tune from So/C)
    stop_after: int = 4  # last stage to run

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI: the setting, else MLflow's standard environment variable (set on the
        cluster's head, infra/k8s/raycluster.yaml), else a sqlite file under work_dir."""
        return (self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{Path(self.work_dir).resolve() / 'mlflow.db'}")

    def validate(self) -> "WorkflowConfig":
        if not self.curriculum.stages:
            raise ValueError("curriculum.stages is empty (pick a curriculum: curriculum=cpu_smoke or paper)")
        seen = [s.stage for s in self.curriculum.stages]
        if seen != sorted(seen) or len(set(seen)) != len(seen):
            raise ValueError(f"curriculum.stages must be in increasing stage order, got {seen}")
        if not 1 <= self.start_stage <= self.stop_after <= 4:
            raise ValueError(f"start_stage={self.start_stage}, stop_after={self.stop_after}: need 1 <= start <= stop <= 4")
        if self.model.init_official:
            from atoken.official import VARIANTS

            if self.model.official_variant not in VARIANTS:
                raise ValueError(f"model.official_variant={self.model.official_variant!r}: choose one of "
                                 f"{sorted(VARIANTS)} (the 3D Gaussian decoder is attached to a converted model, "
                                 "docs/model.md)")
        if self.start_stage > 1 and not self.model.init_official:
            raise ValueError("start_stage > 1 needs model.init_official (the checkpoint the stage starts from)")
        return self
