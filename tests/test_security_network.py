"""The local Ray that debiaslab starts listens on loopback only.

A recipe run with ``distributed.backend=ray`` runs as a user runs it: its train stage uses Ray
Train and its sample stage Ray Data (one Ray session; the test also checks what that run recorded
in MLflow; `extract` and the minority-score stage take the same Ray Data map-job path as the
sample stage). It runs in a subprocess while the OS socket table is polled (tests/netwatch.py):
every listening socket of its process tree must be on 127.0.0.1 / ::1. The Tune sweep command
gets the same check in test_sweep's killed-driver test (its driver is a `debiaslab sweep`
subprocess started by a script that imports ``ray`` first). Linux only: reads /proc.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from netwatch import (
    HAS_PROC,
    ListenWatcher,
    all_processes,
    check_loopback_only,
    is_loopback,
    scrubbed_env,
)

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc")

COMMAND_TIMEOUT_S = 300
EXPERIMENT = {
    "name": "net", "model": {"model_channels": 16, "channel_mult": [1, 2],
                             "attention_resolutions": [], "head_channels": 16},
    "train": {"steps": 2, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 2,
              "log_every": 1, "device": "cpu"},
    "sample": {"samplers": ["ddim"], "steps": 2, "num_samples": 20, "batch_size": 20,
               "labels": "uniform", "guidance": [{"type": "cfg", "omega": 0.0}]},
    "metrics": {"bootstrap": 0},
    "distributed": {"backend": "ray", "num_workers": 1, "cpus_per_worker": 1.0,
                    "object_store_memory_gb": 0.5},
    "tracking": {"experiment": "net"},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The experiment, its dataset and a (plain-loop) checkpoint."""
    from debiaslab.config import load_config
    from debiaslab.data.dataset import ImageDataset
    from debiaslab.stages import build_data
    from debiaslab.training.loop import Trainer

    root = tmp_path_factory.mktemp("net")
    exp = dict(EXPERIMENT, output_dir=str(root / "out"))
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    cfg = load_config(path, ["distributed.backend=local"])
    build_data(cfg)
    Trainer(cfg, ImageDataset.load(cfg.dataset_path), cfg.run_dir, progress=False).fit()
    return root


def run_watched(args: list[str], ray_tmp: str) -> ListenWatcher:
    """Run one CLI command to completion while watching its sockets."""
    assert len(ray_tmp) < 40
    shutil.rmtree(ray_tmp, ignore_errors=True)
    env = scrubbed_env(DEBIASLAB_RAY_TMP=ray_tmp, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "debiaslab.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        with ListenWatcher(proc.pid, ray_tmp) as watcher:
            proc.wait(timeout=COMMAND_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        # leftovers of this command's Ray only (their command lines name its temp dir), by pid
        for pid, cmd in all_processes().items():
            if ray_tmp in cmd[1] and pid != os.getpid():
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        reader.join(timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, "".join(lines[-60:])
    return watcher


def test_local_ray_listens_on_loopback_only(workspace):
    args = ["run", "--stage", "data", "--stage", "train", "--stage", "sample",
            "--set", "name=net_ray_run", "-c", str(workspace / "experiment.yaml")]
    check_loopback_only(run_watched(args, "/tmp/dl-net-run"), "run")
    check_recipe_run_on_ray(workspace / "out")


def check_recipe_run_on_ray(out: Path) -> None:
    """What the `run` command above did on ``distributed.backend: ray``: Ray Train trained (rank 0
    logged into the driver's train child run), Ray Data sampled, each stage has its child run."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("net").experiment_id],
                              filter_string="attributes.run_name = 'net_ray_run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
    parent = runs[0]
    children = {r.data.tags["debiaslab.stage"]: r for r in client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(children) == {"data", "train", "sample"}  # evaluate runs in-process anyway
    steps = [m.step for m in client.get_metric_history(children["train"].info.run_id,
                                                       "train/loss")]
    assert steps == [1, 2]
    samples = out / "runs" / "net_ray_run" / "samples"
    assert (samples / "grid_ddim.png").is_file() and (samples / "ddim" / "dataset.json").is_file()


def test_socket_table_reader_sees_an_exposed_listener():
    """The check itself can fail: a socket on 0.0.0.0 in this process is reported as exposed."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        watcher = ListenWatcher(os.getpid(), "no-such-marker")
        watcher.poll()
        port = s.getsockname()[1]
    assert ("tcp", "0.0.0.0", port) in {x[:3] for x in watcher.exposed()}
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("::") and not is_loopback("0.0.0.0")
