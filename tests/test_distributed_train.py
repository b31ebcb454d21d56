"""Ray Train DDP on local Ray: a real worker kill and resume, MLflow from rank 0, re-run resume.

Each `fit()` costs ~17 s of fixed start-up, so the module shares one uninterrupted reference run.
The reference trains CBDM (Qin et al. 2023) with batch-mode label dropout: the loss whose per-sample
randomness (y', the dropout coin, the noise) is hardest to keep equal between 2 workers x 8 and
1 process x 16, so the DDP-equals-one-process check covers the plain eps loss's path as well.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY as TINY_CORE
from conftest import mlflow_server_process, ship_by_value

from debiaslab.checkpoints import list_checkpoints, load_checkpoint
from debiaslab.config import ExperimentConfig, load_config
from debiaslab.data.locate import load_training_data
from debiaslab.stages import build_data
from debiaslab.training.loop import Trainer

STEPS, CKPT_EVERY, LOG_EVERY, KILL_AT = 20, 10, 5, 15
REGISTER_WAIT_S = 5.0
WORKERS = 2
TINY = TINY_CORE + ["train.warmup_steps=5", f"train.log_every={LOG_EVERY}",
                    f"train.checkpoint_every={CKPT_EVERY}", f"train.steps={STEPS}",
                    "train.keep_checkpoints=2", f"distributed.num_workers={WORKERS}",
                    "distributed.max_failures=1", "tracking.experiment=ray-train-test",
                    "diffusion.loss=cbdm", "train.label_dropout=0.5",
                    "train.label_dropout_mode=batch"]
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


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts in tmp), stopped by PID."""
    with mlflow_server_process(tmp_path_factory.mktemp("mlflow-server"),
                               timeout=SERVER_START_TIMEOUT_S) as uri:
        yield uri


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray-train")


@pytest.fixture(scope="module")
def ray_cluster(shared_ray, out_dir):
    """The run's shared local Ray (conftest.shared_ray)."""
    # workers cannot import this test module: ship its factory and Trainer subclass by value
    ship_by_value(sys.modules[__name__])
    yield


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
    assert kept == [f"checkpoint_{STEPS - CKPT_EVERY:08d}", f"checkpoint_{STEPS:08d}"]  # keep 2
    assert reference["starts"] == [(0, 0), (1, 0)]
    assert {"train/loss", "train/lr", "train/steps_per_sec"} <= set(result.metrics)


def _plugins_in_worker() -> tuple[bool, bool, bool]:
    import sys

    from debiaslab.diffusion.losses import LOSSES
    from debiaslab.registry import plugins_loaded

    return plugins_loaded(), "debiaslab.methods" in sys.modules, "cbdm" in LOSSES


def test_ray_workers_load_the_method_plugins_by_the_setup_hook(reference):
    """The CBDM reference run above trained on Ray Train although no worker-side module imports
    debiaslab.methods (test_layers): Ray's worker_process_setup_hook ran plugins.load() in every
    worker first. A plain task of the same cluster shows it."""
    import ray

    assert reference["result"].step == STEPS
    assert ray.get(ray.remote(_plugins_in_worker).remote()) == (True, True, True)


def test_ddp_matches_single_process_on_the_global_batch(reference, out_dir):
    """Same Trainer loop, same train.batch_size (the global batch): 2 gloo workers x 8 == 1
    process x 16 under CBDM (same y', label-dropout coin and noise per sample), up to float
    summation order."""
    cfg = reference["cfg"]
    single = Trainer(cfg, load_training_data(cfg), out_dir / "single", progress=False).fit()
    diff = max_abs_diff(reference["weights"], weights(single.checkpoint))
    print(f"max |w_ddp - w_single| = {diff:.3g}")
    assert diff < 1e-5  # measured 2.4e-7 under CBDM (fp32 summation order)


def rank_loss_factory(log_dir: Path) -> Any:
    """The real classifier factory, each rank appending "step loss" to rank<r>.log."""
    from debiaslab.training.factories import classifier_trainer

    def build(cfg: ExperimentConfig, **kwargs: Any) -> Any:
        trainer = classifier_trainer(cfg, **kwargs)
        train_step = trainer.train_step

        def recorded(batch: dict[str, torch.Tensor]) -> tuple[float, float]:
            loss, grad_norm = train_step(batch)
            with open(log_dir / f"rank{trainer.rank}.log", "a") as fh:
                fh.write(f"{trainer.step + 1} {loss!r}\n")
            if trainer.step + 1 == trainer.cfg.train.steps:  # words: Ray folds repeated lines
                print(f"{MARKER} {['first', 'second'][trainer.rank]} rank done", flush=True)
            return loss, grad_norm

        trainer.train_step = recorded
        return trainer

    return build


CLASSIFIER = ["classifier.model.net=encoder_classifier", "classifier.model.model_channels=8",
              "classifier.model.channel_mult=[1,2]", "classifier.model.attention_resolutions=[]",
              "classifier.model.head_channels=8", "classifier.model.class_conditional=false",
              "classifier.train.batch_size=16", "classifier.train.steps=6",
              "classifier.train.warmup_steps=0", "classifier.train.ema_decay=0",
              "classifier.train.checkpoint_every=6", "classifier.train.log_every=3",
              "classifier.train.device=cpu", "classifier.train.lr=3e-3",
              "classifier.label=attr:even"]


