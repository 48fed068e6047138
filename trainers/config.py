"""The training config of one curriculum stage: a typed tree whose sections each belong to one trainer
component (model start, data, optimiser, losses, scaling, checkpoints and reports).

The workflow holds one of these as `train` and every curriculum stage as a partial override of it
(orchestration/workflow_config.py); `validate` raises `ConfigError` with the key relative to this tree,
so the caller can name the key as the user wrote it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch

from atoken.losses import LossWeights
from pipelines.config import check_custom_resources

TASKS = ("image_rec", "image_und", "video_rec", "video_und", "3d_rec", "3d_und")
TASK_MODALITY = {"image_rec": "image", "image_und": "image", "video_rec": "video", "video_und": "video",
                 "3d_rec": "3d", "3d_und": "3d"}


class ConfigError(ValueError):
    """A bad config value; `key` is dotted, relative to the tree that validated it."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def _bad(key: str, why: str) -> None:
    raise ConfigError(key, why)


# zero_optimization keys that have their own place in this tree (one way to set each), or that break training
_ZERO_OWNED = {"stage": "ZeRO stage 3 is the trainer's design", "stage3_param_persistence_threshold":
               "set scaling.zero_persistence_threshold", "param_persistence_threshold": "set scaling.zero_persistence_threshold",
               "stage3_module_granularity_threshold": "DeepSpeed's automatic leaves take in the stage's whole module, "
               "whose gradients it then never reduces (two ranks trained on a flat loss); name the leaf classes in "
               "scaling.zero_leaf_modules (e.g. [TransformerBlock])"}


def _check_zero_overrides(overrides: dict) -> None:
    """DeepSpeed's own pydantic model of `zero_optimization` (unknown keys forbidden) names the bad key."""
    for k in overrides:
        if k in _ZERO_OWNED:
            _bad(f"scaling.zero_overrides.{k}", _ZERO_OWNED[k])
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(stage=3, **overrides)
    except ValidationError as e:
        err = e.errors()[0]
        _bad("scaling.zero_overrides." + ".".join(str(x) for x in err["loc"]), err["msg"])


@dataclass
class InitSection:
    """How a stage's starting model is made from its source (docs/model.md, "Initialisation")."""

    fresh: str = "pca"  # a fresh model: pca (start at the linear codec of the data) | zero | default
    growth: str = "data"  # latent growth: data (new channels from what the model misses) | zero
    fsq: str = "fit"  # FSQ switch: fit (per-channel gains fitted to the latents) | plain
    max_items: int = 256  # training items read for the data-dependent steps, per modality

    def validate(self) -> None:
        for key, value, choices in (("fresh", self.fresh, ("pca", "zero", "default")),
                                    ("growth", self.growth, ("data", "zero")), ("fsq", self.fsq, ("fit", "plain"))):
            if value not in choices:
                _bad(f"init.{key}", f"{value!r} is not one of {', '.join(choices)}")
        if self.max_items < 1:
            _bad("init.max_items", "must be >= 1")


@dataclass
class ModelSection:
    preset: str = "tiny"
    init_from: str = ""  # a save_pretrained directory (set by the workflow: the previous stage's export)
    init_official: str = ""  # an official checkpoint file (.pt / .safetensors, local or s3://)
    official_variant: str = "soc"  # soc (So/C, latent 48) | sod (So/D, FSQ) | soc-s1 (stage 1, latent 32)
    siglip2_path: str = ""  # a fresh model's encoder from a local SigLIP2 directory
    latent_channels: int = 32  # 32 in stage 1, 48 after (grown at the switch)
    fsq: bool = False  # stage 4: discrete FSQ tokens
    gradient_checkpointing: bool = False

    @property
    def pretrained_encoder(self) -> bool:
        return bool(self.init_official or self.siglip2_path)


