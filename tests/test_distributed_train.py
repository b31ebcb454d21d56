"""Ray Train DDP on local Ray: a real worker kill and resume, MLflow from rank 0, re-run resume.

Each `fit()` costs ~17 s of fixed start-up, so the module shares one uninterrupted reference run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from debiaslab.config import ExperimentConfig, load_config
from debiaslab.distributed.runtime import init_ray, ray_env, shutdown_ray
from debiaslab.pipeline import build_data, load_training_data
from debiaslab.training.checkpoint import list_checkpoints, load_checkpoint
from debiaslab.training.loop import Trainer

STEPS, CKPT_EVERY, LOG_EVERY, KILL_AT = 40, 10, 5, 15
REGISTER_WAIT_S = 5.0
WORKERS = 2
TINY = ["model.model_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[]",
        "model.head_channels=16", "train.batch_size=16", "train.warmup_steps=5",
        f"train.log_every={LOG_EVERY}", f"train.checkpoint_every={CKPT_EVERY}",
        f"train.steps={STEPS}", "train.keep_checkpoints=2", "train.device=cpu",
        f"distributed.num_workers={WORKERS}", "distributed.max_failures=1",
        "tracking.experiment=ray-train-test"]
SERVER_START_TIMEOUT_S = 150.0  # ~10 s idle; far longer on a busy 2-core box


class RecordingTrainer(Trainer):
    """The shared Trainer, logging (rank, start step, pid) per process and optionally SIGKILLing
    rank 1 once (marker file on disk) just after step ``kill_at`` completed."""

    log_path: Path
    kill_at: int | None = None

    def fit(self) -> Any:
        with open(self.log_path, "a") as fh:
            fh.write(f"{self.rank} {self.step} {os.getpid()}\n")
        return super().fit()

    def train_step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        marker = self.log_path.with_suffix(".killed")
        if self.rank == 1 and self.step == self.kill_at and not marker.exists():
            # let Ray register the last reported checkpoint first (its controller polls the
            # workers), so the restart has something to resume from
            ckpt = (Path(self.cfg.output_dir).resolve() / "ray_results" / self.cfg.name
                    / f"checkpoint_{CKPT_EVERY:08d}")
            deadline = time.time() + 60
            while not ckpt.exists() and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(REGISTER_WAIT_S)
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(batch)


def recording_factory(log_path: Path, kill_at: int | None = None) -> Any:
    def build(cfg: ExperimentConfig, **kwargs: Any) -> RecordingTrainer:
        trainer = RecordingTrainer(cfg, load_training_data(cfg), kwargs.pop("run_dir"), **kwargs)
        trainer.log_path, trainer.kill_at = log_path, kill_at
        return trainer

    return build


def starts(log_path: Path) -> list[tuple[int, int]]:
    """(rank, step the process started training at), in order."""
    rows = [line.split() for line in log_path.read_text().splitlines()]
    return sorted((int(r), int(s)) for r, s, _ in rows)


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = load_checkpoint(path)
    return {"model": state["model"], "ema": state["ema"]["shadow"]}


def max_abs_diff(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]
                 ) -> float:
    return max((a[g][k].float() - b[g][k].float()).abs().max().item()
               for g in a for k in a[g])


# ------------------------------------------------------------------------------ fixtures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts in tmp), stopped by PID."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-train")


@pytest.fixture(scope="module")
def ray_cluster(out_dir):
    """One small local Ray for the module (2 CPUs, 1 GiB object store), always shut down."""
    ray_env()  # before ray is imported: loopback-only head, no telemetry
    import ray.cloudpickle

    # workers cannot import this test module: ship its factory and Trainer subclass by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    init_ray(num_cpus=2, object_store_memory_gb=1.0)
    yield
    shutdown_ray()


def make_cfg(out_dir: Path, name: str, *extra: str) -> ExperimentConfig:
    cfg = load_config(None, TINY + [f"output_dir={out_dir}", f"name={name}", *extra])
    build_data(cfg)
    return cfg


@pytest.fixture(scope="module")
def reference(out_dir, ray_cluster, mlflow_server) -> dict[str, Any]:
    """The uninterrupted 2-worker run, logging to a driver-created run on the MLflow server."""
    from debiaslab.distributed.train import train_distributed
    from debiaslab.tracking import Tracker

    cfg = make_cfg(out_dir, "reference")
    log_path = out_dir / "reference.log"
    with Tracker(out_dir, cfg.tracking.experiment, run_name=cfg.name,
                 tracking_uri=mlflow_server) as tracker:
        t0 = time.perf_counter()
        result = train_distributed(cfg, tracking_uri=mlflow_server, mlflow_run_id=tracker.run_id,
                                   trainer_factory=recording_factory(log_path))
        seconds = time.perf_counter() - t0
        run_id, experiment_id = tracker.run_id, tracker.experiment_id
    print(f"reference fit: {seconds:.1f}s")
    return {"cfg": cfg, "result": result, "weights": weights(result.checkpoint),
            "starts": starts(log_path), "run_id": run_id, "experiment_id": experiment_id,
            "uri": mlflow_server}


# ---------------------------------------------------------------------------------- tests


def test_reference_run_reports_every_checkpoint(reference):
    result = reference["result"]
    assert result.step == STEPS
    assert result.checkpoint is not None and result.checkpoint.name == f"ckpt_{STEPS:08d}.pt"
    assert load_checkpoint(result.checkpoint)["step"] == STEPS
    assert Path(result.storage_dir) == Path(reference["cfg"].output_dir).resolve() \
        / "ray_results" / "reference"  # explicit absolute storage, the run name, no timestamp
    kept = sorted(p.name for p in Path(result.storage_dir).glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000030", "checkpoint_00000040"]  # num_to_keep=2
    assert reference["starts"] == [(0, 0), (1, 0)]
    assert {"train/loss", "train/lr", "train/steps_per_sec"} <= set(result.metrics)


def test_ddp_matches_single_process_on_the_global_batch(reference, out_dir):
    """Same Trainer loop: 2 gloo workers x 16 == 1 process x 32, up to float summation order."""
    cfg = load_config(None, TINY + [f"output_dir={out_dir}", "name=reference",
                                    "train.batch_size=32"])
    single = Trainer(cfg, load_training_data(cfg), out_dir / "single", progress=False).fit()
    diff = max_abs_diff(reference["weights"], weights(single.checkpoint))
    print(f"max |w_ddp - w_single| = {diff:.3g}")
    assert diff < 1e-5  # measured 2.4e-7 (fp32 summation order)


def test_worker_sigkill_resumes_from_last_checkpoint_exactly(reference, out_dir):
    from debiaslab.distributed.train import train_distributed

    cfg = make_cfg(out_dir, "killed")
    log_path = out_dir / "killed.log"
    t0 = time.perf_counter()
    result = train_distributed(cfg, tracking_uri=None, mlflow_run_id=None,
                               trainer_factory=recording_factory(log_path, kill_at=KILL_AT))
    print(f"killed+restarted fit: {time.perf_counter() - t0:.1f}s")
    assert log_path.with_suffix(".killed").exists(), "a worker process was really SIGKILLed"
    # first attempt from scratch; the restarted worker group resumed at the step-10 checkpoint
    assert starts(log_path) == [(0, 0), (0, CKPT_EVERY), (1, 0), (1, CKPT_EVERY)]
    assert result.step == STEPS and load_checkpoint(result.checkpoint)["step"] == STEPS
    diff = max_abs_diff(reference["weights"], weights(result.checkpoint))
    print(f"max |w_killed - w_reference| = {diff:.3g}")
    assert diff == 0.0  # deterministic loop, gloo on CPU: bit-exact


def test_mlflow_metrics_logged_by_rank0_into_driver_run(reference):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=reference["uri"])
    runs = client.search_runs([reference["experiment_id"]])
    assert [r.info.run_id for r in runs] == [reference["run_id"]]  # workers created no runs
    run = runs[0]
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(reference["run_id"], "train/loss")
    assert [m.step for m in history] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert len(client.get_metric_history(reference["run_id"], "train/steps_per_sec")) == 8
    assert run.data.tags["checkpoint"] == str(reference["result"].checkpoint)


def test_rerun_with_same_name_resumes_from_latest_checkpoint(reference, out_dir):
    from debiaslab.distributed.train import train_distributed

    more = STEPS + CKPT_EVERY
    cfg = make_cfg(out_dir, "reference", f"train.steps={more}")
    log_path = out_dir / "reference-continued.log"
    result = train_distributed(cfg, tracking_uri=None, mlflow_run_id=None,
                               trainer_factory=recording_factory(log_path))
    assert starts(log_path) == [(0, STEPS), (1, STEPS)]
    assert result.step == more and load_checkpoint(result.checkpoint)["step"] == more
    assert [s for s, _ in list_checkpoints(result.checkpoint.parent)] == [more]
