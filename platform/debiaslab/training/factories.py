"""Trainer factories for Ray Train workers (distributed.train.train_distributed): module-level
functions, so Ray pickles them by reference, that build one worker's `Trainer` from the config
alone; each loads its data inside the worker, never from the driver's memory."""

from __future__ import annotations

from typing import Any

from debiaslab.config import ExperimentConfig


def score_trainer(cfg: ExperimentConfig, **kwargs: Any) -> Any:
    """The score-model `Trainer` on the experiment's training data. Keyword arguments: run_dir
    and the `Trainer`'s (rank, world_size, device, prepare_model, on_metrics, on_report, ...)."""
    from debiaslab.data.locate import load_training_data
    from debiaslab.training.loop import Trainer

    return Trainer(cfg, load_training_data(cfg), kwargs.pop("run_dir"), **kwargs)


def classifier_trainer(cfg: ExperimentConfig, **kwargs: Any) -> Any:
    """The classifier `Trainer` of a classifier run's config (training.classifier
    .classifier_experiment) on the training part of its stratified split: labels (and features)
    resolved from ``cfg.classifier`` against the experiment's dataset folder."""
    from debiaslab.training.classifier import ClassifierTask
    from debiaslab.training.classifier_data import load_classifier_data, split_data
    from debiaslab.training.loop import Trainer

    train_rows, _ = split_data(cfg, load_classifier_data(cfg))
    return Trainer(cfg, ClassifierTask(cfg, train_rows), kwargs.pop("run_dir"), **kwargs)
