"""The stage sequence every diffusion recipe shares, with the places methods insert their own."""

from __future__ import annotations

from typing import Any

from debiaslab.config import training_keys
from debiaslab.stages.data import data_stage
from debiaslab.stages.evaluate import evaluate_stage
from debiaslab.stages.sample import sample_stage
from debiaslab.stages.train import train_stage


def diffusion_stages(sample_inputs: dict[str, str] | None = None,
                     extra: tuple[Any, ...] = (), evaluate_inputs: dict[str, str] | None = None,
                     evaluate_keys: tuple[str, ...] = (), *, before_train: tuple[Any, ...] = (),
                     train_inputs: dict[str, str] | None = None,
                     train_keys: tuple[str, ...] = ()) -> tuple[Any, ...]:
    """data -> [before_train] -> train -> [extra] -> sample -> evaluate.

    ``before_train``: stages the score model's training reads (e.g. a discriminator its loss
    uses), with ``train_inputs`` the artifacts the train stage takes from them (bound into its
    config, ``cfg.inputs``, so Ray Train workers get them) and ``train_keys`` config keys that
    define the model besides the training sections; ``extra``: stages between train and
    sample; ``sample_inputs`` adds inputs of the sample stage (e.g. a guidance classifier's
    checkpoint), ``evaluate_inputs`` and ``evaluate_keys`` what the recipe's own evaluation
    (Recipe.evaluation) reads. The recipe checks that every input is produced earlier."""
    from debiaslab.recipes import Stage

    extra_train_keys = tuple(train_keys)
    return (
        Stage("data", data_stage, outputs={"dataset": "dataset"}, keys=("data.",),
              description="build the (imbalanced) dataset"),
        *before_train,
        Stage("train", train_stage, inputs={"dataset": "dataset", **(train_inputs or {})},
              outputs={"score_model": "checkpoint"},
              keys=(lambda: training_keys() + extra_train_keys) if extra_train_keys
              else training_keys,
              description="train the score model"),
        *extra,
        Stage("sample", sample_stage,
              inputs={"score_model": "checkpoint", **(sample_inputs or {})},
              outputs={"samples": "samples"}, keys=("sample.",),
              description="sample with every configured sampler and guidance"),
        Stage("evaluate", evaluate_stage,
              inputs={"samples": "samples", **(evaluate_inputs or {})},
              outputs={"evaluation": "evaluation"}, keys=("metrics.", *evaluate_keys),
              description="quality, fairness and minority metrics against the reference"),
    )