@dataclass
class DataSection:
    shards: str = ""  # the ingested shard folder URI (set by the workflow)
    # task sampling ratios (paper Table 2); tasks with ratio 0 are not scheduled
    ratios: dict[str, float] = field(default_factory=lambda: {"image_rec": 1.0, "image_und": 1.0})
    token_budget: int = 1024  # real tokens per worker per step (packed, not padded)
    max_tokens_per_sample: int = 1024  # larger samples are centre-cropped (images/videos) or subsampled (3D)
    augment: bool = True  # random patch-grid offsets and flips for reconstruction's images and videos
    # rows in each stream's seeded shuffle buffer (Ray Data's local shuffle); 0: the shards' row order
    shuffle_buffer: int = 256
    # reconstruction tasks: per-row sampling rate by dataset (the manifest's `dataset`), e.g. {photos: 8}:
    # each photo is drawn 8x as often as a row of an unlisted dataset (1.0); 0 leaves a dataset out of
    # reconstruction. Empty: natural shares. Understanding tasks always use natural shares.
    rec_dataset_weights: dict[str, float] = field(default_factory=dict)
    min_und_samples: int = 4  # an understanding batch holds at least this many samples (its negatives)
    read_cpus: float = 0.0  # per shard-read task: Arrow reads are I/O; samples decode in the train worker
    read_concurrency: int = 0  # shard-read tasks in flight per task stream; 0: one per training worker
    # pause Ray Data's scheduling loop while a stream has no read in flight (pipelines/idle_backoff.py);
    # without it the loop spins through backpressure and took a third of the ranks' CPU on a 2-core node
    idle_stream_pause: bool = True
    pool_size: int = 8  # look-ahead samples per task, refilled in the background while a step runs
    render_views: int = 2  # 3D: views rendered per sample for the Gaussian render loss
    render_resolution: int = 64
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 3e-4  # paper: warmup 2000 steps to 3e-4, cosine to 3e-5
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr; 1.0 = constant after warm-up
    warmup_steps: int = 10
    encoder_lr_mult: float = -1.0  # -1 = auto: 0.1 for a pretrained encoder (paper), 1.0 for a fresh one
    # the sigmoid loss's temperature and bias: two scalars that must move by whole units (SigLIP starts
    # them at t' = log 10, b = -10); at lr 1e-3 Adam moves them ~1e-3 per step, too slow for short stages
    logit_lr_mult: float = 1.0
    # the Gaussian decoder (3D head): its render loss moves every Gaussian of a voxel at once; measured in
    # the smoke curriculum's stage 4 at lr 1e-3, 3D fell 23.3 -> 20.3 dB while video and photos gained
    gaussian_lr_mult: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.9999

    def encoder_multiplier(self, pretrained: bool) -> float:
        if self.encoder_lr_mult >= 0:
            return self.encoder_lr_mult
        return 0.1 if pretrained else 1.0


