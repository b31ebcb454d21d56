"""Integration: a real Ray head on 127.0.0.1, `ray job submit` of the pipeline, a real MLflow
server.

Loopback only; the head and the server are stopped by the PIDs this test started, and no cluster
address file is left behind that would make a later ray.init() hang.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import BIN, mlflow_server_process, ray_head_process, recipe_runs
from conftest import TINY as TINY_CORE

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_CORE + ["train.steps=12", "train.log_every=4", "train.checkpoint_every=6",
                    "sample.num_samples=20", "sample.steps=5", "sample.batch_size=20",
                    "metrics.bootstrap=10", "tracking.experiment=jobsubmit"]
AGENT_RETRIES = 60
JOB_TIMEOUT_S = 600
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture
def services(tmp_path):
    """(Ray dashboard URL, MLflow URI): the Ray head and the MLflow server start side by side
    (each spends most of its ~10-20 s start waiting on imports and its HTTP endpoint); both are
    stopped by the PIDs they started, also when the other one failed to come up."""
    root = tmp_path / "mlflow-server"
    root.mkdir()
    head = ray_head_process(Path("/tmp") / f"rjt{os.getpid()}", RAY_ENV)
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(1) as pool:
        started = pool.submit(head.__enter__)
        try:
            uri = stack.enter_context(mlflow_server_process(root, timeout=180, env=RAY_ENV))
        finally:
            url = started.result()  # the head's own failure, if any, surfaces here
            stack.push(head)
        yield url, uri


def test_ray_job_submit_pipeline_logs_to_mlflow_server(services, tmp_path):
    from mlflow import MlflowClient

    ray_head, mlflow_server = services
    out = tmp_path / "outputs"
    runtime_env = {
        "working_dir": str(ROOT),
        "excludes": [".git", ".venv", "outputs", "*.pt", "mlflow.db", "mlartifacts"],
        "env_vars": {**RAY_ENV, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": "platform",
                     "DEBIASLAB_CACHE": os.environ.get("DEBIASLAB_CACHE", str(tmp_path))},
    }
    sets = [a for item in TINY + [f"output_dir={out}"] for a in ("--set", item)]
    argv = [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--no-wait",
            "--submission-id", "debiaslab-it", "--runtime-env-json", json.dumps(runtime_env),
            "--", sys.executable, "jobs/pipeline.py", "-c",
            "configs/experiments/digits_lt_baseline.yaml", *sets]
    for _ in range(AGENT_RETRIES):  # the head's job agent comes up a little after the dashboard
        proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **RAY_ENV},
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 0 or "No available agent" not in proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(ray_head)
    deadline = time.time() + JOB_TIMEOUT_S
    while jobs.get_job_status("debiaslab-it") not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                      JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(2)
    status = jobs.get_job_status("debiaslab-it")
    assert status == JobStatus.SUCCEEDED, jobs.get_job_logs("debiaslab-it")[-4000:]
    client = MlflowClient(mlflow_server)
    run, children = recipe_runs(client, "jobsubmit")
    assert run.info.status == "FINISHED"
    assert {"train/final_loss", "eval/fid"} <= set(run.data.metrics)
    assert "train/loss" in children["train"].data.metrics
    grids = {a.path for a in client.list_artifacts(children["sample"].info.run_id, "samples")}
    assert "samples/grid_ddim.png" in grids
