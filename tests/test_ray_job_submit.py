"""Integration: a real Ray head on 127.0.0.1, `ray job submit` of the pipeline, a real MLflow server.

Loopback only; the head and the server are stopped by the PIDs this test started, and no cluster
address file is left behind that would make a later ray.init() hang.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import recipe_runs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[]",
        "model.head_channels=16", "train.batch_size=16", "train.steps=12",
        "train.log_every=4", "train.checkpoint_every=6", "train.device=cpu",
        "sample.num_samples=20", "sample.steps=5", "sample.batch_size=20",
        "metrics.bootstrap=10", "tracking.experiment=jobsubmit"]
AGENT_RETRIES = 60
JOB_TIMEOUT_S = 600
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen, timeout: float = 40) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        env={**os.environ, **RAY_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash = free_port(), free_port()
    temp_dir = Path("/tmp") / f"rjt{os.getpid()}"
    env = {**os.environ, **RAY_ENV}
    cluster_file = Path("/tmp/ray/ray_current_cluster")
    before = cluster_file.read_text() if cluster_file.exists() else None
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--num-cpus", "2", "--object-store-memory",
         str(1024**3), "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version", 180)
        yield f"http://127.0.0.1:{dash}"
    finally:
        stop(proc)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any straggler the head left in its group
        except ProcessLookupError:
            pass
        if cluster_file.exists() and cluster_file.read_text() != before:
            cluster_file.unlink()


def test_ray_job_submit_pipeline_logs_to_mlflow_server(ray_head, mlflow_server, tmp_path):
    from mlflow import MlflowClient

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
