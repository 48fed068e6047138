"""Session-scoped real services: local Ray (2 CPUs), moto_server S3, mlflow server."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.services import start_mlflow, start_moto

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
if "ATOKEN_REFERENCE_DIR" in os.environ:
    REFERENCE = Path(os.environ["ATOKEN_REFERENCE_DIR"])


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"official reference data not found at {REFERENCE} (set ATOKEN_REFERENCE_DIR)")
    return REFERENCE


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A local Ray cluster with 2 CPUs on loopback, shared by the session; its workers see the S3
    fixture's endpoint and credentials."""
    import ray

    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), **s3_server["env"]}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             configure_logging=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real moto_server S3 endpoint with a bucket; AWS env points at it for the session."""
    import boto3

    svc = start_moto(tmp_path_factory.mktemp("moto"))
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": svc.url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=svc.url).create_bucket(Bucket="atoken-test")
        yield {"endpoint": svc.url, "bucket": "atoken-test", "env": env}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        svc.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A real `mlflow server` started by the deployment's script (infra/mlflow/serve.sh): sqlite backend,
    artifacts proxied to the S3 fixture, loopback, job execution off."""
    svc = start_mlflow(tmp_path_factory.mktemp("mlflow"), artifacts=f"s3://{s3_server['bucket']}/mlflow",
                       env=s3_server["env"])
    try:
        yield svc.url
    finally:
        svc.stop()


SMALL_INGEST = ["image.max_side=128", "video.frames_per_clip=8", "video.max_clips_per_video=2", "video.max_side=128",
                "threed.views=4", "threed.resolution=64", "threed.grid=16", "shard.max_rows=64"]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """The real sample corpus, scaled down: 15 photos, 20 digits, 8 videos, 4 3DGS assets."""
    from preprocess.sample_corpus import CorpusConfig, build_corpus

    out = tmp_path_factory.mktemp("small_corpus")
    return build_corpus(out, CorpusConfig(digits_per_class=2, gaussians_per_asset=600))
