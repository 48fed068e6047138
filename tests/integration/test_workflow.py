"""The curriculum workflow against a real MLflow server, a real S3 endpoint and real Ray: all four
stages, registry aliases and the pyfunc flavour, operations CLI, a failing gate, and a real kill of the
workflow during stage 2 followed by a rerun."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CURRICULUM = ["curriculum.checkpoint_every=2", "curriculum.eval_items=8",
              "curriculum.stages.0.steps=4", "curriculum.stages.1.steps=4", "curriculum.stages.2.steps=8",
              "curriculum.stages.3.steps=4", "curriculum.gates.min_image_psnr=1.0"]



def _cfg(overrides: list[str]):
    from orchestration.hydra_config import load

    return load("run", overrides)


def _registry(client, model: str) -> dict:
    versions = {v.version: v for v in client.search_model_versions(f"name = '{model}'")}
    stages = {int(v.tags["stage"]): int(k) for k, v in versions.items()}
    return {"stages": stages, "aliases": dict(client.get_registered_model(model).aliases)}


@pytest.fixture(scope="module")
def full_run(ray_cluster, s3_server, mlflow_server, small_corpus, tmp_path_factory):
    from orchestration.workflow import run_workflow

    work = tmp_path_factory.mktemp("wf_full")
    over = [f"work_dir={work}", f"tracking_uri={mlflow_server}", "registered_model=atoken-full",
            f"data.input={small_corpus}", f"cluster.storage=s3://{s3_server['bucket']}/wf", *CURRICULUM]
    summary = run_workflow(_cfg(over))
    return over, summary


def test_full_workflow_registers_and_promotes_every_stage(full_run, mlflow_server, s3_server):
    import mlflow
    import s3fs
    from mlflow.tracking import MlflowClient

    over, summary = full_run
    client = MlflowClient(mlflow_server)
    reg = _registry(client, "atoken-full")
    assert reg["stages"] == {1: 1, 2: 2, 3: 3, 4: 4}
    assert reg["aliases"] == {"champion": "4", **{f"stage{n}": str(n) for n in range(1, 5)},
                              **{f"stage{n}-candidate": str(n) for n in range(1, 5)}}
    # the printed / returned summary shows the registry's aliases at the end, not those of each stage's time
    assert {r["stage"]: r["aliases"] for r in summary["rows"]} == {
        n: sorted([f"stage{n}", f"stage{n}-candidate"] + (["champion"] if n == 4 else [])) for n in range(1, 5)}
    exp = client.get_experiment_by_name("atoken-curriculum")
    runs = client.search_runs([exp.experiment_id], "tags.`atoken.kind` = 'step'")
    steps = {r.data.tags["atoken.step"]: r for r in runs if r.data.tags.get("output.version") or r.data.tags["atoken.step"] == "ingest"}
    assert set(steps) == {"ingest", "stage1", "stage2", "stage3", "stage4"}
    for n in range(2, 5):  # each stage started from the exact version the previous one promoted
        assert steps[f"stage{n}"].data.tags["atoken.init_version"] == str(n - 1)
        assert steps[f"stage{n}"].data.params["model.init_from"].endswith("/export")
    s3 = steps["stage3"]
    assert s3.data.params["data.ratios.3d_rec"] == "1.0" and s3.data.params["model.latent_channels"] == "48"
    assert "train.loss.3d_rec.render_l1" in s3.data.metrics and "eval.3d_psnr" in s3.data.metrics
    assert steps["stage4"].data.params["model.fsq"] == "True"
    hist = client.get_metric_history(steps["stage1"].info.run_id, "train.tokens_per_s")
    assert len(hist) >= 2 and sorted(m.step for m in hist) == [2, 4]
    for r in steps.values():
        assert r.data.tags["atoken.step_key"] and r.data.tags["atoken.code_version"] and r.data.tags["atoken.ray_job_id"]
        arts = [a.path for a in client.list_artifacts(r.info.run_id)]
        assert "config.yaml" in arts
    assert {a.path for a in client.list_artifacts(steps["stage2"].info.run_id, "eval")} >= {
        "eval/eval.json", "eval/images.png", "eval/video_frames.png"}
    assert steps["stage1"].data.tags["output.checkpoint"].startswith("s3://")  # large files stay in storage
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{s3_server['bucket']}/wf/shards/index.json")
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/atoken-full@champion")
    out = model.predict([np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)])
    assert out[0]["discrete"] and out[0]["tokens"].shape == (12, 8) and out[0]["tokens"].max() < 4096
    rec = model.predict({"image": [np.zeros((32, 32, 3), np.uint8)], "mode": "reconstruct"})
    assert rec[0]["image"].shape == (32, 32, 3)
    # rerunning the same workflow does nothing new
    from orchestration.workflow import run_workflow

    again = run_workflow(_cfg(over))
    assert [r["version"] for r in again["rows"]] == ["1", "2", "3", "4"]
    assert len(client.search_model_versions("name = 'atoken-full'")) == 4


def test_promote_rollback_and_status_cli(full_run, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    from orchestration.cli import main

    over, _ = full_run
    ops = [f"tracking_uri={mlflow_server}", "registered_model=atoken-full"]
    client = MlflowClient(mlflow_server)
    assert main(["promote", "--version", "2", "--alias", "champion", *ops]) == 0
    assert client.get_model_version_by_alias("atoken-full", "champion").version == "2"
    assert main(["rollback", "--alias", "champion", *ops]) == 0
    assert client.get_model_version_by_alias("atoken-full", "champion").version == "4"
    assert main(["rollback", "--alias", "stage1", *ops]) == 2  # no previous holder: a clear error
    capsys.readouterr()
    assert main(["status", *over]) == 0
    text = capsys.readouterr().out
    assert "stage4" in text and "v4" in text and "champion->v4" in text


def test_failing_gate_stops_and_leaves_aliases(full_run, mlflow_server, small_corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestration.workflow import GateFailed, run_workflow

    over = [f"work_dir={tmp_path}", f"tracking_uri={mlflow_server}", "registered_model=atoken-gate",
            f"data.input={small_corpus}", *CURRICULUM, "curriculum.gates.min_image_psnr=99", "stop_after=1"]
    with pytest.raises(GateFailed, match=r"min_image_psnr: image_psnr .* < 99.00 \(short by"):
        run_workflow(_cfg(over))
    client = MlflowClient(mlflow_server)
    aliases = dict(client.get_registered_model("atoken-gate").aliases)
    assert aliases == {"stage1-candidate": "1"}  # stage1 and champion never moved


def test_killed_workflow_resumes_and_matches_uninterrupted_registry(full_run, mlflow_server, small_corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "wf"
    args = [str(Path(sys.executable).with_name("atoken")), "run", f"work_dir={work}", f"tracking_uri={mlflow_server}",
            "registered_model=atoken-kill", "name=atoken-kill", f"data.input={small_corpus}", "cluster.num_cpus=2",
            *CURRICULUM]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / "run1.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if list((work / "storage" / "runs").glob("stage2-*/checkpoint_*/atoken_checkpoint.json")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-4000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    run2 = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
    assert run2.returncode == 0, run2.stdout[-4000:] + run2.stderr[-4000:]
    assert "ingest: finished earlier" in run2.stdout and "stage 1: finished earlier" in run2.stdout
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("atoken-kill")
    runs = client.search_runs([exp.experiment_id], "tags.`atoken.kind` = 'step'")
    by = {}
    for r in runs:
        by.setdefault(r.data.tags["atoken.step"], []).append(r)
    assert len(by["ingest"]) == 1 and len(by["stage1"]) == 1  # not rerun
    s2 = sorted(by["stage2"], key=lambda r: r.info.start_time)
    assert [r.info.status for r in s2] == ["KILLED", "FINISHED"]
    assert int(s2[-1].data.tags["output.resumed_from_step"]) >= 2  # resumed from its checkpoint
    assert _registry(client, "atoken-kill") == _registry(client, "atoken-full")
