"""The session fixtures are real services, not mocks."""
import json
import urllib.request

import pytest

pytestmark = pytest.mark.integration


def test_s3_object_written_by_s3fs_is_listed_by_boto3(s3_server):
    import boto3
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint"]})
    fs.pipe(f"{s3_server['bucket']}/probe/hello.bin", b"atoken" * 100)
    listed = boto3.client("s3", endpoint_url=s3_server["endpoint"]).list_objects_v2(
        Bucket=s3_server["bucket"], Prefix="probe/")
    assert [(o["Key"], o["Size"]) for o in listed["Contents"]] == [("probe/hello.bin", 600)]


def test_pyarrow_s3_reads_what_boto3_wrote(s3_server):
    import boto3
    from pyarrow import fs as pafs

    boto3.client("s3", endpoint_url=s3_server["endpoint"]).put_object(
        Bucket=s3_server["bucket"], Key="probe/pa.txt", Body=b"pyarrow")
    s3 = pafs.S3FileSystem(endpoint_override=s3_server["endpoint"], scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    with s3.open_input_stream(f"{s3_server['bucket']}/probe/pa.txt") as f:
        assert f.read() == b"pyarrow"


def test_mlflow_run_logged_by_client_is_read_back_over_http(mlflow_server):
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    exp = mlflow.set_experiment("fixture-probe")
    with mlflow.start_run() as run:
        mlflow.log_metric("psnr", 31.5, step=3)
        mlflow.log_param("preset", "tiny")
    url = f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}"
    with urllib.request.urlopen(url, timeout=10) as r:
        data = json.load(r)["run"]["data"]
    assert {m["key"]: m["value"] for m in data["metrics"]} == {"psnr": 31.5}
    assert {p["key"]: p["value"] for p in data["params"]} == {"preset": "tiny"}
    assert run.info.experiment_id == exp.experiment_id


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
