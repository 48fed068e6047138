"""`ray job submit --working-dir . -- atoken run ...` against a head started with `ray start --head` on
loopback, as the runbook (docs/operations.md) tells ops engineers to do it, with the project's runtime env."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import start_ray_head

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def test_ray_job_submit_runs_the_workflow_and_its_logs_show_the_steps(tmp_path, small_corpus, mlflow_server):
    from mlflow.tracking import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    head = start_ray_head(tmp_path, num_cpus=2, env={"PATH": env["PATH"]})
    work = tmp_path / "work"
    try:
        cmd = [str(Path(bin_dir, "ray")), "job", "submit", "--address", head.dashboard_url, "--working-dir", ".",
               "--runtime-env", "infra/ray/runtime_env.yaml", "--",
               "atoken", "run", f"work_dir={work}", f"tracking_uri={mlflow_server}", "registered_model=atoken-job",
               f"data.input={small_corpus}", "stop_after=1", "curriculum.stages.0.steps=2",
               "curriculum.eval_items=4", "curriculum.gates.min_image_psnr=1.0"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        jobs = JobSubmissionClient(head.dashboard_url).list_jobs()
    finally:
        head.stop()
    assert proc.returncode == 0, out[-6000:]
    assert len(jobs) == 1 and jobs[0].status == JobStatus.SUCCEEDED, jobs
    # The job's logs (tailed by `ray job submit`) show each step as it ran, and the summary table.
    for line in ("[workflow] workflow atoken-curriculum", "[workflow] ingest: ", "[ingest] committed ",
                 "[workflow] stage 1: training 2 steps", "[workflow] stage 1: registered atoken-job version 1",
                 "gates pass", "stage1-candidate"):
        assert line in out, f"{line!r} not in the job's logs:\n{out[-4000:]}"
    assert "Uploading package gcs://" in out  # the working dir went to the cluster, without .venv/.git
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions("name = 'atoken-job'")
    assert version.tags["stage"] == "1"
    assert client.get_registered_model("atoken-job").aliases.get("stage1") == version.version
    run = client.get_run(version.run_id)
    assert run.data.tags["atoken.ray_job_id"] == jobs[0].job_id
