"""Typed ingestion config. Validated at start-up; messages name the bad key."""
from __future__ import annotations

from dataclasses import dataclass, field

from preprocess.gaussians import GaussianPolicy
from preprocess.images import ImagePolicy
from preprocess.multiview import MultiviewPolicy
from preprocess.schema import ENCODINGS
from preprocess.video import VideoPolicy


@dataclass
class ThreeDPolicy(MultiviewPolicy):
    max_gaussians: int = 2_000_000

    def gaussian_policy(self) -> GaussianPolicy:
        return GaussianPolicy(max_gaussians=self.max_gaussians).validate()


@dataclass
class ShardPolicy:
    target_bytes: int = 64 * 2 ** 20  # estimated raw payload per shard
    max_rows: int = 256
    encoding: str = "raw"  # chosen by benchmarks/shard_encoding.py (docs/benchmarks.md)
    compression: str = "zstd"  # Arrow IPC buffer compression: zstd | lz4 | none

    def validate(self) -> "ShardPolicy":
        if self.encoding not in ENCODINGS:
            raise ValueError(f"shard.encoding={self.encoding!r}: choose one of {list(ENCODINGS)}")
        if self.compression not in ("zstd", "lz4", "none"):
            raise ValueError(f"shard.compression={self.compression!r}: choose zstd, lz4 or none")
        if self.target_bytes < 1 or self.max_rows < 1:
            raise ValueError("shard.target_bytes and shard.max_rows must be >= 1")
        return self


def check_custom_resources(resources: dict[str, float], key: str) -> None:
    """Custom Ray resources that steer work onto node types: names other than CPU/GPU/memory (those have
    their own settings) with positive amounts."""
    bad = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory") or v <= 0}
    if bad:
        raise ValueError(f"{key}={bad}: custom resource names with amounts > 0 only (CPU and GPU have their own keys)")


@dataclass
class Resources:
    decode_cpus: float = 1.0  # per image/video decode task
    render_cpus: float = 1.0  # per 3D render task when the cluster has no GPU
    render_gpus: float = 1.0  # per 3D render actor when the cluster has GPUs
    render_actors: int = 0  # max GPU render actors; 0 = one per GPU in the cluster
    probe_cpus: float = 0.5
    max_bytes_per_file: int = 4 * 2 ** 30  # refuse larger inputs
    # Custom Ray resources every CPU task (probe, decode, CPU render) also asks for. On a cluster,
    # e.g. {ingest_node: 0.001}, so the autoscaler places decoding on the cheap CPU node type that
    # advertises `ingest_node` (infra/ray/cluster-aws.yaml) and never starts a GPU node for it.
    task_resources: dict[str, float] = field(default_factory=dict)

    def cpu_task_args(self, num_cpus: float) -> dict:
        """Ray remote args of one CPU task of the ingest job."""
        return {"num_cpus": num_cpus, **({"resources": dict(self.task_resources)} if self.task_resources else {})}

    def validate(self) -> "Resources":
        for key in ("decode_cpus", "render_cpus", "render_gpus", "probe_cpus"):
            if getattr(self, key) < 0:
                raise ValueError(f"resources.{key}={getattr(self, key)} must be >= 0")
        check_custom_resources(self.task_resources, "resources.task_resources")
        return self


@dataclass
class IngestConfig:
    input: str = ""  # manifest (.jsonl/.csv/.parquet) or a folder / bucket prefix
    output: str = ""  # shard folder URI (local path, file:// or s3://)
    image: ImagePolicy = field(default_factory=ImagePolicy)
    video: VideoPolicy = field(default_factory=VideoPolicy)
    threed: ThreeDPolicy = field(default_factory=ThreeDPolicy)
    shard: ShardPolicy = field(default_factory=ShardPolicy)
    resources: Resources = field(default_factory=Resources)
    default_split: str = "train"

    def validate(self) -> "IngestConfig":
        if not self.input:
            raise ValueError("ingest: input= is required (a manifest or a folder / bucket prefix)")
        if not self.output:
            raise ValueError("ingest: output= is required (where shards go)")
        self.image.validate()
        self.video.validate()
        self.threed.validate()
        self.threed.gaussian_policy()
        self.shard.validate()
        self.resources.validate()
        if self.shard.encoding == "jpeg":
            raise ValueError("shard.encoding=jpeg cannot hold 3D RGBA views; use raw or png")
        return self