NOISE = ("TrainingReport", "Moving model to device",
         "Failed to query Ray Train Controller actor state")
MARKER = "debiaslab-worker-line"


def test_classifier_ddp_on_ray_train_equals_one_process(ray_cluster, out_dir, capfd):
    """The classifier trainer on Ray Train: 2 workers x 8 == 1 process x 16.

    Each rank's loss is the mean over its half of the global batch, so the mean of the two
    ranks' losses is the one-process loss, up to fp32 summation order (8 + 8 vs 16 terms, and
    weights drifting by ~1e-7): within 1e-5 relative. The weights are compared as a function
    (logits): attention key biases (``qkv.bias``) have an exactly zero gradient (softmax is
    shift-invariant), so Adam's normalised step turns summation noise into moves of up to lr
    there (measured 3.5e-4 for pool.qkv.bias, every other weight within 1e-5) without changing
    any output."""
    from debiaslab.distributed.train import train_distributed
    from debiaslab.training.classifier import (
        classifier_experiment,
        load_classifier,
        train_classifier,
    )
    from debiaslab.training.classifier_data import load_classifier_data

    cfg = classifier_experiment(make_cfg(out_dir, "clf", *CLASSIFIER))
    log_dir = out_dir / "clf-logs"
    log_dir.mkdir()
    t0 = time.perf_counter()
    result = train_distributed(cfg, tracking_uri=None, mlflow_run_id=None,
                               trainer_factory=rank_loss_factory(log_dir))
    print(f"classifier DDP fit: {time.perf_counter() - t0:.1f}s")
    assert Path(result.storage_dir).name == "clf.classifier" and result.step == 6
    # the driver's log holds the workers' own lines, and none of Ray Train's INFO lines or the
    # placement-group cleaner's State API warnings (forwarded lines may lag the fit a little)
    out, deadline = "", time.time() + 30
    done = [f"{MARKER} first rank done", f"{MARKER} second rank done"]
    while not all(d in out for d in done) and time.time() < deadline:
        captured = capfd.readouterr()
        out += captured.out + captured.err
        time.sleep(0.5)
    Path(out_dir / "clf-driver.log").write_text(out)
    assert all(d in out for d in done), out[-2000:]
    noisy = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy[:5]
    single = train_classifier(cfg, load_classifier_data(cfg), out_dir / "clf-single",
                              progress=False)
    ranks = []
    for r in (0, 1):
        rows = [line.split() for line in (log_dir / f"rank{r}.log").read_text().splitlines()]
        ranks.append({int(step): float(loss) for step, loss in rows})
    rel = max(abs((ranks[0][s] + ranks[1][s]) / 2 - loss) / loss
              for s, loss in single.train.losses.items())
    print(f"classifier max relative loss difference = {rel:.3g}")
    assert sorted(single.train.losses) == sorted(ranks[0]) == sorted(ranks[1]) == list(range(1, 7))
    assert rel < 1e-5  # measured 8.7e-8
    a, b = weights(result.checkpoint), weights(single.train.checkpoint)
    diff = max((a["model"][k] - b["model"][k]).abs().max().item()
               for k in a["model"] if not k.endswith("qkv.bias"))
    print(f"classifier max |w_ddp - w_single| (not qkv.bias) = {diff:.3g}")
    assert diff < 1e-4  # measured 8.4e-6 (cond.time_embed: tiny gradients, Adam-normalised)
    rows = load_classifier_data(cfg)
    x, t = rows.float_inputs(torch.arange(32)), torch.linspace(0, 999, 32)
    with torch.no_grad():
        ddp_logits = load_classifier(result.checkpoint)[0](x, t)
        single_logits = load_classifier(single.train.checkpoint)[0](x, t)
    logit_diff = (ddp_logits - single_logits).abs().max().item()
    print(f"classifier max |logits_ddp - logits_single| = {logit_diff:.3g}")
    assert logit_diff < 1e-5  # measured 1.2e-7
    assert load_checkpoint(result.checkpoint)["batch"] == {"global": 16, "world_size": 2}


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
    assert len(client.get_metric_history(reference["run_id"], "train/steps_per_sec")) \
        == STEPS // LOG_EVERY
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


def test_ray_workers_use_as_many_torch_threads_as_cpus_they_hold():
    """Ray Train sets no OMP_NUM_THREADS in its workers: without a limit torch takes every core
    of the node, and two 0.5-CPU workers on 2 cores ran at 0.55 steps/s instead of ~5."""
    import torch

    from debiaslab.distributed.runtime import limit_threads, threads_for

    assert [threads_for(c) for c in (0.25, 0.5, 1.0, 2.0, 3.7)] == [1, 1, 1, 2, 3]
    before = torch.get_num_threads()
    try:
        assert limit_threads(1.0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
