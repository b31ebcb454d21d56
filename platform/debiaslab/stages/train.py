"""The train stage: the score model, on the local Trainer or Ray Train, with the resume checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from debiaslab.config import ExperimentConfig, dump_yaml
from debiaslab.data.locate import load_training_data, train_data_path
from debiaslab.errors import DataError
from debiaslab.fileio import write_text_atomic
from debiaslab.progress import log
from debiaslab.stages.common import StageResult, on_ray


def resume_point(cfg: ExperimentConfig, backend: str | None = None) -> Path | None:
    """The checkpoint a training run of ``cfg`` would resume from (local or Ray storage)."""
    from debiaslab.checkpoints import latest_intact_checkpoint, list_checkpoints

    if not on_ray(cfg, "train", backend):
        return latest_intact_checkpoint(cfg.run_dir / "checkpoints")
    from debiaslab.distributed.train import storage_path

    storage = storage_path(cfg)
    if "://" in storage:
        return None  # remote storage: the workers check when they restore
    found = [c for folder in sorted((Path(storage) / cfg.name).glob("checkpoint_*"))
             for c in list_checkpoints(folder)]
    return max(found)[1] if found else None


def check_resumable(cfg: ExperimentConfig, backend: str | None = None) -> dict[str, tuple]:
    """Before any MLflow run is opened: refuse a resume that would change what the run means
    (training.resume); returns the changes train.resume_allow accepted."""
    from debiaslab.checkpoints import TRAINER_KEYS, load_checkpoint
    from debiaslab.training.resume import check_resume

    latest = resume_point(cfg, backend)
    if latest is None:
        return {}
    from debiaslab.data.schema import read_manifest

    state = load_checkpoint(latest, required=TRAINER_KEYS)
    return check_resume(cfg, state, latest, read_manifest(train_data_path(cfg)).content_hash)


def train(cfg: ExperimentConfig, *, tracker: Any = None, progress: bool = True,
          backend: str | None = None) -> StageResult:
    """Train ``cfg`` on its built dataset in this process (Ray Train reuses the same Trainer),
    holding the run folder's lock; orphaned temp files of killed writers are removed first."""
    from debiaslab.runlock import run_lock

    with run_lock(cfg.run_dir):
        return _train(cfg, tracker=tracker, progress=progress, backend=backend)


def _train(cfg: ExperimentConfig, *, tracker: Any = None, progress: bool = True,
           backend: str | None = None) -> StageResult:
    from debiaslab.checkpoints import remove_orphan_temps
    from debiaslab.training.loop import Trainer
    from debiaslab.training.resume import describe_changes

    dataset = load_training_data(cfg)
    changes = check_resumable(cfg, backend)
    for path in remove_orphan_temps(cfg.run_dir / "checkpoints"):
        log(f"removed {path.name}, left by a writer that was killed")
    on_metrics: Callable[[int, dict[str, float]], None] | None = None
    if tracker is not None:
        tracker.log_dataset(dataset.content_hash, "train", str(train_data_path(cfg)))
        on_metrics = lambda step, metrics: tracker.log_metrics(metrics, step)
        if changes:
            tracker.set_tag("debiaslab.resume_changes", describe_changes(changes))
    if changes:
        log(f"resuming with changed {', '.join(changes)} (train.resume_allow)")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    if on_ray(cfg, "train", backend):
        from debiaslab.distributed.train import train_distributed

        log(f"training on Ray Train: {cfg.distributed.num_workers} worker(s)")
        dist = train_distributed(
            cfg, tracking_uri=tracker.tracking_uri if tracker is not None else None,
            mlflow_run_id=tracker.run_id if tracker is not None else None)
        if tracker is not None:
            tracker.set_tag("checkpoint", str(dist.checkpoint_uri))
        final = dist.metrics.get("train/loss")  # rank 0 already logged the per-step metrics
        return StageResult(run_dir=run_dir, checkpoint=dist.checkpoint,
                           metrics={} if final is None else {"train/final_loss": float(final)})
    trainer = Trainer(cfg, dataset, run_dir, on_metrics=on_metrics, progress=progress)
    result = trainer.fit()
    losses = list(result.losses.values())
    metrics = {"train/final_loss": sum(losses[-50:]) / max(len(losses[-50:]), 1)} if losses else {}
    if tracker is not None:
        tracker.set_tag("checkpoint", str(result.checkpoint))
    return StageResult(run_dir=run_dir, checkpoint=result.checkpoint, metrics=metrics)


def train_stage(cfg: ExperimentConfig, ctx: Any) -> Any:
    """Train the score model (local Trainer or Ray Train, see recipes.backend_of)."""
    from debiaslab.recipes import StageOutput, make_artifact

    result = train(cfg, tracker=ctx.tracker, progress=ctx.progress, backend=ctx.backend)
    if result.checkpoint is None:
        raise DataError(f"{cfg.run_dir}: training wrote no checkpoint")
    return StageOutput(artifacts={"score_model": make_artifact("checkpoint", result.checkpoint)},
                       metrics=dict(result.metrics), result=result)
