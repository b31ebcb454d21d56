"""The experiment runner: a config's whole recipe (or some of its stages) under the run folder's
lock, seeds of one setting, and Tune sweeps over the shared stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from debiaslab.config import ExperimentConfig
from debiaslab.data.locate import train_data_path
from debiaslab.stages.common import StageResult
from debiaslab.stages.evaluate import build_metric_extractor, evaluate_samples, reference_path
from debiaslab.stages.sample import sample
from debiaslab.stages.train import check_resumable, train


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """Tags that let `debiaslab compare` group seeds of one setting and name the method."""
    from debiaslab.compare import GROUP_TAG, METHOD_TAG, SEED_TAG

    return {GROUP_TAG: cfg.tracking.group or cfg.name, SEED_TAG: str(cfg.train.seed),
            METHOD_TAG: cfg.recipe}


def seed_configs(cfg_path: str | None, overrides: list[str], seeds: list[int]
                 ) -> list[ExperimentConfig]:
    """One config per training seed: ``train.seed=s``, name ``<name>-s<s>``, one group."""
    from debiaslab.config import load_config

    base = load_config(cfg_path, overrides)
    group = base.tracking.group or base.name
    return [load_config(cfg_path, [*overrides, f"train.seed={s}", f"name={base.name}-s{s}",
                                   f"tracking.group={group}"]) for s in seeds]


def run_experiment(cfg: ExperimentConfig, *, progress: bool = True, stages: Any = (),
                   force: bool = False) -> StageResult:
    """Run the config's recipe (or only ``stages``): one MLflow parent run, a child per stage,
    stages whose inputs are unchanged skipped. Holds the run folder's lock throughout."""
    from debiaslab.recipes import run_recipe
    from debiaslab.runlock import run_lock

    def preflight(c: ExperimentConfig) -> None:
        if not stages or "train" in stages:
            if (train_data_path(c) / "dataset.json").is_file():
                check_resumable(c)  # before an MLflow run records a config that won't apply

    with run_lock(cfg.run_dir):
        done = run_recipe(cfg, only=stages, force=force, progress=progress,
                          parent_tags=run_tags(cfg), before=preflight)
    result = StageResult(run_dir=cfg.run_dir, mlflow_run_id=done.mlflow_run_id,
                         metrics=dict(done.metrics), seconds=dict(done.seconds))
    for output in done.stages.values():
        part = output.result
        if isinstance(part, StageResult):
            result.checkpoint = part.checkpoint or result.checkpoint
            result.artifacts.update(part.artifacts)
            result.evaluations.update(part.evaluations)
    if "score_model" in done.outputs and result.checkpoint is None:
        result.checkpoint = Path(done.outputs["score_model"].path)
    return result


def trial_ops() -> Any:
    """The stage functions Tune trials run (handed to distributed.sweep, which never imports
    this module)."""
    from debiaslab.distributed.sweep import TrialOps
    from debiaslab.recipes import recorded_outputs

    return TrialOps(train=train, sample=sample, evaluate_samples=evaluate_samples,
                    build_metric_extractor=build_metric_extractor, reference_path=reference_path,
                    recorded_outputs=recorded_outputs)


def run_sweep(sweep_file: str | Path, overrides: list[str] | None = None, *,
              progress: bool = True) -> Any:
    """Run (or resume) a Ray Tune + Optuna sweep (distributed.sweep.run_sweep)."""
    from debiaslab.distributed.sweep import run_sweep as tune_sweep

    return tune_sweep(sweep_file, overrides, ops=trial_ops(), progress=progress)
