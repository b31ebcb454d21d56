"""The experiment runner: a config's whole recipe (or some of its stages) under the run folder's
lock, seeds of one setting, and Tune sweeps over the shared stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from debiaslab.config import ExperimentConfig
from debiaslab.data.locate import train_data_path
from debiaslab.errors import ConfigError
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
        from debiaslab.recipes import get_recipe

        if not any(s.name == "train" for s in get_recipe(c).stages):
            return  # a recipe without a score model (e.g. subgroup_classifier)
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


def reused_stages(cfg: ExperimentConfig) -> list[Any]:
    """The stages before ``train`` whose outputs the train stage reads besides the dataset
    (e.g. TIW-DSM's discriminator): a training trial reuses them from the base run."""
    from debiaslab.recipes import get_recipe

    stages = list(get_recipe(cfg).stages)
    names = [s.name for s in stages]
    if "train" not in names:
        return []
    train_stage = stages[names.index("train")]
    wanted = set(train_stage.inputs) - {"dataset"}
    return [s for s in stages[:names.index("train")] if wanted & set(s.outputs)]


def check_training_sweep(base: ExperimentConfig, params: list[str]) -> None:
    """A training sweep may not vary what a reused earlier stage is made from: its trials
    would train against the base run's output made with other values."""
    for stage in reused_stages(base):
        for param in params:
            for key in stage.key_names():
                if param == key or (key.endswith(".") and param.startswith(key)):
                    raise ConfigError(
                        f"params.{param}: it defines the {stage.name} stage ({key}), which "
                        f"training trials reuse from the base run; sweep it with separate "
                        f"experiments (debiaslab run --set {param}=...)")


def train_inputs(base: ExperimentConfig, params: list[str]) -> dict[str, dict[str, str]]:
    """What a training trial's train stage reads from the base run's earlier stages, bound as
    the recipe binds them (``cfg.inputs``), each re-hashed from its file now. Refuses a base
    run that has not produced them yet."""
    from debiaslab.recipes import get_recipe, make_artifact, recorded_outputs

    check_training_sweep(base, params)
    stages = list(get_recipe(base).stages)
    train_stage = next(s for s in stages if s.name == "train")
    recorded = recorded_outputs(base)
    out = {}
    for name, kind in train_stage.inputs.items():
        if name == "dataset":
            continue
        if name not in recorded:
            raise ConfigError(f"experiment {base.name}: its {name} is not built yet; run the "
                              f"base experiment first (debiaslab run -c <its config>)")
        artifact = make_artifact(kind, recorded[name])
        out[name] = {"path": artifact.path, "hash": artifact.hash}
    return out


def trial_ops() -> Any:
    """The stage functions Tune trials run (handed to distributed.sweep, which never imports
    this module)."""
    from debiaslab.distributed.sweep import TrialOps
    from debiaslab.recipes import recorded_outputs

    return TrialOps(train=train, sample=sample, evaluate_samples=evaluate_samples,
                    build_metric_extractor=build_metric_extractor, reference_path=reference_path,
                    recorded_outputs=recorded_outputs, train_inputs=train_inputs)


def run_sweep(sweep_file: str | Path, overrides: list[str] | None = None, *,
              progress: bool = True) -> Any:
    """Run (or resume) a Ray Tune + Optuna sweep (distributed.sweep.run_sweep)."""
    from debiaslab.distributed.sweep import run_sweep as tune_sweep

    return tune_sweep(sweep_file, overrides, ops=trial_ops(), progress=progress)
