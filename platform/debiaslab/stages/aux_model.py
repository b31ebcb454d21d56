"""The auxiliary-model stage: any number per recipe, each a classifier with its own config
section, run and output artifact (Ray Train or this process)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from debiaslab.config import ExperimentConfig, dump_yaml
from debiaslab.errors import DataError
from debiaslab.fileio import write_text_atomic
from debiaslab.progress import log
from debiaslab.stages.common import StageResult
from debiaslab.training.factories import classifier_trainer


@dataclass(frozen=True)
class AuxModelKind:
    """How one kind of auxiliary model trains and is validated (the noise-conditional
    classifier by default; a method may bring its own, e.g. TIW-DSM's discriminator).

    - ``train_local(ccfg, on_metrics=, progress=) -> (checkpoint, evaluation)``: train in this
      process on the run config ``ccfg`` and validate the final weights;
    - ``ray_factory(ccfg, **kwargs) -> Trainer``: a module-level function (Ray pickles it by
      reference) that builds one Ray Train worker's Trainer from the config alone;
    - ``validate_checkpoint(ccfg, checkpoint, device) -> (checkpoint, evaluation)``: the
      validation of a trained run's final checkpoint on the held-out rows; a kind may pick
      another checkpoint of the run there (the one it returns is the stage's output).
    ``train_local`` may pick likewise.
    An evaluation is the dict of ``training.classifier_eval.evaluate_classifier``: per bucket
    ``t_lo``, ``t_hi``, ``accuracy``, ``loss``, ``count``, and ``accuracy_mean``, ``loss_mean``;
    a kind may add ``extra_metrics`` ({name: value}), logged with them.
    """

    train_local: Callable[..., tuple[Any, dict[str, Any]]]
    ray_factory: Callable[..., Any]
    validate_checkpoint: Callable[..., tuple[Any, dict[str, Any]]]


def _train_classifier_here(ccfg: ExperimentConfig, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    from debiaslab.training.classifier import train_classifier
    from debiaslab.training.classifier_data import load_classifier_data

    result = train_classifier(ccfg, load_classifier_data(ccfg), ccfg.run_dir, **kwargs)
    return result.train.checkpoint, result.evaluation


def _validate_classifier(ccfg: ExperimentConfig, checkpoint: Any, device: Any
                         ) -> tuple[Any, dict[str, Any]]:
    from debiaslab.training.classifier import validate_checkpoint

    return checkpoint, validate_checkpoint(ccfg, checkpoint, device)


CLASSIFIER = AuxModelKind(_train_classifier_here, classifier_trainer, _validate_classifier)


def train_aux_model(cfg: ExperimentConfig, ctx: Any, *, section: str = "classifier",
                    name: str = "classifier", artifact: str = "classifier",
                    kind: AuxModelKind = CLASSIFIER) -> Any:
    """Train the auxiliary model of config section ``section`` (a classifier section) in its
    own run ``<name>.<stage name>`` (Ray Train or this process, as ``ctx.backend`` says), then
    validate it per timestep bucket on the held-out rows (plot). Output: checkpoint
    ``artifact``."""
    from debiaslab.checkpoints import remove_orphan_temps
    from debiaslab.recipes import StageOutput, make_artifact
    from debiaslab.report import save_figure
    from debiaslab.runlock import run_lock
    from debiaslab.training.classifier import classifier_experiment
    from debiaslab.training.classifier_eval import evaluation_metrics, plot_classifier_evaluation

    ccfg = classifier_experiment(cfg, section, run_suffix=name)
    tracker = ctx.tracker
    with run_lock(ccfg.run_dir):
        ccfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(ccfg.run_dir / "config.yaml", dump_yaml(ccfg))
        for path in remove_orphan_temps(ccfg.run_dir / "checkpoints"):
            log(f"removed {path.name}, left by a writer that was killed")
        if ctx.backend == "ray":
            from debiaslab.distributed.train import train_distributed

            log(f"{name} on Ray Train: {cfg.distributed.num_workers} worker(s)")
            dist = train_distributed(
                ccfg, tracking_uri=tracker.tracking_uri if tracker is not None else None,
                mlflow_run_id=tracker.run_id if tracker is not None else None,
                trainer_factory=kind.ray_factory)
            checkpoint = dist.checkpoint
            if checkpoint is None:
                raise DataError(f"{dist.storage_dir}: the {name} run left no local "
                                f"checkpoint (remote storage is not supported for guidance)")
            checkpoint, evaluation = kind.validate_checkpoint(ccfg, checkpoint,
                                                              ccfg.train.device)
        else:
            on_metrics = ((lambda step, m: tracker.log_metrics(m, step))
                          if tracker is not None else None)
            checkpoint, evaluation = kind.train_local(ccfg, on_metrics=on_metrics,
                                                      progress=ctx.progress)
    metrics = {f"{name}/{k}": v for k, v in evaluation_metrics(evaluation).items()}
    # a kind's own validation numbers (e.g. the discriminator's importance-weight diagnostics)
    metrics.update({f"{name}/{k}": float(v)
                    for k, v in evaluation.get("extra_metrics", {}).items()})
    plot = save_figure(plot_classifier_evaluation(
        evaluation, title=f"{ccfg.name}: validation per timestep"),
        ccfg.run_dir / "validation_per_timestep.png")
    log(f"{name} validation accuracy {evaluation['accuracy_mean']:.3f} "
        f"(per bucket: {', '.join(f'{a:.2f}' for a in evaluation['accuracy'])})")
    if tracker is not None:
        tracker.log_metrics(metrics, step=ccfg.train.steps)
        tracker.log_artifact(plot, "plots")
        tracker.set_tag("checkpoint", str(checkpoint))
    summary = {f"{name}/val/accuracy": metrics[f"{name}/val/accuracy"]}
    return StageOutput(artifacts={artifact: make_artifact("checkpoint", checkpoint)},
                       metrics=summary, result=StageResult(
                           run_dir=ccfg.run_dir,
                           artifacts={f"{name}_validation": Path(plot)}))


def aux_model_keys(section: str) -> tuple[str, ...]:
    """What defines an auxiliary model trained on noisy images: its section, the forward process
    it is noised with and the global batch split."""
    return (f"{section}.", "diffusion.schedule", "diffusion.num_timesteps",
            "distributed.num_workers")


def aux_model_stage(name: str = "classifier", *, section: str | None = None,
                    artifact: str | None = None, inputs: dict[str, str] | None = None,
                    keys: tuple[str, ...] = (),
                    configure: Callable[[ExperimentConfig], ExperimentConfig] | None = None,
                    backend: str = "ray", description: str = "",
                    kind: AuxModelKind = CLASSIFIER) -> Any:
    """A stage that trains one auxiliary model (a classifier on noisy images or on a feature
    table; Ray Train by default): config section ``section`` (default: the stage name), run
    ``<name>.<stage name>``, output checkpoint ``artifact`` (default: the stage name), which
    guidance entries name with ``artifact:``. A recipe may hold any number of them, anywhere
    the data flow allows. ``configure``: adjusts the config first (e.g. binds the label column
    of a side table an earlier stage wrote); ``keys``: config keys beyond the section's;
    ``kind``: how the model trains and validates (:class:`AuxModelKind`, default a classifier)."""
    from debiaslab.recipes import Stage

    section = section or name
    artifact = artifact or name

    def run(cfg: ExperimentConfig, ctx: Any) -> Any:
        return train_aux_model(configure(cfg) if configure is not None else cfg, ctx,
                               section=section, name=name, artifact=artifact, kind=kind)

    return Stage(name, run, inputs={"dataset": "dataset", **(inputs or {})},
                 outputs={artifact: "checkpoint"}, keys=aux_model_keys(section) + tuple(keys),
                 backend=backend, run_suffix=name,  # type: ignore[arg-type]
                 description=description or f"train the auxiliary model of cfg.{section}")
