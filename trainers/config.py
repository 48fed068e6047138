"""Typed config of one curriculum stage (a Hydra structured config in orchestration/conf). Validated
at start-up; messages name the bad key."""
from __future__ import annotations

from dataclasses import dataclass, field

from atoken.losses import LossWeights
from pipelines.config import check_custom_resources

TASKS = ("image_rec", "image_und", "video_rec", "video_und", "3d_rec", "3d_und")
TASK_MODALITY = {"image_rec": "image", "image_und": "image", "video_rec": "video", "video_und": "video",
                 "3d_rec": "3d", "3d_und": "3d"}


@dataclass
class ModelSection:
    preset: str = "tiny"
    init_from: str = ""  # a save_pretrained directory (the previous stage's export); empty: fresh init
    init_official: str = ""  # or an official checkpoint file (.pt / .safetensors)
    official_variant: str = "soc"
    siglip2_path: str = ""  # fresh init of the encoder from a local SigLIP2 directory
    latent_channels: int = 32  # 32 in stage 1, 48 after (grown at the switch)
    fsq: bool = False  # stage 4: discrete FSQ tokens
    gradient_checkpointing: bool = False


@dataclass
class DataSection:
    shards: str = ""  # the ingested shard folder URI
    # task sampling ratios (paper Table 2); tasks with ratio 0 are not scheduled
    ratios: dict[str, float] = field(default_factory=lambda: {"image_rec": 1.0, "image_und": 1.0})
    token_budget: int = 1024  # real tokens per worker per step (packed, not padded)
    max_tokens_per_sample: int = 1024  # larger samples are centre-cropped (images/videos) or subsampled (3D)
    read_cpus: float = 0.0  # per shard-read task: Arrow reads are I/O; samples decode in the train worker
    read_concurrency: int = 0  # shard-read tasks in flight per task stream; 0: one per training worker
    pool_size: int = 8  # look-ahead samples per task, refilled in the background while a step runs
    render_views: int = 2  # 3D: views rendered per sample for the Gaussian render loss
    render_resolution: int = 64
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 3e-4  # paper: warmup 2000 steps to 3e-4, cosine to 3e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    encoder_lr_mult: float = 0.1  # the pretrained encoder learns at 0.1x
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999


@dataclass
class LossSection(LossWeights):
    feature_network: str = "mobilenet_v2"  # mobilenet_v2 | siglip2 | none
    feature_network_path: str = ""
    feature_resolution: int = 224
    text_tower: str = "minilm"  # minilm | siglip2
    text_path: str = ""


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # ZeRO-3 keeps parameters smaller than this whole on every rank. -1 = auto: 0 on CPU/gloo, where
    # re-gathering the kept-whole parameters one by one after every optimizer step cost more than
    # gathering everything per module (measured on the tiny preset: optimizer phase 0.09 -> 0.02 s/step,
    # docs/benchmarks.md); DeepSpeed's default 1e5 on GPU.
    zero_persistence_threshold: int = -1
    # Custom Ray resources each training worker also asks for, e.g. {train_node: 0.001} to pin workers
    # to the GPU node type that advertises it (infra/ray/cluster-aws.yaml).
    custom_resources: dict[str, float] = field(default_factory=dict)

    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one training worker, as the TorchTrainer requests them."""
        res = {"CPU": self.cpus_per_worker, **self.custom_resources}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass
class RunSection:
    storage: str = "atoken-work/runs"  # fsspec URI (local path or s3://)
    name: str = "stage1"
    max_failures: int = 2
    keep_checkpoints: int = 2
    checkpoint_every: int = 10
    report_every: int = 5


@dataclass
class StageConfig:
    stage: int = 1
    steps: int = 40
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    losses: LossSection = field(default_factory=LossSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> "StageConfig":
        def bad(key: str, why: str) -> None:
            raise ValueError(f"stage config: {key}: {why}")

        if self.stage not in (1, 2, 3, 4):
            bad("stage", f"{self.stage} is not one of 1, 2, 3, 4")
        if self.steps < 1:
            bad("steps", "must be >= 1")
        unknown = sorted(set(self.data.ratios) - set(TASKS))
        if unknown:
            bad("data.ratios", f"unknown tasks {unknown}; known: {list(TASKS)}")
        if not any(v > 0 for v in self.data.ratios.values()) or any(v < 0 for v in self.data.ratios.values()):
            bad("data.ratios", "needs at least one positive ratio and none negative")
        if not self.data.shards:
            bad("data.shards", "is required (the ingested shard folder)")
        if self.data.read_concurrency < 0:
            bad("data.read_concurrency", "must be >= 0 (0: one read in flight per training worker)")
        if self.data.token_budget < 16:
            bad("data.token_budget", "must be >= 16")
        if self.model.fsq and self.model.latent_channels != 48:
            bad("model.latent_channels", "FSQ needs 48 latent channels (8 codebooks x 6 dims)")
        if self.scaling.num_workers < 1:
            bad("scaling.num_workers", "must be >= 1")
        check_custom_resources(self.scaling.custom_resources, "stage config: scaling.custom_resources")
        if self.scaling.zero_persistence_threshold < -1:
            bad("scaling.zero_persistence_threshold", "must be -1 (auto) or >= 0 parameter elements")
        if self.scaling.precision not in ("auto", "fp32", "bf16"):
            bad("scaling.precision", "choose auto, fp32 or bf16")
        if not 0 <= self.optim.ema_decay < 1:
            bad("optim.ema_decay", "must be in [0, 1)")
        if self.optim.warmup_steps < 0 or self.optim.lr <= 0:
            bad("optim", "lr must be > 0 and warmup_steps >= 0")
        if self.losses.feature_network not in ("mobilenet_v2", "siglip2", "none"):
            bad("losses.feature_network", "choose mobilenet_v2, siglip2 or none")
        if self.run.checkpoint_every < 1 or self.run.report_every < 1:
            bad("run", "checkpoint_every and report_every must be >= 1")
        self.losses.validate()
        return self

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if self.data.ratios.get(t, 0) > 0]
