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

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CURRICULUM = ["train.run.checkpoint_every=2", "eval.max_items=8", "curriculum.stages.0.steps=4",
              "curriculum.stages.1.steps=4", "curriculum.stages.2.steps=8", "curriculum.stages.3.steps=4"]
# a few steps cannot beat the baselines: these tests are about the workflow's machinery, so the quality
# gates are off in them; test_barely_trained_stage_fails_the_default_gates keeps the defaults
GATES_OFF = [f"curriculum.gates.{g}=null" for g in ("image_vs_pca", "video_vs_pca", "threed_vs_background",
                                                     "max_image_psnr_drop", "max_understanding_drop",
                                                     "probe_vs_random_encoder")]


def _cfg(overrides: list[str]):
    from orchestration.hydra_config import load

    return load("run", overrides)


def _registry(client, model: str) -> dict:
    """stage -> its newest version, and the aliases."""
    stages: dict[int, int] = {}
    for v in client.search_model_versions(f"name = '{model}'"):
        n = int(v.tags["stage"])
        stages[n] = max(stages.get(n, 0), int(v.version))
    return {"stages": stages, "aliases": dict(client.get_registered_model(model).aliases)}


CLEAN_REGISTRY = {"stages": {1: 1, 2: 2, 3: 3, 4: 4},
                  "aliases": {"champion": "4", **{f"stage{n}": str(n) for n in range(1, 5)},
                              **{f"stage{n}-candidate": str(n) for n in range(1, 5)}}}


