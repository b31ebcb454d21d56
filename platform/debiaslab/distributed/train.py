"""Ray Train (DDP) around the shared training loop: every worker runs the same `Trainer`.

Checkpoints go through ``ray.train.report`` into ``storage_path/<name>``; re-running with the same
name resumes from the latest one. Rank 0 logs ``train/...`` metrics to the driver's MLflow run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from debiaslab.checkpoints import TRAINER_KEYS, latest_checkpoint, load_checkpoint
from debiaslab.config import ExperimentConfig, absolute_paths, from_saved_dict, to_dict
from debiaslab.distributed.runtime import init_ray, limit_threads, shutdown_ray
from debiaslab.errors import ConfigError
from debiaslab.training.factories import classifier_trainer, score_trainer  # noqa: F401

RAY_RESULTS_DIR = "ray_results"
CHECKPOINT_DIR_PREFIX = "checkpoint_"


class TrainerLike(Protocol):
    """What the worker loop needs: the shared `Trainer` (score model or classifier task)."""

    device: Any

    def fit(self) -> Any: ...

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None: ...


# Builds one worker's trainer. Keyword arguments: run_dir, rank, world_size, device,
# prepare_model, on_metrics, on_report, progress (all accepted by `Trainer`). Module-level
# functions (training.factories: score_trainer, classifier_trainer) pickle by reference.
TrainerFactory = Callable[..., TrainerLike]


@dataclass
class DistributedTrainResult:
    """A finished Ray Train run: final step, checkpoint in Ray storage, last reported metrics."""

    step: int
    checkpoint: Path | None  # the checkpoint file (``ckpt_<step>.pt``) inside Ray storage
    checkpoint_uri: str | None  # the Ray checkpoint directory (a URI for remote storage)
    metrics: dict[str, float] = field(default_factory=dict)
    storage_dir: str = ""  # <storage_path>/<run name>


def storage_path(cfg: ExperimentConfig) -> str:
    """Absolute Ray Train storage: ``distributed.storage_path`` or ``<output_dir>/ray_results``.

    URIs (``s3://``, ``gs://``, ...) pass through; local paths are made absolute (Ray refuses
    relative ones).
    """
    raw = cfg.distributed.storage_path
    if "://" in raw:
        return raw
    path = Path(raw) if raw else Path(cfg.output_dir) / RAY_RESULTS_DIR
    return str(path.expanduser().resolve())


def _cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(setting: str) -> bool:
    """``auto``: GPU iff the Ray cluster has GPUs (Ray must be initialized)."""
    if setting == "auto":
        return _cluster_has_gpus()
    return setting == "true"


def train_distributed(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    trainer_factory: TrainerFactory = score_trainer,
) -> DistributedTrainResult:
    """Train with a Ray `TorchTrainer` (gloo on CPU, NCCL on GPU) of ``distributed.num_workers``
    that split the global ``train.batch_size``.

    The driver owns the MLflow run: pass its id (and URI; default the embedded store under
    ``output_dir``) and rank 0 logs to it; workers never create runs. Starts a local Ray (or
    joins ``distributed.address``) unless one is running, and shuts down only what it started.
    """
    d = cfg.distributed
    if cfg.train.batch_size % d.num_workers:  # before any worker starts (and fails alike)
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                          f"distributed.num_workers={d.num_workers}")
    started = False
    import ray

    if not ray.is_initialized():
        init_ray(d.address, object_store_memory_gb=d.object_store_memory_gb)
        started = True
    try:
        return _fit(cfg, tracking_uri, mlflow_run_id, trainer_factory)
    finally:
        if started:
            shutdown_ray()


def _fit(cfg: ExperimentConfig, tracking_uri: str | None, mlflow_run_id: str | None,
         trainer_factory: TrainerFactory) -> DistributedTrainResult:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from debiaslab.distributed.torch_loopback import LoopbackTorchConfig
    from debiaslab.tracking import Tracker, resolve_tracking_uri

    cfg = absolute_paths(cfg)  # workers may run in another folder (or on another node)
    d = cfg.distributed
    use_gpu = resolve_use_gpu(d.use_gpu)
    if mlflow_run_id is not None:
        tracking_uri = tracking_uri or resolve_tracking_uri(cfg.output_dir)
    storage = storage_path(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg), "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
            "trainer_factory": trainer_factory,
        },
        torch_config=LoopbackTorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=d.num_workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": d.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=d.max_failures),
            # Ray Train's own INFO lines ("Moving model to device", ...) stay in its log files;
            # the driver's log gets our progress lines and real warnings
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    ckpt_file = ckpt_uri = None
    if result.checkpoint is not None:
        ckpt_uri = result.checkpoint.path
        if "://" not in storage:
            ckpt_file = latest_checkpoint(ckpt_uri)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out = DistributedTrainResult(step=int(metrics.get("step", 0)), checkpoint=ckpt_file,
                                 checkpoint_uri=ckpt_uri, metrics=metrics,
                                 storage_dir=str(result.path))
    if mlflow_run_id is not None and ckpt_uri is not None:  # large files stay in Ray storage
        with Tracker(cfg.output_dir, cfg.tracking.experiment, tracking_uri=tracking_uri,
                     run_id=mlflow_run_id) as tracker:
            tracker.set_tags({"checkpoint": ckpt_file or ckpt_uri, "ray.storage": out.storage_dir})
    return out


# ------------------------------------------------------------------------------ worker side


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: build the trainer, resume from Ray's checkpoint, fit, report."""
    import ray.train
    import ray.train.torch

    _quiet_report_lines()
    cfg = from_saved_dict(config["cfg"])
    limit_threads(cfg.distributed.cpus_per_worker)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    _remove_dead_staging(cfg.name)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{cfg.name}-p{os.getpid()}-"))
    tracker = None
    try:
        on_metrics = None
        if rank == 0 and config.get("mlflow_run_id"):
            from debiaslab.tracking import Tracker

            tracker = Tracker(cfg.output_dir, cfg.tracking.experiment,
                              tracking_uri=config["tracking_uri"],
                              run_id=config["mlflow_run_id"], end_run=False)
            on_metrics = lambda step, metrics: tracker.log_metrics(metrics, step)  # noqa: E731

        def on_report(step: int, metrics: dict[str, float], saved: Path | None) -> None:
            _report(step, metrics, saved, staging)

        trainer = config["trainer_factory"](
            cfg, run_dir=staging, rank=rank, world_size=world_size,
            device=ray.train.torch.get_device(), prepare_model=ray.train.torch.prepare_model,
            on_metrics=on_metrics, on_report=on_report, progress=False,
        )
        restored = ray.train.get_checkpoint()
        if restored is not None:
            with restored.as_directory() as folder:
                path = latest_checkpoint(folder)
                if path is not None:
                    trainer.load_state_dict(load_checkpoint(path, trainer.device,
                                                            required=TRAINER_KEYS), path)
        trainer.fit()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quiet_report_lines() -> None:
    """Ray Train logs every ``ray.train.report`` ("Reporting training result N:
    TrainingReport(...)") at INFO with a logger named by its file path, outside the ray.train
    tree that LoggingConfig sets; Train configures worker logging before this function runs, so
    the level set here holds."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray Train layout: LoggingConfig covers what it can
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


STAGING_PREFIX = "debiaslab-"


def _remove_dead_staging(name: str) -> None:
    """Staging folders (checkpoints before Ray copies them) of workers killed with -9."""
    from debiaslab.checkpoints import pid_alive

    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{name}-p*-*"):
        pid = folder.name[len(f"{STAGING_PREFIX}{name}-p"):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _report(step: int, metrics: dict[str, float], saved: Path | None, staging: Path) -> None:
    """Every rank reports (a barrier); rank 0 attaches its checkpoint file as a directory."""
    import ray.train
    from ray.train import Checkpoint

    payload = {**metrics, "step": step}
    if saved is None:
        ray.train.report(payload)
        return
    folder = Path(tempfile.mkdtemp(prefix="report-", dir=staging))
    try:
        try:
            os.link(saved, folder / saved.name)  # same filesystem: no copy
        except OSError:
            shutil.copy2(saved, folder / saved.name)
        ray.train.report(payload, checkpoint=Checkpoint.from_directory(str(folder)),
                         checkpoint_dir_name=f"{CHECKPOINT_DIR_PREFIX}{step:08d}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
