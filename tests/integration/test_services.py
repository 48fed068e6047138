"""The session fixtures are real services, not mocks: one proof per service (S3, MLflow, Ray)."""
import json

import pytest

pytestmark = pytest.mark.integration


def test_s3_endpoint_serves_the_projects_pyarrow_filesystem(s3_server):
    """One proof for S3: what boto3 wrote is read, and what is written is listed, through the pyarrow
    filesystem Ray Train checkpoints go through (preprocess.storage: the fsspec filesystem, wrapped)."""
    import boto3

    from preprocess import storage

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"])
    s3.put_object(Bucket=s3_server["bucket"], Key="probe/pa.txt", Body=b"pyarrow")
    fs, path = storage.pyarrow_filesystem(f"s3://{s3_server['bucket']}/probe")
    with fs.open_input_stream(f"{path}/pa.txt") as f:
        assert f.read() == b"pyarrow"
    with fs.open_output_stream(f"{path}/back.bin") as f:
        f.write(b"atoken" * 100)
    listed = s3.list_objects_v2(Bucket=s3_server["bucket"], Prefix="probe/")
    assert sorted((o["Key"], o["Size"]) for o in listed["Contents"]) == [("probe/back.bin", 600), ("probe/pa.txt", 7)]
    assert storage.unstrip(f"s3://{s3_server['bucket']}", f"{s3_server['bucket']}/probe/back.bin") == \
        f"s3://{s3_server['bucket']}/probe/back.bin"


def test_mlflow_artifacts_are_proxied_to_s3(mlflow_server, s3_server, tmp_path):
    """As deployed (infra/mlflow/serve.sh): the client uploads over HTTP, the object lands in S3."""
    import boto3
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_experiment("fixture-artifacts")
    (tmp_path / "eval.json").write_text('{"psnr": 31.5}')
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "eval.json"), "eval")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server["endpoint"]).list_objects_v2(
        Bucket=s3_server["bucket"], Prefix="mlflow/").get("Contents", [])]
    mine = [k for k in keys if run.info.run_id in k]
    assert len(mine) == 1 and mine[0].endswith("/eval/eval.json")
    body = boto3.client("s3", endpoint_url=s3_server["endpoint"]).get_object(Bucket=s3_server["bucket"], Key=mine[0])
    assert json.loads(body["Body"].read()) == {"psnr": 31.5}


def test_ray_task_runs_on_fixture_cluster(ray_cluster):
    import os

    ray = ray_cluster

    @ray.remote(num_cpus=1)
    def whoami(x):
        return os.getpid(), x * 2

    pid, val = ray.get(whoami.remote(21))
    assert val == 42 and pid != os.getpid()
    assert ray.cluster_resources()["CPU"] == 2