@dataclass
class LossSection(LossWeights):
    feature_network: str = "mobilenet_v2"  # mobilenet_v2 | siglip2 | none
    feature_network_path: str = ""
    feature_resolution: int = 224
    text_tower: str = "minilm"  # minilm | siglip2
    text_path: str = ""
    # the image-understanding teacher (paper: frozen SigLIP2; images then distil its image-text
    # similarities, KL at losses.distill_tau, weighted by losses.sem). none: images use the sigmoid loss
    # against the text tower like video and 3D (no installed package ships an image-text teacher)
    teacher: str = "none"  # none | siglip2
    teacher_path: str = ""


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # ZeRO-3 keeps parameters smaller than this whole on every rank. -1 = auto: 0 on CPU/gloo, where
    # re-gathering the kept-whole parameters one by one after every optimizer step cost more than
    # gathering everything per module (docs/benchmarks.md); DeepSpeed's default 1e5 on GPU.
    zero_persistence_threshold: int = -1
    threads_per_worker: int = 0  # torch / OpenMP threads in a training worker; 0: its CPUs (at least 1)
    # more keys of DeepSpeed's `zero_optimization` section, in DeepSpeed's names (e.g.
    # stage3_prefetch_bucket_size, stage3_max_live_parameters), set over the ones above; checked
    # against DeepSpeed's own config model at start-up
    zero_overrides: dict[str, Any] = field(default_factory=dict)
    # module classes of the model (atoken.layers / atoken.transformer, e.g. TransformerBlock) that ZeRO-3
    # gathers whole, with no hooks on their children (deepspeed.utils.set_z3_leaf_modules)
    zero_leaf_modules: list[str] = field(default_factory=list)
    fused_adam: bool = True  # GPU: DeepSpeed's FusedAdam (built into the image); false: torch's AdamW
    # Custom Ray resources each training worker also asks for, e.g. {train_node: 0.001} to pin workers
    # to the GPU node type that advertises it (infra/ray/cluster-aws.yaml).
    custom_resources: dict[str, float] = field(default_factory=dict)

    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one training worker, as the TorchTrainer requests them."""
        res = {"CPU": self.cpus_per_worker, **self.custom_resources}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res

    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def leaf_classes(self) -> list[type]:
        """The module classes `zero_leaf_modules` names, from atoken.layers or atoken.transformer."""
        import atoken.layers
        import atoken.transformer

        found = {n: getattr(atoken.layers, n, None) or getattr(atoken.transformer, n, None) for n in self.zero_leaf_modules}
        bad = [n for n, c in found.items() if not (isinstance(c, type) and issubclass(c, torch.nn.Module))]
        if bad:
            _bad("scaling.zero_leaf_modules", f"{', '.join(bad)}: no module class of atoken.layers or atoken.transformer")
        return list(found.values())


@dataclass
class RunSection:
    storage: str = "atoken-work/runs"  # fsspec URI (local path or s3://); the workflow sets it
    name: str = "stage1"  # the run's folder under storage; the workflow names it after the step key
    max_failures: int = 2
    keep_checkpoints: int = 2
    checkpoint_every: int = 100
    report_every: int = 10


@dataclass
class TrainConfig:
    stage: int = 1
    steps: int = 100
    model: ModelSection = field(default_factory=ModelSection)
    init: InitSection = field(default_factory=InitSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    losses: LossSection = field(default_factory=LossSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    run: RunSection = field(default_factory=RunSection)

    def validate(self, need_shards: bool = True) -> "TrainConfig":
        if self.stage not in (1, 2, 3, 4):
            _bad("stage", f"{self.stage} is not one of 1, 2, 3, 4")
        if self.steps < 1:
            _bad("steps", f"{self.steps}: must be >= 1")
        d = self.data
        unknown = sorted(set(d.ratios) - set(TASKS))
        if unknown:
            _bad("data.ratios", f"unknown tasks {unknown}; known: {list(TASKS)}")
        if not any(v > 0 for v in d.ratios.values()) or any(v < 0 for v in d.ratios.values()):
            _bad("data.ratios", "needs at least one positive ratio and none negative")
        if need_shards and not d.shards:
            _bad("data.shards", "is required (the ingested shard folder)")
        if any(v < 0 for v in d.rec_dataset_weights.values()):
            _bad("data.rec_dataset_weights", f"{dict(d.rec_dataset_weights)}: weights must be >= 0")
        if d.read_concurrency < 0:
            _bad("data.read_concurrency", "must be >= 0 (0: one read in flight per training worker)")
        if d.token_budget < 16:
            _bad("data.token_budget", f"{d.token_budget}: must be >= 16")
        if d.max_tokens_per_sample < 1:
            _bad("data.max_tokens_per_sample", "must be >= 1")
        if d.shuffle_buffer < 0:
            _bad("data.shuffle_buffer", f"{d.shuffle_buffer}: rows in the shuffle buffer, >= 0 (0: shard order)")
        if d.min_und_samples < 2:
            _bad("data.min_und_samples", f"{d.min_und_samples}: an understanding batch needs >= 2 samples "
                 "(its other samples are the negatives of the sigmoid loss)")
        if d.pool_size < d.min_und_samples:
            _bad("data.pool_size", f"{d.pool_size} < data.min_und_samples={d.min_und_samples}")
        if self.model.fsq and self.model.latent_channels != 48:
            _bad("model.latent_channels", "FSQ needs 48 latent channels (8 codebooks x 6 dims)")
        if self.model.latent_channels < 1:
            _bad("model.latent_channels", "must be >= 1")
        s = self.scaling
        if s.num_workers < 1:
            _bad("scaling.num_workers", f"{s.num_workers}: must be >= 1")
        if s.cpus_per_worker <= 0:
            _bad("scaling.cpus_per_worker", "must be > 0")
        try:
            check_custom_resources(s.custom_resources, "scaling.custom_resources")
        except ValueError as e:
            _bad("scaling.custom_resources", str(e).split(": ", 1)[-1])
        if s.zero_persistence_threshold < -1:
            _bad("scaling.zero_persistence_threshold", "must be -1 (auto) or >= 0 parameter elements")
        if s.precision not in ("auto", "fp32", "bf16"):
            _bad("scaling.precision", f"{s.precision!r}: choose auto, fp32 or bf16")
        if s.threads_per_worker < 0:
            _bad("scaling.threads_per_worker", "must be >= 0 (0: the worker's CPUs)")
        if s.zero_overrides:
            _check_zero_overrides(dict(s.zero_overrides))
        s.leaf_classes()
        o = self.optim
        if not 0 <= o.ema_decay < 1:
            _bad("optim.ema_decay", f"{o.ema_decay}: must be in [0, 1)")
        if o.lr <= 0:
            _bad("optim.lr", f"{o.lr}: must be > 0")
        if o.logit_lr_mult <= 0:
            _bad("optim.logit_lr_mult", "must be > 0")
        if o.gaussian_lr_mult <= 0:
            _bad("optim.gaussian_lr_mult", "must be > 0")
        if o.warmup_steps < 0:
            _bad("optim.warmup_steps", "must be >= 0")
        if not 0 < o.min_lr_ratio <= 1:
            _bad("optim.min_lr_ratio", f"{o.min_lr_ratio}: must be in (0, 1]")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            _bad("optim.betas", f"{list(o.betas)}: two numbers in [0, 1)")
        if self.losses.feature_network not in ("mobilenet_v2", "siglip2", "none"):
            _bad("losses.feature_network", f"{self.losses.feature_network!r}: choose mobilenet_v2, siglip2 or none")
        if self.losses.teacher not in ("none", "siglip2"):
            _bad("losses.teacher", f"{self.losses.teacher!r}: choose none or siglip2")
        if self.losses.teacher == "siglip2" and not self.losses.teacher_path:
            _bad("losses.teacher_path", "is required with losses.teacher=siglip2 (a local SigLIP2 directory)")
        if self.losses.text_tower not in ("minilm", "siglip2"):
            _bad("losses.text_tower", f"{self.losses.text_tower!r}: choose minilm or siglip2")
        try:
            self.losses.validate()
        except ConfigError:
            raise
        except ValueError as e:  # LossWeights names its own keys as losses.<name>
            key, _, why = str(e).partition(": ")
            _bad(key.split("=")[0], why or str(e))
        self.init.validate()
        if self.run.checkpoint_every < 1:
            _bad("run.checkpoint_every", "must be >= 1")
        if self.run.report_every < 1:
            _bad("run.report_every", "must be >= 1")
        return self

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if self.data.ratios.get(t, 0) > 0]


def from_dict(cls, d: dict):
    """Nested dataclass from a plain dict (what Ray passes to workers); unknown keys are errors."""
    import typing

    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(cls.__name__, f"unknown keys {unknown}")
    kw = {}
    for k, v in d.items():
        t = hints[k]
        kw[k] = from_dict(t, v) if is_dataclass(t) and isinstance(v, dict) else v
    return cls(**kw)