def _steps(client, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    out: dict[str, list] = {}
    for r in client.search_runs([exp.experiment_id], "tags.`atoken.kind` = 'step'", order_by=["attributes.start_time ASC"]):
        out.setdefault(r.data.tags["atoken.step"], []).append(r)
    return out


@pytest.fixture(scope="module")
def full_run(ray_cluster, s3_server, mlflow_server, small_corpus, tmp_path_factory):
    from orchestration.workflow import run_workflow

    work = tmp_path_factory.mktemp("wf_full")
    over = [f"work_dir={work}", f"tracking_uri={mlflow_server}", "registered_model=atoken-full",
            f"data.input={small_corpus}", f"cluster.storage=s3://{s3_server['bucket']}/wf", *CURRICULUM, *GATES_OFF]
    summary = run_workflow(_cfg(over))
    return over, summary


def test_full_workflow_registers_and_promotes_every_stage(full_run, mlflow_server, s3_server):
    import mlflow
    import s3fs
    from mlflow.tracking import MlflowClient

    over, summary = full_run
    client = MlflowClient(mlflow_server)
    assert _registry(client, "atoken-full") == CLEAN_REGISTRY
    # the printed / returned summary shows the registry's aliases at the end, not those of each stage's time
    assert {r["stage"]: r["aliases"] for r in summary["rows"]} == {
        n: sorted([f"stage{n}", f"stage{n}-candidate"] + (["champion"] if n == 4 else [])) for n in range(1, 5)}
    exp = client.get_experiment_by_name("atoken-curriculum")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"  # opens on its training runs
    steps = {k: v[-1] for k, v in _steps(client, "atoken-curriculum").items()}
    assert set(steps) == {"ingest", *(f"stage{n}.{s}" for n in range(1, 5) for s in ("train", "eval", "promote"))}
    for n in range(2, 5):  # each stage started from the exact version the previous one promoted
        assert steps[f"stage{n}.train"].data.tags["atoken.init_version"] == str(n - 1)
        assert steps[f"stage{n}.train"].data.params["model.init_from"].endswith("/export")
    s3 = steps["stage3.train"]
    assert s3.data.params["data.ratios.3d_rec"] == "2.0" and s3.data.params["model.latent_channels"] == "48"
    assert "train/loss/3d_rec/render_l1" in s3.data.metrics
    assert "eval/3d/psnr" in steps["stage3.eval"].data.metrics and "eval/3d/background_psnr" in steps["stage3.eval"].data.metrics
    assert steps["stage4.train"].data.params["model.fsq"] == "True"
    assert "eval/image/photos/pca_fsq_psnr" in steps["stage4.eval"].data.metrics  # the discrete floor
    # live metrics: every report logged by the Train controller's callback at its step
    hist = client.get_metric_history(steps["stage1.train"].info.run_id, "train/tokens_per_s")
    assert sorted(m.step for m in hist) == [2, 4]
    for name, r in steps.items():
        assert r.data.tags["atoken.step_key"] and r.data.tags["atoken.code_version"] and r.data.tags["atoken.ray_job_id"]
        assert r.data.tags.get("mlflow.note.content"), name  # every step run says what it did
        arts = [a.path for a in client.list_artifacts(r.info.run_id)]
        assert "config.yaml" in arts
    assert "PSNR" in steps["stage2.eval"].data.tags["mlflow.note.content"]
    assert {a.path for a in client.list_artifacts(steps["stage2.eval"].info.run_id, "eval")} >= {"eval/eval.json"}
    assert "images" in [a.path for a in client.list_artifacts(steps["stage2.eval"].info.run_id)]  # logged as images
    assert steps["stage1.train"].data.tags["output.checkpoint"].startswith("s3://")  # large files stay in storage
    fs = s3fs.S3FileSystem()
    assert fs.exists(f"{s3_server['bucket']}/wf/shards/index.json")
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model("models:/atoken-full@champion")
    assert model.metadata.signature.inputs.input_names() == ["image"]  # typed, with an input example
    flavor = model.metadata.flavors["python_function"]
    assert "python_model" not in flavor or not str(flavor.get("python_model", "")).endswith(".pkl")  # code, not a pickle
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(png, format="PNG")
    out = model.predict(pd.DataFrame({"image": [png.getvalue()]}))
    assert out[0]["discrete"] and out[0]["tokens"].shape == (12, 8) and out[0]["tokens"].max() < 4096
    rec = model.predict(pd.DataFrame({"image": [png.getvalue()]}), params={"mode": "reconstruct"})
    assert rec[0]["image"].shape == (48, 64, 3)
    raw = model.unwrap_python_model()  # video and 3D through the same model
    vid = raw.predict(None, pd.DataFrame({"video": [np.zeros((8, 32, 32, 3), np.uint8)]}))
    assert vid[0]["tokens"].shape == (2 * 2 * 2, 8)
    cube = raw.predict(None, pd.DataFrame({"3d": [{"voxel_feats": np.random.rand(5, 768), "voxels": np.arange(15).reshape(5, 3) % 8}]}),
                       params={"mode": "reconstruct"})
    assert cube[0]["voxel_feats"].shape == (5, 768)


def test_reruns_redo_exactly_the_steps_a_change_affects(full_run, mlflow_server):
    """Real reruns of the full workflow: unchanged, nothing runs; a stage-3 training knob retrains stages 3
    and 4 only; a gate re-decides every promotion without training or evaluating; an eval setting
    re-evaluates (and so re-decides) without training."""
    from mlflow.tracking import MlflowClient

    from orchestration.workflow import run_workflow

    over, _ = full_run
    client = MlflowClient(mlflow_server)
    count = lambda: {k: len(v) for k, v in _steps(client, "atoken-curriculum").items()}  # noqa: E731
    before = count()
    again = run_workflow(_cfg(over))
    assert [r["version"] for r in again["rows"]] == ["1", "2", "3", "4"] and count() == before
    assert len(client.search_model_versions("name = 'atoken-full'")) == 4

    run_workflow(_cfg([*over, "curriculum.stages.2.optim.warmup_steps=3"]))
    after = count()
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {f"stage{n}.{s}" for n in (3, 4) for s in ("train", "eval", "promote")}
    reg = _registry(client, "atoken-full")
    assert reg["stages"][1] == 1 and reg["stages"][2] == 2 and reg["aliases"]["champion"] == str(reg["stages"][4]) != "4"

    before = after
    run_workflow(_cfg([*over, "curriculum.stages.2.optim.warmup_steps=3", "curriculum.gates.max_image_psnr_drop=50"]))
    after = count()
    assert {k for k in after if after[k] != before[k]} == {f"stage{n}.promote" for n in range(1, 5)}

    before = after
    run_workflow(_cfg([*over, "curriculum.stages.2.optim.warmup_steps=3", "curriculum.gates.max_image_psnr_drop=50",
                       "eval.pictures=4"]))
    after = count()
    assert {k for k in after if after[k] != before[k]} == {f"stage{n}.{s}" for n in range(1, 5) for s in ("eval", "promote")}


def test_promote_rollback_and_status_cli(full_run, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    from orchestration.cli import main

    over, _ = full_run
    ops = [f"tracking_uri={mlflow_server}", "registered_model=atoken-full"]
    client = MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("atoken-full", "champion").version
    assert main(["promote", "--version", "2", "--alias", "champion", *ops]) == 0
    assert client.get_model_version_by_alias("atoken-full", "champion").version == "2"
    assert main(["rollback", "--alias", "champion", *ops]) == 0
    assert client.get_model_version_by_alias("atoken-full", "champion").version == champion
    assert main(["rollback", "--alias", "stage1", *ops]) == 2  # no previous holder: a clear error
    capsys.readouterr()
    assert main(["status", *over]) == 0
    text = capsys.readouterr().out
    assert "stage4.train" in text and "stage4.promote" in text and f"champion->v{champion}" in text


def test_barely_trained_stage_fails_the_default_gates(full_run, mlflow_server, small_corpus, tmp_path):
    """One training step with every default gate: the stage is not promoted, and the workflow says which
    gate failed and by how much."""
    from mlflow.tracking import MlflowClient

    from orchestration.workflow import GateFailed, run_workflow

    over = [f"work_dir={tmp_path}", f"tracking_uri={mlflow_server}", "registered_model=atoken-gate", "name=atoken-gate",
            f"data.input={small_corpus}", "eval.max_items=8", "curriculum.stages.0.steps=1", "stop_after=1"]
    with pytest.raises(GateFailed, match=r"image_vs_pca: photos PSNR .* dB < PCA-32 .* \(short by \d+\.\d\d dB\)"):
        run_workflow(_cfg(over))
    client = MlflowClient(mlflow_server)
    assert dict(client.get_registered_model("atoken-gate").aliases) == {"stage1-candidate": "1"}  # never promoted
    promote = _steps(client, "atoken-gate")["stage1.promote"][-1]
    assert "Not promoted" in promote.data.tags["mlflow.note.content"] and promote.data.tags["output.passed"] == "False"


def test_killed_workflow_resumes_and_matches_uninterrupted_registry(full_run, mlflow_server, small_corpus, tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "wf"
    args = [str(Path(sys.executable).with_name("atoken")), "run", f"work_dir={work}", f"tracking_uri={mlflow_server}",
            "registered_model=atoken-kill", "name=atoken-kill", f"data.input={small_corpus}", "cluster.num_cpus=2",
            *CURRICULUM, *GATES_OFF]
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
    logs = run2.stdout + run2.stderr
    assert "ingest: finished earlier" in logs and "stage 1 train: finished earlier" in logs
    # the console an operator reads (issue: 47,075 lines for a main job): short, no runs of blank lines, no
    # per-report dicts, no repeated library warnings, no training progress bars; the summary at the end
    non_empty = [line for line in logs.splitlines() if line.strip()]
    assert len(non_empty) <= 120, "\n".join(non_empty[:200])
    assert "\n\n\n" not in logs.replace("\r", "")
    for noise in ("TrainingReport(", "Failed to query Ray Train Controller", "serialized using CloudPickle",
                  "Add type hints", "ReadArrowShard", "split(2, equal=True)", "Setting accelerator to CPU",
                  "is deprecated", "Successfully registered model", "Downloading artifacts"):
        assert noise not in logs, noise
    assert "[progress] stage 3 train: step 8/8 (100%)" in logs and "summary (PSNR in dB" in logs
    client = MlflowClient(mlflow_server)
    by = _steps(client, "atoken-kill")
    assert len(by["ingest"]) == 1 and len(by["stage1.train"]) == 1  # not rerun
    s2 = sorted(by["stage2.train"], key=lambda r: r.info.start_time)
    assert [r.info.status for r in s2] == ["KILLED", "FINISHED"]
    assert int(s2[-1].data.tags["output.resumed_from_step"]) >= 2  # resumed from its checkpoint
    assert _registry(client, "atoken-kill") == CLEAN_REGISTRY  # as if it had never been interrupted
